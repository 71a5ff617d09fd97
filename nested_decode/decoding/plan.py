"""The static plan of a decode: per step, which width runs, over how many tokens, with what cache.

Everything here is host-side Python derived from the config, so the sampler's shapes are static
and the FLOP counter reads exactly the plan the sampler runs.

A cached step runs its active tokens padded up to one of ``query_buckets`` evenly spaced sizes,
so that steps and schedules of one width share a few compiled programs instead of one per
active-token count; the padding is counted as work (``num_queries``), the exact count is
``num_active``.
"""
import dataclasses
import math
from typing import Sequence

from nested_decode.decoding.mask_schedule import masked_counts

CACHE_POLICIES = ('none', 'refresh_on_switch', 'refresh_every_k')


@dataclasses.dataclass(frozen=True)
class DecodeStep:
  index: int
  width_factor: int
  full_pass: bool      # True: all 1 + N positions run and the cache is rebuilt
  num_queries: int     # positions run through the network at this step (padding included)
  num_keys: int        # positions attended to (always 1 + N)
  num_logits: int      # positions whose logits are computed
  masked_before: int   # content tokens masked when the step starts
  masked_after: int    # content tokens masked when it ends
  num_active: int      # positions whose results the step uses (num_queries without padding)
  keeps_cache: bool = False  # the next step reads the cache this one leaves (it is cached)


def expand_width_schedule(width_schedule: Sequence[Sequence[int]]) -> list[int]:
  """``((8, 3), (1, 2))`` -> ``[8, 8, 8, 1, 1]``."""
  return [int(factor) for factor, steps in width_schedule for _ in range(int(steps))]


def query_bucket(num_active: int, seq_len: int, query_buckets: int) -> int:
  """The padded query count of a cached step: ``num_active`` rounded up to a multiple of
  ``ceil(seq_len / query_buckets)`` (at most ``seq_len``); ``query_buckets=0`` pads nothing."""
  if not query_buckets:
    return num_active
  size = math.ceil(seq_len / query_buckets)
  return min(seq_len, -(-num_active // size) * size)


def make_plan(seq_len: int, num_unknown: int, width_schedule: Sequence[Sequence[int]],
              cache_policy: str = 'refresh_on_switch', refresh_every: int = 1,
              mask_schedule: str = 'cosine', query_buckets: int = 0
              ) -> tuple[DecodeStep, ...]:
  """Plans a decode of ``seq_len`` content tokens of which ``num_unknown`` start masked.

  With a cache, a step runs as queries only its *active* tokens: those still masked plus those
  revealed at the previous step (their cached keys/values still describe the mask token). That
  set is exactly the tokens masked when the previous step started, so its size is known ahead.
  The first step, every width switch and (``refresh_every_k``) every k-th step since the last
  refresh are full passes. ``query_buckets`` pads cached steps (see the module docstring).
  """
  if cache_policy not in CACHE_POLICIES:
    raise ValueError(f'Unknown cache policy {cache_policy!r}; allowed: {CACHE_POLICIES}')
  if not 0 < num_unknown <= seq_len:
    raise ValueError(f'num_unknown={num_unknown} must be in [1, seq_len={seq_len}]')
  widths = expand_width_schedule(width_schedule)
  after = masked_counts(num_unknown, len(widths), mask_schedule)
  before = [num_unknown] + after[:-1]
  steps, since_refresh = [], 0
  for t, factor in enumerate(widths):
    full = (t == 0 or cache_policy == 'none' or factor != widths[t - 1]
            or (cache_policy == 'refresh_every_k' and since_refresh >= refresh_every))
    since_refresh = 1 if full else since_refresh + 1
    active = seq_len + 1 if full else before[t - 1]
    queries = active if full else query_bucket(active, seq_len, query_buckets)
    steps.append(DecodeStep(index=t, width_factor=factor, full_pass=full, num_queries=queries,
                            num_keys=seq_len + 1,
                            num_logits=seq_len if full else queries,
                            masked_before=before[t], masked_after=after[t],
                            num_active=active))
  return tuple(dataclasses.replace(step, keeps_cache=not later.full_pass)
               for step, later in zip(steps, steps[1:])) + (steps[-1],)
