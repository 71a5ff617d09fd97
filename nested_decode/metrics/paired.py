"""Paired differences: two decodes of the same seeds and labels compared sample by sample.

Sampling noise is keyed by (seed, sample, step, position) (``decoding/sampler.py``), so sample
``i`` of seed ``s`` under two schedules shares its label and its random numbers; the spread of
the per-pair differences, not of each side's scores, then says how sure a difference is.
"""

import math

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
