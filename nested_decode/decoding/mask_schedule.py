"""Mask schedules: how many tokens stay masked after each of the T decode steps (MaskGIT rule).

The names and formulas are MaskGIT's (``libml/mask_schedule.py`` of google-research/maskgit), so
an ablation under a name compares with theirs: ``log`` and ``exp`` depend on the number of
unknown tokens ``N`` as well as on the progress ``r``.
"""

import math

MASK_SCHEDULES = ('cosine', 'linear', 'square', 'cubic', 'sqrt', 'log', 'exp')


def mask_ratio(ratio: float, schedule: str, num_unknown: int) -> float:
  """Fraction of the ``num_unknown`` initially unknown tokens still masked at progress
  ``ratio`` in [0, 1], clipped to [0, 1]."""
  if schedule == 'cosine':
    value = math.cos(math.pi / 2 * ratio)
  elif schedule == 'linear':
    value = 1.0 - ratio
  elif schedule == 'square':
    value = 1.0 - ratio**2
  elif schedule == 'cubic':
    value = 1.0 - ratio**3
  elif schedule == 'sqrt':
    value = 1.0 - math.sqrt(ratio)
  elif schedule == 'log':  # -log_N(r): 1 at r = 1/N and before, 0 at r = 1
    value = math.inf if ratio <= 0 else -math.log(ratio) / math.log(max(num_unknown, 2))
  elif schedule == 'exp':  # 1 - N^-(1 - r): 1 - 1/N at r = 0, 0 at r = 1
    value = 1.0 - max(num_unknown, 2) ** -(1.0 - ratio)
  else:
    raise ValueError(f'Unknown mask schedule {schedule!r}; allowed: {MASK_SCHEDULES}')
  return min(max(value, 0.0), 1.0)


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
      keep = math.floor(num_unknown * mask_ratio((step + 1) / num_steps, schedule, num_unknown))
      keep = max(1, min(remaining - 1, keep))
    counts.append(keep)
    remaining = keep
  return counts
