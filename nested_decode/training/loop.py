"""The resumable loop every trainer shares: restore, step, check, log, checkpoint.

A trainer named ``name`` keeps its checkpoints in ``workdir/name`` and its metrics in
``workdir/name_metrics.jsonl``; it is finished when its latest checkpoint is at ``num_steps``.

Faults:
- SIGTERM (the notice TPU VMs, SLURM and Kubernetes give before they kill a job) makes ``run``
  finish the step in flight, save a checkpoint of it (with the data-iterator position), wait for
  the write, and raise ``Preempted``; ``main`` turns that into exit status 143 (128 + SIGTERM,
  what the signal itself would give), so a scheduler counts the job as interrupted, not done,
  and the same command resumes it. The handler is installed only while ``run`` runs.
- A non-finite loss, or non-finite state about to be checkpointed, raises ``FloatingPointError``
  before anything of that step is saved; the last good checkpoint stays the latest.
- Pending asynchronous writes are awaited whichever way ``run`` ends, and half-written
  checkpoints of a killed run (orbax's ``<step>.orbax-checkpoint-tmp`` folders) are never read
  and are removed when the next run starts.
"""

import signal
import threading
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from nested_decode import checkpoints
from nested_decode.checkpoints import Checkpointer, path_name
from nested_decode.training.metrics import MetricLogger

MakeIterator = Callable[[Any], Iterator[dict]]
IteratorState = Callable[[Iterator[dict]], Any]


def lr_schedule(training: ml_collections.ConfigDict, start: int = 0,
                steps: int | None = None) -> optax.Schedule:
  """Linear warmup to ``learning_rate``, then cosine decay to ``final_lr_fraction`` of it, over
  the ``steps`` (default ``training.num_steps``) steps from ``start``; after them the final
  value."""
  steps = training.num_steps if steps is None else steps
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=training.learning_rate,
      warmup_steps=min(training.warmup_steps, steps - 1),
      decay_steps=steps, end_value=training.learning_rate * training.final_lr_fraction)
  return schedule if start == 0 else lambda count: schedule(count - start)


class Preempted(Exception):
  """Training stopped on a signal after its checkpoint of the step it reached was written."""

  exit_code = 128 + signal.SIGTERM  # what the shell reports for a process SIGTERM killed

  def __init__(self, name: str, step: int, directory: str, reason: str):
    super().__init__(f'{name} training stopped by {reason} at step {step}; its checkpoint is '
                     f'in {directory}; run the same command again to resume')
    self.name, self.step, self.directory = name, step, directory


class StopRequest:
  """Catches SIGTERM while training and says at which step every process should stop.

  One process: a handler notes the signal (the previous handler comes back on exit).
  Several processes (a pod, where every process gets the signal, maybe steps apart): all of
  them must save the same step, because orbax's save is collective. With JAX's preemption
  service (started by ``jax.distributed.initialize`` unless ``jax_enable_preemption_service``
  is off), ``multihost_utils.reached_preemption_sync_point`` gives that step from the notice
  of any process, and no Python handler is installed (it would hide the signal from the
  service). Without it, the processes all-gather their flags after every step.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self._signals = signals
    self._previous: dict[int, Any] = {}
    self._use_jax_service = False
    self.received: str | None = None

  def __enter__(self) -> 'StopRequest':
    self._use_jax_service = (jax.process_count() > 1
                             and jax.config.jax_enable_preemption_service)
    if not self._use_jax_service:
      if threading.current_thread() is threading.main_thread():
        for signum in self._signals:
          self._previous[signum] = signal.signal(signum, self._note)
      else:
        logging.warning('Training outside the main thread: signals end it without a checkpoint')
    return self

  def _note(self, signum, frame) -> None:
    del frame  # no logging here: the handler may interrupt the logger itself
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc_info) -> None:
    for signum, previous in self._previous.items():
      # None: installed outside Python, which cannot be put back; the default ends the process.
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous = {}

  def should_stop(self, step: int) -> bool:
    """Whether all processes stop after ``step``; every process calls it after every step."""
    if self._use_jax_service:
      if multihost_utils.reached_preemption_sync_point(step):
        self.received = self.received or 'a preemption notice'
        return True
      return False
    if jax.process_count() > 1:
      flags = multihost_utils.process_allgather(np.int32(self.received is not None))
      if np.any(flags):
        self.received = self.received or 'a signal to another process'
        return True
      return False
    return self.received is not None


@jax.jit
def _finite_leaves(leaves: list[jax.Array]) -> list[jax.Array]:
  return [jnp.all(jnp.isfinite(leaf)) for leaf in leaves]


_NO_BAD_LOSS = (np.int32(-1), np.float32(0))


@jax.jit
def _track_non_finite(first: tuple[jax.Array, jax.Array], loss: jax.Array,
                      step: int) -> tuple[jax.Array, jax.Array]:
  """``(step, loss)`` of the first non-finite loss so far, or ``(-1, 0)``: kept on the device,
  so the loop learns of a bad loss at its next read without reading every step's loss."""
  bad_step, bad_loss = first
  new = (bad_step < 0) & ~jnp.isfinite(loss)
  return (jnp.where(new, step, bad_step).astype(jnp.int32),
          jnp.where(new, loss, bad_loss).astype(jnp.float32))


def non_finite_leaves(state: Any) -> list[str]:
  """Names of the floating-point leaves of ``state`` holding a NaN or an infinity."""
  named = [(path_name(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state)
           if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  finite = jax.device_get(_finite_leaves([leaf for _, leaf in named]))
  return [name for (name, _), ok in zip(named, finite) if not ok]


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
  checkpointer = Checkpointer(checkpoints.checkpoint_dir(workdir, name),
                              max_to_keep=keep_checkpoints, cleanup_tmp=True)
  stop = StopRequest()
  logger = None
  try:
    with stop:
      state, position = initial_state, None
      if checkpointer.latest_step() is not None:
        abstract = jax.tree.map(  # with each leaf's sharding: restored straight onto the mesh
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), initial_state)
        state, position, _ = checkpointer.restore(abstract)
        logging.info('Resuming %s training from step %d', name, int(state.step))
      iterator = make_iterator(position)
      logger = MetricLogger(workdir, name, num_steps)
      start = int(jax.device_get(state.step))
      first_non_finite = _NO_BAD_LOSS
      for step in range(start + 1, num_steps + 1):
        state, metrics = train_step(state, prepare(next(iterator)))
        logger.accumulate(metrics)
        first_non_finite = _track_non_finite(first_non_finite, metrics['loss'], step)
        stopping = stop.should_stop(step)
        saving = step % checkpoint_every == 0 or step == num_steps or stopping
        if step % log_every == 0 or saving:  # the first reads of the step's values
          bad_step, bad_loss = jax.device_get(first_non_finite)
          if bad_step >= 0:
            raise FloatingPointError(
                f'{name} loss became {bad_loss} at step {bad_step}; the last good checkpoint '
                f'in {checkpointer.directory} is kept')
        if step % log_every == 0 or step == num_steps:
          logger.write(step)
        if saving:
          bad = non_finite_leaves(state)
          if bad:
            raise FloatingPointError(
                f'{name} state has non-finite values in {", ".join(bad[:5])} at step {step}; '
                f'not saved, the last good checkpoint in {checkpointer.directory} is kept')
          checkpointer.save(step, state, iterator_state(iterator), config)
        if stopping:
          logging.warning('%s: stopping at step %d on %s; writing its checkpoint', name, step,
                          stop.received)
          checkpointer.wait()
          raise Preempted(name, step, checkpointer.directory, stop.received)
        if stop_after is not None and step - start >= stop_after:
          break
      checkpointer.wait()
    if stop.received:  # came after the last step's check: its checkpoint is the final one
      raise Preempted(name, int(state.step), checkpointer.directory, stop.received)
  finally:
    checkpointer.close()  # waits for writes in flight, also when a step failed
    if logger is not None:
      logger.close()
  return state
