"""Families of decodes that spend fewer FLOPs than the full-width, ``sampling.steps`` baseline.

A decode is a schedule of ``(nesting factor, steps)`` segments, narrowest first, and a cache
policy. The ways to decode cheaper that a reviewer compares MaGNeTS with:

- ``fewer_steps``: the full width alone, with fewer steps, ``((1, T),)``;
- ``sub_model``: one sub-model (factor p > 1) alone, ``((p, T),)``;
- ``magnets``: small-to-large schedules of at least two widths, the number of steps free.

All of them live in one space, every small-to-large schedule of the trained factors with a
number of steps in ``[min_steps, max_steps]``; the first two families are its one-width
schedules. A schedule's step count is its own T: the mask schedule is planned for it.
"""

import dataclasses
import itertools
from typing import Iterator, Sequence

from nested_decode.decoding.plan import CACHE_POLICIES

FEWER_STEPS, SUB_MODEL, MAGNETS = 'fewer_steps', 'sub_model', 'magnets'
CACHES = ('none', 'refresh_on_switch')
CACHE_NAMES = {'none': 'nocache', 'refresh_on_switch': 'cached', 'refresh_every_k': 'refreshk'}

Widths = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True, order=True)
class Decode:
  """One schedule with its cache policy; ``widths`` narrowest first."""
  widths: Widths
  cache: str

  def __post_init__(self):
    if self.cache not in CACHE_POLICIES:
      raise ValueError(f'Unknown cache policy {self.cache!r}; allowed: {CACHE_POLICIES}')

  @property
  def spec(self) -> str:
    """``'8x1,4x1,2x6,1x4'``: the API's schedule string."""
    return ','.join(f'{p}x{n}' for p, n in self.widths)

  @property
  def name(self) -> str:
    """A file-name-safe name: ``'8x1-4x1-2x6-1x4_cached'``, ``'1x4_nocache'``."""
    return f"{self.spec.replace(',', '-')}_{CACHE_NAMES[self.cache]}"


def family_of(widths: Widths) -> str:
  """Which family a schedule belongs to: one width is ``fewer_steps`` (the full width) or
  ``sub_model``; two widths or more are ``magnets``."""
  if len({p for p, _ in widths}) >= 2:
    return MAGNETS
  return FEWER_STEPS if widths[0][0] == 1 else SUB_MODEL


def widths_of(counts: Sequence[int], factors: Sequence[int]) -> Widths:
  """Step counts per factor (``factors`` narrowest first) -> segments without empty ones."""
  return tuple((p, n) for p, n in zip(factors, counts) if n > 0)


def counts_of(widths: Widths, factors: Sequence[int]) -> tuple[int, ...]:
  """The inverse of ``widths_of``; a factor out of ``factors`` or out of order is an error."""
  order = [factors.index(p) for p, _ in widths]
  if order != sorted(set(order)):
    raise ValueError(f'{widths} is not narrowest first over the factors {tuple(factors)}')
  counts = [0] * len(factors)
  for p, n in widths:
    counts[factors.index(p)] = n
  return tuple(counts)


def narrowest_first(factors: Sequence[int]) -> tuple[int, ...]:
  return tuple(sorted(factors, reverse=True))


def schedule_space(factors: Sequence[int], min_steps: int, max_steps: int) -> Iterator[Widths]:
  """Every small-to-large schedule of ``factors`` with ``min_steps..max_steps`` steps."""
  factors = narrowest_first(factors)
  for total in range(max(1, min_steps), max_steps + 1):
    for used in range(1, len(factors) + 1):
      for subset in itertools.combinations(factors, used):
        # compositions of `total` into `used` positive parts
        for cuts in itertools.combinations(range(1, total), used - 1):
          parts = [b - a for a, b in zip((0,) + cuts, cuts + (total,))]
          yield tuple(zip(subset, parts))


def one_width_decodes(factors: Sequence[int], min_steps: int, max_steps: int
                      ) -> dict[str, list[Decode]]:
  """The ``fewer_steps`` and ``sub_model`` families: each factor alone for every step count,
  with and without the cache."""
  families = {FEWER_STEPS: [], SUB_MODEL: []}
  for p in sorted(factors):
    for steps in range(min_steps, max_steps + 1):
      for cache in CACHES:
        families[FEWER_STEPS if p == 1 else SUB_MODEL].append(Decode(((p, steps),), cache))
  return families


def neighbours(decode: Decode, factors: Sequence[int], min_steps: int, max_steps: int
               ) -> list[Decode]:
  """The decodes one move from ``decode`` in the schedule space: a step moved to the next
  narrower or wider factor, a step added or removed at one factor, or the other cache."""
  factors = narrowest_first(factors)
  counts = counts_of(decode.widths, factors)
  moved = []
  for i in range(len(counts)):
    for j in (i - 1, i + 1):
      if 0 <= j < len(counts) and counts[i] > 0:
        c = list(counts)
        c[i], c[j] = c[i] - 1, c[j] + 1
        moved.append(c)
    if sum(counts) < max_steps:
      moved.append([n + (k == i) for k, n in enumerate(counts)])
    if counts[i] > 0 and sum(counts) > min_steps:
      moved.append([n - (k == i) for k, n in enumerate(counts)])
  result = {Decode(widths_of(c, factors), decode.cache) for c in moved if sum(c) > 0}
  result.add(Decode(decode.widths, next(c for c in CACHES if c != decode.cache)))
  result.discard(decode)
  return sorted(result)
