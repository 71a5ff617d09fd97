"""A decode schedule: which nesting factor runs for how many steps, and how the cache is kept.

    Schedule.parse('8x3,4x3,2x3,1x3')             # factor x steps, narrowest first for MaGNeTS
    Schedule.parse(((8, 3), (1, 9)), cache='none')
    Schedule.parse(config.eval.schedules.magnets)  # a config entry: widths, cache, refresh_every

``check`` says whether a model can decode it, ``plan`` lays out its steps (``decoding/plan.py``)
and ``step_flops`` counts their FLOPs (``models/flops.py``); a decode plans once and
passes the plan on.
"""

import dataclasses
from typing import Any, Mapping, Sequence

from nested_decode.decoding.plan import CACHE_POLICIES, DecodeStep, make_plan
from nested_decode.models import flops
from nested_decode.models.transformer import TransformerConfig

BASELINE = 'baseline'


class ScheduleError(ValueError):
  """A schedule that cannot be decoded; ``field`` names the part at fault (``widths``,
  ``cache``, ``refresh_every``)."""

  def __init__(self, field: str, value: Any, problem: str):
    super().__init__(f'{field}={value!r} is invalid: {problem}')
    self.field, self.value, self.problem = field, value, problem


@dataclasses.dataclass(frozen=True)
class DecodeTask:
  """What a plan depends on besides the schedule: the model's token count and trained factors,
  how many tokens start masked, and the sampling settings that shape each step."""
  seq_len: int
  num_generated: int
  nesting_factors: tuple[int, ...]
  mask_schedule: str = 'cosine'
  query_buckets: int = 0


@dataclasses.dataclass(frozen=True)
class Schedule:
  widths: tuple[tuple[int, int], ...]
  cache: str = 'refresh_on_switch'
  refresh_every: int = 1

  @classmethod
  def parse(cls, spec: 'str | Sequence[Sequence[int]] | Mapping | Schedule',
            cache: str | None = None) -> 'Schedule':
    """A schedule from its spec string, its (factor, steps) pairs or a config entry, with
    ``cache`` when given; a ``ScheduleError`` says what is malformed."""
    if isinstance(spec, Schedule):
      schedule = spec
    elif isinstance(spec, Mapping) or hasattr(spec, 'widths'):
      get = spec.get if hasattr(spec, 'get') else lambda key, default: getattr(spec, key, default)
      kept = get('cache', 'refresh_on_switch')
      # refresh_every_k needs its interval given; the other policies do not read it.
      schedule = cls(_pairs(get('widths', None)), kept,
                     get('refresh_every', None if kept == 'refresh_every_k' else 1))
    elif isinstance(spec, str):
      try:
        widths = tuple(tuple(int(n) for n in part.split('x')) for part in spec.split(','))
      except ValueError:
        raise ScheduleError('widths', spec, "write factor x steps segments like "
                            "'8x3,4x3,2x3,1x3'") from None
      schedule = cls(_pairs(widths))
    else:
      schedule = cls(_pairs(spec))
    return schedule if cache is None else dataclasses.replace(schedule, cache=cache)

  @classmethod
  def baseline(cls, steps: int) -> 'Schedule':
    """Full width for ``steps`` steps, without cache: MaskGIT's decode."""
    return cls(((1, steps),), cache='none')

  @property
  def name(self) -> str:
    """``'8x3,4x3,2x3,1x3'``: the spec string of the widths."""
    return ','.join(f'{factor}x{steps}' for factor, steps in self.widths)

  @property
  def num_steps(self) -> int:
    return sum(steps for _, steps in self.widths)

  def check(self, task: DecodeTask) -> None:
    """Raises ``ScheduleError`` unless ``task``'s model decodes this: trained nesting factors,
    at most one step per token to generate, a known cache policy."""
    unknown = [f for f, _ in self.widths if f not in task.nesting_factors]
    if unknown:
      raise ScheduleError('widths', self.widths, f'factors {unknown} are not in '
                          f'config.model.nesting_factors={task.nesting_factors}')
    if any(steps <= 0 for _, steps in self.widths):
      raise ScheduleError('widths', self.widths, 'every segment needs a positive number of '
                          'steps')
    if self.num_steps > task.num_generated:
      raise ScheduleError('widths', self.widths, f'its {self.num_steps} steps are more than the '
                          f'{task.num_generated} tokens to generate')
    if self.cache not in CACHE_POLICIES:
      raise ScheduleError('cache', self.cache, f'allowed values are {CACHE_POLICIES}')
    if self.cache == 'refresh_every_k' and (self.refresh_every is None
                                            or self.refresh_every <= 0):
      raise ScheduleError('refresh_every', self.refresh_every, 'must be a positive integer')

  def plan(self, task: DecodeTask) -> tuple[DecodeStep, ...]:
    """The steps of generating ``task``'s tokens with this schedule."""
    return make_plan(task.seq_len, task.num_generated, self.widths, self.cache,
                     self.refresh_every, task.mask_schedule, task.query_buckets)

  def step_flops(self, task: DecodeTask, model: TransformerConfig, guided: bool) -> list[int]:
    """FLOPs per sample of each planned step (both passes of a step when ``guided``)."""
    return flops.decode_flops(model, self.plan(task), guided)


def _pairs(widths) -> tuple[tuple[int, int], ...]:
  try:
    pairs = tuple(tuple(int(n) for n in segment) for segment in widths)
  except (TypeError, ValueError):
    raise ScheduleError('widths', widths, 'must be a tuple of (nesting_factor, steps) pairs'
                        ) from None
  if not pairs or any(len(pair) != 2 for pair in pairs):
    raise ScheduleError('widths', widths, 'must be a tuple of (nesting_factor, steps) pairs')
  return pairs
