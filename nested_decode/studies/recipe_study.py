"""``--mode=recipe_study``: what the transformer's weight average (``training.ema_decay``) and
dropout (``model.dropout_rate``, ``model.attention_dropout_rate``) do to the main job's model.

Each variant of ``config.recipe_study.variants`` is trained for every training seed in
``range(config.recipe_study.seeds)`` on the job's own tokens (``config.seed`` is the seed: it
fixes the initial weights, the data order and the masks), sampled with the full-width baseline
decode (the same labels and sampling seed for every model) and scored by the job's classifier.
Samples are compared with training digits, not the held-out test digits, since the study
chooses the config's defaults. Each variant's class accuracy and Frechet distance are compared
with ``plain`` (neither) as differences paired by training seed, with their standard errors;
its train step time comes from ``--mode=bench_train``'s measurement of the nested step.
"""

import copy
import statistics
from typing import Callable

import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from nested_decode import io_utils
from nested_decode.metrics import paired
from nested_decode.studies import study
from nested_decode.tools import bench_train

PLAIN = 'plain'
# The settings each variant trains with; every other key is the job's.
VARIANTS = {
    PLAIN: dict(ema_decay=0.0, dropout_rate=0.0, attention_dropout_rate=0.0),
    'ema': dict(ema_decay=0.999, dropout_rate=0.0, attention_dropout_rate=0.0),
    'dropout': dict(ema_decay=0.0, dropout_rate=0.1, attention_dropout_rate=0.1),
}


def variant_config(config: ml_collections.ConfigDict, variant: str,
                   seed: int) -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f'config.recipe_study.variants names {variant!r}; allowed: '
                     f'{tuple(VARIANTS)}')
  settings = VARIANTS[variant]
  config = copy.deepcopy(config)
  config.seed = seed
  config.training.ema_decay = settings['ema_decay']
  config.model.update(dropout_rate=settings['dropout_rate'],
                      attention_dropout_rate=settings['attention_dropout_rate'])
  return config


def step_seconds(config: ml_collections.ConfigDict, mesh: Mesh) -> float:
  bench = config.bench
  row = bench_train.transformer_row(config, mesh, tuple(config.training.widths),
                                    bench.train_warmup_steps, bench.train_steps)
  return row['step_seconds']


def run_recipe_study(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
                     log: Callable[[str], None] = logging.info) -> dict:
  settings = config.recipe_study
  out_dir = io_utils.join(workdir, 'recipe_study')
  variants = (PLAIN,) + tuple(v for v in settings.variants if v != PLAIN)
  seeds = list(range(settings.seeds))
  scorer = None
  results = {}
  for variant in variants:
    rows = []
    for seed in seeds:
      trained = variant_config(config, variant, seed)
      params = study.train_variant(trained, workdir,
                                   io_utils.join(out_dir, f'{variant}_seed{seed}'), mesh)
      if scorer is None:
        scorer = study.make_scorer(trained, workdir, mesh, params, reference_split='train')
      row = scorer.with_model(trained, params).score(
          ((1, config.sampling.steps),), 'none', [0], settings.num_samples)
      rows.append(dict(seed=seed, class_accuracy=row['class_accuracy_mean'], fd=row['fd_mean']))
      log(f'recipe_study {variant} seed {seed}: class accuracy {row["class_accuracy_mean"]:.3f}, '
          f'fd {row["fd_mean"]:.2f}')
    results[variant] = dict(rows=rows, step_seconds=step_seconds(
        variant_config(config, variant, 0), mesh))
  report = dict(variants=[summary(name, results) for name in variants],
                seeds=len(seeds), num_samples=settings.num_samples,
                reference='the first 1000 training digits', decode='baseline',
                training_steps=config.training.num_steps)
  io_utils.write_json(io_utils.join(out_dir, 'results.json'), report)
  io_utils.write_bytes(io_utils.join(out_dir, 'results.md'), markdown(report).encode())
  return report


def summary(variant: str, results: dict) -> dict:
  """A variant's means and its differences from ``plain`` paired by training seed (accuracy
  over the seeds' per-seed accuracies, so the standard error is the seeds')."""
  rows, plain = results[variant]['rows'], results[PLAIN]['rows']
  accuracy = [r['class_accuracy'] for r in rows]
  fd = [r['fd'] for r in rows]
  accuracy_diff, accuracy_se = paired.paired_difference(
      accuracy, [r['class_accuracy'] for r in plain])
  fd_diff, fd_se = paired.paired_difference(fd, [r['fd'] for r in plain])
  step, plain_step = results[variant]['step_seconds'], results[PLAIN]['step_seconds']
  return dict(variant=variant, settings=VARIANTS[variant],
              class_accuracy_per_seed=accuracy, fd_per_seed=fd,
              class_accuracy_mean=float(np.mean(accuracy)), fd_mean=statistics.fmean(fd),
              class_accuracy_diff=accuracy_diff, class_accuracy_diff_se=accuracy_se,
              fd_diff=fd_diff, fd_diff_se=fd_se, step_seconds=step,
              step_time_over_plain=step / plain_step)


def markdown(report: dict) -> str:
  lines = [f"Baseline decode, {report['num_samples']} samples per model, {report['seeds']} "
           f"training seeds, {report['training_steps']} steps; Frechet distance to "
           f"{report['reference']}.", '',
           '| variant | class acc | fd | class acc - plain | fd - plain | step ms | '
           'step time / plain |', '| --- | --- | --- | --- | --- | --- | --- |']
  for v in report['variants']:
    lines.append(
        f"| {v['variant']} | {v['class_accuracy_mean']:.4f} | {v['fd_mean']:.2f} | "
        f"{v['class_accuracy_diff']:+.4f} ± {v['class_accuracy_diff_se']:.4f} | "
        f"{v['fd_diff']:+.2f} ± {v['fd_diff_se']:.2f} | {1000 * v['step_seconds']:.1f} | "
        f"{v['step_time_over_plain']:.2f} |")
  return '\n'.join(lines) + '\n'
