"""Paired differences: two decodes of the same seeds and labels compared sample by sample.

Sampling noise is keyed by (seed, sample, step, position) (``decoding/sampler.py``), so sample
``i`` of seed ``s`` under two schedules shares its label and its random numbers; the spread of
the per-pair differences, not of each side's scores, then says how sure a difference is.
"""

import math
from typing import Callable, Sequence

import numpy as np


def paired_difference(values, reference) -> tuple[float, float]:
  """Mean of ``values - reference`` (paired elementwise, any equal shapes) and its standard
  error (sample standard deviation over sqrt(pairs)); the error is NaN for a single pair."""
  values, reference = np.asarray(values, np.float64), np.asarray(reference, np.float64)
  if values.shape != reference.shape:
    raise ValueError(f'paired values of shapes {values.shape} and {reference.shape}')
  differences = (values - reference).ravel()
  if differences.size < 2:
    return float(differences.mean()), math.nan
  return (float(differences.mean()),
          float(differences.std(ddof=1) / math.sqrt(differences.size)))


def bootstrap_difference(difference: Callable[[np.ndarray], float], group_sizes: Sequence[int],
                         resamples: int, seed: int = 0) -> tuple[float, float]:
  """``difference(all rows)`` and its paired bootstrap standard error, for scores of a whole
  set (such as FVD) that no per-pair difference gives.

  ``difference(rows)`` scores two sets on the same ``rows`` (an index array; row ``i`` of both
  comes from the same condition and real clip) and returns the first score minus the second.
  The rows are consecutive groups of ``group_sizes`` (the folds a score averages over), each
  resampled on its own: every one of ``resamples`` draws takes, within each group, as many of
  its rows with replacement as it has. The error is the standard deviation of the drawn
  differences.
  """
  if resamples < 2:
    raise ValueError(f'a bootstrap needs at least 2 resamples, got {resamples}')
  rng = np.random.default_rng(seed)
  starts = np.cumsum([0, *group_sizes[:-1]])
  draws = [difference(np.concatenate([start + rng.integers(0, size, size)
                                      for start, size in zip(starts, group_sizes)]))
           for _ in range(resamples)]
  return float(difference(np.arange(sum(group_sizes)))), float(np.std(draws, ddof=1))
