from nested_decode.jobs import schedule_search
from nested_decode.jobs import study


def test_grid_has_baselines_single_widths_and_both_directions():
  grid = dict(study.decode_grid(12))
  assert grid['baseline_T8'] == ((1, 8),) and grid['baseline_T16'] == ((1, 16),)
  assert {grid[f'alone_p{p}'] for p in (2, 4, 8)} == {((2, 12),), ((4, 12),), ((8, 12),)}
  for name, widths in grid.items():
    factors = [p for p, _ in widths]
    if name.startswith('up_'):
      assert factors == sorted(factors, reverse=True) and factors[-1] == 1
      assert sum(n for _, n in widths) == 12
    if name.startswith('down_'):
      assert factors == sorted(factors) and factors[0] == 1
  assert sum(name.startswith('up_') for name in grid) >= 4
  assert sum(name.startswith('down_') for name in grid) >= 1


def test_pareto_front_keeps_only_undominated_rows():
  rows = [dict(gflops_per_sample=g, fd_mean=f, name=n) for g, f, n in
          [(1.0, 50.0, 'a'), (2.0, 40.0, 'b'), (2.5, 45.0, 'c'), (3.0, 30.0, 'd'),
           (0.5, 80.0, 'e'), (3.0, 35.0, 'f')]]
  assert [r['name'] for r in study.pareto_front(rows)] == ['e', 'a', 'b', 'd']


def test_search_moves_one_step_to_the_next_narrower_width_and_keeps_a_full_width_step():
  # counts are per factor, narrowest first: (8, 4, 2, 1)
  assert schedule_search.cheaper_neighbours((0, 0, 0, 12)) == [(0, 0, 1, 11)]
  assert sorted(schedule_search.cheaper_neighbours((0, 2, 0, 1))) == [(1, 1, 0, 1)]
  assert schedule_search.widths_of((3, 0, 2, 7), (8, 4, 2, 1)) == ((8, 3), (2, 2), (1, 7))
