"""``--mode=scaling_study``: does the quality cost of decode-time scaling shrink as the nested
model grows? (MNIST.)

For each nested model of ``config.scaling.widths`` x ``config.scaling.train_steps`` (same data,
tokenizer and classifier as the main job; heads and MLP scaled with the width, so the head size
stays), the decodes of ``config.scaling.schedules`` are scored like the study's rows (3 seeds x
1000 samples, paired differences against the model's own 12-step full-width baseline), and a
plain model of the full width is trained with the same budget to price nesting. Of every model,
the best schedule at >= 3x (and >= 4x) fewer FLOPs is the one closest to the target (fd within
10%, class accuracy within 2 points; ``target_excess``); its gaps are fitted against log2(width)
and log2(steps) (``studies/trend.py``) to say how they move per doubling and at what size the
target would be met if the trend holds.

Resumable: a model's training resumes from its last checkpoint, and every scored row is one file
under ``DIR/scaling/<model>/rows/``; a rerun skips what is there. The model of the base config
(the main job's) is the main job's own ``DIR/transformer``.
"""

import dataclasses
import math
from typing import Any, Callable

import ml_collections
from absl import logging
from jax.sharding import Mesh

from nested_decode import config_lib, io_utils
from nested_decode.inference import decode_cost, restore
from nested_decode.models import flops as flops_lib
from nested_decode.studies import resumable, study
from nested_decode.studies import trend as trend_lib
from nested_decode.writers import figures

FD_TARGET = 0.10        # relative fd increase over the baseline that still counts as matching
ACCURACY_TARGET = 0.02  # class accuracy points (as a fraction) that may be lost
FLOP_THRESHOLDS = (3.0, 4.0)
BASELINE = ('baseline_T12', 'none')


def point_name(width: int, steps: int) -> str:
  return f'w{width}_s{steps}'


def point_config(config: ml_collections.ConfigDict, width: int, steps: int
                 ) -> ml_collections.ConfigDict:
  """The nested model of ``width`` trained ``steps`` steps; everything else as ``config``."""
  base = config.model
  scale = width / base.width
  heads, mlp = base.num_heads * scale, base.mlp_dim * scale
  widest = max(base.nesting_factors)
  if not (heads.is_integer() and mlp.is_integer() and width % widest == 0
          and int(heads) % widest == 0):
    raise ValueError(f'config.scaling.widths: {width} scales {base.num_heads} heads and MLP '
                     f'{base.mlp_dim} of width {base.width} to {heads:g} and {mlp:g}; both must '
                     f'be whole and, with the width, divisible by the nesting factor {widest}')
  point = ml_collections.ConfigDict(config.to_dict())
  point.model.width, point.model.num_heads, point.model.mlp_dim = width, int(heads), int(mlp)
  point.training.num_steps = steps
  return point


def train_gflops(config: ml_collections.ConfigDict) -> float:
  """Analytic GFLOPs of training (forward and backward, about 3x forward, of every trained
  width): the unit of the progress estimate."""
  model = config_lib.transformer_config(config)
  tokens = model.seq_len + 1
  forward = sum(flops_lib.pass_flops(model, p, tokens, tokens, model.seq_len).total
                for p in config.training.widths)
  return 3 * forward * config.training.batch_size * config.training.num_steps / 1e9


def decode_gflops(config: ml_collections.ConfigDict, schedule: ml_collections.ConfigDict,
                  samples: int) -> float:
  return sum(decode_cost.step_flops(config, schedule)) * samples / 1e9


@dataclasses.dataclass
class Point:
  width: int
  steps: int
  config: ml_collections.ConfigDict
  model_dir: str
  separate_config: ml_collections.ConfigDict | None  # None: no separate model at this point
  separate_dir: str
  rows: resumable.RowStore

  @property
  def name(self) -> str:
    return point_name(self.width, self.steps)


def make_points(config: ml_collections.ConfigDict, workdir: str) -> list[Point]:
  out_dir = io_utils.join(workdir, 'scaling')
  unknown = set(config.scaling.separate_steps) - set(config.scaling.train_steps)
  if unknown:
    raise ValueError(f'config.scaling.separate_steps: {sorted(unknown)} not in '
                     f'config.scaling.train_steps={tuple(config.scaling.train_steps)}')
  points = []
  for width in config.scaling.widths:
    for steps in config.scaling.train_steps:
      point = point_config(config, width, steps)
      directory = io_utils.join(out_dir, point_name(width, steps))
      same_as_main_job = (point.model.to_dict() == config.model.to_dict()
                          and point.training.to_dict() == config.training.to_dict())
      points.append(Point(
          width=width, steps=steps, config=point,
          model_dir=workdir if same_as_main_job else io_utils.join(directory, 'nested'),
          separate_config=(study.separate_config(point, 1)
                           if steps in config.scaling.separate_steps else None),
          separate_dir=io_utils.join(directory, 'separate'),
          rows=resumable.RowStore(io_utils.join(directory, 'rows'))))
  return points


class PointModels:
  """The nested and the separate model of one point, trained on first use (or loaded)."""

  def __init__(self, point: Point, workdir: str, base_scorer: study.Scorer):
    self.point, self.workdir, self.base_scorer = point, workdir, base_scorer
    self.mesh = base_scorer.generator.mesh
    self._params: dict[str, Any] = {}

  def config_and_dir(self, key: str) -> tuple[ml_collections.ConfigDict, str]:
    if key == 'nested':
      return self.point.config, self.point.model_dir
    return self.point.separate_config, self.point.separate_dir

  def params(self, key: str) -> Any:
    if key not in self._params:
      config, directory = self.config_and_dir(key)
      self._params[key] = study.train_variant(config, self.workdir, directory, self.mesh)
    return self._params[key]

  def scorer(self, key: str) -> study.Scorer:
    return self.base_scorer.with_model(self.config_and_dir(key)[0], self.params(key))


def point_tasks(point: Point, models: PointModels, schedules: dict, seeds: list[int],
                num_samples: int, log: Callable[[str], None]) -> list[resumable.Task]:
  """Training each model of the point, then scoring its rows: the nested model's schedules,
  the separate model's baseline."""
  tasks = []
  for key in ('nested', 'separate') if point.separate_config else ('nested',):
    config, directory = models.config_and_dir(key)
    tasks.append(resumable.Task('train', f'{point.name} {key} training', train_gflops(config),
                      done=lambda c=config, d=directory: restore.transformer_is_trained(c, d),
                      run=lambda k=key: models.params(k)))
    names = list(schedules) if key == 'nested' else [BASELINE[0]]
    for name in names:
      row_name = name if key == 'nested' else f'separate_{name}'

      def score(key=key, name=name, row_name=row_name):
        schedule = schedules[name]
        row, correct = models.scorer(key).score_samples(schedule.widths, schedule.cache, seeds,
                                                        num_samples)
        point.rows.save(row_name, dict(schedule=name, model=key, **row), correct)
        log(f"scaling {point.name} {row_name}: {row['gflops_per_sample']:.3g} GFLOPs, "
            f"acc {row['class_accuracy_mean']:.3f}, fd {row['fd_mean']:.1f}")

      tasks.append(resumable.Task('decode', f'{point.name} {row_name}',
                        decode_gflops(config, schedules[name], len(seeds) * num_samples),
                        done=lambda n=row_name: point.rows.has(n), run=score))
  return tasks


def run_scaling_study(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
                      log: Callable[[str], None] = logging.info) -> dict:
  s = config.scaling
  schedules = dict(s.schedules.items())
  if BASELINE[0] not in schedules or schedules[BASELINE[0]].cache != BASELINE[1]:
    raise ValueError(f'config.scaling.schedules needs {BASELINE[0]!r}: the full-width 12-step '
                     f'decode without cache, that every row is compared with')
  points = make_points(config, workdir)
  base_scorer = study.make_scorer(config, workdir, mesh, None)
  tasks = []
  for point in points:
    tasks += point_tasks(point, PointModels(point, workdir, base_scorer), schedules,
                         list(range(s.seeds)), s.num_samples, log)
  resumable.Progress(tasks, log, name='scaling study').run_all()

  report = analyse(points, schedules)
  report['config'] = study.json_config(config)
  out_dir = io_utils.join(workdir, 'scaling')
  io_utils.write_json(io_utils.join(out_dir, 'results.json'), report)
  io_utils.write_bytes(io_utils.join(out_dir, 'results.md'), markdown(report).encode())
  plot_gaps(report, io_utils.join(out_dir, 'gap_vs_size.png'))
  return report


def target_excess(fd_gap: float, accuracy_gap: float) -> float:
  """How far a row is from the target, in units of it: <= 1 meets both bounds."""
  return max(fd_gap / FD_TARGET, -accuracy_gap / ACCURACY_TARGET)


def best_at(rows: list[dict], min_flop_ratio: float) -> dict | None:
  """The row with flop_ratio >= ``min_flop_ratio`` closest to the target, or None."""
  eligible = [r for r in rows if r['flop_ratio'] >= min_flop_ratio]
  return min(eligible, key=lambda r: r['target_excess'], default=None)


def analyse(points: list[Point], schedules: dict) -> dict:
  """Rows with paired differences per model, the best schedules at each FLOP threshold, the
  trend fits and the cost of nesting."""
  models = []
  for point in points:
    names = list(schedules)
    loaded = [point.rows.load(n) for n in names]
    rows, correct = [r for r, _ in loaded], [c for _, c in loaded]
    separate = []
    if point.separate_config:
      separate_row, separate_correct = point.rows.load(f'separate_{BASELINE[0]}')
      separate = [separate_row]
      correct.append(separate_correct)
    baseline_index = names.index(BASELINE[0])
    study.add_comparisons(rows + separate, correct, baseline_index)
    baseline_fd = rows[baseline_index]['fd_mean']
    for row in rows + separate:
      row['fd_gap'] = row['fd_diff'] / baseline_fd
      row['fd_gap_se'] = row['fd_diff_se'] / baseline_fd
      row['target_excess'] = target_excess(row['fd_gap'], row['class_accuracy_diff'])
    models.append(dict(
        name=point.name, width=point.width, steps=point.steps,
        narrowest_width=point.width // max(point.config.model.nesting_factors),
        rows=rows, separate_full_width=separate[0] if separate else None,
        best={f'{t:g}x': best_at(rows, t) for t in FLOP_THRESHOLDS}))
  return dict(models=models, trends=fit_trends(models),
              targets=dict(fd_gap=FD_TARGET, class_accuracy_diff=-ACCURACY_TARGET))


def fit_trends(models: list[dict]) -> dict:
  """Per FLOP threshold and gap, the trend over the models and where it meets the target at the
  longest training and at the widest model."""
  widths = [m['width'] for m in models]
  steps = [m['steps'] for m in models]
  longest, widest = max(steps), max(widths)
  trends = {}
  for threshold in (f'{t:g}x' for t in FLOP_THRESHOLDS):
    if any(m['best'][threshold] is None for m in models) or len(models) < 2:
      continue
    for gap, target, better in (('fd_gap', FD_TARGET, 'lower'),
                                ('class_accuracy_diff', -ACCURACY_TARGET, 'higher')):
      values = [m['best'][threshold][gap] for m in models]
      fitted = trend_lib.fit(widths, steps, values)
      trends[f'{threshold}/{gap}'] = dict(
          **dataclasses.asdict(fitted), target=target,
          width_reaching_target=_for_json(fitted.width_reaching(target, longest, better)),
          at_steps=longest,
          steps_reaching_target=_for_json(fitted.steps_reaching(target, widest, better)),
          at_width=widest)
  return trends


def _for_json(size: float | None) -> float | str | None:
  return 'never' if size is not None and math.isinf(size) else size


def _size(value: float | str | None) -> str:
  if value is None:
    return 'n/a (one value measured)'
  if value == 'never':
    return 'never (the gap does not shrink)'
  return f'{value:,.0f}' if value < 1e7 else f'{value:.1e}'


def _slope(value: float | None, se: float | None) -> str:
  if value is None:
    return 'n/a (one value measured)'
  return f'{value:+.3f}' + ('' if se is None else f' ± {se:.3f}')


def markdown(report: dict) -> str:
  lines = ['| model | narrowest | best >= 3x | fd gap | class acc gap | best >= 4x | fd gap | '
           'class acc gap | nesting: separate full width fd / acc vs nested |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for m in report['models']:
    cells = [m['name'], str(m['narrowest_width'])]
    for threshold in ('3x', '4x'):
      row = m['best'][threshold]
      if row is None:
        cells += ['none', '', '']
        continue
      cells += [f"{row['schedule']} ({row['flop_ratio']:.2f}x)",
                f"{100 * row['fd_gap']:+.1f}% ± {100 * row['fd_gap_se']:.1f}",
                f"{100 * row['class_accuracy_diff']:+.1f} ± "
                f"{100 * row['class_accuracy_diff_se']:.1f}"]
    separate = m['separate_full_width']
    baseline = next(r for r in m['rows'] if r['schedule'] == BASELINE[0])
    cells.append('not trained' if separate is None else
                 f"{separate['fd_mean']:.1f} / {separate['class_accuracy_mean']:.3f} vs "
                 f"{baseline['fd_mean']:.1f} / {baseline['class_accuracy_mean']:.3f}")
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += ['', '| trend | per width doubling | per steps doubling | reaches target at width '
            '(longest training) | at steps (widest model) |', '| --- | --- | --- | --- | --- |']
  for name, t in report['trends'].items():
    lines.append(f"| {name} | {_slope(t['per_width_doubling'], t['per_width_doubling_se'])} "
                 f"| {_slope(t['per_steps_doubling'], t['per_steps_doubling_se'])} | "
                 f"{_size(t['width_reaching_target'])} ({t['at_steps']} steps) | "
                 f"{_size(t['steps_reaching_target'])} (width {t['at_width']}) |")
  for m in report['models']:
    lines += ['', f"### {m['name']}", '',
              '| schedule | cache | GFLOPs | flop_ratio | class acc | fd | class acc - baseline '
              '| fd - baseline |', '| --- | --- | --- | --- | --- | --- | --- | --- |']
    separate = m['separate_full_width']
    for r in m['rows'] + ([dict(separate, schedule='separate full width')] if separate else []):
      lines.append(
          f"| {r['schedule']} | {r['cache']} | {r['gflops_per_sample']:.3f} | "
          f"{r['flop_ratio']:.2f} | {r['class_accuracy_mean']:.3f} ± "
          f"{r['class_accuracy_std']:.3f} | {r['fd_mean']:.1f} ± {r['fd_std']:.1f} | "
          f"{r['class_accuracy_diff']:+.3f} ± {r['class_accuracy_diff_se']:.3f} | "
          f"{r['fd_diff']:+.1f} ± {r['fd_diff_se']:.1f} |")
  return '\n'.join(lines) + '\n'


def plot_gaps(report: dict, path: str) -> None:
  """The gaps of the best >= 3x and >= 4x schedules against width, one line per training
  length, with the target bounds."""
  plt = figures.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  gaps = (('fd_gap', 'fd increase over the baseline (%)', 100 * FD_TARGET),
          ('class_accuracy_diff', 'class accuracy - baseline (points)', -100 * ACCURACY_TARGET))
  steps = sorted({m['steps'] for m in report['models']})
  for ax, (gap, label, target) in zip(axes, gaps):
    for threshold, style in (('3x', '-o'), ('4x', '--s')):
      for s in steps:
        sel = sorted((m for m in report['models']
                      if m['steps'] == s and m['best'][threshold] is not None),
                     key=lambda m: m['width'])
        if not sel:
          continue
        ax.errorbar([m['width'] for m in sel], [100 * m['best'][threshold][gap] for m in sel],
                    yerr=[100 * m['best'][threshold][f'{gap}_se'] for m in sel], fmt=style,
                    capsize=3, label=f'best >= {threshold}, {s} steps')
    ax.axhline(target, color='k', linestyle=':', label='target')
    ax.axhline(0, color='grey', linewidth=0.5)
    ax.set_xscale('log', base=2)
    widths = sorted({m['width'] for m in report['models']})
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.minorticks_off()
    ax.set_xlabel('model width (narrowest sub-model = width / 8)')
    ax.set_ylabel(label)
  axes[0].legend(fontsize=7)
  fig.suptitle('Quality gap of the best schedule at >= 3x / >= 4x fewer FLOPs against size')
  figures.save_png(fig, path)
