"""``--mode=bench``: the time of one batch decode per schedule, through what sampling runs.

Random weights (float32, as trained) go into an ``api.Generator``, so the benchmark times the
same path as sampling: parameters cast to the compute dtype once, the shared step programs, the
batch split over the mesh. Every schedule is timed in this one process after a warm-up, so the
speedups are ratios of one run; ``compile_seconds`` is what a schedule compiled that earlier
rows had not (programs are shared between schedules).
"""

import statistics
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from nested_decode import api, config_lib, parallel
from nested_decode.inference import decode_cost
from nested_decode.models.transformer import NestedMaskedTransformer


def random_params(config: ml_collections.ConfigDict, rng: jax.Array, mesh) -> dict:
  """Randomly initialised transformer parameters in float32, replicated over ``mesh``."""
  model = NestedMaskedTransformer(config_lib.transformer_config(config))
  tokens = jnp.zeros((1, model.config.seq_len), jnp.int32)
  labels = jnp.zeros((1,), jnp.int32)
  init = jax.jit(lambda r: nn.unbox(model.init(r, tokens, labels)),
                 out_shardings=parallel.replicated(mesh))
  return init(rng)


def bench_rows(config: ml_collections.ConfigDict, mesh: Mesh,
               log: Callable[[str], None] = print) -> list[dict]:
  """``flops_rows`` with ``seconds_per_batch`` (median of ``bench.timed_runs`` after
  ``bench.warmup_runs``), ``compile_seconds``, ``tflops_per_second`` and ``speedup``."""
  params_rng, label_rng, given_rng = jax.random.split(jax.random.key(config.seed), 3)
  generator = api.Generator(config, None, random_params(config, params_rng, mesh), mesh)
  model_config = config_lib.transformer_config(config)
  batch = config.bench.batch_size
  labels = np.asarray(jax.random.randint(label_rng, (batch,), 0,
                                         max(model_config.num_classes, 1)))
  given = None
  if generator.task.num_given:  # the task's known tokens: random ids stand in
    given = np.asarray(jax.random.randint(given_rng, (batch, model_config.seq_len), 0,
                                          model_config.codebook_size))

  rows = decode_cost.flops_rows(config)
  schedules = config_lib.schedules_with_baseline(config)
  for row in rows:
    schedule = schedules[row['schedule']]
    timings = {}
    for _ in range(config.bench.warmup_runs):
      list(generator.token_batches(schedule, labels, config.seed, given, batch, timings=timings))
    compile_seconds = timings['compile_seconds']
    times = []
    for _ in range(config.bench.timed_runs):
      timings = {}
      list(generator.token_batches(schedule, labels, config.seed, given, batch, timings=timings))
      times.append(sum(timings['batch_seconds']))
    seconds = statistics.median(times)
    row.update(seconds_per_batch=seconds, compile_seconds=compile_seconds,
               tflops_per_second=row['gflops_per_sample'] * batch / seconds / 1e3)
    log(f"{row['schedule']:>24s}: {seconds * 1e3:9.1f} ms/batch (compiled {compile_seconds:.1f} "
        f"s), {row['tflops_per_second']:.2f} TFLOP/s")
  baseline = rows[0]['seconds_per_batch']
  for row in rows:
    row['speedup'] = baseline / row['seconds_per_batch']
  return rows
