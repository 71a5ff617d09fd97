"""Per-frame PSNR and SSIM of predicted video frames against the real ones (the metrics the
Moving MNIST and frame prediction literature reports beside FVD).

Both take uint8 ``[N, T, H, W, C]`` clips and return float64 ``[N, T]``: one score per clip and
frame. SSIM is Wang et al. (2004) as scikit-image computes it with ``gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=255``: an 11 x 11 Gaussian window, the
statistics over the windows that fit wholly inside the frame, averaged over them and over
channels. PSNR is ``10 log10(255^2 / MSE)``; a frame equal to its reference scores ``inf``
(tests/unit/metrics/test_frames.py checks both against scikit-image).
"""

import numpy as np

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5   # scikit-image's int(3.5 * sigma + 0.5): an 11-wide window
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0


def check_pair(predicted, real) -> tuple[np.ndarray, np.ndarray]:
  predicted, real = np.asarray(predicted), np.asarray(real)
  if predicted.shape != real.shape or predicted.ndim != 5:
    raise ValueError(f'Frame metrics need predicted and real clips of one shape [N, T, H, W, C]; '
                     f'got {predicted.shape} and {real.shape}')
  if min(real.shape[2:4]) < 2 * SSIM_RADIUS + 1:
    raise ValueError(f'Frames of {real.shape[2:4]} are smaller than the {2 * SSIM_RADIUS + 1}-'
                     'pixel SSIM window')
  return predicted.astype(np.float64), real.astype(np.float64)


def psnr(predicted, real) -> np.ndarray:
  """``[N, T]`` peak signal-to-noise ratio in dB of each frame."""
  predicted, real = check_pair(predicted, real)
  mse = np.mean((predicted - real) ** 2, axis=(2, 3, 4))
  with np.errstate(divide='ignore'):
    return 10 * np.log10(DATA_RANGE ** 2 / mse)


def _gaussian_window() -> np.ndarray:
  offsets = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1)
  window = np.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
  return window / window.sum()


def _local_mean(x: np.ndarray) -> np.ndarray:
  """Gaussian-weighted mean over each window that fits in ``[..., H, W, C]``'s frames."""
  window = _gaussian_window()
  size = len(window)
  rows = np.lib.stride_tricks.sliding_window_view(x, size, axis=-3) @ window
  return np.lib.stride_tricks.sliding_window_view(rows, size, axis=-2) @ window


def ssim(predicted, real) -> np.ndarray:
  """``[N, T]`` structural similarity of each frame, averaged over its windows and channels."""
  x, y = check_pair(predicted, real)
  c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
  mean_x, mean_y = _local_mean(x), _local_mean(y)
  var_x = _local_mean(x * x) - mean_x ** 2
  var_y = _local_mean(y * y) - mean_y ** 2
  cov = _local_mean(x * y) - mean_x * mean_y
  index = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)
           / ((mean_x ** 2 + mean_y ** 2 + c1) * (var_x + var_y + c2)))
  return index.mean(axis=(2, 3, 4))


def frame_scores(predicted, real) -> dict[str, np.ndarray]:
  """``{'psnr', 'ssim'}``, each ``[N, T]``."""
  return {'psnr': psnr(predicted, real), 'ssim': ssim(predicted, real)}


def summary(scores: dict[str, np.ndarray], first_frame: int) -> dict[str, float | list | None]:
  """Means over clips: ``psnr`` and ``ssim`` over frames ``first_frame`` onwards (the predicted
  ones), and ``psnr_per_frame`` and ``ssim_per_frame`` for every frame. A mean that is not
  finite (frames copied exactly, such as copy-last-frame's given ones) is None, JSON's null."""
  finite = lambda value: float(value) if np.isfinite(value) else None
  result = {}
  for name in ('psnr', 'ssim'):
    result[name] = finite(np.mean(scores[name][:, first_frame:]))
    result[f'{name}_per_frame'] = [finite(v) for v in np.mean(scores[name], axis=0)]
  return result
