"""``--mode=recipe_study``: what the transformer's weight average (``training.ema_decay``) and
dropout (``model.dropout_rate``, ``model.attention_dropout_rate``) do to the main job's model.

For every training seed in ``range(config.recipe_study.seeds)`` (``config.seed`` fixes the initial
weights, the data order and the masks) the study trains on the job's own tokens once without
dropout and, if a dropout variant is asked for, once with it. Every training keeps the weight
average, which never feeds back into training (the trained weights are those of a run without
it), so ``plain`` and ``ema`` are the two weights of one run, as are ``dropout`` and
``ema_dropout``: the average's effect is measured on the same trajectory. Each variant of
``config.recipe_study.variants`` is sampled with the full-width baseline decode (the same labels
and sampling seed for every model) and scored by the job's classifier against training digits,
not the held-out test digits, since the study chooses the config's defaults. Each is compared
with ``plain`` as differences paired by training seed, with their standard errors; its train
step time comes from ``--mode=bench_train``'s measurement of the nested step with its settings.
"""

import copy
import dataclasses
import statistics
from typing import Callable

import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from nested_decode import config_lib, io_utils
from nested_decode.inference import restore
from nested_decode.metrics import paired
from nested_decode.studies import study
from nested_decode.tools import bench_train

PLAIN = 'plain'
EMA_DECAY = config_lib.MASKGIT_EMA_DECAY
# The trainings, by their dropout rate (residual paths and attention weights alike); each keeps
# the weight average at EMA_DECAY.
TRAININGS = {'no_dropout': 0.0, 'dropout': config_lib.MASKGIT_DROPOUT_RATE}


@dataclasses.dataclass(frozen=True)
class Variant:
  training: str  # a key of TRAININGS
  weights: str  # restore.TRAINED or restore.EMA

  @property
  def ema_decay(self) -> float:
    return EMA_DECAY if self.weights == restore.EMA else 0.0

  @property
  def dropout_rate(self) -> float:
    return TRAININGS[self.training]


VARIANTS = {
    PLAIN: Variant('no_dropout', restore.TRAINED),
    'ema': Variant('no_dropout', restore.EMA),
    'dropout': Variant('dropout', restore.TRAINED),
    'ema_dropout': Variant('dropout', restore.EMA),
}


def with_settings(config: ml_collections.ConfigDict, seed: int, ema_decay: float,
                  dropout_rate: float) -> ml_collections.ConfigDict:
  config = copy.deepcopy(config)
  config.seed = seed
  config.training.ema_decay = ema_decay
  config.model.update(dropout_rate=dropout_rate, attention_dropout_rate=dropout_rate)
  return config


def variant(name: str) -> Variant:
  if name not in VARIANTS:
    raise ValueError(f'config.recipe_study.variants names {name!r}; allowed: {tuple(VARIANTS)}')
  return VARIANTS[name]


def variant_config(config: ml_collections.ConfigDict, name: str,
                   seed: int) -> ml_collections.ConfigDict:
  """The job's config with the variant's own settings: what a user would train it with."""
  v = variant(name)
  return with_settings(config, seed, v.ema_decay, v.dropout_rate)


def training_config(config: ml_collections.ConfigDict, training: str,
                    seed: int) -> ml_collections.ConfigDict:
  """What the study trains: the training's dropout, and the average kept."""
  return with_settings(config, seed, EMA_DECAY, TRAININGS[training])


def step_seconds(config: ml_collections.ConfigDict, mesh: Mesh) -> float:
  bench = config.bench
  row = bench_train.transformer_row(config, mesh, tuple(config.training.widths),
                                    bench.train_warmup_steps, bench.train_steps)
  return row['step_seconds']


def run_recipe_study(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
                     log: Callable[[str], None] = logging.info) -> dict:
  settings = config.recipe_study
  out_dir = io_utils.join(workdir, 'recipe_study')
  names = (PLAIN,) + tuple(v for v in settings.variants if v != PLAIN)
  by_training = {}
  for name in names:
    by_training.setdefault(variant(name).training, []).append(name)
  seeds = list(range(settings.seeds))
  scorer = None
  results = {name: dict(rows=[]) for name in names}
  for training, trained_names in by_training.items():
    for seed in seeds:
      trained = training_config(config, training, seed)
      run_dir = io_utils.join(out_dir, f'{training}_seed{seed}')
      for name in trained_names:
        params = study.train_variant(trained, workdir, run_dir, mesh, VARIANTS[name].weights)
        if scorer is None:
          scorer = study.make_scorer(trained, workdir, mesh, params, reference_split='train')
        row = scorer.with_model(trained, params).score(
            ((1, config.sampling.steps),), 'none', [0], settings.num_samples)
        results[name]['rows'].append(dict(seed=seed, class_accuracy=row['class_accuracy_mean'],
                                          fd=row['fd_mean']))
        log(f'recipe_study {name} seed {seed}: class accuracy '
            f'{row["class_accuracy_mean"]:.3f}, fd {row["fd_mean"]:.2f}')
  for name in names:
    results[name]['step_seconds'] = step_seconds(variant_config(config, name, 0), mesh)
  report = dict(variants=[summary(name, results) for name in names],
                seeds=len(seeds), num_samples=settings.num_samples,
                reference='the first 1000 training digits', decode='baseline',
                training_steps=config.training.num_steps, ema_decay=EMA_DECAY)
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
  v = VARIANTS[variant]
  return dict(variant=variant, training=v.training, weights=v.weights,
              settings=dict(ema_decay=v.ema_decay, dropout_rate=v.dropout_rate,
                            attention_dropout_rate=v.dropout_rate),
              class_accuracy_per_seed=accuracy, fd_per_seed=fd,
              class_accuracy_mean=float(np.mean(accuracy)), fd_mean=statistics.fmean(fd),
              class_accuracy_diff=accuracy_diff, class_accuracy_diff_se=accuracy_se,
              fd_diff=fd_diff, fd_diff_se=fd_se, step_seconds=step,
              step_time_over_plain=step / plain_step)


def markdown(report: dict) -> str:
  lines = [f"Baseline decode, {report['num_samples']} samples per model, {report['seeds']} "
           f"training seeds, {report['training_steps']} steps; Frechet distance to "
           f"{report['reference']}. `ema` is the weight average ({report['ema_decay']}) of "
           f"`plain`'s runs, `ema_dropout` that of `dropout`'s.", '',
           '| variant | class acc | fd | class acc - plain | fd - plain | step ms | '
           'step time / plain |', '| --- | --- | --- | --- | --- | --- | --- |']
  for v in report['variants']:
    lines.append(
        f"| {v['variant']} | {v['class_accuracy_mean']:.4f} | {v['fd_mean']:.2f} | "
        f"{v['class_accuracy_diff']:+.4f} ± {v['class_accuracy_diff_se']:.4f} | "
        f"{v['fd_diff']:+.2f} ± {v['fd_diff_se']:.2f} | {1000 * v['step_seconds']:.1f} | "
        f"{v['step_time_over_plain']:.2f} |")
  return '\n'.join(lines) + '\n'
