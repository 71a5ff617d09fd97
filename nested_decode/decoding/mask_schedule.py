"""Mask schedules: how many tokens stay masked after each of the T decode steps (MaskGIT rule)."""

import math

MASK_SCHEDULES = ('cosine', 'linear', 'square', 'exp')


def mask_ratio(ratio: float, schedule: str) -> float:
  """Fraction of the initially unknown tokens still masked at progress ``ratio`` in [0, 1]."""
  if schedule == 'cosine':
    return math.cos(math.pi / 2 * ratio)
  if schedule == 'linear':
    return 1.0 - ratio
  if schedule == 'square':
    return 1.0 - ratio**2
  if schedule == 'exp':
    return 1.0 - (math.exp(ratio) - 1.0) / (math.e - 1.0)
  raise ValueError(f'Unknown mask schedule {schedule!r}; allowed: {MASK_SCHEDULES}')


def masked_counts(num_unknown: int, num_steps: int, schedule: str = 'cosine') -> list[int]:
  """Tokens still masked after each step; the last entry is 0.

  MaskGIT: after step t, ``floor(num_unknown * mask_ratio((t + 1) / T))`` stay masked, clamped
  so that every step reveals at least one token and keeps at least one masked until the end.
  """
  counts, remaining = [], num_unknown
  for step in range(num_steps):
    if step == num_steps - 1:
      keep = 0
    else:
      keep = math.floor(num_unknown * mask_ratio((step + 1) / num_steps, schedule))
      keep = max(1, min(remaining - 1, keep))
    counts.append(keep)
    remaining = keep
  return counts
