"""The stages of the main job, each resumable and skipped when its final output exists:

tokenizer -> token dataset -> transformer -> samples -> eval (plus the MNIST scoring classifier).
Outputs live under ``workdir``; only process 0 writes samples and metrics.
"""

import functools
import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from nested_decode import config_lib
from nested_decode import io_utils
from nested_decode import parallel
from nested_decode import sampling
from nested_decode import tasks
from nested_decode.data import clips
from nested_decode.data import moving_mnist
from nested_decode.data import pipeline
from nested_decode.evaluation import decode_benchmark
from nested_decode.evaluation import mnist_classifier
from nested_decode.evaluation import sample_writer
from nested_decode.training import train_tokenizer
from nested_decode.training import train_transformer


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

DATASETS = ('mnist', 'imagenet2012', 'moving_mnist', 'ucf101', 'kinetics600')


def data_sources(config: ml_collections.ConfigDict, num_frames: int | None = None
                 ) -> tuple[Any, Any, Any, Any]:
  """``(train_source, eval_source, train_transform, eval_transform)`` of ``config.data``.

  Video transforms cut clips of ``num_frames`` (default ``config.data.num_frames``) frames.
  """
  data = config.data
  if data.name == 'mnist':
    train, evaluation = pipeline.mnist_sources(data.image_size)
    return train, evaluation, None, None
  if data.name == 'imagenet2012':
    from nested_decode.data import imagenet  # TFDS: only for real runs
    train = imagenet.imagenet_source('train', data.get('data_dir'), data.get('manual_dir'))
    evaluation = imagenet.imagenet_source('validation', data.get('data_dir'))
    return (train, evaluation, imagenet.TrainTransform(data.image_size),
            imagenet.EvalTransform(data.image_size))
  frames = num_frames or data.num_frames
  stride = data.get('frame_stride', 1)
  if data.name == 'moving_mnist':
    train, evaluation = moving_mnist.moving_mnist_sources(data.num_train_clips,
                                                          data.num_eval_clips)
  elif data.name == 'ucf101':
    from nested_decode.data import ucf101  # TFDS: only for real runs
    train = ucf101.ucf101_source('train', data.get('data_dir'))
    evaluation = ucf101.ucf101_source('test', data.get('data_dir'))
  elif data.name == 'kinetics600':
    from nested_decode.data import video_files  # PyAV: only for real runs
    for key in ('video_dir', 'train_csv', 'eval_csv'):
      if not data.get(key):
        raise FileNotFoundError(f'config.data.{key} is empty: Kinetics-600 reads the official '
                                'CSVs and a folder of the video files')
    train, evaluation = kinetics_sources(data.video_dir, data.train_csv, data.eval_csv,
                                         data.num_frames, stride, data.image_size)
    return (train, evaluation, video_files.TrainClip(frames, stride, data.image_size),
            video_files.EvalClip(data.num_frames, stride, data.image_size))
  else:
    raise ValueError(f"config.data.name={data.name!r} is invalid: allowed values are "
                     f"{DATASETS}")
  return (train, evaluation, clips.RandomClip(frames, stride, data.image_size),
          clips.FirstClip(data.num_frames, stride, data.image_size))


# What a user sets to point a config at its data, and the offline job to run without it.
DATA_KEYS = {
    'imagenet2012': (('data.data_dir', 'the prepared TFDS imagenet2012, see the README'),),
    'ucf101': (('data.data_dir', 'the prepared TFDS ucf101, see the README'),),
    'kinetics600': (('data.video_dir', 'a folder of the Kinetics-600 video files'),
                    ('data.train_csv', 'the official train CSV'),
                    ('data.eval_csv', 'the official validate CSV')),
}
OFFLINE_CONFIGS = {'imagenet2012': 'configs/mnist.py', 'ucf101': 'configs/k600.py:tiny',
                   'kinetics600': 'configs/k600.py:tiny'}


class MissingDataError(FileNotFoundError):
  """The config's dataset is not where the config says; the message says what to set."""


def check_data(config: ml_collections.ConfigDict, config_name: str) -> None:
  """Opens the config's data sources so that a run without its data stops before any work,
  with one line: the keys to set and the config that runs offline. Embedded datasets (MNIST,
  Moving MNIST) are always there; Kinetics files are scanned once per process either way."""
  name = config.data.name
  if name not in DATA_KEYS:
    return
  try:
    data_sources(config)
  except FileNotFoundError as error:
    keys = ', '.join(f'--config.{key} ({what})' for key, what in DATA_KEYS[name])
    raise MissingDataError(
        f'{config_name} cannot find its data ({str(error).rstrip(".")}). Set {keys}; to run '
        f'offline without data, use --config={OFFLINE_CONFIGS[name]}') from error


def check_can_evaluate(config: ml_collections.ConfigDict) -> None:
  """Images other than MNIST are scored with FID, which is not built yet: say so before
  training, not after it."""
  if not train_tokenizer.is_video(config) and config.data.name != 'mnist':
    raise config_lib.ConfigError(
        f'config.data.name={config.data.name!r}: --mode=eval (and the whole job, which ends '
        'with it) needs FID, which is not implemented yet; run --mode=train_tokenizer, '
        '--mode=train and --mode=sample')


@functools.cache  # each stage asks for the sources; scan the video files once per process
def kinetics_sources(video_dir: str, train_csv: str, eval_csv: str, num_frames: int,
                     stride: int, image_size: int) -> tuple[Any, Any]:
  from nested_decode.data import video_files  # PyAV: only for real runs
  common = dict(num_frames=num_frames, stride=stride, image_size=image_size)
  train = video_files.VideoFileSource(video_dir, train_csv, **common)
  evaluation = video_files.VideoFileSource(video_dir, eval_csv, class_names=train.class_names,
                                           **common)
  return train, evaluation


def resumable_batches(source: Any, transform: Any, global_batch_size: int, seed: int,
                      key: str = 'training.batch_size'):
  """``(make_iterator, iterator_state)`` over this process's shard, for the trainers: each
  process reads its share of the global batch ``config.<key>``."""
  batch_size = parallel.process_batch_size(global_batch_size, key)
  loader = pipeline.make_loader(source, batch_size=batch_size, seed=seed, train=True,
                                transform=transform, shard_index=jax.process_index(),
                                shard_count=jax.process_count())

  def make_iterator(state):
    return iter(loader) if state is None else pipeline.restore_iterator(loader, state)

  return make_iterator, pipeline.iterator_state


def all_images(source: Any) -> tuple[np.ndarray, np.ndarray]:
  """Every example of a (small, in-memory) source as uint8 images and labels."""
  examples = [source[i] for i in range(len(source))]
  return (np.stack([e['image'] for e in examples]),
          np.asarray([e['label'] for e in examples], np.int32))


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------

def tokenizer_stage(config: ml_collections.ConfigDict, workdir: str) -> Any:
  if not train_tokenizer.is_trained(config, workdir):
    train, _, transform, _ = data_sources(config,
                                          config.tokenizer_training.get('num_frames'))
    batches = resumable_batches(train, transform, config.tokenizer_training.batch_size,
                                config.seed, key='tokenizer_training.batch_size')
    train_tokenizer.train(config, workdir, *batches)
  return train_tokenizer.load_params(config, workdir)


def token_shard_path(workdir: str, split: str, index: int, count: int) -> str:
  return io_utils.join(workdir, 'tokens', f'{split}-{index:05d}-of-{count:05d}.npz')


def stored_token_shards(workdir: str, split: str) -> list[epath.Path] | None:
  """The files of a finished encoding of ``split`` (one per process that wrote it), or None."""
  directory = epath.Path(workdir) / 'tokens'
  if not directory.exists():
    return None
  by_count: dict[int, dict[int, epath.Path]] = {}
  for path in directory.glob(f'{split}-*-of-*.npz'):
    match = re.fullmatch(rf'{re.escape(split)}-(\d+)-of-(\d+)\.npz', path.name)
    if match:
      by_count.setdefault(int(match[2]), {})[int(match[1])] = path
  for count, files in sorted(by_count.items()):
    if sorted(files) == list(range(count)):
      return [files[index] for index in range(count)]
  return None


def encode_split(config: ml_collections.ConfigDict, workdir: str, split: str) -> None:
  """Encodes ``split`` (center crops) with the trained tokenizer: every process encodes its
  share of each global batch of ``eval.batch_size`` examples and writes its own file of
  ``tokens``, ``labels`` and ``rows`` (example indices)."""
  params = tokenizer_stage(config, workdir)
  train, evaluation, _, eval_transform = data_sources(config)
  source = train if split == 'train' else evaluation
  logging.info('Encoding the %d examples of the %s split', len(source), split)
  tokens, labels, rows = [], [], []
  for share in parallel.row_shares(len(source), config.eval.batch_size,
                                   sampling.eval_mesh(config)):
    batch = pipeline.examples_at(source, share.rows, eval_transform)
    tokens.append(train_tokenizer.encode_batch(config, params, batch)[share.valid])
    labels.append(batch['label'][share.valid])
    rows.append(share.rows[share.valid])
  io_utils.write_npz(
      token_shard_path(workdir, split, jax.process_index(), jax.process_count()),
      tokens=np.concatenate(tokens).astype(np.int32), labels=np.concatenate(labels),
      rows=np.concatenate(rows))
  multihost_utils.sync_global_devices(f'tokens/{split}')  # every file written before reads


def token_dataset(config: ml_collections.ConfigDict, workdir: str, split: str
                  ) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens [n, N], labels [n])`` of a split in example order, encoded once
  (``encode_split``) and read from all of its files; the labels are the model's
  (``tasks.conditioning_labels``)."""
  files = stored_token_shards(workdir, split)
  if files is None:
    encode_split(config, workdir, split)
    files = stored_token_shards(workdir, split)
  parts = [io_utils.load_npz(os.fspath(path)) for path in files]
  rows = np.concatenate([part['rows'] for part in parts])
  _, order = np.unique(rows, return_index=True)  # example order; rows held twice counted once
  tokens, labels = (np.concatenate([part[key] for part in parts])[order]
                    for key in ('tokens', 'labels'))
  source = f'the {split} split of config.data.name={config.data.name!r} ({files[0].parent})'
  return tokens, tasks.conditioning_labels(labels, config.tokens.num_classes, source)


def transformer_stage(config: ml_collections.ConfigDict, workdir: str) -> Any:
  if not train_transformer.is_trained(config, workdir):
    tokens, labels = token_dataset(config, workdir, 'train')
    source = pipeline.ArraySource(f'tokens/train/{config.data.name}', tokens=tokens,
                                  label=labels)
    batches = resumable_batches(source, None, config.training.batch_size, config.seed)
    train_transformer.train(config, workdir, *batches)
  return train_transformer.load_params(config, workdir)


def classifier_path(workdir: str) -> str:
  return io_utils.join(workdir, 'classifier', 'params.msgpack')


def classifier_stage(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """The MNIST digit classifier that scores samples, trained on the training split."""
  path = classifier_path(workdir)
  if not io_utils.exists(path):
    train, _, _, _ = data_sources(config)
    images, labels = all_images(train)
    params = mnist_classifier.train_classifier(
        images, labels, steps=config.classifier.steps, batch_size=config.classifier.batch_size,
        seed=config.seed, log=logging.info)
    if jax.process_index() == 0:
      mnist_classifier.save_classifier(path, params)
    return params
  return mnist_classifier.load_classifier(path)


# ----------------------------------------------------------------------------------------------
# Sampling and evaluation
# ----------------------------------------------------------------------------------------------

def sample_labels(config: ml_collections.ConfigDict) -> np.ndarray:
  return np.arange(config.eval.num_samples, dtype=np.int32) % max(config.tokens.num_classes, 1)


def samples_path(workdir: str, name: str) -> str:
  return io_utils.join(workdir, 'samples', f'{name}.npz')


def sample_stage(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
  """Per schedule: ``samples/<name>.npz`` (images, labels) and a PNG grid, one row per class
  (videos: see ``video_stages``)."""
  if train_tokenizer.is_video(config):
    from nested_decode import video_stages
    video_stages.sample_stage(config, workdir)
    return {row['schedule']: row for row in decode_benchmark.flops_rows(config)}
  transformer = transformer_stage(config, workdir)
  tokenizer = tokenizer_stage(config, workdir)
  rows = {row['schedule']: row for row in decode_benchmark.flops_rows(config)}
  labels = sample_labels(config)
  for name, schedule in config_lib.schedules_with_baseline(config).items():
    path = samples_path(workdir, name)
    if io_utils.exists(path):
      continue
    logging.info('Sampling %d images with schedule %s', len(labels), name)
    images = np.concatenate([
        parallel.gather_share(train_tokenizer.decode_tokens(config, tokenizer, tokens), share)
        for share, tokens in sampling.token_batches(
            config, transformer, sampling.schedule_decoder(config, schedule), labels,
            config.seed)])
    if jax.process_index() == 0:
      sample_writer.save_samples_npz(path, images, labels)
      widths = ' '.join(f'{p}x{s}' for p, s in schedule.widths)
      title = (f"{name} ({widths}, cache {schedule.cache}): "
               f"{rows[name]['gflops_per_sample']:.3g} GFLOPs/sample")
      keep = np.concatenate([np.flatnonzero(labels == c)[:config.eval.grid_per_class]
                             for c in np.unique(labels)])
      sample_writer.save_grid_png(path.replace('.npz', '.png'), images[keep], labels[keep],
                                  title=title, per_row=config.eval.grid_per_class)
  return rows


def eval_stage(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """``eval.json``: per schedule, FLOPs and classifier scores of its samples (MNIST) or FVD
  (videos)."""
  if train_tokenizer.is_video(config):
    from nested_decode import video_stages
    return video_stages.eval_stage(config, workdir)
  check_can_evaluate(config)
  flops = sample_stage(config, workdir)
  classifier = classifier_stage(config, workdir)
  _, evaluation, _, _ = data_sources(config)
  held_out, held_out_labels = all_images(evaluation)
  scorer = mnist_classifier.SampleScorer(classifier, held_out)
  rows = []
  for name in config_lib.schedules_with_baseline(config):
    samples = io_utils.load_npz(samples_path(workdir, name))
    scores = scorer.score(samples['images'], samples['labels'])
    row = {key: flops[name][key] for key in ('schedule', 'cache', 'steps', 'gflops_per_sample',
                                             'flop_ratio')}
    row.update(scores, num_samples=len(sample_labels(config)))
    rows.append(row)
    logging.info('eval %s: %s', name, row)
  tokenizer = tokenizer_stage(config, workdir)
  eval_tokens, _ = token_dataset(config, workdir, 'eval')
  reconstructions = sampling.decode_rows(config, tokenizer, eval_tokens)
  reference = scorer.score(reconstructions, held_out_labels)
  reference['reconstruction_mse'] = float(np.mean(
      (reconstructions.astype(np.float32) / 127.5 - held_out.astype(np.float32) / 127.5) ** 2))
  report = dict(rows=rows, tokenizer_reconstructions_of_held_out=reference,
                held_out_classifier_accuracy=mnist_classifier.class_accuracy(
                    scorer.classifier.predict(held_out),
                    held_out_labels))
  if jax.process_index() == 0:
    io_utils.write_json(io_utils.join(workdir, 'eval.json'), report)
  return rows
