"""Checkpoints with orbax: train state, data-iterator position and config, async, keep-N.

A checkpoint holds three items: ``state`` (any pytree of arrays: parameters, optimizer state,
step, RNG), ``data`` (the JSON state of the input iterator of every process: each reads its own
shard, and orbax writes JSON items from the primary process only, so the positions are gathered
there first) and ``config`` (the run's config as JSON). Restoring into a state of another shape
is an error that names both shapes.

Writes are atomic: orbax writes step ``N`` into ``N.orbax-checkpoint-tmp`` and renames it to
``N`` once every item is written, so a write killed half-way leaves only the temporary folder,
which ``latest_step`` and ``restore`` never see; a writer made with ``cleanup_tmp=True`` (the
training loop's) deletes such leftovers when it starts. On Cloud Storage (``gs://``), which
cannot rename, orbax writes ``N`` in place and marks it finished with ``commit_success.txt``
last; a step without it does not count as a checkpoint.
"""

import json
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from nested_decode import io_utils


class CheckpointShapeError(ValueError):
  """The checkpoint's arrays do not fit the model being restored."""


def path_name(path) -> str:
  """``params/layers/query/kernel`` for a pytree path of dict keys, attributes or indices."""
  parts = (getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))) for k in path)
  return '/'.join(str(part) for part in parts)


def gather_json(value: Any) -> list:
  """Every process's JSON-able ``value`` in process order (a collective when there are several)."""
  if jax.process_count() == 1:
    return [value]
  encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(len(encoded)))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:len(encoded)] = encoded
  rows = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:length]).decode()) for row, length in zip(rows, lengths)]


class Checkpointer:
  """Saves and restores ``(state, data_state)`` under ``directory``."""

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True,
               cleanup_tmp: bool = False):
    self.directory = io_utils.absolute(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save,
                                             cleanup_tmp_directories=cleanup_tmp),
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           data=ocp.JsonCheckpointHandler(),
                           config=ocp.JsonCheckpointHandler()))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: Any,
           config: ml_collections.ConfigDict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({'by_process': gather_json(data_state)}),
        config=ocp.args.JsonSave(json.loads(config.to_json()))))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, Any, dict]:
    """Returns ``(state, data_state, config_dict)`` of ``step`` (default: the latest), to
    resume training: the data position is this process's, so as many processes must run."""
    step = self._step_to_restore(step, abstract_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore()))
    return restored['state'], self._own_data_state(step, restored['data']), restored['config']

  def state_entries(self, step: int | None = None) -> tuple[str, ...]:
    """The top-level entries of the state saved at ``step`` (default: the latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}')
    stored = self._manager.item_metadata(step)['state']
    names = (path_name(path).split('/')[0]
             for path, _ in jax.tree_util.tree_leaves_with_path(stored))
    return tuple(dict.fromkeys(names))

  def restore_params(self, abstract_params: Any, step: int | None = None,
                     entry: str = 'params') -> Any:
    """The state's ``entry`` (``params``, or e.g. their average ``ema_params``) alone, to sample
    with, on any number of processes: the optimizer state is not read, so it takes no memory
    and may have any structure (an older version's)."""
    wanted = {entry: abstract_params}
    step = self._step_to_restore(step, wanted)
    reader = ocp.CheckpointManager(self.directory, item_handlers=dict(
        state=ocp.PyTreeCheckpointHandler()))
    restored = reader.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
        partial_restore=True)))
    reader.close()
    return restored['state'][entry]

  def restore_config(self, step: int | None = None) -> dict:
    """The config (as a dict) that the run writing ``step`` (default: the latest) trained with."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}')
    return self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))['config']

  def _step_to_restore(self, step: int | None, abstract_state: Any) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}')
    self._check_shapes(step, abstract_state)
    return step

  def _own_data_state(self, step: int, data: Any) -> Any:
    if not (isinstance(data, dict) and 'by_process' in data):
      return data  # written before positions were kept per process
    states = data['by_process']
    if len(states) != jax.process_count():
      raise ValueError(
          f'Checkpoint {self.directory} step {step} holds the data positions of {len(states)} '
          f'processes but this run has {jax.process_count()}; each process reads its own '
          'shard, so resume with as many processes')
    return states[jax.process_index()]

  def _check_shapes(self, step: int, abstract_state: Any) -> None:
    stored = self._manager.item_metadata(step)['state']
    stored_shapes = {path_name(path): tuple(leaf.shape)
                     for path, leaf in jax.tree_util.tree_leaves_with_path(stored)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state):
      name = path_name(path)
      if name not in stored_shapes:
        raise CheckpointShapeError(
            f'Checkpoint {self.directory} step {step} has no entry {name}; '
            f'it was written by a different model')
      if stored_shapes[name] != tuple(leaf.shape):
        raise CheckpointShapeError(
            f'Checkpoint {self.directory} step {step}: {name} has shape {stored_shapes[name]} '
            f'but the model expects {tuple(leaf.shape)}; the config does not match the one '
            f'the checkpoint was trained with')

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


# The folders of a workdir that the trainers write their checkpoints to.
TOKENIZER = 'tokenizer'
TRANSFORMER = 'transformer'


def checkpoint_dir(workdir: str, name: str) -> str:
  return io_utils.join(workdir, name)


def is_finished(workdir: str, name: str, num_steps: int) -> bool:
  directory = checkpoint_dir(workdir, name)
  return io_utils.exists(directory) and Checkpointer(directory).latest_step() == num_steps
