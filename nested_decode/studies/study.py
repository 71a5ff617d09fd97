"""``--mode=study``: quality against compute for a grid of decodes of one trained nested model,
and what nesting and distillation cost, on the offline MNIST task.

Every row is scored on the held-out digits with several sampling seeds (mean and standard
deviation) and compared with the 12-step full-width baseline as paired differences (the same
seeds, labels and noise; ``metrics/paired.py``) with their standard errors: "± se" after
a difference. Its time comes from the same sampling runs (the median over seeds of the mean
time of a compiled batch decode), so speedups are measured in one process.
"""

import dataclasses
import json
import statistics
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from nested_decode import api, config_lib, io_utils
from nested_decode.data import pipeline
from nested_decode.data.sources import all_images, data_sources, resumable_batches
from nested_decode.inference import restore
from nested_decode.metrics import paired
from nested_decode.models.transformer import NestedMaskedTransformer
from nested_decode.networks import mnist_classifier
from nested_decode.pipeline import image, stages
from nested_decode.training import objective, train_transformer
from nested_decode.writers import figures

CACHES = ('none', 'refresh_on_switch')
BASELINE = 'baseline_T12'  # what every row is compared with: full width, 12 steps, no cache


def decode_grid(steps: int = 12) -> list[tuple[str, tuple[tuple[int, int], ...]]]:
  """(name, widths) of the study: baselines at T in {8, 12, 16}, each width alone, small-to-large
  splits of the T steps and, as controls, large-to-small ones."""
  grid = [(f'baseline_T{t}', ((1, t),)) for t in (8, 12, 16)]
  grid += [(f'alone_p{p}', ((p, steps),)) for p in (2, 4, 8)]
  splits = [((8, 3), (4, 3), (2, 3), (1, 3)), ((8, 4), (4, 4), (2, 2), (1, 2)),
            ((8, 2), (4, 2), (2, 4), (1, 4)), ((8, 6), (1, 6)), ((4, 6), (1, 6)),
            ((2, 6), (1, 6)), ((8, 8), (1, 4)), ((4, 4), (2, 4), (1, 4))]
  grid += [('up_' + '_'.join(f'{p}x{n}' for p, n in s), s) for s in splits]
  controls = [((1, 3), (2, 3), (4, 3), (8, 3)), ((1, 6), (8, 6))]
  grid += [('down_' + '_'.join(f'{p}x{n}' for p, n in s), s) for s in controls]
  return grid


def chosen_grid(config: ml_collections.ConfigDict) -> list[tuple[str, tuple[tuple[int, int], ...]]]:
  """The grid's entries named in ``config.study.schedules`` (all when empty), with the
  baseline every row is compared with."""
  grid = decode_grid(config.sampling.steps)
  chosen = set(config.study.schedules)
  unknown = chosen - {name for name, _ in grid}
  if unknown:
    raise config_lib.ConfigError(
        f'config.study.schedules={tuple(config.study.schedules)!r} names {sorted(unknown)}, '
        f'which are not in the grid; allowed: {", ".join(name for name, _ in grid)}')
  return [(name, widths) for name, widths in grid
          if not chosen or name in chosen or name == BASELINE]


@dataclasses.dataclass
class Scorer:
  """Samples decodes of a trained model and scores them against reference digits."""
  generator: api.Generator
  samples: mnist_classifier.SampleScorer
  compile_seconds: float = 0.0  # spent compiling decodes by this scorer's calls

  def score(self, widths, cache: str, seeds: list[int], num_samples: int) -> dict:
    """The row of one decode: its cost, time and scores (mean, std and per seed)."""
    return self.score_samples(widths, cache, seeds, num_samples)[0]

  def score_samples(self, widths, cache: str, seeds: list[int], num_samples: int
                    ) -> tuple[dict, np.ndarray]:
    """``score``'s row and whether each sample was classified as its label (bool
    ``[seeds, num_samples]``; sample ``i`` has label ``i % num_classes`` under every schedule)."""
    config = self.generator.config
    schedule = self.generator.schedule(widths, cache)
    labels = np.arange(num_samples, dtype=np.int32) % config.tokens.num_classes
    correct, distances, seconds = [], [], []
    for seed in seeds:
      samples = self.generator.sample(labels, schedule, seed=seed,
                                      batch_size=config.eval.batch_size)
      seed_correct, fd = self.samples.correct_and_fd(samples.images, labels)
      correct.append(seed_correct)
      distances.append(fd)
      seconds.append(samples.seconds / -(-num_samples // config.eval.batch_size))
      self.compile_seconds += samples.compile_seconds
    accuracies = [float(c.mean()) for c in correct]
    row = dict(
        widths=[list(s) for s in widths], cache=cache, steps=len(samples.step_widths),
        gflops_per_sample=samples.gflops_per_sample,
        seconds_per_batch=statistics.median(seconds),
        class_accuracy_mean=float(np.mean(accuracies)),
        class_accuracy_std=float(np.std(accuracies)),
        fd_mean=float(np.mean(distances)), fd_std=float(np.std(distances)),
        class_accuracy_per_seed=accuracies, fd_per_seed=[float(d) for d in distances],
        num_samples=num_samples, seeds=len(seeds))
    return row, np.stack(correct)

  def with_model(self, config: ml_collections.ConfigDict, transformer: Any) -> 'Scorer':
    """The same references and tokenizer, another transformer."""
    return Scorer(api.Generator(config, self.generator.tokenizer_params, transformer,
                                self.generator.mesh), self.samples)


def make_scorer(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, transformer: Any,
                reference_split: str = 'eval') -> Scorer:
  """A scorer whose reference digits are the held-out split (or, for calibration, the first
  1000 training digits, disjoint from it)."""
  train, evaluation, _, _ = data_sources(config)
  images, _ = all_images(evaluation if reference_split == 'eval' else train)
  if reference_split != 'eval':
    images = images[:1000]
  samples = mnist_classifier.SampleScorer(image.classifier_stage(config, workdir), images)
  return Scorer(api.Generator(config, stages.tokenizer_stage(config, workdir, mesh), transformer,
                              mesh), samples)


def heldout_token_accuracy(config: ml_collections.ConfigDict, params: Any, workdir: str,
                           mesh: Mesh, factors: tuple[int, ...]) -> dict[str, float]:
  """Masked-token accuracy per width on the held-out tokens, with fixed training-style masks."""
  tokens, labels = stages.token_dataset(config, workdir, 'eval', mesh)
  model = NestedMaskedTransformer(config_lib.transformer_config(config))
  mask = objective.random_mask(jax.random.PRNGKey(1234), *tokens.shape)
  inputs = np.where(mask, model.config.mask_id, tokens)
  result = {}
  for factor in factors:
    logits, _ = jax.jit(lambda p, x, y, f=factor: model.apply(p, x, y, width_factor=f))(
        params, inputs, labels)
    result[f'p{factor}'] = float(objective.masked_mean(logits.argmax(-1) == tokens, mask))
  return result


def separate_config(config: ml_collections.ConfigDict, factor: int) -> ml_collections.ConfigDict:
  """A plain model of the sub-width ``D / factor`` with the nested model's training budget
  (steps and batch)."""
  separate = ml_collections.ConfigDict(config.to_dict())
  separate.model.width = config.model.width // factor
  separate.model.num_heads = config.model.num_heads // factor
  separate.model.mlp_dim = config.model.mlp_dim // factor
  separate.model.nesting_factors = (1,)
  separate.training.widths = (1,)
  separate.eval.schedules = ml_collections.ConfigDict()
  return separate


def variant_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """Separately trained plain models of each sub-width, and the nested model without
  distillation, all with the nested model's training budget (steps and batch)."""
  variants = {}
  for factor in config.model.nesting_factors:
    separate = separate_config(config, factor)
    variants[f'separate_width{separate.model.width}'] = separate
  no_distill = ml_collections.ConfigDict(config.to_dict())
  no_distill.training.distill_lambda_start = no_distill.training.distill_lambda_end = 1.0
  variants['nested_no_distillation'] = no_distill
  return variants


def train_variant(config: ml_collections.ConfigDict, workdir: str, variant_dir: str,
                  mesh: Mesh, weights: str | None = None) -> Any:
  """The transformer trained by ``config`` on the job's tokens into ``variant_dir`` (unless it
  is there already); its ``weights`` (``restore.EMA``/``TRAINED``; default as sampling loads)."""
  if not restore.transformer_is_trained(config, variant_dir):
    tokens, labels = stages.token_dataset(config, workdir, 'train', mesh)
    source = pipeline.ArraySource(f'tokens/train/{config.data.name}', tokens=tokens,
                                   label=labels)
    batches = resumable_batches(source, None, config.training.batch_size, config.seed)
    train_transformer.train(config, variant_dir, *batches, mesh)
  return restore.transformer_params(config, variant_dir, mesh, weights)


def run_study(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
              log: Callable[[str], None] = logging.info) -> dict:
  out_dir = io_utils.join(workdir, 'study')
  study = config.study
  seeds = list(range(study.seeds))
  grid = chosen_grid(config)
  params = stages.transformer_stage(config, workdir, mesh)
  scorer = make_scorer(config, workdir, mesh, params)
  rows, correct = [], []
  for name, widths in grid:
    for cache in CACHES:
      row, row_correct = scorer.score_samples(widths, cache, seeds, study.num_samples)
      rows.append(dict(schedule=name, model='nested', **row))
      correct.append(row_correct)
      log(f"study {name} {cache}: {row['gflops_per_sample']:.3g} GFLOPs, "
          f"acc {row['class_accuracy_mean']:.3f}, fd {row['fd_mean']:.1f}")
  add_comparisons(rows, correct, next(i for i, r in enumerate(rows)
                                      if r['schedule'] == BASELINE and r['cache'] == 'none'))
  log(f'study: the decode grid compiled for {scorer.compile_seconds:.1f} s')

  factors = tuple(config.model.nesting_factors)
  comparisons = [dict(model='nested', token_accuracy=heldout_token_accuracy(
      config, params, workdir, mesh, factors))]
  variants = variant_configs(config) if study.variants else {}
  for name, variant in variants.items():
    variant_params = train_variant(variant, workdir, io_utils.join(out_dir, name), mesh)
    own_factors = tuple(variant.model.nesting_factors)
    entry = dict(model=name, token_accuracy=heldout_token_accuracy(
        variant, variant_params, workdir, mesh, own_factors))
    variant_scorer = scorer.with_model(variant, variant_params)
    for factor in own_factors:
      entry[f'samples_p{factor}'] = variant_scorer.score(
          ((factor, config.sampling.steps),), 'none', seeds, study.num_samples)
    comparisons.append(entry)
    log(f'study variant {name}: {entry}')

  report = dict(rows=rows, models=comparisons, config=json_config(config),
                decode_compile_seconds=scorer.compile_seconds)
  io_utils.write_json(io_utils.join(out_dir, 'results.json'), report)
  io_utils.write_bytes(io_utils.join(out_dir, 'results.md'), markdown(report).encode())
  plot_pareto(rows, io_utils.join(out_dir, 'fd_vs_gflops.png'))
  return report


def add_comparisons(rows: list[dict], correct: list[np.ndarray], baseline_index: int) -> None:
  """Adds to each row its FLOP ratio, speedup and quality against the baseline row, as paired
  differences with standard errors: class accuracy over (seed, sample) pairs, fd over seeds."""
  baseline = rows[baseline_index]
  for row, row_correct in zip(rows, correct):
    row['flop_ratio'] = baseline['gflops_per_sample'] / row['gflops_per_sample']
    row['speedup'] = baseline['seconds_per_batch'] / row['seconds_per_batch']
    row['class_accuracy_diff'], row['class_accuracy_diff_se'] = paired.paired_difference(
        row_correct, correct[baseline_index])
    row['fd_diff'], row['fd_diff_se'] = paired.paired_difference(row['fd_per_seed'],
                                                                 baseline['fd_per_seed'])


def json_config(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json())


def pareto_front(rows: list[dict], x: str = 'gflops_per_sample', y: str = 'fd_mean',
                 lower_is_better: bool = True) -> list[dict]:
  """Rows not beaten by any row that is both as cheap or cheaper in ``x`` and better in
  ``y``, cheapest first."""
  sign = 1 if lower_is_better else -1
  ordered = sorted(rows, key=lambda r: (r[x], sign * r[y]))
  front, best = [], float('inf')
  for row in ordered:
    if sign * row[y] < best:
      front.append(row)
      best = sign * row[y]
  return front


def markdown(report: dict) -> str:
  front = {id(r) for r in pareto_front(report['rows'])}
  lines = ['| schedule | cache | GFLOPs | flop_ratio | speedup | class acc | fd | '
           'class acc - baseline | fd - baseline | Pareto |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in report['rows']:
    lines.append(
        f"| {r['schedule']} | {r['cache']} | {r['gflops_per_sample']:.3f} | "
        f"{r['flop_ratio']:.2f} | {r['speedup']:.2f} | "
        f"{r['class_accuracy_mean']:.3f} ± {r['class_accuracy_std']:.3f} | "
        f"{r['fd_mean']:.1f} ± {r['fd_std']:.1f} | "
        f"{r['class_accuracy_diff']:+.3f} ± {r['class_accuracy_diff_se']:.3f} | "
        f"{r['fd_diff']:+.1f} ± {r['fd_diff_se']:.1f} | {'*' if id(r) in front else ''} |")
  lines += ['', '| model | masked-token accuracy (held out) | samples: class acc / fd |',
            '| --- | --- | --- |']
  for m in report['models']:
    samples = '; '.join(f"{k[8:]}: {v['class_accuracy_mean']:.3f} / {v['fd_mean']:.1f}"
                        for k, v in m.items() if k.startswith('samples_'))
    accuracy = ', '.join(f'{k} {v:.3f}' for k, v in m['token_accuracy'].items())
    lines.append(f"| {m['model']} | {accuracy} | {samples or 'see the rows above'} |")
  return '\n'.join(lines) + '\n'


def plot_pareto(rows: list[dict], path: str) -> None:
  plt = figures.pyplot()
  fig, ax = plt.subplots(figsize=(8, 5.5))
  for cache, marker in zip(CACHES, ('o', 's')):
    sel = [r for r in rows if r['cache'] == cache]
    ax.errorbar([r['gflops_per_sample'] for r in sel], [r['fd_mean'] for r in sel],
                yerr=[r['fd_std'] for r in sel], fmt=marker, alpha=0.75, label=f'cache {cache}')
  front = pareto_front(rows)
  ax.plot([r['gflops_per_sample'] for r in front], [r['fd_mean'] for r in front], 'k--',
          label='Pareto front')
  for r in front:
    ax.annotate(f"{r['schedule']} ({r['cache'][:7]})", (r['gflops_per_sample'], r['fd_mean']),
                fontsize=7, xytext=(4, 4), textcoords='offset points')
  ax.set_xscale('log')
  ax.set_xlabel('GFLOPs per sample (log)')
  ax.set_ylabel('Fréchet distance to held-out digits (lower is better)')
  ax.set_title('Quality against decode compute, one nested model')
  ax.legend()
  figures.save_png(fig, path)
