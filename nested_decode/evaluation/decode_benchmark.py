"""Decode cost per schedule: analytic FLOPs (``--mode=flops``) and measured time (``--mode=bench``).

Both produce rows ``{"schedule", "cache", "steps", "gflops_per_sample", "flop_ratio", ...}`` with
the full-width, uncached T-step baseline first; ratios are baseline / row.
"""

import statistics
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nested_decode import config_lib
from nested_decode import tasks
from nested_decode.decoding.sampler import make_decoder
from nested_decode.evaluation.flops import decode_flops
from nested_decode.models.transformer import NestedMaskedTransformer


def device_description() -> str:
  device = jax.devices()[0]
  return f'{device.platform}:{device.device_kind} x{jax.device_count()}'


def step_flops(config: ml_collections.ConfigDict, sched: ml_collections.ConfigDict
               ) -> list[float]:
  """FLOPs per sample of each step of the decode ``sched`` plans (guidance included)."""
  return decode_flops(config_lib.transformer_config(config), config_lib.decode_plan(config, sched),
                      config.sampling.guidance_scale > 0)


def flops_rows(config: ml_collections.ConfigDict) -> list[dict]:
  rows = []
  for name, sched in config_lib.schedules_with_baseline(config).items():
    plan = config_lib.decode_plan(config, sched)
    per_step = step_flops(config, sched)
    rows.append(dict(
        schedule=name, cache=sched.cache, steps=len(plan),
        widths=[list(segment) for segment in sched.widths],
        gflops_per_sample=sum(per_step) / 1e9,
        per_step_gflops=[f / 1e9 for f in per_step],
        per_step_queries=[step.num_queries for step in plan]))
  baseline = rows[0]['gflops_per_sample']
  for row in rows:
    row['flop_ratio'] = baseline / row['gflops_per_sample']
  return rows


def random_inference_params(config: ml_collections.ConfigDict, model: NestedMaskedTransformer,
                            rng: jax.Array):
  """Randomly initialised parameters in the compute dtype (stand-ins until training lands)."""
  n = config_lib.seq_len(config)
  tokens = jnp.zeros((1, n), jnp.int32)
  labels = jnp.zeros((1,), jnp.int32)
  dtype = jnp.dtype(config.model.dtype)
  init = jax.jit(lambda r: jax.tree.map(lambda x: x.astype(dtype),
                                        nn.unbox(model.init(r, tokens, labels))))
  return init(rng)


def time_call(fn: Callable[[], jax.Array], warmup_runs: int, timed_runs: int
              ) -> tuple[float, float]:
  """Returns (seconds of the first call, median seconds of ``timed_runs`` later calls)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  for _ in range(warmup_runs - 1):
    jax.block_until_ready(fn())
  times = []
  for _ in range(timed_runs):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def bench_rows(config: ml_collections.ConfigDict, log: Callable[[str], None] = print
               ) -> list[dict]:
  """Times one batch decode per schedule, all in this process, after warm-up."""
  model_config = config_lib.transformer_config(config)
  model = NestedMaskedTransformer(model_config)
  options = config_lib.sampling_options(config)
  rng = jax.random.key(config.seed)
  params_rng, label_rng, decode_rng = jax.random.split(rng, 3)
  given_rng = jax.random.fold_in(label_rng, 1)
  params = random_inference_params(config, model, params_rng)
  batch = config.bench.batch_size
  given = jax.random.randint(given_rng, (batch, model_config.seq_len), 0,
                             model_config.codebook_size)  # the task's known tokens, if any
  init_tokens = jnp.asarray(tasks.task_of(config).initial_tokens(np.asarray(given),
                                                                 model_config.mask_id))
  labels = jax.random.randint(label_rng, (batch,), 0, max(model_config.num_classes, 1))
  if model_config.num_classes == 0:
    labels = jnp.full((batch,), model_config.unconditional_id, jnp.int32)

  rows = flops_rows(config)
  schedules = config_lib.schedules_with_baseline(config)
  for row in rows:
    plan = config_lib.decode_plan(config, schedules[row['schedule']])
    decode = make_decoder(model, plan, options)
    first, seconds = time_call(lambda: decode(params, init_tokens, labels, decode_rng).tokens,
                               config.bench.warmup_runs, config.bench.timed_runs)
    row.update(seconds_per_batch=seconds, compile_seconds=first - seconds,
               tflops_per_second=row['gflops_per_sample'] * batch / seconds / 1e3)
    log(f"{row['schedule']:>24s}: {seconds * 1e3:9.1f} ms/batch "
        f"(first call {first:.1f} s), {row['tflops_per_second']:.2f} TFLOP/s")
  baseline = rows[0]['seconds_per_batch']
  for row in rows:
    row['speedup'] = baseline / row['seconds_per_batch']
  return rows
