"""Fréchet Video Distance (Unterthiner et al., 2018) with the Kinetics-400 Inception-I3D.

The standard protocol: uint8 RGB videos ``[N, T, H, W, 3]`` (``T >= 9``, usually 16 frames) have
every frame resized to 224x224, are scaled to [-1, 1] and go through I3D; the 400 Kinetics
logits (averaged over time by the network) are the features, and FVD is the squared Fréchet
distance between Gaussians fitted to the two feature sets (``frechet.py``).

Resizing is bilinear without antialiasing, straight to 224x224 whatever the aspect ratio (no
crop), as in the reference TF code and the common PyTorch ports. The sampling grid uses
half-pixel centers (``jax.image.resize``, same as ``tf.image.resize`` in TF2 and
``F.interpolate(align_corners=False)``); the original TF1 ``resize_bilinear`` used the legacy
corner-aligned grid, a sub-pixel shift that changes FVD by a small fraction. Grayscale videos
``[..., 1]`` are repeated to 3 channels.

FVD is biased upward for small sample sets (the covariances are 400x400); compare numbers only
at equal set sizes (papers use 2048 or more videos per set).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nested_decode.data import pixels
from nested_decode.metrics import frechet
from nested_decode.networks import compiled, i3d

FEATURE_DIM = i3d.NUM_CLASSES


def check_videos(videos) -> np.ndarray:
  """``videos`` as a uint8 numpy array ``[N, T, H, W, C]`` with ``C`` in (1, 3), else ValueError."""
  videos = np.asarray(videos)
  if (videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] not in (1, 3)
      or videos.shape[1] < i3d.MIN_FRAMES or 0 in videos.shape):
    raise ValueError(
        f'expected uint8 videos [N, T >= {i3d.MIN_FRAMES}, H, W, 3 or 1], got {videos.dtype} '
        f'with shape {videos.shape}')
  return videos


def preprocess(videos: jax.Array) -> jax.Array:
  """uint8 ``[B, T, H, W, C]`` -> float32 ``[B, T, 224, 224, 3]`` in [-1, 1] (bilinear resize)."""
  x = pixels.to_float(videos)  # scaling first: bilinear resizing is affine-equivariant
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  size = (i3d.IMAGE_SIZE, i3d.IMAGE_SIZE)
  if x.shape[2:4] != size:
    x = jax.image.resize(x, x.shape[:2] + size + (3,), method='bilinear', antialias=False)
  return x


def _logits(variables, videos: jax.Array) -> jax.Array:
  return i3d.InceptionI3D().apply(variables, preprocess(videos))


class I3DFeatures:
  """FVD features (I3D logits ``[N, 400]``) of uint8 videos; loads the weights once.

  Batches are padded to one size, so each video shape compiles once.
  """

  def __init__(self, variables=None):
    self.variables = jax.device_put(variables if variables is not None else i3d.load_variables())
    self._logits = compiled.CompiledPerShape(_logits)

  def __call__(self, videos, batch_size: int = 8) -> np.ndarray:
    """float32 features ``[N, 400]`` of uint8 ``videos [N, T, H, W, 3 or 1]``."""
    videos = check_videos(videos)
    if batch_size < 1:
      raise ValueError(f'batch_size must be positive, got {batch_size}')
    batch_size = min(batch_size, videos.shape[0])
    features = []
    for start in range(0, videos.shape[0], batch_size):
      batch = videos[start:start + batch_size]
      padded = np.pad(batch, [(0, batch_size - batch.shape[0])] + [(0, 0)] * 4)
      features.append(np.asarray(self._logits(self.variables, padded))[:batch.shape[0]])
    return np.concatenate(features)


@functools.cache
def default_features() -> I3DFeatures:
  """One shared ``I3DFeatures`` with the Kinetics-400 weights, loaded on first use."""
  return I3DFeatures()


def fvd(videos_a, videos_b, *, batch_size: int = 8,
        features: I3DFeatures | None = None) -> float:
  """FVD between two sets of uint8 videos ``[N, T, H, W, 3 or 1]`` (at least 2 videos each).

  The sets may differ in size and resolution. ``features`` defaults to ``default_features()``.
  """
  if features is None:
    features = default_features()
  videos_a, videos_b = check_videos(videos_a), check_videos(videos_b)
  if min(videos_a.shape[0], videos_b.shape[0]) < 2:
    raise ValueError(f'FVD needs at least 2 videos per set, got shapes {videos_a.shape} and '
                     f'{videos_b.shape}')
  return frechet.frechet_distance_from_features(features(videos_a, batch_size),
                                                features(videos_b, batch_size))
