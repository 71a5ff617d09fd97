"""Bidirectional multi-head attention ``q [B, Q, h, d]`` over ``k, v [B, K, h, d]``, by
implementation (``config.model.attention_impl``):

* ``xla``: ``jax.nn.dot_product_attention``, materialising the ``[B, h, Q, K]`` scores;
* ``deferred``: the same materialised attention with fewer passes over the scores, for where
  their trips through memory set the time (CPUs; TPUs, by the compiler's model): heads
  lead (``[B, h, Q, d]``), the weights stay unnormalised (``exp(s - max s)``) through the
  product with the values, and the division by their row sums is applied to the ``[B, h, Q, d]``
  result, one pass fewer over the scores; its backward is softmax attention's own, written out.
  It has ``xla``'s attention-weight dropout too, dropping the same weights for the same key.
  A nested train step of ``configs/k600.py:tiny`` (577 tokens, heads of 16) takes about half
  the time of ``xla``'s on 2 CPU cores (docs/results.md), and the TPU compiler models a k600
  layer's attention at 44% less time forward and 14% less forward and backward on a v5e
  (docs/tpu_time.md);
* ``cudnn``: the same through cuDNN's fused kernel (GPU only);
* ``splash``: the Pallas splash-attention kernel for TPU, which never holds the whole score
  matrix: memory grows with the sequence, not its square. It runs in interpret mode where the
  devices are not TPUs (slow; for tests), and works for ``Q != K`` too, so the KV-cached decode
  pass (a subset of queries over the whole cache) uses it as well.

Splash needs sequence lengths that are multiples of its block (128): queries and keys are padded
to one, the padded keys are kept out of every softmax with segment ids (real keys share the
queries' segment, padded keys do not), and the padded query rows are dropped. A kernel cannot be
partitioned by XLA, so under a mesh (``jax.set_mesh``, as the train step and the TPU compile set
it) it runs inside ``shard_map`` in the layout ``partitioning.HEADS``: batch over the batch axes,
heads over ``tensor`` where that divides the heads of the width at hand (sub-model ``p`` has
``h / p`` heads).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from nested_decode.models import partitioning

IMPLEMENTATIONS = ('xla', 'deferred', 'cudnn', 'splash')
DROPOUT_IMPLEMENTATIONS = ('xla', 'deferred')
SPLASH_BLOCK = 128


def attend(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str,
           dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None) -> jax.Array:
  """Attention of every query over every key; returns ``[B, Q, h, d]`` in ``q``'s dtype.

  With a ``dropout_rng`` and ``dropout_rate > 0`` (training only) each attention weight is
  dropped with that probability and the rest scaled by ``1 / (1 - rate)``; the ``xla`` and
  ``deferred`` implementations have that option, and with one ``dropout_rng`` they drop the same
  weights.
  """
  if dropout_rate <= 0:
    dropout_rng = None
  if dropout_rng is not None and implementation not in DROPOUT_IMPLEMENTATIONS:
    raise ValueError(f'attention-weight dropout needs one of the attention implementations '
                     f'{DROPOUT_IMPLEMENTATIONS}, not {implementation!r}')
  if implementation == 'deferred':
    return deferred_attend(q, k, v, dropout_rate, dropout_rng)
  if dropout_rng is not None:
    return attend_with_dropout(q, k, v, dropout_rate, dropout_rng)
  if implementation == 'splash':
    return splash_attend(q, k, v)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'attention implementation {implementation!r} is not one of '
                     f'{IMPLEMENTATIONS}')
  impl = None if implementation == 'xla' else implementation
  return jax.nn.dot_product_attention(q, k, v, implementation=impl)


def _keep_mask(rng: jax.Array | None, rate: float, shape: tuple[int, ...]) -> jax.Array | None:
  """The attention weights kept by dropout at ``rate``, one draw per ``[B, h, Q, K]`` weight;
  ``None`` (all kept) without a key."""
  return None if rng is None else jax.random.bernoulli(rng, 1.0 - rate, shape)


def _dropped(x: jax.Array, keep: jax.Array | None, rate: float) -> jax.Array:
  """``x`` where ``keep``, scaled by ``1 / (1 - rate)``, and zero elsewhere."""
  return x if keep is None else jnp.where(keep, x / (1.0 - rate), 0.0)


def attend_with_dropout(q: jax.Array, k: jax.Array, v: jax.Array, rate: float,
                        rng: jax.Array) -> jax.Array:
  """Softmax attention with the ``[B, h, Q, K]`` weights dropped at ``rate``."""
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(scores / math.sqrt(q.shape[-1]), axis=-1)
  weights = _dropped(weights, _keep_mask(rng, rate, weights.shape), rate).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v).astype(q.dtype)


def deferred_attend(q: jax.Array, k: jax.Array, v: jax.Array, dropout_rate: float = 0.0,
                    dropout_rng: jax.Array | None = None) -> jax.Array:
  """Softmax attention normalised after the value product (see the module docstring).

  Dropout commutes with the deferred division: dropping weights of ``p = e / rowsum(e)`` is
  dropping them from ``e`` before the value product, with the row sums taken over all of ``e``.
  """
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  return jnp.swapaxes(_deferred_core(dropout_rate, q, k, v, dropout_rng), 1, 2)


def _deferred_forward(rate, q, k, v, rng):
  """``[B, h, Q, d]`` outputs in float32, the unnormalised weights and their row sums."""
  scale = jnp.asarray(1 / math.sqrt(q.shape[-1]), q.dtype)
  scores = jnp.einsum('bhqd,bhkd->bhqk', q * scale, k, preferred_element_type=jnp.float32)
  weights = jnp.exp(scores - scores.max(axis=-1, keepdims=True))  # the shift keeps exp in range
  sums = weights.sum(axis=-1, keepdims=True)
  kept = _dropped(weights, _keep_mask(rng, rate, weights.shape), rate)
  out = jnp.einsum('bhqk,bhkd->bhqd', kept.astype(v.dtype), v,
                   preferred_element_type=jnp.float32) / sums
  return out, weights, sums


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _deferred_core(rate, q, k, v, rng):
  return _deferred_forward(rate, q, k, v, rng)[0].astype(q.dtype)


def _deferred_core_forward(rate, q, k, v, rng):
  out, weights, sums = _deferred_forward(rate, q, k, v, rng)
  return out.astype(q.dtype), (q, k, v, rng, out, weights, sums)


def _deferred_core_backward(rate, residuals, d_out):
  """Softmax attention's own backward (``d_scores = p * (d_p - rowsum(d_out * out))``), with
  ``p`` never formed: autodiff of the forward's steps would be modeled 1.6x slower on a v5e
  (docs/tpu_time.md). Under dropout ``d_p`` is kept where the weights were (the mask is drawn
  again from its key, not stored) and the row sum is unchanged."""
  q, k, v, rng, out, weights, sums = residuals
  d_out = d_out.astype(jnp.float32)
  keep = _keep_mask(rng, rate, weights.shape)
  d_v = jnp.einsum('bhqk,bhqd->bhkd', _dropped(weights, keep, rate).astype(v.dtype),
                   (d_out / sums).astype(v.dtype), preferred_element_type=jnp.float32)
  d_weights = _dropped(jnp.einsum('bhqd,bhkd->bhqk', d_out.astype(v.dtype), v,
                                  preferred_element_type=jnp.float32), keep, rate)
  d_scores = weights / sums * (d_weights - jnp.sum(d_out * out, axis=-1, keepdims=True))
  d_scores = (d_scores / math.sqrt(q.shape[-1])).astype(q.dtype)
  d_q = jnp.einsum('bhqk,bhkd->bhqd', d_scores, k, preferred_element_type=jnp.float32)
  d_k = jnp.einsum('bhqk,bhqd->bhkd', d_scores, q, preferred_element_type=jnp.float32)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_deferred_core.defvjp(_deferred_core_forward, _deferred_core_backward)


def _round_up(length: int) -> int:
  return -(-length // SPLASH_BLOCK) * SPLASH_BLOCK


def _pad_sequence(x: jax.Array, length: int) -> jax.Array:
  """``[B, S, h, d]`` -> ``[B, h, length, d]``, zero-padded along the sequence."""
  x = jnp.swapaxes(x, 1, 2)
  return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))


def splash_local(q: jax.Array, k: jax.Array, v: jax.Array, interpret: bool) -> jax.Array:
  """Splash attention on the arrays of one device (no mesh)."""
  _, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  q_padded, kv_padded = _round_up(q_len), _round_up(kv_len)
  q = q * jnp.asarray(1 / math.sqrt(head_dim), q.dtype)  # the kernel does not scale
  q, k, v = _pad_sequence(q, q_padded), _pad_sequence(k, kv_padded), _pad_sequence(v, kv_padded)
  mask = masks.MultiHeadMask([masks.FullMask((q_padded, kv_padded))] * heads)
  kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)
  segment_ids = None
  if kv_padded != kv_len:
    segment_ids = splash.SegmentIds(
        q=jnp.zeros((q_padded,), jnp.int32),
        kv=(jnp.arange(kv_padded) >= kv_len).astype(jnp.int32))
  out = jax.vmap(functools.partial(kernel, segment_ids=segment_ids))(q, k, v)
  return jnp.swapaxes(out[:, :, :q_len], 1, 2).astype(q.dtype)


def splash_attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Splash attention, inside ``shard_map`` over the context mesh when there is one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return splash_local(q, k, v, interpret=jax.default_backend() != 'tpu')
  interpret = mesh.abstract_device.platform != 'tpu'
  spec = partitioning.current_spec(partitioning.HEADS, q.shape, mesh)
  run = functools.partial(splash_local, interpret=interpret)
  return jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)
