"""Files of the workdir and of the data, local or on Cloud Storage (``gs://bucket/...``).

The package reads and writes workdir and data files only through these helpers, which use
``etils.epath`` (the path library orbax uses for checkpoints; ``gs://`` through ``gcsfs``).
Paths are plain strings. Read directly: files shipped inside installed packages (MNIST digits,
I3D weights) and the Kinetics video files, which must be local (``data/video_files.py``).

Writes are atomic: readers see the old file or the whole new one, never half. A local file is
written to a temporary file next to it and renamed over it. A ``gs://`` object is written to
its final name in one upload: Cloud Storage makes an object visible only once its upload has
completed, so there is no temporary object and no rename (which GCS does not have).
"""

import contextlib
import io
import json
import os
import socket
import tempfile
import urllib.parse
import uuid
from typing import Iterator

import numpy as np
from etils import epath

CLOUD_PREFIX = 'gs://'
PUBLIC_GCS_ENDPOINT = 'https://storage.googleapis.com'
# How long the workdir check waits for Cloud Storage before naming it unreachable; gcsfs
# itself retries a refused connection for about half a minute.
GCS_CHECK_TIMEOUT_S = 20.0


class CorruptDataError(ValueError):
  """An input file or record cannot be decoded; the message names it and says what to do."""


def is_cloud(path: str) -> bool:
  return str(path).startswith(CLOUD_PREFIX)


def join(*parts: str) -> str:
  """``parts`` joined with ``/``; ``join('gs://b/run', 'eval.json') == 'gs://b/run/eval.json'``."""
  return os.fspath(epath.Path(*parts))


def absolute(path: str) -> str:
  """A local path made absolute; ``gs://`` paths are absolute already."""
  return path if is_cloud(path) else os.fspath(epath.Path(path).absolute())


def exists(path: str) -> bool:
  """Whether a file or a directory is there (on GCS: an object, or objects under the prefix)."""
  return epath.Path(path).exists()


def read_bytes(path: str) -> bytes:
  return epath.Path(path).read_bytes()


def read_text(path: str) -> str:
  return epath.Path(path).read_text(encoding='utf-8')


def load_npz(path: str) -> dict[str, np.ndarray]:
  """Every array of an ``.npz`` file, read whole (no pickles)."""
  with np.load(io.BytesIO(read_bytes(path))) as stored:
    return {key: stored[key] for key in stored.files}


def write_bytes(path: str, data: bytes) -> None:
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f'write_bytes({path!r}) needs bytes, got {type(data).__name__}')
  if is_cloud(path):
    epath.Path(path).write_bytes(data)  # one upload: atomic (see the module docstring)
    return
  with _replaced_on_success(path) as f:
    f.write(data)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


def read_json(path: str):
  return json.loads(read_text(path))


def write_json(path: str, payload) -> None:
  write_text(path, json.dumps(payload, indent=2) + '\n')


def write_npz(path: str, **arrays) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes(path, buffer.getvalue())


def ensure_writable_dir(path: str) -> None:
  """Creates directory ``path`` if needed and checks a file can be written in it.

  A local directory is created and a probe file written and removed: ``os.access`` would say
  yes to root even where the file system refuses. A ``gs://`` path (GCS has no directories)
  is checked by uploading and deleting a probe object, within ``GCS_CHECK_TIMEOUT_S``.

  Raises:
    OSError: naming ``path`` and the reason (a parent or ``path`` itself is a file, no
      permission, a read-only file system; no GCS client, an unreachable endpoint, a missing
      bucket, no write permission).
  """
  try:
    if is_cloud(path):
      _check_gcs_writable(path)
      return
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix='.write_test')
    os.close(fd)
    os.unlink(probe)
  except OSError as error:
    reason = '; '.join(str(error).splitlines())  # the server's message may span lines
    raise OSError(f'{path} is not a writable directory: {reason}') from error


def _gcs_endpoint() -> str:
  """The Cloud Storage endpoint gcsfs talks to: ``$STORAGE_EMULATOR_HOST`` or the public one."""
  emulator = os.environ.get('STORAGE_EMULATOR_HOST', '')
  if emulator in ('', 'default'):
    return PUBLIC_GCS_ENDPOINT
  return emulator if emulator.startswith(('http://', 'https://')) else f'http://{emulator}'


def _check_gcs_writable(path: str) -> None:
  try:
    import gcsfs
  except ImportError as error:
    raise OSError('reading and writing gs:// paths needs the Cloud Storage client gcsfs: '
                  'pip install gcsfs') from error
  endpoint = _gcs_endpoint()
  arrays_endpoint = os.environ.get('TENSORSTORE_GCS_HTTP_URL', PUBLIC_GCS_ENDPOINT)
  if arrays_endpoint.rstrip('/') != endpoint.rstrip('/'):
    raise OSError(f'files would go to {endpoint} (STORAGE_EMULATOR_HOST) but checkpoint arrays '
                  f'to {arrays_endpoint} (TENSORSTORE_GCS_HTTP_URL); set both to the same '
                  'endpoint, or neither for Cloud Storage itself')
  _check_reachable(endpoint)
  filesystem = gcsfs.GCSFileSystem(skip_instance_cache=True,
                                   requests_timeout=GCS_CHECK_TIMEOUT_S)
  probe = join(path, f'.write_test-{uuid.uuid4().hex}')  # one per process of a pod
  try:
    filesystem.pipe_file(probe, b'', timeout=GCS_CHECK_TIMEOUT_S)
    filesystem.rm_file(probe, timeout=GCS_CHECK_TIMEOUT_S)
  except FileNotFoundError as error:
    bucket = path[len(CLOUD_PREFIX):].split('/')[0]
    raise OSError(f'bucket {bucket} does not exist at {endpoint}') from error
  except TimeoutError as error:  # an OSError too, without a message
    raise OSError(f'no answer from {endpoint} within {GCS_CHECK_TIMEOUT_S:g} s') from error
  except OSError as error:
    message = str(error).splitlines()
    if message and message[0].startswith('Forbidden'):  # gcsfs: 'Forbidden: URL\nWHY' (403)
      raise PermissionError(f'permission denied: {message[-1]}') from error
    raise
  except Exception as error:  # pylint: disable=broad-except  # e.g. credentials, HTTP errors
    raise OSError(f'{type(error).__name__}: {error}') from error


def _check_reachable(endpoint: str) -> None:
  """Connects to the endpoint's port, so a wrong or closed one fails now, not after retries."""
  url = urllib.parse.urlsplit(endpoint)
  port = url.port or (443 if url.scheme == 'https' else 80)
  try:
    socket.create_connection((url.hostname, port), timeout=GCS_CHECK_TIMEOUT_S).close()
  except OSError as error:
    raise OSError(f'cannot reach Cloud Storage at {endpoint}: {error.strerror or error}') \
        from error


def _current_umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def _replaced_on_success(path: str) -> Iterator[io.BufferedWriter]:
  """Opens a temporary file next to local ``path`` that replaces it once the block succeeds."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path), suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      yield f
    os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600 files; outputs are shared
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
