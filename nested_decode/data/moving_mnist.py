"""Moving MNIST generated from the embedded MNIST digits, the same on every machine.

Each clip has ``num_digits`` (2) digits of 28 x 28 moving in a ``size`` (64) squared frame for
``num_frames`` (20) frames: a digit starts at a uniformly random top-left position, moves by a
constant velocity of 1 to 3 pixels per frame along each axis (random signs), and bounces off the
borders (the position is reflected and that velocity component flips), so it always lies wholly
inside the frame. Digits are drawn from the ``'train'`` MNIST split for the training set and
from ``'eval'`` for the evaluation set, and overlapping digits combine with ``max``.

Randomness: every number of clip ``i`` is SplitMix64 of ``(seed, i, which number)``, an integer
hash that does not depend on NumPy's generator streams, and positions use only additions,
multiplications and rounding (no ``sin``/``cos``, whose last bit may differ between machines).
So clip ``i`` is the same on every machine, NumPy release and for any ``num_clips`` (a smaller
set is a prefix of a larger one). The default seeds differ per split (``SEEDS``).
"""

import functools

import numpy as np

from nested_decode.data import mnist, pipeline

DIGIT_SIZE = mnist.SOURCE_SIZE
SEEDS = {'train': 20240611, 'eval': 20240612}
SPEED_RANGE = (1.0, 3.0)  # pixels per frame along each axis
_NUMBERS_PER_DIGIT = 8  # per clip and digit: which digit, row, column, 2 speeds, 2 signs
_MASK64 = 0xFFFFFFFFFFFFFFFF


def _splitmix64(seed: int, counters: np.ndarray) -> np.ndarray:
  """Output ``counter + 1`` of SplitMix64 seeded with ``seed``, for each counter (uint64)."""
  z = (np.uint64(seed & _MASK64)
       + (counters.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15))
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def _uniform(seed: int, num_clips: int, num_digits: int) -> np.ndarray:
  """float64 ``[num_clips, num_digits, _NUMBERS_PER_DIGIT]`` uniform in ``[0, 1)``."""
  per_clip = num_digits * _NUMBERS_PER_DIGIT
  counters = np.arange(num_clips * per_clip, dtype=np.uint64)
  # Clip i's counters start at i * per_clip, so clip i does not depend on num_clips.
  bits = _splitmix64(seed, counters) >> np.uint64(11)  # the top 53 bits: exact in a float64
  return (bits.astype(np.float64) * 2.0**-53).reshape(num_clips, num_digits, _NUMBERS_PER_DIGIT)


def _check_split(split: str) -> None:
  if split not in mnist.SPLITS:
    raise ValueError(f'Unknown Moving MNIST split {split!r}; expected one of {mnist.SPLITS}')


def layout(split: str, num_clips: int, num_frames: int = 20, size: int = 64,
           seed: int | None = None, num_digits: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """Which digits each clip shows and where.

  Returns:
    ``digit_indices`` int ``[N, num_digits]`` into ``mnist.load_mnist(split)``, and
    ``positions`` int ``[N, num_frames, num_digits, 2]``: each digit's top-left ``(row, col)``,
    within ``[0, size - 28]``.
  """
  _check_split(split)
  if size < DIGIT_SIZE:
    raise ValueError(f'size {size} is smaller than the {DIGIT_SIZE}-pixel digits')
  seed = SEEDS[split] if seed is None else seed
  numbers = _uniform(seed, num_clips, num_digits)
  pool = len(mnist.load_mnist(split)[1])
  digit_indices = np.minimum(np.floor(numbers[..., 0] * pool), pool - 1).astype(np.int64)
  limit = float(size - DIGIT_SIZE)
  position = numbers[..., 1:3] * limit  # [N, D, 2] continuous (row, col)
  low, high = SPEED_RANGE
  velocity = (low + (high - low) * numbers[..., 3:5]) * np.where(numbers[..., 5:7] < 0.5, -1, 1)
  positions = np.empty((num_clips, num_frames, num_digits, 2), np.int64)
  for frame in range(num_frames):
    positions[:, frame] = np.floor(position + 0.5)
    position = position + velocity
    for past, reflect in ((position < 0, -position), (position > limit, 2 * limit - position)):
      position = np.where(past, reflect, position)
      velocity = np.where(past, -velocity, velocity)
    position = np.clip(position, 0.0, limit)  # for speeds above the free space
  return digit_indices, positions


def moving_mnist(split: str, num_clips: int, num_frames: int = 20, size: int = 64,
                 seed: int | None = None, num_digits: int = 2) -> np.ndarray:
  """uint8 ``[num_clips, num_frames, size, size, 1]`` Moving MNIST clips of ``split``'s digits.

  Args:
    split: ``'train'`` or ``'eval'``: the MNIST split the digits come from.
    num_clips: clips to generate; clip ``i`` does not depend on it.
    num_frames: frames per clip.
    size: side of the square frames, at least 28.
    seed: default ``SEEDS[split]``.
    num_digits: digits per clip.
  """
  digit_indices, positions = layout(split, num_clips, num_frames, size, seed, num_digits)
  digits = mnist.load_mnist(split)[0][..., 0][digit_indices]  # [N, D, 28, 28]
  videos = np.zeros((num_clips, num_frames, size, size), np.uint8)
  clips = np.arange(num_clips)[:, None, None]
  offsets = np.arange(DIGIT_SIZE)
  for frame in range(num_frames):
    for digit in range(num_digits):
      rows = (positions[:, frame, digit, 0, None] + offsets)[:, :, None]  # [N, 28, 1]
      cols = (positions[:, frame, digit, 1, None] + offsets)[:, None, :]  # [N, 1, 28]
      region = videos[clips, frame, rows, cols]
      videos[clips, frame, rows, cols] = np.maximum(region, digits[:, digit])
  return videos[..., None]


@functools.cache  # every stage asks for the sources; generate the clips once per process
def moving_mnist_sources(num_train: int = 10_000, num_eval: int = 1_000, num_frames: int = 20,
                         size: int = 64, num_digits: int = 2
                         ) -> tuple[pipeline.ArraySource, pipeline.ArraySource]:
  """``(train, eval)`` sources of ``{'video': uint8 [T, S, S, 1], 'label': 0}``.

  The clips are generated in memory (``num_clips * num_frames * size**2`` bytes: 819 MB for
  10,000 clips of 20 x 64 x 64) with the default seeds; the label is a dummy 0.
  """
  sources = []
  for split, num_clips in (('train', num_train), ('eval', num_eval)):
    videos = moving_mnist(split, num_clips, num_frames, size, num_digits=num_digits)
    name = (f'moving_mnist/{split}/{num_clips}x{num_frames}x{size}px/{num_digits}digits/'
            f'seed{SEEDS[split]}')
    sources.append(pipeline.ArraySource(name, video=videos,
                                        label=np.zeros(num_clips, np.int32)))
  return sources[0], sources[1]
