"""Per-frame PSNR and SSIM agree with scikit-image's implementations."""

import numpy as np
import pytest
from skimage import metrics as skmetrics

from nested_decode.data import moving_mnist
from nested_decode.metrics import frames


def clip_pair(channels):
  rng = np.random.default_rng(0)
  real = moving_mnist.moving_mnist('eval', 2, num_frames=3, size=32)
  real = np.repeat(real, channels, axis=-1)
  noise = rng.integers(-40, 40, real.shape)
  predicted = np.clip(real.astype(int) + noise, 0, 255).astype(np.uint8)
  return predicted, real


@pytest.mark.parametrize('channels', [1, 3])
def test_psnr_and_ssim_equal_scikit_image_frame_by_frame(channels):
  predicted, real = clip_pair(channels)
  scores = frames.frame_scores(predicted, real)
  assert scores['psnr'].shape == scores['ssim'].shape == (2, 3)
  for clip in range(2):
    for t in range(3):
      want_psnr = skmetrics.peak_signal_noise_ratio(real[clip, t], predicted[clip, t],
                                                    data_range=255)
      want_ssim = skmetrics.structural_similarity(
          real[clip, t], predicted[clip, t], data_range=255, channel_axis=-1,
          gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
      np.testing.assert_allclose(scores['psnr'][clip, t], want_psnr, rtol=1e-10)
      np.testing.assert_allclose(scores['ssim'][clip, t], want_ssim, rtol=1e-8)


def test_identical_frames_score_infinite_psnr_and_ssim_one():
  _, real = clip_pair(1)
  scores = frames.frame_scores(real, real)
  assert np.all(np.isinf(scores['psnr']))
  np.testing.assert_allclose(scores['ssim'], 1.0)


def test_summary_averages_the_predicted_frames():
  scores = {'psnr': np.array([[50.0, 10.0, 20.0], [50.0, 30.0, 40.0]]),
            'ssim': np.array([[1.0, 0.2, 0.4], [1.0, 0.6, 0.8]])}
  result = frames.summary(scores, first_frame=1)
  assert result['psnr'] == 25.0 and result['ssim'] == pytest.approx(0.5)
  assert result['psnr_per_frame'] == [50.0, 20.0, 30.0]


def test_summary_writes_exact_copies_as_null():
  scores = {'psnr': np.array([[np.inf, 10.0]]), 'ssim': np.array([[1.0, 0.5]])}
  result = frames.summary(scores, first_frame=1)
  assert result['psnr_per_frame'] == [None, 10.0] and result['psnr'] == 10.0


def test_mismatched_clips_are_named():
  with pytest.raises(ValueError, match='one shape'):
    frames.psnr(np.zeros((1, 2, 16, 16, 1)), np.zeros((1, 3, 16, 16, 1)))
  with pytest.raises(ValueError, match='SSIM window'):
    frames.ssim(np.zeros((1, 2, 8, 8, 1)), np.zeros((1, 2, 8, 8, 1)))
