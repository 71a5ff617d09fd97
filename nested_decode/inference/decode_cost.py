"""Decode cost per schedule, counted: analytic FLOPs (``--mode=flops``).

Rows ``{"schedule", "cache", "steps", "gflops_per_sample", "flop_ratio", ...}`` with the
full-width, uncached T-step baseline first; ratios are baseline / row. ``--mode=bench``
(``tools/bench_decode.py``) adds measured times to the same rows.
"""

import jax
import ml_collections

from nested_decode import config_lib
from nested_decode.decoding.schedule import Schedule
from nested_decode.models.flops import decode_flops


def device_description() -> str:
  device = jax.devices()[0]
  return f'{device.platform}:{device.device_kind} x{jax.device_count()}'


def step_flops(config: ml_collections.ConfigDict, schedule: Schedule | ml_collections.ConfigDict
               ) -> list[int]:
  """FLOPs per sample of each step of ``schedule``'s decode (a ``Schedule`` or a config entry)
  with ``config``'s model, guidance included."""
  return Schedule.parse(schedule).step_flops(config_lib.decode_task(config),
                                             config_lib.transformer_config(config),
                                             config.sampling.guidance_scale > 0)


def flops_rows(config: ml_collections.ConfigDict) -> list[dict]:
  task, model = config_lib.decode_task(config), config_lib.transformer_config(config)
  guided = config.sampling.guidance_scale > 0
  rows = []
  for name, schedule in config_lib.schedules_with_baseline(config).items():
    plan = schedule.plan(task)
    per_step = decode_flops(model, plan, guided)
    rows.append(dict(
        schedule=name, cache=schedule.cache, steps=len(plan),
        widths=[list(segment) for segment in schedule.widths],
        gflops_per_sample=sum(per_step) / 1e9,
        per_step_gflops=[f / 1e9 for f in per_step],
        per_step_queries=[step.num_queries for step in plan]))
  baseline = rows[0]['gflops_per_sample']
  for row in rows:
    row['flop_ratio'] = baseline / row['gflops_per_sample']
  return rows
