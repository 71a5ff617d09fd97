"""Decoding samples in global batches whose rows are split over the processes.

Every process works through the same global batches of ``config.eval.batch_size`` rows and
decodes only its share of each (``parallel.row_shares``) on its own devices, with the
transformer's parameters as trained (replicated or sharded over the mesh). A batch's random
numbers are drawn for the whole global batch, so the samples do not depend on how many
processes or devices share the work. ``parallel.gather_share`` collects a batch's results when
every process needs them (scores, files that process 0 writes).
"""

import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from nested_decode import config_lib
from nested_decode import parallel
from nested_decode import tasks
from nested_decode.decoding.sampler import make_decoder
from nested_decode.models.transformer import NestedMaskedTransformer
from nested_decode.training import train_tokenizer


def schedule_decoder(config: ml_collections.ConfigDict, schedule: ml_collections.ConfigDict):
  """The jit-compiled decode of one schedule (compiled on first use, then reused)."""
  model = NestedMaskedTransformer(config_lib.transformer_config(config))
  return make_decoder(model, config_lib.decode_plan(config, schedule),
                      config_lib.sampling_options(config))


def eval_mesh(config: ml_collections.ConfigDict):
  """The mesh that evaluation work is split over; ``eval.batch_size`` must divide over it."""
  mesh = parallel.make_mesh(config)
  parallel.check_batch_size(config.eval.batch_size, mesh, 'eval.batch_size')
  return mesh


def token_batches(config: ml_collections.ConfigDict, params: Any, decode: Any,
                  labels: np.ndarray, seed: int, given_tokens: np.ndarray | None = None,
                  batch_seconds: list[float] | None = None
                  ) -> Iterator[tuple[parallel.RowShare, np.ndarray]]:
  """Token samples for ``labels``: per global batch of ``eval.batch_size`` samples, this
  process's share of the rows and its tokens of them (a short last batch is padded, so the
  tokens hold a row for each of ``share.rows``).

  ``given_tokens [n, N]`` holds the task's known tokens (frame prediction: the condition's
  latent frames of clip ``i`` for sample ``i``); without it every token is generated. Each
  batch's wall time is appended to ``batch_seconds`` when given.
  """
  model_config = config_lib.transformer_config(config)
  task = tasks.task_of(config)
  if task.num_given and (given_tokens is None or len(given_tokens) < len(labels)):
    raise ValueError(f'{task.name} needs given tokens for each of the {len(labels)} samples')
  mesh = eval_mesh(config)
  rng = jax.random.PRNGKey(seed)
  decoded = 0
  for share in parallel.row_shares(len(labels), config.eval.batch_size, mesh):
    if task.num_given:
      init = task.initial_tokens(share.take(given_tokens), model_config.mask_id)
    else:
      init = np.full((len(share.rows), model_config.seq_len), model_config.mask_id, np.int32)
    batch_rng = jax.random.fold_in(rng, share.start)
    began = time.perf_counter()
    tokens = parallel.apply_to_local_rows(
        lambda init, labels: decode(params, init, labels, batch_rng).tokens, mesh, init,
        share.take(labels).astype(np.int32))
    if batch_seconds is not None:
      batch_seconds.append(time.perf_counter() - began)
    decoded += share.num_valid
    yield share, tokens
  logging.info('Process %d decoded %d of %d samples', jax.process_index(), decoded, len(labels))


def generate_tokens(config: ml_collections.ConfigDict, params: Any, decode: Any,
                    labels: np.ndarray, seed: int,
                    batch_seconds: list[float] | None = None) -> np.ndarray:
  """Class-conditional token samples ``[n, N]`` for ``labels``, all of them on every process
  (see ``token_batches``)."""
  return np.concatenate([parallel.gather_share(tokens, share) for share, tokens in
                         token_batches(config, params, decode, labels, seed,
                                       batch_seconds=batch_seconds)])


def decode_rows(config: ml_collections.ConfigDict, tokenizer: Any, tokens: np.ndarray
                ) -> np.ndarray:
  """``train_tokenizer.decode_tokens`` of every row of ``tokens`` (the same on every
  process), each process decoding its share; all the uint8 images or clips on every process."""
  mesh = eval_mesh(config)
  return np.concatenate([
      parallel.gather_share(train_tokenizer.decode_tokens(config, tokenizer, share.take(tokens)),
                            share)
      for share in parallel.row_shares(len(tokens), config.eval.batch_size, mesh)])
