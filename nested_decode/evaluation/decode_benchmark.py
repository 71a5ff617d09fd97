"""Decode cost per schedule, counted: analytic FLOPs (``--mode=flops``).

Rows ``{"schedule", "cache", "steps", "gflops_per_sample", "flop_ratio", ...}`` with the
full-width, uncached T-step baseline first; ratios are baseline / row. ``--mode=bench``
(``jobs/bench_decode.py``) adds measured times to the same rows.
"""

import jax
import ml_collections

from nested_decode import config_lib
from nested_decode.evaluation.flops import decode_flops


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
