"""Output files written atomically: readers see the old file or the whole new one, never half."""

import contextlib
import json
import os
import tempfile
from typing import IO, Iterator

import numpy as np


class CorruptDataError(ValueError):
  """An input file or record cannot be decoded; the message names it and says what to do."""


def ensure_writable_dir(path: str) -> None:
  """Creates directory ``path`` if needed and checks a file can be written in it.

  Raises:
    OSError: naming ``path`` and the reason (a parent or ``path`` itself is a file, no
      permission, a read-only file system). The check writes a file rather than asking
      ``os.access``, which says yes to root even where the file system refuses.
  """
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix='.write_test')
    os.close(fd)
    os.unlink(probe)
  except OSError as error:
    raise OSError(f'{path} is not a writable directory: {error}') from error


def _current_umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def _replaced_on_success(path: str, mode: str) -> Iterator[IO]:
  """Opens a temporary file next to ``path`` that replaces ``path`` once the block succeeds."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path), suffix='.tmp')
  try:
    with os.fdopen(fd, mode) as f:
      yield f
    os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600 files; outputs are shared
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def write_json(path: str, payload) -> None:
  with _replaced_on_success(path, 'w') as f:
    json.dump(payload, f, indent=2)
    f.write('\n')


def write_bytes(path: str, data: bytes) -> None:
  with _replaced_on_success(path, 'wb') as f:
    f.write(data)


def write_npz(path: str, **arrays) -> None:
  with _replaced_on_success(path, 'wb') as f:
    np.savez(f, **arrays)
