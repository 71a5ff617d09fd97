"""A CPU-only machine with the README's install (libtpu included, for --mode=compile_tpu) starts
its JAX processes without backend errors for hardware it does not have."""

import os
import re
import subprocess
import sys

from conftest import ROOT, start_main, without_cpu_only_flags

from nested_decode import platforms

# What libtpu logs when it starts on a machine without TPU chips, and any absl error line.
BACKEND_NOISE = re.compile(r'libtpu|TPU_|InitGoogle|Source Location Trace|accelerator type|'
                           r'^E\d{4} ', re.MULTILINE)


def readme_env() -> dict:
  """This process's environment as a user's shell has it: no JAX_PLATFORMS (the suite sets
  one), no lock file of another JAX process that would keep libtpu from starting at all
  and so hide its errors, and no CPU-only XLA flag, which libtpu rejects."""
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS' and not k.startswith('TPU_')}
  return dict(env, ALLOW_MULTIPLE_LIBTPU_LOAD='1',
              XLA_FLAGS=without_cpu_only_flags(os.environ['XLA_FLAGS']))


def test_platforms_leave_out_the_tpu_only_where_there_are_no_chips_and_no_user_choice():
  yes, no = (lambda: True), (lambda: False)
  assert platforms.without_absent_tpu({}, tpu_chips=no, cuda_gpu=no) == 'cpu'
  assert platforms.without_absent_tpu({}, tpu_chips=no, cuda_gpu=yes) == 'cuda,cpu'
  assert platforms.without_absent_tpu({}, tpu_chips=yes, cuda_gpu=no) is None
  assert platforms.without_absent_tpu({'JAX_PLATFORMS': 'tpu'}, no, no) is None
  assert platforms.without_absent_tpu({'JAX_PLATFORMS': ''}, no, no) is None


def test_a_job_started_as_the_readme_says_prints_no_backend_errors(tmp_path):
  job = start_main('--config=configs/mnist.py:tiny', '--mode=flops',
                   f'--workdir={tmp_path}', env=readme_env())
  stdout, stderr = job.communicate(timeout=300)
  assert job.returncode == 0, stderr
  assert 'baseline' in stdout
  assert not BACKEND_NOISE.findall(stdout + stderr), stderr


def test_describing_a_tpu_slice_for_compiling_prints_no_backend_errors():
  describe = ('from nested_decode.tools import tpu_fit; '
              'print(len(tpu_fit.topology_devices("v5e:2x2")))')
  done = subprocess.run([sys.executable, '-c', describe], cwd=ROOT, env=readme_env(),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert done.stdout.split() == ['4']
  assert not BACKEND_NOISE.findall(done.stdout + done.stderr), done.stderr
