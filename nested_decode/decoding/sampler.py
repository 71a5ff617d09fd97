"""The decode loop: one jit-compiled function per (model, plan, options), static shapes throughout.

Each step of the plan runs the nested transformer at its width, either as a full pass that
rebuilds the KV cache or over the active tokens only, reusing the cache (see ``plan.py``). Masked
tokens are sampled from the (guided) logits; the least confident of them, with Gumbel noise
annealed by the choice temperature, are masked again so that exactly ``step.masked_after`` stay
masked. Tokens that were given at the start are never changed.
"""

import dataclasses
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nested_decode.decoding.plan import DecodeStep
from nested_decode.models.transformer import NestedMaskedTransformer

GUIDANCE_SCHEDULES = ('constant', 'linear')


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  temperature: float = 1.0
  top_k: int = 0                    # 0 keeps the whole codebook
  choice_temperature: float = 4.5
  guidance_scale: float = 0.0       # w in (1 + w) * cond - w * uncond; 0 disables the extra pass
  guidance_schedule: str = 'constant'  # 'linear' ramps w from 0 to guidance_scale over T

  def guidance_at(self, ratio: float) -> float:
    if self.guidance_schedule == 'constant':
      return self.guidance_scale
    if self.guidance_schedule == 'linear':
      return self.guidance_scale * ratio
    raise ValueError(f'Unknown guidance schedule {self.guidance_schedule!r}; '
                     f'allowed: {GUIDANCE_SCHEDULES}')


class DecodeOutput(NamedTuple):
  tokens: jax.Array          # [B, N], no mask id left
  masked_counts: jax.Array   # [T, B] tokens still masked after each step
  logit_counts: jax.Array    # [T] content positions the network produced logits for, per step
  step_tokens: jax.Array | None = None  # [B, T, N] the canvas after each step (record_steps)


def sample_tokens(logits: jax.Array, gumbel_noise: jax.Array, temperature: float,
                  top_k: int) -> tuple[jax.Array, jax.Array]:
  """Samples ids from ``logits [..., V]`` with standard Gumbel ``noise`` of the same shape
  (the Gumbel-max draw ``jax.random.categorical`` makes); returns them and their
  log-probabilities."""
  logits = logits / max(temperature, 1e-6)
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  ids = jnp.argmax(logits + gumbel_noise, axis=-1)
  log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], axis=-1)[..., 0]
  return ids, log_probs


def position_gumbel(keys: jax.Array, length: int, tail: tuple[int, ...] = ()) -> jax.Array:
  """Gumbel noise ``[B, length, *tail]``; row ``b`` comes from ``keys[b]`` alone. A pass over
  some positions takes their rows of it, so a token's noise is the same whichever other tokens
  the pass computes."""
  return jax.vmap(lambda key: jax.random.gumbel(key, (length,) + tail))(keys)


def mask_least_confident(confidence: jax.Array, count: int) -> jax.Array:
  """Boolean mask of exactly ``count`` lowest-confidence positions per row of ``[B, N]``."""
  if count == 0:
    return jnp.zeros(confidence.shape, bool)
  _, lowest = jax.lax.top_k(-confidence, count)
  rows = jnp.arange(confidence.shape[0])[:, None]
  return jnp.zeros(confidence.shape, bool).at[rows, lowest].set(True)


def positions_of(flags: jax.Array, count: int) -> jax.Array:
  """Indices of the ``count`` True entries of each row of ``flags [B, N]`` (ascending)."""
  return jnp.argsort(~flags, axis=-1, stable=True)[:, :count]


def scatter(base: jax.Array, index: jax.Array, rows: jax.Array) -> jax.Array:
  """``base[b, index[b, a]] = rows[b, a]``; ``index`` distinct and ascending within a row."""
  batch = jnp.arange(base.shape[0])[:, None]
  return base.at[batch, index].set(rows, unique_indices=True, indices_are_sorted=True)


def _masked_per_row(tokens, mask_id: int) -> np.ndarray:
  """Masked positions per row; of this process's rows only when ``tokens`` is a global array
  split over several hosts (each process checks its own)."""
  if isinstance(tokens, jax.Array) and not tokens.is_fully_addressable:
    return np.concatenate([np.asarray(shard.data == mask_id).sum(axis=-1)
                           for shard in tokens.addressable_shards])
  return np.asarray(tokens == mask_id).sum(axis=-1)


def make_decoder(model: NestedMaskedTransformer, plan: Sequence[DecodeStep],
                 options: SamplingOptions, record_steps: bool = False
                 ) -> Callable[..., DecodeOutput]:
  """Returns ``decode(params, init_tokens [B, N], labels [B], rng, row_ids=None) ->
  DecodeOutput``.

  ``init_tokens`` holds ``mask_id`` at the positions to generate and given tokens elsewhere;
  every row must have ``plan[0].masked_before`` masked positions. Row ``b``'s random numbers
  come from ``rng`` and ``row_ids[b]`` (default ``b``) alone: a sample does not depend on the
  batch it is decoded in.

  On a mesh, pass ``init_tokens`` and ``labels`` split over the batch (``parallel.shard_batch``)
  and the parameters replicated or sharded as trained: the decode runs where its inputs live
  and returns ``tokens`` split like ``init_tokens`` (same tokens as on one device).

  ``record_steps`` also returns the canvas after every step (``mask_id`` where still masked).
  """
  cfg = model.config
  guided = options.guidance_scale > 0
  num_steps = len(plan)

  def run_model(params, tokens, labels, step, positions, cache):
    if guided:
      tokens = jnp.concatenate([tokens, tokens])
      labels = jnp.concatenate([labels, jnp.full_like(labels, cfg.unconditional_id)])
      positions = None if positions is None else jnp.concatenate([positions, positions])
    logits, cache = model.apply(params, tokens, labels, width_factor=step.width_factor,
                                positions=positions, cache=None if step.full_pass else cache)
    if guided:
      cond, uncond = jnp.split(logits, 2)
      w = options.guidance_at((step.index + 1) / num_steps)
      logits = (1 + w) * cond - w * uncond
    return logits, cache

  def decode(params, init_tokens, labels, rng, row_ids=None):
    tokens = init_tokens
    batch, length = tokens.shape
    if row_ids is None:
      row_ids = jnp.arange(batch)
    # Noise is keyed by (sample, step, position), so two decodes of one seed differ only
    # where their computations differ (a cached pass draws what a full pass draws).
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, row_ids)
    masked = tokens == cfg.mask_id
    masked_at_previous_start = masked
    cache = None
    masked_counts, logit_counts, step_tokens = [], [], []
    for step in plan:
      step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step.index)
      sample_keys, choice_keys = (jax.vmap(jax.random.fold_in, in_axes=(0, None))(step_keys, i)
                                  for i in (0, 1))
      if step.full_pass:
        logits, cache = run_model(params, tokens, labels, step, None, cache)
        noise = position_gumbel(sample_keys, length, (cfg.codebook_size,))
        ids, log_probs = sample_tokens(logits, noise, options.temperature, options.top_k)
      else:
        active = positions_of(masked_at_previous_start, step.num_queries)
        active_tokens = jnp.take_along_axis(tokens, active, axis=1)
        logits, cache = run_model(params, active_tokens, labels, step, active + 1, cache)
        noise = jnp.take_along_axis(position_gumbel(sample_keys, length, (cfg.codebook_size,)),
                                    active[..., None], axis=1)
        ids, log_probs = sample_tokens(logits, noise, options.temperature, options.top_k)
        ids = scatter(tokens, active, ids)
        log_probs = scatter(jnp.zeros(tokens.shape, log_probs.dtype), active, log_probs)
      logit_counts.append(logits.shape[1])

      candidate = jnp.where(masked, ids, tokens)
      anneal = options.choice_temperature * (1.0 - (step.index + 1) / num_steps)
      confidence = log_probs + anneal * position_gumbel(choice_keys, length)
      confidence = jnp.where(masked, confidence, jnp.inf)
      still_masked = mask_least_confident(confidence, step.masked_after)
      tokens = jnp.where(still_masked, cfg.mask_id, candidate)
      masked_at_previous_start, masked = masked, still_masked
      masked_counts.append(jnp.sum(masked, axis=-1))
      step_tokens.append(tokens)
    return DecodeOutput(tokens, jnp.stack(masked_counts), jnp.asarray(logit_counts, jnp.int32),
                        jnp.stack(step_tokens, axis=1) if record_steps else None)

  jitted = jax.jit(decode)

  def checked_decode(params, init_tokens, labels, rng, row_ids=None) -> DecodeOutput:
    if not isinstance(init_tokens, jax.core.Tracer):
      unknown = _masked_per_row(init_tokens, cfg.mask_id)
      if np.any(unknown != plan[0].masked_before):
        raise ValueError(f'init_tokens rows have {sorted(set(unknown.tolist()))} masked tokens; '
                         f'the plan expects {plan[0].masked_before} in every row')
    return jitted(params, init_tokens, labels, rng, row_ids)

  checked_decode.lower = jitted.lower
  return checked_decode
