import os

# The suite runs on the CPU. With libtpu installed (the dev extra, for test_tpu_compile.py) JAX
# would first try a TPU backend, and loading libtpu for it takes a machine-wide lock file, so a
# TPU compile in another process (another test run, a --mode=compile_tpu job) would fail.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from nested_decode.models.transformer import NestedMaskedTransformer, TransformerConfig

jax.config.update('jax_default_matmul_precision', 'highest')


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
