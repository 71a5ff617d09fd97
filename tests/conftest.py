import os

# The suite runs on the CPU. With libtpu installed (the dev extra, for test_tpu_compile.py) JAX
# would first try a TPU backend, and loading libtpu for it takes a machine-wide lock file, so a
# TPU compile in another process (another test run, a --mode=compile_tpu job) would fail.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# The suite's models are tiny, so compiling costs far more than running: LLVM's optimisation
# level 0 compiles about 40% faster here, and XLA:CPU's loop emitters instead of its fusion
# emitters take 19% off the cold configs/mnist.py:tiny job again (its eval table is the same
# either way). This process and every JAX process the tests start use both. libtpu reads
# XLA_FLAGS too and rejects the CPU-only flag, so a process that compiles for a TPU topology
# goes without it (`without_cpu_only_flags`).
FAST_COMPILE = '--xla_backend_optimization_level=0'
CPU_ONLY_FAST_COMPILE = '--xla_cpu_use_fusion_emitters=false'
CPU_FAST_COMPILE = f'{FAST_COMPILE} {CPU_ONLY_FAST_COMPILE}'
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_FAST_COMPILE}".strip()

import dataclasses
import importlib.util
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
# Scripts the tests run and modules they share (tests/helpers/).
HELPERS = os.path.join(ROOT, 'tests', 'helpers')
sys.path.insert(0, HELPERS)

import gcs_emulator  # pylint: disable=wrong-import-position

from nested_decode.models.transformer import NestedMaskedTransformer, TransformerConfig

jax.config.update('jax_default_matmul_precision', 'highest')

# One persistent compilation cache for the whole run, unless the user gave one: the pytest
# process makes it, and xdist's workers and the JAX processes the tests start inherit the
# variable (many of them compile the same programs, e.g. the tiny trainers and job stages);
# the process that made it removes it when the session ends, after its workers.
OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if OWN_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='nested_decode_test_jax_')
COMPILATION_CACHE = os.environ['JAX_COMPILATION_CACHE_DIR']
jax.config.update('jax_compilation_cache_dir', COMPILATION_CACHE)
# JAX caches only programs that took >= 1 s to compile by default; at optimisation level 0 most
# of the suite's take less, yet the same ones are compiled again by the job subprocesses of a
# test (a job, then --mode=sample, search and study on its workdir), so cache them all.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
jax.config.update('jax_persistent_cache_min_compile_time_secs',
                  float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))


def pytest_sessionfinish(session, exitstatus):
  if OWN_CACHE:
    shutil.rmtree(COMPILATION_CACHE, ignore_errors=True)


def small_config(**overrides) -> TransformerConfig:
  fields = dict(num_layers=2, width=64, num_heads=8, mlp_dim=256, codebook_size=32,
                num_classes=10, seq_len=16)
  fields.update(overrides)
  return TransformerConfig(**fields)


def init_params(config: TransformerConfig, seed: int = 0):
  model = NestedMaskedTransformer(config)
  tokens = jnp.zeros((1, config.seq_len), jnp.int32)
  labels = jnp.zeros((1,), jnp.int32)
  return jax.jit(lambda rng: nn.unbox(model.init(rng, tokens, labels)))(jax.random.key(seed))


@pytest.fixture
def model_and_params():
  config = small_config()
  return NestedMaskedTransformer(config), init_params(config)


def jitted_apply(model: NestedMaskedTransformer):
  """``model.apply`` compiled once per width (eager Flax on CPU is much slower than compiling)."""
  return jax.jit(model.apply, static_argnames=('width_factor',))


def without_cpu_only_flags(xla_flags: str) -> str:
  return ' '.join(flag for flag in xla_flags.split() if flag != CPU_ONLY_FAST_COMPILE)


@pytest.fixture
def tpu_compiler(monkeypatch):
  """XLA_FLAGS that libtpu accepts, for tests that compile for a TPU topology in this process.
  Each backend reads XLA_FLAGS once, when it starts: libtpu in the first such test, the CPU
  backend usually earlier (one that starts under this fixture only compiles a little slower)."""
  monkeypatch.setenv('XLA_FLAGS', without_cpu_only_flags(os.environ['XLA_FLAGS']))


@pytest.fixture(scope='session')
def gcs_bucket():
  """``gs://BUCKET`` on a Cloud Storage emulator started once per session
  (``tests/helpers/gcs_emulator.py``); the variables pointing gcsfs and tensorstore at it stay
  set in ``os.environ`` for the session, so subprocesses started with it reach the bucket too."""
  with gcs_emulator.running() as url, pytest.MonkeyPatch.context() as patch:
    for key, value in gcs_emulator.environment(url).items():
      patch.setenv(key, value)
    yield f'gs://{gcs_emulator.BUCKET}'


def load_config(name: str, variant: str | None = None):
  """``configs/<name>.py``'s ``get_config(variant)``."""
  path = os.path.join(ROOT, 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def cpu_env(devices: int, **extra) -> dict:
  """The environment of a JAX subprocess on ``devices`` virtual CPU devices, without this
  process's cluster or device settings."""
  cluster = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'JAX_PLATFORMS')
  env = {k: v for k, v in os.environ.items()
         if k not in cluster and not k.startswith(('SLURM_', 'TPU_')) and k != 'XLA_FLAGS'}
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {CPU_FAST_COMPILE}',
             JAX_PLATFORMS='cpu', **extra)
  return env


def start_main(*args, env: dict | None = None) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, '-m', 'nested_decode.main', *args], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)



@dataclasses.dataclass
class BucketJob:
  """A finished main job whose workdir is in the emulated bucket; ``cwd`` and ``tmp`` (its
  working folder and TMPDIR) were empty and must stay so; ``env`` runs more of it."""
  workdir: str
  cwd: pathlib.Path
  tmp: pathlib.Path
  env: dict
  stderr: str


@pytest.fixture(scope='session')
def mnist_tiny_job(gcs_bucket, tmp_path_factory) -> BucketJob:
  """The whole ``configs/mnist.py:tiny`` job, once, with ``--workdir`` in the bucket, in one
  process on 4 CPU devices (the mesh that the two-process test splits over 2 x 2 devices)."""
  cwd, tmp = tmp_path_factory.mktemp('job_cwd'), tmp_path_factory.mktemp('job_tmp')
  # The suite's compilation cache (outside cwd and TMPDIR) stays: a user's setting, not output
  # of the job, and the later modes on this workdir reuse the job's programs.
  env = cpu_env(4, PYTHONPATH=ROOT, TMPDIR=str(tmp))
  workdir = f'{gcs_bucket}/mnist_job'
  run = subprocess.run([sys.executable, '-m', 'nested_decode.main',
                        f'--config={ROOT}/configs/mnist.py:tiny', f'--workdir={workdir}'],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr
  return BucketJob(workdir, cwd, tmp, env, run.stderr)


# With `-n 2 --dist loadfile` (the README's test command) each file runs on one worker; the
# longest files start first, so that both workers finish at about the same time.
LONGEST_FIRST = ('test_main.py', 'test_fid_eval.py', 'test_video_job.py', 'test_parallel.py',
                 'test_faults.py', 'test_tpu_compile.py')


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
