"""The config's data: its training and held-out sources with their transforms, and the
resumable per-process batches the trainers read."""

import dataclasses
import functools
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from nested_decode import parallel
from nested_decode.config_lib import ConfigError
from nested_decode.data import clip_views, clips, moving_mnist, pipeline


def _mnist(config: ml_collections.ConfigDict, num_frames: int | None):
  train, evaluation = pipeline.mnist_sources(config.data.image_size)
  return train, evaluation, None, None


def _imagenet(config: ml_collections.ConfigDict, num_frames: int | None):
  from nested_decode.data import imagenet  # TFDS: only for real runs
  data = config.data
  train = imagenet.imagenet_source('train', data.get('data_dir'), data.get('manual_dir'))
  evaluation = imagenet.imagenet_source('validation', data.get('data_dir'))
  return (train, evaluation, imagenet.TrainTransform(data.image_size),
          imagenet.EvalTransform(data.image_size))


def _clip_sources(config: ml_collections.ConfigDict, num_frames: int | None, train, evaluation):
  data = config.data
  frames, stride = num_frames or data.num_frames, data.get('frame_stride', 1)
  return (train, _eval_views(config, evaluation),
          clips.RandomClip(frames, stride, data.image_size),
          clips.FirstClip(data.num_frames, stride, data.image_size))


def _moving_mnist(config: ml_collections.ConfigDict, num_frames: int | None):
  train, evaluation = moving_mnist.moving_mnist_sources(config.data.num_train_clips,
                                                        config.data.num_eval_clips)
  return _clip_sources(config, num_frames, train, evaluation)


def _moving_mnist_validation(config: ml_collections.ConfigDict, count: int):
  """Clips of training digits after the training set's (clip ``i`` is the same however many are
  generated), so the transformer never trained on them and the test set, of held-out digits,
  holds none of them."""
  first = config.data.num_train_clips
  videos = moving_mnist.moving_mnist('train', first + count)[first:]
  source = pipeline.ArraySource(f'moving_mnist/validation/clips{first}-{first + count}',
                                video=videos, label=np.zeros(count, np.int32))
  return source, _moving_mnist(config, None)[3]


def _ucf101(config: ml_collections.ConfigDict, num_frames: int | None):
  from nested_decode.data import ucf101  # TFDS: only for real runs
  train = ucf101.ucf101_source('train', config.data.get('data_dir'))
  evaluation = ucf101.ucf101_source('test', config.data.get('data_dir'))
  return _clip_sources(config, num_frames, train, evaluation)


def _kinetics600(config: ml_collections.ConfigDict, num_frames: int | None):
  from nested_decode.data import video_files  # PyAV: only for real runs
  data = config.data
  for key in ('video_dir', 'train_csv', 'eval_csv'):
    if not data.get(key):
      raise FileNotFoundError(f'config.data.{key} is empty: Kinetics-600 reads the official '
                              'CSVs and a folder of the video files')
  frames, stride = num_frames or data.num_frames, data.get('frame_stride', 1)
  train, evaluation = kinetics_sources(data.video_dir, data.train_csv, data.eval_csv,
                                       data.num_frames, stride, data.image_size)
  return (train, _eval_views(config, evaluation),
          video_files.TrainClip(frames, stride, data.image_size),
          video_files.EvalClip(data.num_frames, stride, data.image_size))


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset a config can name (``config.data.name``): how its sources open, how samples of
  it are scored, and, for data that must be fetched, the config keys that point at it and the
  config that runs offline instead."""
  open: Callable[[ml_collections.ConfigDict, int | None], tuple[Any, Any, Any, Any]]
  scoring: str  # 'classifier' (MNIST digits: class accuracy and fd), 'fid' or 'fvd'
  location_keys: tuple[tuple[str, str], ...] = ()
  offline_config: str = ''
  # Whether its training transform is random (crops, flips, windows), so that more than one
  # token view of an example (config.data.token_views) differs from the first.
  random_views: bool = True
  # (config, count) -> (source, transform) of count validation examples, which neither the
  # training nor the held-out split holds (``validation_split``); None: the dataset has none.
  validation: Callable[[ml_collections.ConfigDict, int], tuple[Any, Any]] | None = None


DATASETS = {
    'mnist': Dataset(_mnist, 'classifier', random_views=False),
    'imagenet2012': Dataset(
        _imagenet, 'fid',
        (('data.data_dir', 'the prepared TFDS imagenet2012, see the README'),),
        'configs/mnist.py'),
    'moving_mnist': Dataset(_moving_mnist, 'fvd', validation=_moving_mnist_validation),
    'ucf101': Dataset(_ucf101, 'fvd',
                      (('data.data_dir', 'the prepared TFDS ucf101, see the README'),),
                      'configs/k600.py:tiny'),
    'kinetics600': Dataset(_kinetics600, 'fvd',
                           (('data.video_dir', 'a folder of the Kinetics-600 video files'),
                            ('data.train_csv', 'the official train CSV'),
                            ('data.eval_csv', 'the official validate CSV')),
                           'configs/k600.py:tiny'),
}


def dataset(config: ml_collections.ConfigDict) -> Dataset:
  """The registered dataset ``config.data.name`` names."""
  name = config.data.name
  if name not in DATASETS:
    raise ConfigError(f'config.data.name={name!r} is invalid: allowed values are '
                      f'{tuple(DATASETS)}')
  return DATASETS[name]


def data_sources(config: ml_collections.ConfigDict, num_frames: int | None = None
                 ) -> tuple[Any, Any, Any, Any]:
  """``(train_source, eval_source, train_transform, eval_transform)`` of ``config.data``.

  Video transforms cut clips of ``num_frames`` (default ``config.data.num_frames``) frames.
  """
  return dataset(config).open(config, num_frames)


def validation_split(config: ml_collections.ConfigDict, count: int) -> tuple[Any, Any]:
  """``(source, eval_transform)`` of ``count`` validation examples of ``config.data``, to choose
  settings on without touching the held-out split that scores them."""
  found = dataset(config)
  if found.validation is None:
    raise ConfigError(f'config.data.name={config.data.name!r} has no validation split apart from '
                      'its training and held-out ones (datasets with one: '
                      f'{", ".join(n for n, d in DATASETS.items() if d.validation)})')
  return found.validation(config, count)


def _eval_views(config: ml_collections.ConfigDict, evaluation: Any) -> Any:
  """The held-out videos as ``eval.clip_views`` clips each, when they are the real clips of FVD."""
  views = tuple(config.eval.get('clip_views', (1, 1)))
  if config.eval.get('real_split', 'eval') != 'eval' or views == (1, 1):
    return evaluation
  return clip_views.ClipViews(evaluation, *views)


@functools.cache  # each stage asks for the sources; scan the video files once per process
def kinetics_sources(video_dir: str, train_csv: str, eval_csv: str, num_frames: int,
                     stride: int, image_size: int) -> tuple[Any, Any]:
  from nested_decode.data import video_files  # PyAV: only for real runs
  common = dict(num_frames=num_frames, stride=stride, image_size=image_size)
  train = video_files.VideoFileSource(video_dir, train_csv, **common)
  evaluation = video_files.VideoFileSource(video_dir, eval_csv, class_names=train.class_names,
                                           **common)
  return train, evaluation


def worker_options(config: ml_collections.ConfigDict) -> dict[str, int]:
  """``config.data``'s grain worker processes and their prefetch, for ``resumable_batches``
  of pixels (saved configs get them from ``config_migrations.upgrade``)."""
  return dict(worker_count=config.data.worker_count,
              worker_buffer_size=config.data.worker_buffer_size)


def resumable_batches(source: Any, transform: Any, global_batch_size: int, seed: int,
                      key: str = 'training.batch_size', worker_count: int = 0,
                      worker_buffer_size: int = 1):
  """``(make_iterator, iterator_state)`` over this process's shard, for the trainers: each
  process reads its share of the global batch ``config.<key>``, in ``worker_count`` grain
  processes (``worker_options``) or in this one.

  A checkpointed position restores only with the worker count it was saved with; another one
  is a ``ConfigError`` that names the count to resume with.
  """
  batch_size = parallel.process_batch_size(global_batch_size, key)
  loader = pipeline.make_loader(source, batch_size=batch_size, seed=seed, train=True,
                                transform=transform, shard_index=jax.process_index(),
                                shard_count=jax.process_count(), worker_count=worker_count,
                                worker_buffer_size=worker_buffer_size)

  def make_iterator(state):
    if state is None:
      return iter(loader)
    try:
      return pipeline.restore_iterator(loader, state)
    except pipeline.WorkerCountError as error:
      raise ConfigError(
          f'config.data.worker_count={worker_count} cannot resume this run: {error}. Resume '
          f'with --config.data.worker_count={state["worker_count"]} (batches depend on the '
          'count, so a checkpointed data position continues only with its own), or train in '
          'a new workdir') from error

  return make_iterator, pipeline.iterator_state


def all_images(source: Any) -> tuple[np.ndarray, np.ndarray]:
  """Every example of a (small, in-memory) source as uint8 images and labels."""
  examples = [source[i] for i in range(len(source))]
  return (np.stack([e['image'] for e in examples]),
          np.asarray([e['label'] for e in examples], np.int32))
