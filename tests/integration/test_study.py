import numpy as np
import pytest
from conftest import load_config

from nested_decode.config_lib import ConfigError
from nested_decode.metrics import paired
from nested_decode.studies import schedule_search, study


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


def test_a_study_of_chosen_schedules_keeps_the_baseline_and_names_unknown_ones():
  config = load_config('mnist', 'tiny')
  assert study.chosen_grid(config) == study.decode_grid(12)
  config.study.schedules = ('down_1x6_8x6', 'alone_p4')
  assert [name for name, _ in study.chosen_grid(config)] == [
      'baseline_T12', 'alone_p4', 'down_1x6_8x6']
  config.study.schedules = ('alone_p4', 'alone_p3')
  with pytest.raises(ConfigError, match=r"config.study.schedules=\('alone_p4', 'alone_p3'\) "
                     r"names \['alone_p3'\], which are not in the grid; allowed: baseline_T8, "):
    study.chosen_grid(config)


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


def test_paired_difference_uses_the_spread_of_the_differences():
  reference = np.array([10.0, 20.0, 30.0, 40.0])
  mean, se = paired.paired_difference(reference + [1.0, 3.0, 1.0, 3.0], reference)
  assert mean == 2.0 and se == pytest.approx(np.std([1, 3, 1, 3], ddof=1) / 2)
  mean, se = paired.paired_difference([[1, 0, 1], [1, 1, 1]], [[1, 1, 0], [1, 1, 1]])
  assert mean == 0.0 and se == pytest.approx(np.std([0, -1, 1, 0, 0, 0], ddof=1) / np.sqrt(6))
  assert np.isnan(paired.paired_difference([3.0], [1.0])[1])
  with pytest.raises(ValueError, match=r'shapes \(2,\) and \(3,\)'):
    paired.paired_difference([1, 2], [1, 2, 3])


def test_study_rows_are_compared_with_the_baseline_sample_by_sample():
  rows = [dict(gflops_per_sample=10.0, seconds_per_batch=2.0, fd_per_seed=[50.0, 54.0]),
          dict(gflops_per_sample=2.5, seconds_per_batch=1.0, fd_per_seed=[56.0, 59.0])]
  correct = [np.array([[1, 1, 0, 1], [1, 0, 1, 1]], bool),
             np.array([[1, 0, 0, 1], [1, 0, 1, 0]], bool)]
  study.add_comparisons(rows, correct, baseline_index=0)
  assert rows[0]['fd_diff'] == 0 and rows[0]['class_accuracy_diff'] == 0
  assert rows[1]['flop_ratio'] == 4.0 and rows[1]['speedup'] == 2.0
  assert rows[1]['fd_diff'] == 5.5 and rows[1]['fd_diff_se'] == pytest.approx(0.5)
  assert rows[1]['class_accuracy_diff'] == -0.25
  assert rows[1]['class_accuracy_diff_se'] == pytest.approx(
      np.std([0, -1, 0, 0, 0, 0, 0, -1], ddof=1) / np.sqrt(8))


def test_variants_are_plain_models_of_each_sub_width_and_the_nested_one_without_distillation():
  config = load_config('mnist')
  variants = study.variant_configs(config)
  assert set(variants) == {'separate_width256', 'separate_width128', 'separate_width64',
                           'separate_width32', 'nested_no_distillation'}
  narrow = variants['separate_width64']
  assert (narrow.model.width, narrow.model.num_heads, narrow.model.mlp_dim) == (64, 4, 256)
  assert narrow.model.nesting_factors == (1,) and narrow.training.widths == (1,)
  assert narrow.training.num_steps == config.training.num_steps
  no_distill = variants['nested_no_distillation'].training
  assert no_distill.distill_lambda_start == no_distill.distill_lambda_end == 1.0
  assert config.model.width == 256 and config.training.distill_lambda_end != 1.0
