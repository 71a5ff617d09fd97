"""What the studies share to run for an hour and survive a kill: scored rows stored one file
each (a rerun skips them), and tasks that log progress with an ETA."""

import dataclasses
import time
from typing import Any, Callable

import numpy as np

from nested_decode import io_utils


@dataclasses.dataclass
class Task:
  kind: str          # e.g. 'train' or 'decode': progress keeps a rate per kind
  label: str
  gflops: float      # estimated work, the unit of the progress estimate
  done: Callable[[], bool]
  run: Callable[[], Any]


class Progress:
  """Logs each finished task with the time elapsed and an ETA from the seconds per GFLOP that
  the tasks of the same kind have taken in this process (skipped tasks do not count). Tasks
  found along the way (a search's next round) join with ``add``."""

  def __init__(self, tasks: list[Task], log: Callable[[str], None], name: str):
    self._name, self._log = name, log
    self._remaining: dict[int, Task] = {}
    self._total = 0
    self._seconds: dict[str, float] = {}
    self._gflops: dict[str, float] = {}
    self._start = time.perf_counter()
    skipped = self.add(tasks)
    log(f'{name}: {skipped} of {len(tasks)} tasks already done')

  def add(self, tasks: list[Task]) -> int:
    """Queues the tasks not done yet; returns how many were done."""
    self._total += len(tasks)
    pending = {id(t): t for t in tasks if not t.done()}
    self._remaining.update(pending)
    return len(tasks) - len(pending)

  def run_all(self) -> None:
    for task in list(self._remaining.values()):
      self.run(task)

  def run(self, task: Task) -> None:
    """Runs a queued task."""
    start = time.perf_counter()
    task.run()
    self._seconds[task.kind] = self._seconds.get(task.kind, 0.0) + time.perf_counter() - start
    self._gflops[task.kind] = self._gflops.get(task.kind, 0.0) + task.gflops
    del self._remaining[id(task)]
    self._log(f'{self._name}: {task.label} done; {self._total - len(self._remaining)}/'
              f'{self._total} tasks, {(time.perf_counter() - self._start) / 60:.1f} min, '
              f'{self.eta()}')

  def eta(self) -> str:
    seconds = 0.0
    for task in self._remaining.values():
      if not self._gflops.get(task.kind):
        return f'ETA after the first {task.kind} task'
      seconds += task.gflops * self._seconds[task.kind] / self._gflops[task.kind]
    return f'ETA {seconds / 60:.1f} min'


def encode_correct(correct: np.ndarray) -> list[str]:
  return [''.join('1' if c else '0' for c in row) for row in correct]


def decode_correct(rows: list[str]) -> np.ndarray:
  return np.array([[c == '1' for c in row] for row in rows], dtype=bool)


class RowStore:
  """Scored rows, one JSON file each under ``directory``: the row and, per seed, whether each
  sample was classified as its label (for paired differences)."""

  def __init__(self, directory: str):
    self.directory = directory

  def path(self, name: str) -> str:
    return io_utils.join(self.directory, f'{name}.json')

  def has(self, name: str) -> bool:
    return io_utils.exists(self.path(name))

  def load(self, name: str) -> tuple[dict, np.ndarray]:
    stored = io_utils.read_json(self.path(name))
    return stored['row'], decode_correct(stored['correct'])

  def save(self, name: str, row: dict, correct: np.ndarray) -> None:
    io_utils.write_json(self.path(name), dict(row=row, correct=encode_correct(correct)))
