"""Paired differences and the paired bootstrap of whole-set scores (metrics/paired.py)."""

import numpy as np
import pytest

from nested_decode.metrics import paired


def test_bootstrap_error_of_a_mean_matches_the_paired_standard_error():
  rng = np.random.default_rng(0)
  reference = rng.normal(size=500)
  values = reference + 0.3 + rng.normal(scale=0.1, size=500)  # correlated, as paired decodes are
  gap = lambda rows: values[rows].mean() - reference[rows].mean()
  difference, error = paired.bootstrap_difference(gap, [500], resamples=2000)
  mean, standard_error = paired.paired_difference(values, reference)
  assert difference == pytest.approx(mean)
  assert error == pytest.approx(standard_error, rel=0.1)
  # far below what the two sides' own spreads would give unpaired (about 0.063)
  assert error < 0.2 * np.sqrt(values.var() / 500 + reference.var() / 500)


def test_bootstrap_resamples_each_group_within_itself():
  drawn = []

  def gap(rows):
    drawn.append(rows)
    return float(rows.mean())

  paired.bootstrap_difference(gap, [3, 5], resamples=50)
  for rows in drawn[:-1]:
    assert len(rows) == 8 and set(rows[:3]) <= {0, 1, 2} and set(rows[3:]) <= set(range(3, 8))
  np.testing.assert_array_equal(drawn[-1], np.arange(8))  # the difference itself: every row once


def test_bootstrap_needs_two_resamples():
  with pytest.raises(ValueError, match='at least 2 resamples'):
    paired.bootstrap_difference(lambda rows: 0.0, [4], resamples=1)
