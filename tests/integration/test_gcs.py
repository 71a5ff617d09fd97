"""Workdirs on Cloud Storage (``gs://``), against the session's local GCS API server
(``gcs_bucket``, see ``tests/helpers/gcs_emulator.py``): the path helpers, and one clear line for
each unusable ``gs://`` workdir before anything runs. The whole tiny job in a bucket, with nothing
of it on local disk: ``tests/integration/test_main.py``; preemption and two-process checkpoints
in a bucket: ``tests/integration/test_faults.py``.
"""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading

import gcs_emulator
import numpy as np
import pytest
from conftest import ROOT

from nested_decode import io_utils


def test_path_helpers_read_back_what_they_wrote_to_a_bucket(gcs_bucket):
  base = io_utils.join(gcs_bucket, 'helpers')
  assert base == f'{gcs_bucket}/helpers' and io_utils.absolute(base) == base
  assert not io_utils.exists(base)
  io_utils.write_json(io_utils.join(base, 'a.json'), {'x': 1})
  io_utils.write_npz(io_utils.join(base, 'sub', 'b.npz'), a=np.arange(3))
  assert json.loads(io_utils.read_text(io_utils.join(base, 'a.json'))) == {'x': 1}
  np.testing.assert_array_equal(io_utils.load_npz(io_utils.join(base, 'sub', 'b.npz'))['a'],
                                np.arange(3))
  assert io_utils.exists(io_utils.join(base, 'sub'))  # a prefix with objects under it
  io_utils.write_text(io_utils.join(base, 'a.json'), 'replaced')
  assert io_utils.read_text(io_utils.join(base, 'a.json')) == 'replaced'


def test_kinetics_csvs_are_read_from_a_bucket_but_videos_must_be_local(gcs_bucket):
  from nested_decode.data import video_files
  csv_path = io_utils.join(gcs_bucket, 'k600', 'train.csv')
  io_utils.write_text(csv_path, 'label,youtube_id,time_start,time_end,split\n'
                                'abseiling,abc,10,20,train\n')
  assert video_files.read_clip_csv(csv_path) == [
      video_files.ClipRow('abc', 10, 20, 'abseiling')]
  with pytest.raises(NotADirectoryError, match=f'Video folder {gcs_bucket}/k600/videos is on '
                                               'Cloud Storage.*copy them to local disk'):
    video_files.VideoFileSource(f'{gcs_bucket}/k600/videos', csv_path)


# ----------------------------------------------------------------------------------------------
# Bad gs:// workdirs: one line naming the path and the cause, before anything runs
# ----------------------------------------------------------------------------------------------

class Forbidding(http.server.BaseHTTPRequestHandler):
  """Answers every request as Cloud Storage answers a caller without write permission."""

  def _refuse(self):
    body = json.dumps({'error': {'code': 403, 'message': 'caller does not have '
                                 'storage.objects.create access'}}).encode()
    self.send_response(403)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  do_GET = do_POST = do_PUT = do_DELETE = _refuse

  def log_message(self, *args):
    del args


@pytest.fixture(scope='module')
def forbidding_endpoint():
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Forbidding)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  yield f'http://127.0.0.1:{server.server_address[1]}'
  server.shutdown()
  server.server_close()


def bad_workdir_cases(bucket, forbidding):
  """``(workdir, environment changes, expected cause)`` of each fault; ``no_gcsfs`` is made by
  the test."""
  closed = f'http://127.0.0.1:{gcs_emulator.free_port()}'
  return {
      'unreachable': (f'{bucket}/run', gcs_emulator.environment(closed),
                      f'cannot reach Cloud Storage at {closed}: Connection refused'),
      'no_bucket': ('gs://no-such-bucket/run', {},
                    'bucket no-such-bucket does not exist at http://127.0.0.1:'),
      'forbidden': (f'{bucket}/run', gcs_emulator.environment(forbidding),
                    'permission denied: caller does not have storage.objects.create access'),
      'no_gcsfs': (f'{bucket}/run', {},
                   'gs:// paths needs the Cloud Storage client gcsfs: pip install gcsfs'),
      'split_endpoints': (f'{bucket}/run', {'TENSORSTORE_GCS_HTTP_URL': closed},
                          f'checkpoint arrays to {closed} (TENSORSTORE_GCS_HTTP_URL)'),
  }


@pytest.mark.parametrize('case', ['unreachable', 'no_bucket', 'forbidden', 'no_gcsfs',
                                  'split_endpoints'])
def test_an_unusable_bucket_workdir_is_named_with_its_cause(gcs_bucket, forbidding_endpoint,
                                                            monkeypatch, case):
  workdir, changes, expected = bad_workdir_cases(gcs_bucket, forbidding_endpoint)[case]
  for key, value in changes.items():
    monkeypatch.setenv(key, value)
  if case == 'no_gcsfs':
    monkeypatch.setitem(sys.modules, 'gcsfs', None)  # makes `import gcsfs` fail
  with pytest.raises(OSError) as error:
    io_utils.ensure_writable_dir(workdir)
  message = str(error.value)
  assert message.startswith(f'{workdir} is not a writable directory: ') and '\n' not in message
  assert expected in message, message


def test_an_endpoint_that_never_answers_is_named_within_the_bound(gcs_bucket, monkeypatch):
  with socket.create_server(('127.0.0.1', 0)) as silent:  # accepts connections, never answers
    url = f'http://127.0.0.1:{silent.getsockname()[1]}'
    for key, value in gcs_emulator.environment(url).items():
      monkeypatch.setenv(key, value)
    monkeypatch.setattr(io_utils, 'GCS_CHECK_TIMEOUT_S', 1.0)
    with pytest.raises(OSError, match=f'{gcs_bucket}/run is not a writable directory: no answer '
                                      f'from {url} within 1 s'):
      io_utils.ensure_writable_dir(f'{gcs_bucket}/run')


@pytest.mark.parametrize('case', ['unreachable', 'no_gcsfs'])
def test_main_stops_on_an_unusable_bucket_workdir_with_one_line_before_training(
    gcs_bucket, forbidding_endpoint, tmp_path, case):
  workdir, changes, expected = bad_workdir_cases(gcs_bucket, forbidding_endpoint)[case]
  python_path = ROOT
  if case == 'no_gcsfs':  # a module first on the path that fails as a missing package does
    (tmp_path / 'gcsfs.py').write_text("raise ImportError('No module named gcsfs')\n")
    python_path = f'{tmp_path}:{ROOT}'
  result = subprocess.run(
      [sys.executable, '-m', 'nested_decode.main', '--config=configs/mnist.py:tiny',
       f'--workdir={workdir}', '--mode=train'],
      cwd=ROOT, env={**os.environ, **changes, 'PYTHONPATH': python_path}, capture_output=True,
      text=True, timeout=120)
  assert result.returncode == 1, result.stderr
  assert 'Traceback' not in result.stderr and '[tokenizer]' not in result.stderr
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith(f'--workdir: {workdir} is not a writable directory: '), line
  assert expected in line, line
