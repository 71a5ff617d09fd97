"""Layers whose parameters are stored once at full size and used as leading slices.

A sub-model of nesting factor ``p`` uses, for every parameter, the first ``n // p`` entries of
each *nested* dimension (model width, heads, MLP width) and the whole of every other dimension
(head_dim, vocabulary). The factor is a static Python int, so every width compiles to its own
program over the same parameters.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nested_decode.models import partitioning

Dtype = jnp.dtype

default_kernel_init = nn.initializers.truncated_normal(stddev=0.02)


def leading_slice(param: jax.Array, nested_dims: Sequence[bool], factor: int) -> jax.Array:
  """Returns ``param[:n0//p, :n1//p, ...]`` on the dimensions marked nested."""
  index = tuple(
      slice(0, size // factor) if nested else slice(None)
      for size, nested in zip(param.shape, nested_dims))
  return param[index]


def nested_param(module: nn.Module, name: str, shape: tuple[int, ...],
                 nested_dims: tuple[bool, ...], logical_axes: tuple[str, ...],
                 init_fn: nn.initializers.Initializer, factor: int) -> jax.Array:
  """Declares the full-size parameter ``name`` on ``module`` and returns its slice."""
  full = module.param(name, nn.with_logical_partitioning(init_fn, logical_axes), shape,
                      jnp.float32)
  sharded = tuple(nested and partitioning.fsdp_sharded(axis)
                  for nested, axis in zip(nested_dims, logical_axes))
  local = tuple(nested and not split for nested, split in zip(nested_dims, sharded))
  if factor == 1 or not (any(sharded) and any(local)):
    return leading_slice(full, nested_dims, factor)
  # Under FSDP the rows of a sub-model's slice sit on the first chips only and are spread over
  # all of them before use. Slicing the other nested dimensions first (the barrier keeps XLA
  # from merging the two slices) spreads only the sub-model's block, not whole rows: a third of
  # the bytes of a width-D/8 pass (docs/tpu_fit.md). The values are the same.
  part = jax.lax.optimization_barrier(leading_slice(full, local, factor))
  return leading_slice(part, sharded, factor)


class NestedDense(nn.Module):
  """``x @ kernel[:in/p, ..., :out/p]`` over the trailing ``len(in_shape)`` axes of ``x``.

  ``in_shape`` and ``out_shape`` are the full-size shapes; ``in_nested``/``out_nested`` say which
  of their dimensions shrink with the factor (e.g. heads do, head_dim does not). The product is
  taken in ``dtype``; ``output_dtype`` (default ``dtype``) is what it accumulates into and adds
  the bias in, e.g. float32 logits from bfloat16 operands.
  """

  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  in_nested: tuple[bool, ...]
  out_nested: tuple[bool, ...]
  logical_axes: tuple[str, ...]
  use_bias: bool = False
  bias_nested: bool = True
  dtype: Dtype = jnp.float32
  output_dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, factor: int) -> jax.Array:
    output_dtype = self.dtype if self.output_dtype is None else self.output_dtype
    kernel = nested_param(self, 'kernel', self.in_shape + self.out_shape,
                          self.in_nested + self.out_nested, self.logical_axes,
                          default_kernel_init, factor)
    n_in = len(self.in_shape)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())),
                            preferred_element_type=output_dtype)
    if self.use_bias:
      bias_nested = self.out_nested if self.bias_nested else (False,) * len(self.out_shape)
      bias = nested_param(self, 'bias', self.out_shape, bias_nested, self.logical_axes[n_in:],
                          nn.initializers.zeros_init(), factor)
      y = y + bias.astype(output_dtype)
    return y


class NestedLayerNorm(nn.Module):
  """LayerNorm whose statistics are taken over the sub-model's own ``D/p`` features."""

  features: int
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, factor: int) -> jax.Array:
    scale = nested_param(self, 'scale', (self.features,), (True,), ('embed',),
                         nn.initializers.ones_init(), factor)
    bias = nested_param(self, 'bias', (self.features,), (True,), ('embed',),
                        nn.initializers.zeros_init(), factor)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype)


class NestedEmbed(nn.Module):
  """Embedding table ``[num_embeddings, D]``; a sub-model reads the first ``D/p`` columns."""

  num_embeddings: int
  features: int
  logical_axes: tuple[str, str] = ('vocab', 'embed')
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, factor: int) -> jax.Array:
    table = nested_param(self, 'embedding', (self.num_embeddings, self.features), (False, True),
                         self.logical_axes, default_kernel_init, factor)
    return jnp.take(table, ids, axis=0).astype(self.dtype)


class NestedAxisPositions(nn.Module):
  """Position embeddings of a class token and a row-major token ``grid`` (a video's time, rows
  and columns), each grid position's the sum of one learned row per grid axis: a row and column
  share their vector at every time step, so "the same place one frame back" is one relation to
  learn, not one per position. Called like ``NestedEmbed`` with sequence positions (0: the class
  token); a sub-model reads the first ``D/p`` columns of every table."""

  grid: tuple[int, ...]
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, factor: int) -> jax.Array:
    # The sum of len(grid) rows has the spread of one row of default_kernel_init.
    init = nn.initializers.truncated_normal(stddev=0.02 / len(self.grid) ** 0.5)
    param = lambda name, rows, init: nested_param(
        self, name, (rows, self.features), (False, True), ('position', 'embed'), init, factor)
    grid_rows = 0
    for axis, size in enumerate(self.grid):
      shape = [1] * len(self.grid) + [-1]
      shape[axis] = size
      grid_rows = grid_rows + param(f'axis_{axis}', size, init).reshape(shape)
    table = jnp.concatenate([param('class_position', 1, default_kernel_init),
                             grid_rows.reshape(-1, grid_rows.shape[-1])])
    return jnp.take(table, ids, axis=0).astype(self.dtype)
