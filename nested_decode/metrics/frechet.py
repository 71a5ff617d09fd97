"""Fréchet distance between Gaussians fitted to two feature sets (the core of FID and FVD).

``d^2 = |mu1 - mu2|^2 + tr(s1 + s2 - 2 (s1 s2)^(1/2))``. With ``s1 = F F^T`` (a pivoted Cholesky
factor ``F [d, r]``, ``r`` the numerical rank of ``s1``), the non-zero eigenvalues of ``s1 s2`` are
those of ``F^T s2 F``, which is symmetric positive semi-definite, so the trace of the square root
is ``sum(sqrt(eigvalsh(F^T s2 F)))``: no complex parts or singular-matrix fixes, and for
rank-deficient features (fewer samples than dimensions, dead ReLUs) only an ``r x r``
eigenproblem, where a full eigendecomposition of ``s1`` would also add the square roots of its
rounding-level eigenvalues.
"""

import numpy as np
from scipy.linalg import lapack


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean ``[d]`` and unbiased covariance ``[d, d]`` of ``features [n, d]``, in float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2:
    raise ValueError(f'features must be [n, d], got shape {features.shape}')
  if features.shape[0] < 2:
    raise ValueError(f'need at least 2 feature vectors for a covariance, got {features.shape[0]}')
  return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def _psd_factor(matrix: np.ndarray) -> np.ndarray:
  """``F [d, r]`` with ``F F^T = matrix`` (positive semi-definite, numerical rank ``r``)."""
  factor, pivots, rank, info = lapack.dpstrf(matrix, lower=1)
  if info < 0:
    raise ValueError(f'pivoted Cholesky rejected its argument {-info}')
  lower = np.tril(factor)[:, :rank]
  unpivoted = np.empty_like(lower)
  unpivoted[pivots - 1] = lower  # dpstrf factors P^T matrix P
  return unpivoted


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Squared Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f'expected mu [d] and sigma [d, d] with one d, got {mu1.shape}, '
                     f'{sigma1.shape}, {mu2.shape}, {sigma2.shape}')
  factor = _psd_factor(sigma1)
  middle = factor.T @ sigma2 @ factor
  # Symmetrize away rounding so eigvalsh sees an exactly symmetric matrix.
  middle = (middle + middle.T) / 2
  trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0, None)).sum()
  diff = mu1 - mu2
  distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
  return float(max(distance, 0.0))


def frechet_distance_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """Squared Fréchet distance between Gaussians fitted to ``features1 [n1, d]`` and ``[n2, d]``."""
  features1, features2 = np.asarray(features1), np.asarray(features2)
  if features1.ndim != 2 or features2.ndim != 2 or features1.shape[1] != features2.shape[1]:
    raise ValueError(f'feature dims differ: {features1.shape} vs {features2.shape}')
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
