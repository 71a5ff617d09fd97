"""``--mode=search_schedule``: beam search over small-to-large width schedules for a budget.

A schedule gives each nesting factor a number of the T steps, narrowest first. Starting from the
full-width baseline, every round moves one step of some width to the next narrower width (each
move makes the decode cheaper) and scores the new candidates with a cheap proxy: the Fréchet
distance of a few hundred samples to a *calibration* reference (training digits, disjoint from the
held-out digits used for evaluation). The budget is either a maximum of GFLOPs per sample (find
the best proxy fd within it) or a maximum relative fd increase over the baseline (find the
cheapest schedule within it). The winner is then evaluated on the held-out digits next to the
hand-written default.
"""

from typing import Callable

import ml_collections
from absl import logging
from jax.sharding import Mesh

from nested_decode import io_utils
from nested_decode.pipeline import stages
from nested_decode.studies import study

PROXY_SEED = 10_000  # sampling seeds of the search never coincide with the study's 0, 1, 2


def widths_of(counts: tuple[int, ...], factors: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  """Step counts per factor (narrowest first) -> ``((p, steps), ...)`` without empty segments."""
  return tuple((p, n) for p, n in zip(factors, counts) if n > 0)


def cheaper_neighbours(counts: tuple[int, ...]) -> list[tuple[int, ...]]:
  """Move one step from each width to the next narrower one (factors sorted widest last)."""
  result = []
  for i in range(1, len(counts)):
    if counts[i] > (1 if i == len(counts) - 1 else 0):  # keep a full-width last step
      moved = list(counts)
      moved[i] -= 1
      moved[i - 1] += 1
      result.append(tuple(moved))
  return result


def search(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
           log: Callable[[str], None] = logging.info) -> dict:
  s = config.search
  if (s.max_gflops_per_sample > 0) == (s.max_fd_increase > 0):
    raise ValueError('Set exactly one budget: config.search.max_gflops_per_sample (> 0) or '
                     'config.search.max_fd_increase (> 0, relative to the baseline fd)')
  factors = tuple(sorted(config.model.nesting_factors, reverse=True))  # narrowest first
  steps, cache = config.sampling.steps, s.cache
  params = stages.transformer_stage(config, workdir, mesh)
  proxy = study.make_scorer(config, workdir, mesh, params, reference_split='calibration')
  scored = {}

  def evaluate(counts):
    if counts not in scored:
      widths = widths_of(counts, factors)
      row = proxy.score(widths, cache, [PROXY_SEED], s.proxy_samples)
      scored[counts] = row
      log(f"search {widths}: {row['gflops_per_sample']:.3g} GFLOPs, proxy fd "
          f"{row['fd_mean']:.1f}")
    return scored[counts]

  baseline = tuple(0 for _ in factors[:-1]) + (steps,)
  base_fd = evaluate(baseline)['fd_mean']
  fd_limit = base_fd * (1 + s.max_fd_increase)

  def feasible(counts):
    row = evaluate(counts)
    if s.max_gflops_per_sample > 0:
      return row['gflops_per_sample'] <= s.max_gflops_per_sample
    return row['fd_mean'] <= fd_limit

  def better(a, b):  # is candidate a better than b under the budget's objective?
    if s.max_gflops_per_sample > 0:
      return scored[a]['fd_mean'] < scored[b]['fd_mean']
    return scored[a]['gflops_per_sample'] < scored[b]['gflops_per_sample']

  best, frontier = None, [baseline]
  for _ in range(s.max_rounds):
    candidates = sorted({n for c in frontier for n in cheaper_neighbours(c)})
    if not candidates:
      break
    for c in candidates:
      if feasible(c) and (best is None or better(c, best)):
        best = c
    if s.max_gflops_per_sample > 0:
      frontier = sorted(candidates, key=lambda c: scored[c]['fd_mean'])[:s.beam_width]
      if all(feasible(c) for c in frontier):
        break  # from here every move is cheaper still, and (by the proxy) worse
    else:
      frontier = sorted((c for c in candidates if feasible(c)),
                        key=lambda c: scored[c]['gflops_per_sample'])[:s.beam_width]
      if not frontier:
        break
  if best is None:
    raise RuntimeError(f'No schedule within the budget in {len(scored)} candidates; '
                       f'loosen config.search')

  found = widths_of(best, factors)
  heldout = study.make_scorer(config, workdir, mesh, params)
  seeds = list(range(config.study.seeds))
  rows = {'searched': heldout.score(found, cache, seeds, config.study.num_samples)}
  default = config.eval.schedules[s.compare_with]
  rows[s.compare_with] = heldout.score(default.widths, default.cache, seeds,
                                       config.study.num_samples)
  rows['baseline'] = heldout.score(((1, steps),), 'none', seeds, config.study.num_samples)
  for row in rows.values():
    row['flop_ratio'] = rows['baseline']['gflops_per_sample'] / row['gflops_per_sample']

  snippet = (f'config.eval.schedules.searched = config_lib.schedule({found!r}, '
             f'cache={cache!r})\n'
             f'# or on the command line:\n'
             f'# --config.eval.schedules.searched.widths="{found!r}" '
             f'--config.eval.schedules.searched.cache={cache}\n')
  out_dir = io_utils.join(workdir, 'search')
  io_utils.write_bytes(io_utils.join(out_dir, 'best_schedule.py'), snippet.encode())
  report = dict(budget=dict(max_gflops_per_sample=s.max_gflops_per_sample,
                            max_fd_increase=s.max_fd_increase),
                found=[list(x) for x in found], cache=cache, candidates_scored=len(scored),
                proxy=dict(samples=s.proxy_samples, reference='first 1000 training digits',
                           baseline_fd=base_fd,
                           candidates=[dict(widths=[list(x) for x in widths_of(c, factors)],
                                            **{k: r[k] for k in ('gflops_per_sample',
                                                                 'fd_mean')})
                                       for c, r in scored.items()]),
                heldout=rows)
  io_utils.write_json(io_utils.join(out_dir, 'result.json'), report)
  log(f'search found {found} ({cache}); held-out: {rows}')
  return report
