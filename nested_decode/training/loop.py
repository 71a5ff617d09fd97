"""The resumable loop every trainer shares: restore, step, check, log, checkpoint.

A trainer named ``name`` keeps its checkpoints in ``workdir/name`` and its metrics in
``workdir/name_metrics.jsonl``; it is finished when its latest checkpoint is at ``num_steps``.
"""

import os
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from nested_decode.training.checkpoints import Checkpointer
from nested_decode.training.metrics import MetricLogger

MakeIterator = Callable[[Any], Iterator[dict]]
IteratorState = Callable[[Iterator[dict]], Any]


def lr_schedule(training: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to ``learning_rate``, then cosine decay to ``final_lr_fraction`` of it."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=training.learning_rate,
      warmup_steps=min(training.warmup_steps, training.num_steps - 1),
      decay_steps=training.num_steps, end_value=training.learning_rate * training.final_lr_fraction)


def checkpoint_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def is_finished(workdir: str, name: str, num_steps: int) -> bool:
  directory = checkpoint_dir(workdir, name)
  return os.path.isdir(directory) and Checkpointer(directory).latest_step() == num_steps


def restore_state(workdir: str, name: str, abstract_state: Any) -> Any:
  """The latest checkpointed state of trainer ``name``, shape-checked against the model."""
  state, _, _ = Checkpointer(checkpoint_dir(workdir, name)).restore(abstract_state)
  return state


def run(*, name: str, config: ml_collections.ConfigDict, workdir: str, initial_state: Any,
        train_step: Callable[[Any, Any], tuple[Any, dict]],
        batches: tuple[MakeIterator, IteratorState], prepare: Callable[[dict], Any],
        num_steps: int, log_every: int, checkpoint_every: int, keep_checkpoints: int,
        stop_after: int | None = None) -> Any:
  """Trains ``initial_state`` (or the latest checkpoint) to ``num_steps``.

  ``batches = (make_iterator, iterator_state)``: ``make_iterator(position_or_None)`` gives the
  batch iterator, restored to a saved position when given one, and ``iterator_state(it)`` its
  JSON-serialisable position, checkpointed with the state. ``stop_after`` ends this call after
  that many steps, as a preemption would (tests use it).
  """
  make_iterator, iterator_state = batches
  checkpointer = Checkpointer(checkpoint_dir(workdir, name), max_to_keep=keep_checkpoints)
  state, position = initial_state, None
  if checkpointer.latest_step() is not None:
    state, position, _ = checkpointer.restore(jax.eval_shape(lambda: initial_state))
    logging.info('Resuming %s training from step %d', name, int(state.step))
  iterator = make_iterator(position)
  logger = MetricLogger(workdir, name, num_steps)
  start = int(state.step)
  for step in range(start + 1, num_steps + 1):
    state, metrics = train_step(state, prepare(next(iterator)))
    logger.accumulate(metrics)
    loss = float(metrics['loss'])
    if not np.isfinite(loss):
      raise FloatingPointError(f'{name} loss became {loss} at step {step}; the last good '
                               f'checkpoint in {checkpointer.directory} is kept')
    if step % log_every == 0 or step == num_steps:
      logger.write(step)
    if step % checkpoint_every == 0 or step == num_steps:
      checkpointer.save(step, state, iterator_state(iterator), config)
    if stop_after is not None and step - start >= stop_after:
      break
  checkpointer.close()
  return state
