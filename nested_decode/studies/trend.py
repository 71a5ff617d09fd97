"""How a quality gap moves with model size: a least-squares plane in log2(width) and
log2(training steps), and where it would cross a target if the trend holds.

``gap = intercept + per_width_doubling * log2(width) + per_steps_doubling * log2(steps)``.
A coordinate that takes a single value in the data gets no slope (None) instead of an
underdetermined fit.
"""

import dataclasses
import math
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Trend:
  intercept: float
  per_width_doubling: float | None
  per_steps_doubling: float | None
  # Standard errors of the slopes from the residuals; None where the fit has no residual
  # degrees of freedom (as many points as parameters) or the coordinate did not vary.
  per_width_doubling_se: float | None
  per_steps_doubling_se: float | None

  def predict(self, width: float, steps: float) -> float:
    return (self.intercept + (self.per_width_doubling or 0.0) * math.log2(width)
            + (self.per_steps_doubling or 0.0) * math.log2(steps))

  def width_reaching(self, target: float, steps: float, better: str) -> float | None:
    """The width at which the gap reaches ``target`` at ``steps`` training steps; ``better``
    is 'lower' (an fd gap) or 'higher' (an accuracy difference). ``math.inf`` when the gap does
    not move towards better with width (never, if the trend holds); None without a width
    slope."""
    return self._reaching(target, better, self.per_width_doubling,
                          self.predict(1, steps))

  def steps_reaching(self, target: float, width: float, better: str) -> float | None:
    """As ``width_reaching``, for the number of training steps at a fixed width."""
    return self._reaching(target, better, self.per_steps_doubling, self.predict(width, 1))

  @staticmethod
  def _reaching(target: float, better: str, slope: float | None, offset: float
                ) -> float | None:
    if better not in ('lower', 'higher'):
      raise ValueError(f"better must be 'lower' or 'higher', not {better!r}")
    if slope is None:
      return None
    if not (slope < 0 if better == 'lower' else slope > 0):
      return math.inf
    return 2.0 ** ((target - offset) / slope)


def fit(widths: Sequence[float], steps: Sequence[float], gaps: Sequence[float]) -> Trend:
  """Least squares of ``gaps`` on log2(width) and log2(steps) (see the module docstring)."""
  widths, steps, gaps = (np.asarray(v, np.float64) for v in (widths, steps, gaps))
  if not len(widths) == len(steps) == len(gaps) or len(gaps) < 2:
    raise ValueError(f'fit needs >= 2 points with a width, steps and gap each; got '
                     f'{len(widths)}, {len(steps)}, {len(gaps)}')
  columns = [np.ones_like(gaps)]
  varying = []
  for values in (widths, steps):
    if np.unique(values).size > 1:
      columns.append(np.log2(values))
      varying.append(True)
    else:
      varying.append(False)
  design = np.stack(columns, axis=1)
  coefficients, _, rank, _ = np.linalg.lstsq(design, gaps, rcond=None)
  if rank < design.shape[1]:
    raise ValueError('fit: the widths and steps of the points do not determine a plane (they '
                     'vary together); add points that vary one at a time')
  dof = len(gaps) - design.shape[1]
  errors = [None] * design.shape[1]
  if dof > 0:
    residual = gaps - design @ coefficients
    variance = float(residual @ residual) / dof
    covariance = variance * np.linalg.inv(design.T @ design)
    errors = [float(math.sqrt(max(v, 0.0))) for v in np.diag(covariance)]
  slopes, slope_errors = [None, None], [None, None]
  column = 1
  for i, is_varying in enumerate(varying):
    if is_varying:
      slopes[i], slope_errors[i] = float(coefficients[column]), errors[column]
      column += 1
  return Trend(intercept=float(coefficients[0]), per_width_doubling=slopes[0],
               per_steps_doubling=slopes[1], per_width_doubling_se=slope_errors[0],
               per_steps_doubling_se=slope_errors[1])
