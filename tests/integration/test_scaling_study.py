import math

import numpy as np
import pytest

from nested_decode.studies import scaling_study, trend


def test_trend_recovers_a_plane_in_log_width_and_log_steps():
  widths, steps = [128, 256, 512, 128, 256, 512], [800, 800, 800, 3200, 3200, 3200]
  gaps = [0.4 - 0.05 * math.log2(w) - 0.02 * math.log2(s) for w, s in zip(widths, steps)]
  fitted = trend.fit(widths, steps, gaps)
  assert fitted.per_width_doubling == pytest.approx(-0.05)
  assert fitted.per_steps_doubling == pytest.approx(-0.02)
  assert fitted.per_width_doubling_se == pytest.approx(0.0, abs=1e-9)
  assert fitted.predict(1024, 3200) == pytest.approx(0.4 - 0.5 - 0.02 * math.log2(3200))
  # The width where the gap falls to 0.1 with 3200 steps: 0.4 - 0.05 log2 w - 0.02 log2 3200.
  expected = 2 ** ((0.4 - 0.02 * math.log2(3200) - 0.1) / 0.05)
  assert fitted.width_reaching(0.1, 3200, 'lower') == pytest.approx(expected)
  assert fitted.predict(expected, 3200) == pytest.approx(0.1)
  assert fitted.steps_reaching(0.1, 512, 'lower') == pytest.approx(
      2 ** ((0.4 - 0.05 * 9 - 0.1) / 0.02))
  # An accuracy difference that gets worse with width never reaches a higher target.
  assert fitted.width_reaching(0.0, 3200, 'higher') == math.inf


def test_trend_standard_errors_come_from_the_residuals():
  widths, steps = [128, 256, 128, 256, 512], [200, 200, 800, 800, 800]
  noise = np.array([0.01, -0.01, -0.01, 0.01, 0.0])
  gaps = 0.3 - 0.04 * np.log2(widths) + noise
  fitted = trend.fit(widths, steps, gaps)
  design = np.stack([np.ones(5), np.log2(widths), np.log2(steps)], 1)
  coefficients = np.linalg.lstsq(design, gaps, rcond=None)[0]
  residual = gaps - design @ coefficients
  covariance = residual @ residual / 2 * np.linalg.inv(design.T @ design)
  assert fitted.per_width_doubling == pytest.approx(coefficients[1])
  assert fitted.per_width_doubling_se == pytest.approx(math.sqrt(covariance[1, 1]))
  assert fitted.per_steps_doubling_se == pytest.approx(math.sqrt(covariance[2, 2]))


def test_a_coordinate_with_one_value_gets_no_slope_and_collinear_points_are_refused():
  fitted = trend.fit([64, 64], [2, 4], [0.3, 0.2])
  assert fitted.per_width_doubling is None and fitted.per_steps_doubling == pytest.approx(-0.1)
  assert fitted.width_reaching(0.1, 4, 'lower') is None
  assert fitted.steps_reaching(0.1, 64, 'lower') == pytest.approx(8)
  with pytest.raises(ValueError, match='vary together'):
    trend.fit([128, 256], [200, 400], [0.3, 0.2])
  with pytest.raises(ValueError, match='>= 2 points'):
    trend.fit([128], [200], [0.3])


def test_the_best_schedule_is_the_closest_to_both_bounds_above_the_flop_ratio():
  assert scaling_study.target_excess(0.05, -0.01) == pytest.approx(0.5)
  assert scaling_study.target_excess(0.05, -0.04) == pytest.approx(2.0)
  rows = [dict(name='base', flop_ratio=1.0, fd_gap=0.0, class_accuracy_diff=0.0),
          dict(name='a', flop_ratio=3.5, fd_gap=0.15, class_accuracy_diff=-0.01),
          dict(name='b', flop_ratio=3.1, fd_gap=0.12, class_accuracy_diff=-0.05),
          dict(name='c', flop_ratio=4.8, fd_gap=0.30, class_accuracy_diff=-0.08),
          dict(name='d', flop_ratio=2.9, fd_gap=0.01, class_accuracy_diff=0.0)]
  for row in rows:
    row['target_excess'] = scaling_study.target_excess(row['fd_gap'],
                                                       row['class_accuracy_diff'])
  assert scaling_study.best_at(rows, 3.0)['name'] == 'a'  # 1.5 vs b's 2.5; d is below 3x
  assert scaling_study.best_at(rows, 4.0)['name'] == 'c'
  assert scaling_study.best_at(rows, 6.0) is None


def test_point_configs_keep_the_head_size_and_name_bad_widths():
  from conftest import load_config
  config = load_config('mnist')
  point = scaling_study.point_config(config, 128, 3200)
  assert (point.model.width, point.model.num_heads, point.model.mlp_dim) == (128, 8, 512)
  assert point.training.num_steps == 3200 and config.training.num_steps == 800
  with pytest.raises(ValueError, match='config.scaling.widths: 96'):
    scaling_study.point_config(config, 96, 800)
  config.scaling.separate_steps = (3200,)
  with pytest.raises(ValueError, match=r'separate_steps: \[3200\] not in .*=\(400, 800\)'):
    scaling_study.make_points(config, '/tmp/unused')
