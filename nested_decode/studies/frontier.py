"""``--mode=frontier``: at equal decode FLOPs, does MaGNeTS beat decoding less? (MNIST.)

For every budget of ``config.frontier.budgets`` (a decode must need at least that many times
fewer FLOPs than the full-width, ``sampling.steps`` baseline without cache), the best decode of
each family (``decoding/families.py``: the full width with fewer steps, one sub-model alone,
MaGNeTS schedules of two widths or more with the number of steps free, and the separately
trained plain models of ``--mode=study`` where they are trained) is chosen on the *validation*
split, then scored once on the held-out *test* digits.

- Validation: Fréchet distance to the first 1000 training digits (disjoint from the held-out
  ones; the tokenizer, transformer and classifier trained on them, but every family decodes the
  same model, and no held-out digit or test seed is seen) and class accuracy, of
  ``validation_samples`` samples per seed of sampling seeds that nothing else uses. The
  config's own schedules are not candidates: they were chosen on the held-out digits. A row's
  objective is how far it is from the target of the scaling study (fd within 10% of the
  validation baseline, class accuracy within 2 points): ``scaling_study.target_excess``. The
  one-width families are scored for every step count; MaGNeTS schedules by a beam search per
  budget over the schedule space, started from the best one-width decodes.
- Test: the chosen decodes, ``seeds`` x ``num_samples`` on the held-out digits, as paired
  differences (``metrics/paired.py``) against the baseline and against the best other family
  at the same budget (the one validation ranks first), with sampling seeds no other job uses.

Resumable: every scored row is one file under ``DIR/frontier/{validation,test}/``.
"""

import dataclasses
import math
from typing import Any, Callable

import ml_collections
from absl import logging
from jax.sharding import Mesh

from nested_decode import config_lib, io_utils
from nested_decode.data.sources import all_images, data_sources, dataset
from nested_decode.decoding import families
from nested_decode.decoding.families import Decode
from nested_decode.inference import restore
from nested_decode.metrics import paired
from nested_decode.pipeline import image, stages
from nested_decode.studies import resumable, scaling_study, study
from nested_decode.writers import figures

SEPARATE = 'separate'  # the family of the separately trained plain models
# Seeds no other job uses: the study, the scaling study and the main job sample with 0, 1, 2,
# and the config's schedules were chosen on those samples of the held-out digits.
VALIDATION_SEED = 20_000
TEST_SEED = 30_000
NESTED = 'nested'
COLORS = {families.FEWER_STEPS: 'tab:blue', families.SUB_MODEL: 'tab:orange',
          families.MAGNETS: 'tab:green', SEPARATE: 'tab:purple'}


@dataclasses.dataclass(frozen=True)
class Candidate:
  model: str       # 'nested' or a separately trained model, 'separate_width64'
  decode: Decode
  gflops: float    # per sample
  flop_ratio: float  # the nested baseline's GFLOPs over these

  @property
  def family(self) -> str:
    return SEPARATE if self.model != NESTED else families.family_of(self.decode.widths)

  @property
  def name(self) -> str:
    return f'{self.model}_{self.decode.name}'


def check_config(config: ml_collections.ConfigDict) -> None:
  if dataset(config).scoring != 'classifier' or 'frontier' not in config:
    raise config_lib.ConfigError('--mode=frontier scores digits with the MNIST classifier: it '
                                 'needs an MNIST config with config.frontier (configs/mnist.py)')
  f = config.frontier
  if not f.budgets or any(b < 1 for b in f.budgets):
    raise config_lib.ConfigError(f'config.frontier.budgets={tuple(f.budgets)}: give FLOP '
                                 'ratios of at least 1, e.g. (2, 3, 4, 6, 8, 12)')
  if not 1 <= f.min_steps <= f.max_steps:
    raise config_lib.ConfigError(f'config.frontier.min_steps={f.min_steps} and max_steps='
                                 f'{f.max_steps} must satisfy 1 <= min_steps <= max_steps')
  for key in ('validation_samples', 'validation_seeds', 'seeds', 'num_samples', 'beam_width'):
    if f[key] <= 0:
      raise config_lib.ConfigError(f'config.frontier.{key}={f[key]} must be positive')
  if f.seeds < 2:
    raise config_lib.ConfigError(f'config.frontier.seeds={f.seeds}: paired standard errors of '
                                 'fd need at least 2 seeds')


def best_within(rows: list[dict], budget: float, family: str | None = None) -> dict | None:
  """Of ``rows`` (each with ``flop_ratio``, ``objective`` and ``family``), the one of
  ``family`` (any, if None) with flop_ratio >= ``budget`` and the lowest objective (the
  cheaper on a tie), or None when none is within the budget."""
  eligible = [r for r in rows if r['flop_ratio'] >= budget
              and (family is None or r['family'] == family)]
  return min(eligible, key=lambda r: (r['objective'], -r['flop_ratio']), default=None)


class Models:
  """The nested model and the trained separate ones, loaded once, with scorers of each against
  the validation reference (``scorers('eval')``: against the held-out digits)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh: Mesh):
    self.config, self.workdir, self.mesh = config, workdir, mesh
    self.params = {NESTED: (config, stages.transformer_stage(config, workdir, mesh))}
    for name, separate in separate_models(config, workdir).items():
      self.params[name] = (separate, restore.transformer_params(
          separate, io_utils.join(workdir, 'study', name), mesh))
    self.validation = self.scorers('calibration')
    self._candidates: dict[tuple[str, Decode], Candidate] = {}
    self.baseline_flops = self.decode_flops(NESTED, Decode(((1, config.sampling.steps),),
                                                             'none'))

  def scorers(self, reference_split: str) -> dict[str, study.Scorer]:
    nested = study.make_scorer(self.config, self.workdir, self.mesh, self.params[NESTED][1],
                               reference_split=reference_split)
    return {name: nested if name == NESTED else nested.with_model(config, params)
            for name, (config, params) in self.params.items()}

  def decode_flops(self, model: str, decode: Decode) -> int:
    generator = self.validation[model].generator
    return sum(generator.step_flops(generator.schedule(decode.spec, decode.cache)))

  def candidate(self, model: str, decode: Decode) -> Candidate:
    """The decode with its cost, counted once (the search asks again at every budget)."""
    if (model, decode) not in self._candidates:
      flops = self.decode_flops(model, decode)  # integers: 1x4 is exactly 3x of 1x12
      self._candidates[model, decode] = Candidate(model, decode, flops / 1e9,
                                                  self.baseline_flops / flops)
    return self._candidates[model, decode]


def separate_models(config: ml_collections.ConfigDict, workdir: str
                    ) -> dict[str, ml_collections.ConfigDict]:
  """The study's separately trained plain models of each width that have finished training."""
  found = {}
  for factor in config.model.nesting_factors:
    separate = study.separate_config(config, factor)
    name = f'separate_width{separate.model.width}'
    if restore.transformer_is_trained(separate, io_utils.join(workdir, 'study', name)):
      found[name] = separate
  return found


class Split:
  """Scores candidates on one split with its seeds, one stored row each."""

  def __init__(self, scorers: dict[str, study.Scorer], directory: str, seeds: list[int],
               num_samples: int):
    self.scorers, self.seeds, self.num_samples = scorers, seeds, num_samples
    self.store = resumable.RowStore(directory)
    self._rows: dict[str, tuple[dict, Any]] = {}

  def task(self, candidate: Candidate, label: str) -> resumable.Task:
    return resumable.Task(
        'decode', f'{label} {candidate.name}',
        candidate.gflops * len(self.seeds) * self.num_samples,
        done=lambda: self.store.has(candidate.name), run=lambda: self.score(candidate))

  def score(self, candidate: Candidate) -> None:
    row, correct = self.scorers[candidate.model].score_samples(
        candidate.decode.widths, candidate.decode.cache, self.seeds, self.num_samples)
    row.update(model=candidate.model, family=candidate.family, spec=candidate.decode.spec,
               flop_ratio=candidate.flop_ratio)
    self.store.save(candidate.name, row, correct)

  def row(self, candidate: Candidate) -> tuple[dict, Any]:
    """The stored row and per-sample correctness, read once."""
    if candidate.name not in self._rows:
      row, correct = self.store.load(candidate.name)
      if row['seeds'] != len(self.seeds) or row['num_samples'] != self.num_samples:
        raise ValueError(f'{self.store.path(candidate.name)} was scored with {row["seeds"]} '
                         f'seeds x {row["num_samples"]} samples, not the config\'s '
                         f'{len(self.seeds)} x {self.num_samples}: use another workdir or '
                         f'delete {self.store.directory}')
      self._rows[candidate.name] = row, correct
    return self._rows[candidate.name]


def objective_of(row: dict, baseline: dict) -> float:
  fd_gap = (row['fd_mean'] - baseline['fd_mean']) / baseline['fd_mean']
  return scaling_study.target_excess(
      fd_gap, row['class_accuracy_mean'] - baseline['class_accuracy_mean'])


def run_frontier(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
                 log: Callable[[str], None] = logging.info) -> dict:
  check_config(config)
  f = config.frontier
  out_dir = io_utils.join(workdir, 'frontier')
  factors = tuple(config.model.nesting_factors)
  baseline = Decode(((1, config.sampling.steps),), 'none')

  models = Models(config, workdir, mesh)
  validation = Split(models.validation, io_utils.join(out_dir, 'validation'),
                     [VALIDATION_SEED + s for s in range(f.validation_seeds)],
                     f.validation_samples)
  loosest = min(f.budgets)
  one_width = [c for d in sum(families.one_width_decodes(factors, f.min_steps,
                                                         f.max_steps).values(), [])
               if (c := models.candidate(NESTED, d)).flop_ratio >= loosest]
  full_width = families.one_width_decodes((1,), f.min_steps, f.max_steps)[families.FEWER_STEPS]
  one_width += [c for name in models.params if name != NESTED for d in full_width
                if (c := models.candidate(name, d)).flop_ratio >= loosest]
  base_candidate = models.candidate(NESTED, baseline)
  scored = dict.fromkeys([base_candidate] + one_width)
  progress = resumable.Progress([validation.task(c, 'validation') for c in scored], log,
                                name='frontier')
  progress.run_all()

  def rows_of(candidates):
    base_row = validation.row(base_candidate)[0]
    rows = []
    for c in candidates:
      row = validation.row(c)[0]
      rows.append(dict(row, candidate=c, objective=objective_of(row, base_row)))
    return rows

  for budget in sorted(f.budgets):
    search_magnets(budget, models, validation, progress, scored, rows_of, f, factors)

  # Validation picks each family's decode per budget; the test scores each pick once.
  validation_rows = rows_of(list(scored))
  family_names = [families.FEWER_STEPS, families.SUB_MODEL, families.MAGNETS]
  if len(models.params) > 1:
    family_names.append(SEPARATE)
  chosen = {budget: {fam: best_within(validation_rows, budget, fam) for fam in family_names}
            for budget in f.budgets}

  test = Split(models.scorers('eval'), io_utils.join(out_dir, 'test'),
               [TEST_SEED + s for s in range(f.seeds)], f.num_samples)
  picks = {base_candidate} | {row['candidate'] for by_family in chosen.values()
                              for row in by_family.values() if row}
  progress.add([test.task(c, 'test') for c in sorted(picks, key=lambda c: -c.gflops)])
  progress.run_all()

  report = analyse(chosen, test, base_candidate, validation_rows)
  nested_test = test.scorers[NESTED]
  _, evaluation, _, _ = data_sources(config)
  report['tokenizer_reconstructions_of_held_out'] = image.reconstruction_scores(
      config, workdir, nested_test.generator, nested_test.samples, *all_images(evaluation))
  report.update(config=study.json_config(config),
                validation=dict(reference='first 1000 training digits',
                                seeds=validation.seeds, samples=f.validation_samples,
                                candidates_scored=len(validation_rows)),
                test=dict(reference='the 1000 held-out digits', seeds=test.seeds,
                          samples=f.num_samples))
  io_utils.write_json(io_utils.join(out_dir, 'results.json'), report)
  io_utils.write_bytes(io_utils.join(out_dir, 'results.md'), markdown(report).encode())
  plot(report, io_utils.join(out_dir, 'fd_vs_gflops.png'))
  plot_validation(report['validation_candidates'], io_utils.join(out_dir, 'validation.png'))
  return report


def search_magnets(budget, models, validation, progress, scored, rows_of, f, factors) -> None:
  """Beam search for MaGNeTS schedules within ``budget``: start from the neighbours of the
  ``beam_width`` best decodes of each one-width family within it, then follow the neighbours
  of the ``beam_width`` best MaGNeTS rows until the best stops improving or ``max_rounds``
  are done."""
  def feasible(decode):
    candidate = models.candidate(NESTED, decode)
    return candidate if candidate.flop_ratio >= budget else None

  def top(family):
    rows = [r for r in rows_of([c for c in scored if c.model == NESTED])
            if r['flop_ratio'] >= budget and r['family'] == family]
    return sorted(rows, key=lambda r: (r['objective'], -r['flop_ratio']))[:f.beam_width]

  beam = [r['candidate'] for family in (families.FEWER_STEPS, families.SUB_MODEL)
          for r in top(family)]
  best = math.inf
  for round_index in range(f.max_rounds):
    new = {}
    for c in beam:
      for decode in families.neighbours(c.decode, factors, f.min_steps, f.max_steps):
        candidate = feasible(decode)
        if candidate and candidate not in scored and (
            families.family_of(decode.widths) == families.MAGNETS):
          new[candidate] = None
    progress.add([validation.task(c, f'validation {budget:g}x round {round_index + 1}')
                  for c in new])
    progress.run_all()
    scored.update(new)
    leaders = top(families.MAGNETS)
    if not leaders or leaders[0]['objective'] >= best:
      break
    best = leaders[0]['objective']
    beam = [r['candidate'] for r in leaders]


def compare(row, correct, other_row, other_correct, baseline_fd) -> dict:
  """Paired differences of a test row against another: class accuracy over (seed, sample)
  pairs, fd over seeds, also as a fraction of the baseline's fd."""
  accuracy, accuracy_se = paired.paired_difference(correct, other_correct)
  fd, fd_se = paired.paired_difference(row['fd_per_seed'], other_row['fd_per_seed'])
  return dict(class_accuracy_diff=accuracy, class_accuracy_diff_se=accuracy_se,
              fd_diff=fd, fd_diff_se=fd_se, fd_gap=fd / baseline_fd,
              fd_gap_se=fd_se / baseline_fd)


def verdict(difference: dict) -> str:
  """``ahead``: better by more than two standard errors in fd or class accuracy and not worse
  by more than two in the other; ``behind`` the reverse; ``mixed`` better in one and worse in
  the other; otherwise ``tie``."""
  fd_better = difference['fd_diff'] < -2 * difference['fd_diff_se']
  fd_worse = difference['fd_diff'] > 2 * difference['fd_diff_se']
  acc_better = difference['class_accuracy_diff'] > 2 * difference['class_accuracy_diff_se']
  acc_worse = difference['class_accuracy_diff'] < -2 * difference['class_accuracy_diff_se']
  if (fd_better and not acc_worse) or (acc_better and not fd_worse):
    return 'ahead'
  if (fd_worse and not acc_better) or (acc_worse and not fd_better):
    return 'behind'
  return 'mixed' if (fd_better or acc_better) else 'tie'


def analyse(chosen: dict, test: Split, base_candidate: Candidate,
            validation_rows: list[dict]) -> dict:
  base_row, base_correct = test.row(base_candidate)
  baseline = dict(base_row, decode=base_candidate.decode.spec, cache=base_candidate.decode.cache)
  budgets = []
  for budget, by_family in chosen.items():
    entries, correct_of = {}, {}
    for family, pick in by_family.items():
      if pick is None:
        entries[family] = None
        continue
      row, correct_of[family] = test.row(pick['candidate'])
      entries[family] = dict(
          row, validation_objective=pick['objective'], validation_fd=pick['fd_mean'],
          validation_class_accuracy=pick['class_accuracy_mean'],
          vs_baseline=compare(row, correct_of[family], base_row, base_correct,
                              base_row['fd_mean']))
    for family, entry in entries.items():
      others = [(f, e) for f, e in entries.items() if f != family and e]
      if not entry or not others:
        continue
      best_family, best = min(others, key=lambda fe: fe[1]['validation_objective'])
      difference = compare(entry, correct_of[family], best, correct_of[best_family],
                           base_row['fd_mean'])
      entry['vs_best_other'] = dict(family=best_family, verdict=verdict(difference),
                                    **difference)
    budgets.append(dict(budget=budget, families=entries))
  return dict(baseline=baseline, budgets=budgets,
              validation_candidates=[
                  {k: r[k] for k in ('model', 'family', 'spec', 'cache', 'gflops_per_sample',
                                     'flop_ratio', 'fd_mean', 'class_accuracy_mean',
                                     'objective')} for r in validation_rows])


def _pct(value: float) -> str:
  return f'{100 * value:+.1f}%'


def _reconstruction_line(report: dict) -> list[str]:
  ceiling = report.get('tokenizer_reconstructions_of_held_out')
  if not ceiling:
    return []
  return [f"The tokenizer's reconstructions of the held-out digits (the ceiling): class accuracy "
          f"{ceiling['class_accuracy']:.3f}, fd {ceiling['fd']:.1f}, pixel MSE "
          f"{ceiling['reconstruction_mse']:.4f}.", '']


def markdown(report: dict) -> str:
  base = report['baseline']
  lines = [f"Baseline ({base['decode']}, cache {base['cache']}): "
           f"{base['gflops_per_sample']:.3f} GFLOPs, class accuracy "
           f"{base['class_accuracy_mean']:.3f}, fd {base['fd_mean']:.1f} (test, "
           f"{len(base['fd_per_seed'])} seeds x {base['num_samples']} samples).", '',
           *_reconstruction_line(report),
           'Differences are paired (same seeds and labels) ± standard error: class accuracy in '
           'points over (seed, sample) pairs, fd over seeds as a percentage of the baseline\'s '
           'fd, also against the family that validation ranks first among the others at the '
           'same budget.', '',
           '| budget | family | decode | cache | GFLOPs | flop_ratio | class acc (vs baseline) | '
           'fd (vs baseline) | vs best other family: acc, fd | verdict |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for entry in report['budgets']:
    for family, row in entry['families'].items():
      head = f"| >= {entry['budget']:g}x | {family} |"
      if row is None:
        lines.append(f'{head} none within the budget | | | | | | | |')
        continue
      b = row['vs_baseline']
      other = row.get('vs_best_other')
      versus = (f"vs {other['family']}: {100 * other['class_accuracy_diff']:+.1f} ± "
                f"{100 * other['class_accuracy_diff_se']:.1f} pts, {_pct(other['fd_gap'])} ± "
                f"{100 * other['fd_gap_se']:.1f}" if other else '')
      lines.append(
          f"{head} {row['spec']} | {row['cache']} | {row['gflops_per_sample']:.3f} | "
          f"{row['flop_ratio']:.2f} | "
          f"{row['class_accuracy_mean']:.3f} ({100 * b['class_accuracy_diff']:+.1f} ± "
          f"{100 * b['class_accuracy_diff_se']:.1f} pts) | {row['fd_mean']:.1f} "
          f"({_pct(b['fd_gap'])} ± {100 * b['fd_gap_se']:.1f}) | {versus} | "
          f"{other['verdict'] if other else ''} |")
  return '\n'.join(lines) + '\n'


PANELS = (('fd_mean', True, 'Fréchet distance (lower is better)'),
          ('class_accuracy_mean', False, 'class accuracy (higher is better)'))


def _gflops_axis(ax) -> None:
  from matplotlib import ticker
  ax.set_xscale('log')
  ax.xaxis.set_major_locator(ticker.LogLocator(base=2))
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f'{x:.2g}'))
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  ax.set_xlabel('GFLOPs per sample (log)')


def draw_test_frontier(axes, report: dict) -> None:
  """Into two matplotlib axes (fd, class accuracy): the test scores of each family's picks
  against GFLOPs (± std over seeds), the family's frontier through them, and the baseline."""
  base = report['baseline']
  by_family = {}
  for entry in report['budgets']:
    for family, row in entry['families'].items():
      if row:
        by_family.setdefault(family, {})[(row['model'], row['spec'], row['cache'])] = row
  for ax, (key, lower, label) in zip(axes, PANELS):
    for family, rows in by_family.items():
      color = COLORS[family]
      rows = sorted(rows.values(), key=lambda r: r['gflops_per_sample'])
      std = key.replace('_mean', '_std')
      ax.errorbar([r['gflops_per_sample'] for r in rows], [r[key] for r in rows],
                  yerr=[r[std] for r in rows], fmt='o', capsize=3, color=color)
      front = study.pareto_front(rows, y=key, lower_is_better=lower)
      ax.plot([r['gflops_per_sample'] for r in front], [r[key] for r in front], '-',
              color=color, label=family)
      for r in rows:
        ax.annotate(r['spec'] + ('' if r['cache'] == 'none' else ' c'),
                    (r['gflops_per_sample'], r[key]), fontsize=6, xytext=(3, 3),
                    textcoords='offset points')
    ax.plot([base['gflops_per_sample']], [base[key]], 'k*', markersize=12,
            label=f"baseline {base['decode']}")
    _gflops_axis(ax)
    ax.set_ylabel(f'{label}, held-out digits')
  axes[0].legend(fontsize=8)


def plot(report: dict, path: str) -> None:
  plt = figures.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
  draw_test_frontier(axes, report)
  fig.suptitle('Best decode of each family per FLOP budget: chosen on validation, scored on '
               'the held-out digits (c: cached)')
  figures.save_png(fig, path)


def plot_validation(rows: list[dict], path: str) -> None:
  """Every decode scored on validation, and each family's frontier through them."""
  plt = figures.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
  for ax, (key, lower, label) in zip(axes, PANELS):
    for family, color in COLORS.items():
      mine = [r for r in rows if r['family'] == family]
      if not mine:
        continue
      ax.plot([r['gflops_per_sample'] for r in mine], [r[key] for r in mine], '.',
              color=color, alpha=0.35)
      front = study.pareto_front(mine, y=key, lower_is_better=lower)
      ax.plot([r['gflops_per_sample'] for r in front], [r[key] for r in front], '-o',
              color=color, markersize=4, label=f'{family} ({len(mine)} decodes)')
    _gflops_axis(ax)
    ax.set_ylabel(f'{label}, validation')
  axes[0].legend(fontsize=8)
  fig.suptitle('Every decode scored on validation, and the frontier of each family')
  figures.save_png(fig, path)
