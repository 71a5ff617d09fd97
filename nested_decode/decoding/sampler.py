"""The decode loop: compiled programs shared by steps and schedules, a KV cache carried between.

Each step of a plan runs the nested transformer at its width, either as a full pass that
rebuilds the KV cache or over the active tokens only, reusing the cache (see ``plan.py``). Masked
tokens are sampled from the (guided) logits; the least confident of them, with Gumbel noise
annealed by the choice temperature, are masked again so that exactly ``step.masked_after`` stay
masked. Tokens that were given at the start are never changed.

A step is one jit-compiled program whose shapes depend only on its width, its pass kind and its
(padded) query count; what differs between steps (step index, how many stay masked, the
annealing and guidance weights) is an input. So every step and every schedule of one width,
pass kind and query bucket runs one executable, compiled once per input shape and kept by the
``Decoder``; one more program draws every step's noise. The host dispatches the steps back to
back without waiting for results, and the state (tokens, masks, cache) stays on the devices
between them.
"""

import contextlib
import dataclasses
import functools
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nested_decode.decoding.plan import DecodeStep
from nested_decode.models import partitioning
from nested_decode.models.transformer import NestedMaskedTransformer, TransformerConfig

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


def mask_least_confident(confidence: jax.Array, count: jax.Array | int) -> jax.Array:
  """Boolean mask of exactly ``count`` lowest-confidence positions per row of ``[B, N]`` (ties:
  the lower position first); ``count`` may be traced, so one program serves every step."""
  order = jnp.argsort(confidence, axis=-1, stable=True)
  ranks = jnp.argsort(order, axis=-1)
  return ranks < count


def positions_of(flags: jax.Array, count: int) -> jax.Array:
  """Indices of the ``count`` True entries of each row of ``flags [B, N]`` (ascending)."""
  return jnp.argsort(~flags, axis=-1, stable=True)[:, :count]


def scatter(base: jax.Array, index: jax.Array, rows: jax.Array) -> jax.Array:
  """``base[b, index[b, a]] = rows[b, a]``; ``index`` distinct and ascending within a row.
  Mapped over the rows, so a batch split over devices stays split (no gathers)."""
  return jax.vmap(lambda base, index, rows: base.at[index].set(
      rows, unique_indices=True, indices_are_sorted=True))(base, index, rows)


def _masked_per_row(tokens, mask_id: int) -> np.ndarray:
  """Masked positions per row; of this process's rows only when ``tokens`` is a global array
  split over several hosts (each process checks its own)."""
  if isinstance(tokens, jax.Array) and not tokens.is_fully_addressable:
    return np.concatenate([np.asarray(shard.data == mask_id).sum(axis=-1)
                           for shard in tokens.addressable_shards])
  return np.asarray(tokens == mask_id).sum(axis=-1)


class DecodeState(NamedTuple):
  """What one step hands to the next, on the devices."""
  tokens: jax.Array                    # [B, N] with mask_id where still masked
  masked: jax.Array                    # [B, N] bool: masked now
  masked_at_previous_start: jax.Array  # [B, N] bool: masked when the last step began
  cache: Any                           # the KVCache of the last full pass, or None


class StepInputs(NamedTuple):
  """The per-step values a shared program takes as inputs rather than constants."""
  index: np.ndarray         # int32: the step's index (keys its noise)
  masked_after: np.ndarray  # int32: tokens left masked after it
  anneal: np.ndarray        # float32: choice temperature x (1 - (index + 1) / T)
  guidance: np.ndarray      # float32: the guidance weight w of this step

  @classmethod
  def of(cls, step: DecodeStep, num_steps: int, options: SamplingOptions) -> 'StepInputs':
    ratio = (step.index + 1) / num_steps
    return cls(np.int32(step.index), np.int32(step.masked_after),
               np.float32(options.choice_temperature * (1.0 - ratio)),
               np.float32(options.guidance_at(ratio)))


def program_key(step: DecodeStep) -> tuple[int, bool, int, bool]:
  """What fixes a step program: steps with equal keys run one executable. A step whose cache no
  later step reads returns none: writing it made imagenet256's baseline decode 54% slower by
  the TPU compiler's model of a v5e (docs/tpu_time.md)."""
  return step.width_factor, step.full_pass, step.num_queries, step.keeps_cache


def _signature(tree: Any) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return (treedef,) + tuple((tuple(x.shape), x.dtype, getattr(x, 'sharding', None))
                            for x in leaves)


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=getattr(x, 'sharding', None)), tree)


def _mesh_of(args: Any) -> jax.sharding.Mesh | None:
  """The mesh of the first input placed on several devices by name (None: one device)."""
  for leaf in jax.tree.leaves(args):
    sharding = getattr(leaf, 'sharding', None)
    if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
      return sharding.mesh
  return None


class Decoder:
  """Decodes with any plan of ``model`` under ``options``.

  ``decoder(params, init_tokens [B, N], labels [B], rng, plan, row_ids=None)`` returns a
  ``DecodeOutput``. ``init_tokens`` holds ``mask_id`` at the positions to generate and given
  tokens elsewhere; every row must have ``plan[0].masked_before`` masked positions. Row ``b``'s
  random numbers come from ``rng`` and ``row_ids[b]`` (default ``b``) alone: a sample does not
  depend on the batch it is decoded in. Noise is keyed by (sample, step, position), so two
  decodes of one seed differ only where their computations differ (a cached pass draws what a
  full pass draws).

  On a mesh, pass ``init_tokens`` and ``labels`` split over the batch (``parallel.shard_batch``)
  and the parameters replicated or sharded as trained: the decode runs where its inputs live
  and returns ``tokens`` split like ``init_tokens`` (same tokens as on one device), its
  activations laid out by ``rules`` (``parallel.logical_rules(config)``: as in training).

  ``compile_seconds`` and ``num_compiled`` count the executables compiled so far.
  """

  def __init__(self, model: NestedMaskedTransformer, options: SamplingOptions,
               compiler_options: dict | None = None,
               rules: partitioning.Rules = partitioning.RULES):
    self.model = model
    self.options = options
    self.rules = tuple(rules)
    self._compiler_options = compiler_options
    self._programs: dict[tuple, Any] = {}
    self._executables: dict[tuple, Any] = {}
    self.compile_seconds = 0.0

  @property
  def num_compiled(self) -> int:
    return len(self._executables)

  def __call__(self, params, init_tokens, labels, rng, plan: Sequence[DecodeStep],
               row_ids=None, record_steps: bool = False) -> DecodeOutput:
    """``record_steps`` also returns the canvas after every step (``mask_id`` where still
    masked)."""
    mask_id = self.model.config.mask_id
    unknown = _masked_per_row(init_tokens, mask_id)
    if np.any(unknown != plan[0].masked_before):
      raise ValueError(f'init_tokens rows have {sorted(set(unknown.tolist()))} masked tokens; '
                       f'the plan expects {plan[0].masked_before} in every row')
    if row_ids is None:
      row_ids = np.arange(init_tokens.shape[0], dtype=np.int32)
    init_tokens = jnp.asarray(init_tokens)
    masked = init_tokens == mask_id
    state = DecodeState(init_tokens, masked, masked, None)
    masked_counts, step_tokens = [], []
    for step in plan:
      state = self._advance(step, len(plan), params, state, labels, rng, row_ids,
                            lambda executable, *args: executable(*args))
      masked_counts.append(state.masked.sum(axis=-1))
      if record_steps:
        step_tokens.append(state.tokens)
    return DecodeOutput(state.tokens, jnp.stack(masked_counts),
                        np.asarray([step.num_logits for step in plan], np.int32),
                        jnp.stack(step_tokens, axis=1) if record_steps else None)

  def compile_plan(self, params, init_tokens, labels, rng, plan: Sequence[DecodeStep],
                   row_ids=None) -> list[Any]:
    """The executables a decode of ``plan`` runs, in order (shared ones repeat), for concrete
    or abstract (``jax.ShapeDtypeStruct``, with shardings) inputs; nothing runs. For reading
    the memory and cost of a decode, e.g. compiled for a TPU topology."""
    if row_ids is None:
      row_ids = jax.ShapeDtypeStruct((init_tokens.shape[0],), jnp.int32,
                                     sharding=getattr(labels, 'sharding', None))
    masked = jax.ShapeDtypeStruct(init_tokens.shape, jnp.bool_,
                                  sharding=getattr(init_tokens, 'sharding', None))
    state = DecodeState(_abstract(init_tokens), masked, masked, None)
    executables = []

    def outputs_of(executable, *args):
      executables.append(executable)
      return jax.tree.map(lambda info, sharding: jax.ShapeDtypeStruct(
          info.shape, info.dtype, sharding=sharding), executable.out_info,
                          executable.output_shardings)

    params, labels, rng = _abstract((params, labels, rng))
    for step in plan:
      state = self._advance(step, len(plan), params, state, labels, rng, row_ids, outputs_of)
    return executables

  def _advance(self, step: DecodeStep, num_steps: int, params, state: DecodeState, labels,
               rng, row_ids, run) -> DecodeState:
    """The state after ``step``: its noise, then its step program, each through
    ``run(executable, *args)``."""
    inputs = StepInputs.of(step, num_steps, self.options)
    noise_args = (rng, row_ids, inputs.index)
    noise = run(self._executable(('noise',), self._draw_noise, noise_args), *noise_args)
    if step.full_pass:  # rebuilds the cache: the old one is not an input of its program
      state = state._replace(cache=None)
    step_args = (params, state, labels, noise, inputs)
    key = program_key(step)
    return run(self._executable(key, functools.partial(self._step, *key), step_args),
               *step_args)

  def _executable(self, key: tuple, fn, args: tuple) -> Any:
    """``fn`` compiled for ``args``' shapes, dtypes and placements, once per ``key``."""
    full_key = (key, _signature(args))
    if full_key not in self._executables:
      # Steps already dispatched finish first: run beside the compile, their time would be
      # counted as compile time (the first decode of a schedule looked much faster than it is).
      jax.block_until_ready(args)
      began = time.perf_counter()
      # One program per mesh: the model's sharding constraints are traced for the context mesh.
      mesh = _mesh_of(args)
      if (key, mesh) not in self._programs:
        self._programs[key, mesh] = jax.jit(fn)
      with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext(),
            partitioning.use_rules(self.rules)):
        lowered = self._programs[key, mesh].lower(*args)
      self._executables[full_key] = lowered.compile(compiler_options=self._compiler_options)
      self.compile_seconds += time.perf_counter() - began
    return self._executables[full_key]

  def _draw_noise(self, rng, row_ids, index) -> tuple[jax.Array, jax.Array]:
    """Gumbel noise of one step for sampling ``[B, N, V]`` and for the choice ``[B, N]``, by
    (sample, step, position). One program for every step: drawing it inside each step program
    would compile the random number generator into every one of them."""
    cfg = self.model.config
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, row_ids)
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, index)
    sample_keys, choice_keys = (jax.vmap(jax.random.fold_in, in_axes=(0, None))(step_keys, i)
                                for i in (0, 1))
    return (position_gumbel(sample_keys, cfg.seq_len, (cfg.codebook_size,)),
            position_gumbel(choice_keys, cfg.seq_len))

  def _run_model(self, params, tokens, labels, width_factor, positions, cache, guidance):
    cfg = self.model.config

    def run(labels, cache):
      return self.model.apply(params, tokens, labels, width_factor=width_factor,
                              positions=positions, cache=cache)

    if not self.options.guidance_scale > 0:
      return run(labels, cache)
    # The conditional and unconditional passes side by side on a new leading axis (the cache
    # has it too), not concatenated along the batch: that would move rows between the devices
    # a batch is split over.
    both = jnp.stack([labels, jnp.full_like(labels, cfg.unconditional_id)])
    logits, cache = jax.vmap(run)(both, cache)
    return (1 + guidance) * logits[0] - guidance * logits[1], cache

  def _step(self, width_factor: int, full_pass: bool, num_queries: int, keeps_cache: bool,
            params, state: DecodeState, labels, noise: tuple[jax.Array, jax.Array],
            inputs: StepInputs) -> DecodeState:
    cfg, options = self.model.config, self.options
    tokens, masked = state.tokens, state.masked
    noise, choice_noise = noise
    if full_pass:
      logits, cache = self._run_model(params, tokens, labels, width_factor, None, None,
                                      inputs.guidance)
      ids, log_probs = sample_tokens(logits, noise, options.temperature, options.top_k)
    else:
      # The active tokens first, then the lowest other positions as padding up to the bucket
      # (their keys and values are refreshed, their samples unused); ascending for the scatters.
      queries = jnp.sort(positions_of(state.masked_at_previous_start, num_queries), axis=-1)
      logits, cache = self._run_model(params, jnp.take_along_axis(tokens, queries, axis=1),
                                      labels, width_factor, queries + 1, state.cache,
                                      inputs.guidance)
      noise = jnp.take_along_axis(noise, queries[..., None], axis=1)
      ids, log_probs = sample_tokens(logits, noise, options.temperature, options.top_k)
      ids = scatter(tokens, queries, ids)
      log_probs = scatter(jnp.zeros(tokens.shape, log_probs.dtype), queries, log_probs)

    candidate = jnp.where(masked, ids, tokens)
    confidence = log_probs + inputs.anneal * choice_noise
    confidence = jnp.where(masked, confidence, jnp.inf)
    still_masked = mask_least_confident(confidence, inputs.masked_after)
    return DecodeState(jnp.where(still_masked, cfg.mask_id, candidate), still_masked, masked,
                       cache if keeps_cache else None)


@functools.lru_cache(maxsize=None)
def decoder_for(model_config: TransformerConfig, options: SamplingOptions,
                rules: partitioning.Rules = partitioning.RULES) -> Decoder:
  """The process's one ``Decoder`` of a model config, sampling options and layout rules
  (hashable), so that every caller (the API, benchmarks, jobs) shares its compiled programs."""
  return Decoder(NestedMaskedTransformer(model_config), options, rules=rules)
