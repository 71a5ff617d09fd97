import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from nested_decode.models.transformer import NestedMaskedTransformer, TransformerConfig

jax.config.update('jax_default_matmul_precision', 'highest')

# One persistent compilation cache for the session and the JAX processes its tests start (they
# inherit the variable): many of them compile the same programs, e.g. the tiny trainers.
OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
COMPILATION_CACHE = os.environ.setdefault(
    'JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='nested_decode_test_jax_cache_'))
jax.config.update('jax_compilation_cache_dir', COMPILATION_CACHE)


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


def load_config(name: str, variant: str | None = None):
  """``configs/<name>.py``'s ``get_config(variant)``."""
  path = os.path.join(os.path.dirname(__file__), '..', 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


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
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu',
             **extra)
  return env


def start_main(*args, env: dict | None = None) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, '-m', 'nested_decode.main', *args], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope='session')
def mnist_tiny_job(tmp_path_factory):
  """The whole ``configs/mnist.py:tiny`` job, once, in one process on 4 CPU devices (the mesh
  the two-process tests split over 2 x 2): ``(workdir, stderr)``."""
  workdir = tmp_path_factory.mktemp('mnist_tiny_job')
  run = start_main('--config=configs/mnist.py:tiny', f'--workdir={workdir}', env=cpu_env(4))
  _, stderr = run.communicate(timeout=600)
  assert run.returncode == 0, stderr
  return workdir, stderr
