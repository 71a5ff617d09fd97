"""Deterministic, resumable, process-shardable input pipelines with grain.

A data source is anything grain can index: ``__len__`` and ``__getitem__`` returning a dict with
``'image'`` (uint8 ``[H, W, C]``) and ``'label'``. ``make_loader`` shuffles (for training) with a
seed, shards by process, applies an optional per-example transform and batches, in
``worker_count`` grain worker processes when asked. Batches are ``{'image': uint8 [B, H, W, C],
'label': int32 [B]}`` (or ``video`` uint8 ``[B, T, H, W, C]``, or ``tokens``): pixels reach the
device as uint8 and the jitted step that reads them scales them (``pixels.to_float``).

The iterator's position is a JSON-serialisable dict (``iterator_state``) that a trainer stores
in its checkpoint; ``restore_iterator`` gives an iterator that continues with exactly the batches
the saved one would have produced next. The loader must be built with the same arguments,
the worker count included (``restore_iterator`` raises ``WorkerCountError`` otherwise).
"""

import json
from typing import Any, Optional

import grain.python as grain
import numpy as np
from absl import flags

from nested_decode.data import mnist

Transform = grain.MapTransform | grain.RandomMapTransform


class ArraySource:
  """In-memory source over equally long arrays, e.g. ``image`` uint8 ``[N, H, W, C]`` and
  ``label [N]``, or ``tokens [N, L]`` and ``label [N]``.

  ``name`` is the ``repr``: grain checks it against the one saved in an iterator state, so it
  must describe the data, not the object's address.
  """

  # Reading a row is a numpy index: grain's reader threads (16 by default, for sources that
  # wait on storage) only contend for the GIL (docs/real_data.md, "Input pipeline").
  read_threads = 0

  def __init__(self, name: str, **features: np.ndarray):
    lengths = {key: len(value) for key, value in features.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f'{name}: features have different lengths {lengths}')
    self._features = features
    self._name = name

  def __len__(self) -> int:
    return len(next(iter(self._features.values())))

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {key: value[index] for key, value in self._features.items()}

  def __repr__(self) -> str:
    return f'ArraySource({self._name}, n={len(self)})'


def mnist_sources(image_size: int = 28) -> tuple[ArraySource, ArraySource]:
  """``(train, eval)`` sources over the 4000/1000 MNIST split, images ``[S, S, 1]``."""
  sources = []
  for split in mnist.SPLITS:
    images, labels = mnist.load_mnist(split)
    sources.append(ArraySource(f'mnist/{split}/{image_size}px',
                               image=mnist.fit_to_size(images, image_size),
                               label=np.asarray(labels, np.int32)))
  return sources[0], sources[1]


class KeepFeatures(grain.MapTransform):
  """The features models read, in the dtypes batches carry: ``image`` and ``video`` stay uint8,
  ``label`` and ``tokens`` become int32; the rest (file names, ...) is dropped."""

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {key: np.asarray(element[key], np.int32) for key in ('label', 'tokens')
           if key in element}
    for key in ('image', 'video'):
      if key in element:
        out[key] = np.asarray(element[key], np.uint8)
    return out


def make_loader(source: Any, *, batch_size: int, seed: int, train: bool,
                transform: Optional[Transform] = None, shard_index: int = 0,
                shard_count: int = 1, num_epochs: Optional[int] = None,
                worker_count: int = 0, worker_buffer_size: int = 1) -> grain.DataLoader:
  """A grain loader over this process's shard of ``source``.

  Args:
    source: random-access source of ``{'image', 'label'}`` dicts.
    batch_size: examples per batch on this process.
    seed: seeds the shuffle and the per-example rng of a ``RandomMapTransform``.
    train: shuffle and drop the last partial batch; otherwise read in order and keep it.
    transform: optional per-example transform on the uint8 example (crop, flip, ...).
    shard_index: this process's shard, e.g. ``jax.process_index()``.
    shard_count: number of shards, e.g. ``jax.process_count()``; every shard gets
      ``len(source) // shard_count`` examples per epoch, the remainder is dropped.
    num_epochs: passes over the data; None repeats forever when training and reads one pass
      otherwise.
    worker_count: grain worker processes that read, transform and batch (0: all in this
      process, at ``next``). Each worker builds whole batches of its own slice of the index
      stream and the loader takes them in turn, so the batches (not the examples of an epoch)
      depend on the count, and a saved iterator state restores only into a loader with the
      same count. Workers are spawned processes: ``source`` and ``transform`` are pickled to
      each of them.
    worker_buffer_size: batches each worker prepares ahead of the one asked for.

  The examples are read by ``source.read_threads`` threads per process (grain's default when
  the source does not say).

  Returns:
    A ``grain.DataLoader`` whose iterators support ``get_state`` / ``set_state``.
  """
  if num_epochs is None and not train:
    num_epochs = 1
  shard_options = grain.ShardOptions(shard_index, shard_count, drop_remainder=True)
  sampler = grain.IndexSampler(len(source), shard_options=shard_options, shuffle=train,
                               num_epochs=num_epochs, seed=seed)
  operations = [] if transform is None else [transform]
  operations += [KeepFeatures(), grain.Batch(batch_size, drop_remainder=train)]
  if worker_count and not flags.FLAGS.is_parsed():
    # grain reads its absl flags when it starts workers; outside an absl app (a notebook, the
    # tests) they keep their defaults instead of failing as unparsed.
    flags.FLAGS.mark_as_parsed()
  read_threads = getattr(source, 'read_threads', None)
  read_options = None if read_threads is None else grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=0 if read_threads == 0 else 500)
  return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                          worker_count=worker_count, worker_buffer_size=worker_buffer_size,
                          shard_options=shard_options, read_options=read_options)


def examples_at(source: Any, indices: np.ndarray,
                transform: Optional[grain.MapTransform] = None,
                view_seed: Optional[tuple[int, int]] = None) -> dict[str, np.ndarray]:
  """Examples ``indices`` of ``source`` as one batch, exactly as an in-order loader gives them
  (``transform``, then ``KeepFeatures``: pixels uint8): for evaluation work split by rows over
  processes. A random ``transform`` (a training view) takes ``view_seed = (seed, view)``:
  example ``i``'s randomness comes from ``(seed, view, i)`` alone, whichever process asks."""
  elements = []
  for index in indices:
    element = source[int(index)]
    if isinstance(transform, grain.RandomMapTransform):
      if view_seed is None:
        raise ValueError(f'{type(transform).__name__} is random: give examples_at a view_seed')
      element = transform.random_map(element, np.random.default_rng((*view_seed, int(index))))
    elif transform is not None:
      element = transform.map(element)
    elements.append(KeepFeatures().map(element))
  return {key: np.stack([element[key] for element in elements]) for key in elements[0]}


def iterator_state(iterator: grain.PyGrainDatasetIterator) -> dict[str, Any]:
  """The position of a loader's iterator as a JSON-serialisable dict (e.g. for JsonSave)."""
  return json.loads(iterator.get_state())


class WorkerCountError(ValueError):
  """A saved iterator position was taken with another number of grain workers than the loader
  it is restored into has; there is no exact position to continue from in that loader."""


def restore_iterator(loader: grain.DataLoader,
                     state: dict[str, Any]) -> grain.PyGrainDatasetIterator:
  """A fresh iterator of ``loader`` positioned where ``iterator_state`` was taken.

  Raises:
    WorkerCountError: the state was saved by a loader with another ``worker_count``. Workers
      batch interleaved slices of the index stream, so the examples already read do not form a
      prefix that another count could continue from: resuming with another count would repeat
      or skip examples.
  """
  saved, current = state.get('worker_count', 0), loader.multiprocessing_options.num_workers
  if saved != current:
    raise WorkerCountError(f'the data iterator was saved with worker_count={saved}, the loader '
                           f'has worker_count={current}')
  iterator = iter(loader)
  iterator.set_state(json.dumps(state).encode())
  return iterator
