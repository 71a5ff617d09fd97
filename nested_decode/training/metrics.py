"""Training metrics: summed on the device, averaged and written as JSON lines, TensorBoard and logs.

Each step's scalars are added to running sums on the device, so a step reads nothing back to the
host and the next step is dispatched while this one runs; ``write`` (every ``log_every`` steps)
fetches the sums once.

``DIR/<name>_metrics.jsonl`` and TensorBoard event files in ``DIR/tensorboard/<name>/`` are
written by the first process (``tensorboard --logdir DIR/tensorboard``). The event files come
from ``tensorboardX``, which needs no TensorFlow; on ``gs://`` its records go through
``io_utils`` (the client the rest of the workdir uses), the whole file uploaded at each flush.

The JSON lines file is rewritten whole at every write, from lines kept in memory (those of an
earlier run read back first, so a resumed run continues the file): a Cloud Storage object cannot
be appended to, and a whole-file write is atomic on every file system, so a reader never sees a
half line. The file is small (one line per ``log_every`` steps), so rewriting it costs little.
"""

import io
import json
import time
from typing import Callable

import jax
import tensorboardX
from absl import logging
from tensorboardX import record_writer

from nested_decode import io_utils

TENSORBOARD_FLUSH_SECONDS = 30


class _WholeObjectRecords:
  """An event file on Cloud Storage, which cannot be appended to: kept in memory and uploaded
  whole (atomically) at every flush."""

  def __init__(self, path: str):
    self._path, self._buffer, self._uploaded = path, io.BytesIO(), -1

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    """Uploads the file if records came since the last upload (the writer's timer and its
    ``close`` flush again with nothing new)."""
    data = self._buffer.getvalue()
    if len(data) != self._uploaded:
      io_utils.write_bytes(self._path, data)
      self._uploaded = len(data)

  def close(self) -> None:
    self.flush()


class _CloudRecordsFactory:
  def open(self, path: str) -> _WholeObjectRecords:
    return _WholeObjectRecords(path)

  def directory_check(self, path: str) -> None:
    pass  # Cloud Storage has no directories to make


record_writer.register_writer_factory('gs', _CloudRecordsFactory())


def tensorboard_writer(logdir: str) -> tensorboardX.SummaryWriter | None:
  """The first process's writer; its thread writes the events and flushes them every
  ``TENSORBOARD_FLUSH_SECONDS``, and ``close`` writes what is left."""
  if jax.process_index() > 0:
    return None
  return tensorboardX.SummaryWriter(logdir, flush_secs=TENSORBOARD_FLUSH_SECONDS)


def earlier_lines(path: str) -> list[str]:
  """The complete lines of ``path`` if it exists (a line cut short by a killed append-based
  writer of an older version is dropped)."""
  if not io_utils.exists(path):
    return []
  return [line for line in io_utils.read_text(path).splitlines(keepends=True)
          if line.endswith('\n')]


class MetricLogger:
  """Accumulates per-step scalars and writes their averages every ``write`` call."""

  def __init__(self, workdir: str, name: str, total_steps: int,
               log: Callable[[str], None] = logging.info):
    self._path = io_utils.join(workdir, f'{name}_metrics.jsonl')
    self._name = name
    self._total = total_steps
    self._log = log
    self._tensorboard = tensorboard_writer(io_utils.join(workdir, 'tensorboard', name))
    self._lines = earlier_lines(self._path) if jax.process_index() == 0 else []
    self._sums: dict[str, jax.Array] = {}
    self._count = 0
    self._last_time, self._last_step = time.time(), None

  def accumulate(self, scalars: dict) -> None:
    """Adds one step's scalars (device arrays) to the sums, on the device."""
    self._count += 1
    for key, value in scalars.items():
      self._sums[key] = value if key not in self._sums else self._sums[key] + value

  def write(self, step: int, extra: dict | None = None) -> dict:
    """Writes the averages since the last call plus ``extra``; logs a progress line with ETA."""
    sums = jax.device_get(self._sums)
    scalars = {key: float(sums[key]) / self._count for key in sorted(sums)}
    scalars.update(extra or {})
    now = time.time()
    if self._last_step is not None and step > self._last_step:
      scalars['steps_per_second'] = (step - self._last_step) / (now - self._last_time)
    self._sums, self._count, self._last_time, self._last_step = {}, 0, now, step
    if jax.process_index() == 0:
      self._lines.append(json.dumps({'step': step, **scalars}) + '\n')
      io_utils.write_text(self._path, ''.join(self._lines))
      if self._tensorboard is not None:
        for key, value in scalars.items():
          self._tensorboard.add_scalar(key, value, step)
      self._log(self._progress_line(step, scalars))
    return scalars

  def close(self) -> None:
    """Writes the TensorBoard events still queued; the JSON lines are written already."""
    if self._tensorboard is not None:
      self._tensorboard.close()

  def _progress_line(self, step: int, scalars: dict) -> str:
    rate = scalars.get('steps_per_second')
    eta = f', ETA {format_seconds((self._total - step) / rate)}' if rate else ''
    shown = ', '.join(f'{k}={v:.4g}' for k, v in scalars.items() if k != 'steps_per_second')
    speed = f', {rate:.2f} steps/s' if rate else ''
    return f'[{self._name}] step {step}/{self._total} ({100 * step / self._total:.0f}%){speed}' \
           f'{eta}: {shown}'


def format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  minutes, seconds = divmod(seconds, 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}:{minutes:02d}:{seconds:02d}' if hours else f'{minutes}:{seconds:02d}'
