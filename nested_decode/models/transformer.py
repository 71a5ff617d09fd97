"""The nested bidirectional transformer over VQ tokens (MaskGIT-style, MatFormer-style nesting).

The input sequence is ``[class token] + N content tokens``. The class vocabulary holds
``num_classes`` labels plus one extra "unconditional" id (``num_classes``) for classifier-free
guidance; tasks without labels use only that id. Logits cover the codebook only.

One module serves training and both kinds of decode step:

* full pass (``cache=None``): ``tokens [B, N]`` and ``labels [B]``; returns logits ``[B, N, V]``
  and the keys/values of every position, ``KVCache`` with ``[L, B, 1 + N, (H/p) * head_dim]``
  (heads merged: see ``KVCache``);
* cached pass: ``tokens [B, A]`` at sequence ``positions [B, A]`` (content token ``i`` sits at
  ``1 + i``) plus a cache from an earlier pass of the same width; the active tokens' fresh keys
  and values are written into the cache, the tokens attend over the whole updated cache, and
  the logits ``[B, A, V]`` and the updated cache come back;
* nested pass (``width_factor`` a tuple of factors, no cache): the full pass of every one of
  those widths, as one pass over the layers whose blocks run each width in turn, so the widths'
  independent work sits side by side in one loop body and each layer's weights are read (and,
  sharded, gathered) once for all widths (the README's "Input pipeline and training speed" and
  "Scaling out" measure both); returns the tuple of their logits and no cache.

On a mesh the activations are pinned at every block boundary (``partitioning.py``): the batch
over ``data`` x ``fsdp``, heads, MLP units and logits over ``tensor``, the width replicated.
"""

import functools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from nested_decode.models import attention, partitioning
from nested_decode.models.nested_layers import (
  NestedAxisPositions,
  NestedDense,
  NestedEmbed,
  NestedLayerNorm,
)
from nested_decode.models.partitioning import HEADS, HIDDEN, LOGITS, MLP, constrain

# What a rematerialised block keeps from its forward pass for the backward pass; everything
# else is recomputed. 'none' does not rematerialise (every activation is kept).
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'save_attention_out': jax.checkpoint_policies.save_only_these_names('attention_out'),
}


class KVCache(NamedTuple):
  """Keys and values with the heads merged, ``[L, B, S, (H/p) * head_dim]``. Merged, the
  cached pass's row scatter and attention read a wide minor dimension instead of head_dim
  (48 at imagenet256, under the TPU's 128 lanes); the TPU compiler models imagenet256's
  cached ``magnets`` decode at 31% less time so (docs/tpu_time.md)."""
  keys: jax.Array
  values: jax.Array


class TransformerConfig(NamedTuple):
  """Static description of the full-size model (hashable, so it can key jit caches)."""
  num_layers: int
  width: int
  num_heads: int
  mlp_dim: int
  codebook_size: int
  num_classes: int
  seq_len: int  # content tokens N, without the class token
  nesting_factors: tuple[int, ...] = (1, 2, 4, 8)
  scan_layers: bool = True
  remat: str = 'none'  # a key of REMAT_POLICIES
  dtype: str = 'float32'
  attention_impl: str = 'xla'  # a value of attention.IMPLEMENTATIONS
  # The token grid whose axes get one position table each (``NestedAxisPositions``); empty: one
  # learned vector per sequence position.
  position_grid: tuple[int, ...] = ()
  # Training only (``train=True``): dropout of the embeddings and of each block's attention and
  # MLP outputs before they join the residual stream, and of the attention weights (MaskGIT's
  # hidden and attention-probability dropout).
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def mask_id(self) -> int:
    return self.codebook_size

  @property
  def unconditional_id(self) -> int:
    return self.num_classes


def scatter_rows(cache: jax.Array, positions: jax.Array, rows: jax.Array) -> jax.Array:
  """``cache[b, positions[b, a]] = rows[b, a]`` for ``cache [B, S, ...]``.

  Positions must be distinct and ascending within a row (the sampler's active positions are),
  which lets XLA use a plain, atomics-free scatter. Mapped over the rows, so a batch split over
  devices stays split (a scatter indexed by a batch iota would gather it).
  """
  return jax.vmap(lambda cache, positions, rows: cache.at[positions].set(
      rows.astype(cache.dtype), unique_indices=True, indices_are_sorted=True))(
          cache, positions, rows)


def cast_for_inference(params: Any, dtype: str) -> Any:
  """``params`` as every pass uses them in ``dtype``: kernels, biases and embedding tables cast
  (the layers cast them on every call otherwise), LayerNorm parameters kept as they are (norms
  compute in float32). Cast once per call site, a decode's steps then read half the bytes."""
  dtype = jnp.dtype(dtype)

  def cast(path, x):
    in_norm = any(str(getattr(key, 'key', '')).endswith('_norm') for key in path)
    return x if in_norm or not jnp.issubdtype(x.dtype, jnp.floating) else x.astype(dtype)

  return jax.tree_util.tree_map_with_path(cast, params)


class NestedBlock(nn.Module):
  """Pre-LayerNorm transformer block, applied at each width ``D / p`` of ``factors`` to that
  width's activations (one parameter set, sliced per width); ``train`` turns dropout on."""

  config: TransformerConfig
  factors: tuple[int, ...]
  train: bool = False

  @nn.compact
  def __call__(self, xs: tuple[jax.Array, ...], layer_cache: Optional[KVCache],
               positions: Optional[jax.Array]):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    h, d = cfg.num_heads, cfg.head_dim
    qkv = functools.partial(NestedDense, in_shape=(cfg.width,), out_shape=(h, d),
                            in_nested=(True,), out_nested=(True, False),
                            logical_axes=('embed', 'heads', 'kv'), dtype=dtype)
    attention_norm = NestedLayerNorm(cfg.width, dtype=dtype, name='attention_norm')
    query, key, value = qkv(name='query'), qkv(name='key'), qkv(name='value')
    attention_out = NestedDense(in_shape=(h, d), out_shape=(cfg.width,), in_nested=(True, False),
                                out_nested=(True,), logical_axes=('heads', 'kv', 'embed'),
                                dtype=dtype, name='attention_out')
    mlp_norm = NestedLayerNorm(cfg.width, dtype=dtype, name='mlp_norm')
    mlp_in = NestedDense(in_shape=(cfg.width,), out_shape=(cfg.mlp_dim,), in_nested=(True,),
                         out_nested=(True,), logical_axes=('embed', 'mlp'), use_bias=True,
                         dtype=dtype, name='mlp_in')
    mlp_out = NestedDense(in_shape=(cfg.mlp_dim,), out_shape=(cfg.width,), in_nested=(True,),
                          out_nested=(True,), logical_axes=('mlp', 'embed'), use_bias=True,
                          dtype=dtype, name='mlp_out')
    heads = lambda a: constrain(a, HEADS)
    merged = lambda a: partitioning.constrain_merged_heads(a, a.shape[2] // d)
    merge_heads = lambda a: merged(a.reshape(a.shape[:2] + (-1,)))
    split_heads = lambda a: heads(a.reshape(a.shape[:2] + (-1, d)))
    dropout = nn.Dropout(cfg.dropout_rate, deterministic=not self.train)
    attention_rng = (self.make_rng('dropout') if self.train and cfg.attention_dropout_rate > 0
                     else None)
    outputs = []
    for x, p in zip(xs, self.factors):
      y = attention_norm(x, p)
      q = heads(query(y, p))
      k, v = merge_heads(heads(key(y, p))), merge_heads(heads(value(y, p)))
      if layer_cache is not None:
        k = merged(scatter_rows(layer_cache.keys, positions, k))
        v = merged(scatter_rows(layer_cache.values, positions, v))
      width_rng = None if attention_rng is None else jax.random.fold_in(attention_rng, p)
      attended = heads(attention.attend(q, split_heads(k), split_heads(v), cfg.attention_impl,
                                        cfg.attention_dropout_rate, width_rng))
      attended = checkpoint_name(attended, 'attention_out')
      x = constrain(x + dropout(attention_out(attended, p)), HIDDEN)
      y = constrain(nn.gelu(mlp_in(mlp_norm(x, p), p)), MLP)
      outputs.append(constrain(x + dropout(mlp_out(y, p)), HIDDEN))
    # Keys and values only for a single width: decoding caches them, training drops them.
    return tuple(outputs), KVCache(k, v) if len(self.factors) == 1 else None


class NestedMaskedTransformer(nn.Module):
  """The nested masked-token transformer; see the module docstring for the call forms."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, labels: Optional[jax.Array] = None, *,
               width_factor: int | tuple[int, ...] = 1, positions: Optional[jax.Array] = None,
               cache: Optional[KVCache] = None, train: bool = False):
    """``train``: a training pass, with dropout (its random numbers from the ``'dropout'``
    RNG stream); decode passes never set it."""
    cfg = self.config
    factors = (width_factor,) if isinstance(width_factor, int) else tuple(width_factor)
    for p in factors:
      if p not in cfg.nesting_factors:
        raise ValueError(f'width_factor={p} is not one of nesting_factors={cfg.nesting_factors}')
    if len(factors) > 1 and cache is not None:
      raise ValueError(f'A cached pass runs one width; got width_factor={width_factor}')
    if train and cache is not None:
      raise ValueError('A cached pass is a decode step; it does not train')
    dtype = jnp.dtype(cfg.dtype)
    token_embed = NestedEmbed(cfg.codebook_size + 1, cfg.width, dtype=dtype, name='token_embed')
    if cfg.position_grid:
      position_table = NestedAxisPositions(tuple(cfg.position_grid), cfg.width, dtype=dtype,
                                           name='position_embed')
    else:
      position_table = NestedEmbed(cfg.seq_len + 1, cfg.width, ('position', 'embed'),
                                   dtype=dtype, name='position_embed')
    if cache is None:
      if labels is None:
        raise ValueError('A full pass needs labels (use the unconditional id for none).')
      class_embed = NestedEmbed(cfg.num_classes + 1, cfg.width, ('classes', 'embed'),
                                dtype=dtype, name='class_embed')
      xs = tuple(jnp.concatenate([class_embed(labels[:, None], p), token_embed(tokens, p)],
                                 axis=1) + position_table(jnp.arange(cfg.seq_len + 1)[None], p)
                 for p in factors)
    else:
      if positions is None:
        raise ValueError('A cached pass needs the positions of its tokens.')
      xs = (token_embed(tokens, factors[0]) + position_table(positions, factors[0]),)
    dropout = nn.Dropout(cfg.dropout_rate, deterministic=not train)
    xs = tuple(constrain(dropout(x), HIDDEN) for x in xs)
    xs, new_cache = self._layers(xs, cache, positions, factors, train)
    final_norm = NestedLayerNorm(cfg.width, dtype=dtype, name='final_norm')
    logits_layer = NestedDense(in_shape=(cfg.width,), out_shape=(cfg.codebook_size,),
                               in_nested=(True,), out_nested=(False,),
                               logical_axes=('embed', 'vocab'), use_bias=True, bias_nested=False,
                               dtype=dtype, output_dtype=jnp.float32, name='logits')
    logits = []
    for x, p in zip(xs, factors):
      if cache is None:
        x = x[:, 1:]  # logits for content tokens only
      logits.append(constrain(logits_layer(final_norm(x, p), p), LOGITS))
    if isinstance(width_factor, int):
      return logits[0], new_cache
    return tuple(logits), None

  def _layers(self, xs, cache, positions, factors, train):
    cfg = self.config
    block = NestedBlock
    if cfg.remat not in REMAT_POLICIES:
      raise ValueError(f'remat={cfg.remat!r} is not one of {tuple(REMAT_POLICIES)}')
    if cfg.remat != 'none':
      block = nn.remat(block, prevent_cse=not cfg.scan_layers, policy=REMAT_POLICIES[cfg.remat])
    if cfg.scan_layers:
      stack = nn.scan(block, variable_axes={'params': 0},
                      split_rngs={'params': True, 'dropout': True},
                      in_axes=(0, nn.broadcast), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      return stack(cfg, factors, train, name='layers')(xs, cache, positions)
    layer_caches = []
    for i in range(cfg.num_layers):
      layer_cache = None if cache is None else jax.tree.map(lambda c, i=i: c[i], cache)
      xs, new_layer_cache = block(cfg, factors, train, name=f'layers_{i}')(xs, layer_cache,
                                                                           positions)
      layer_caches.append(new_layer_cache)
    return xs, jax.tree.map(lambda *c: jnp.stack(c), *layer_caches)
