"""``frame_metrics.png``: per-frame PSNR and SSIM of each clip set against the real clips."""

import numpy as np

from nested_decode.writers import figures


def save_frame_metrics_plot(path: str, summaries: dict[str, dict], given_frames: int) -> None:
  """Two panels (PSNR, SSIM) with one line per set over the frame index, the condition frames
  shaded; a frame whose mean is None (exact copies) is left out. ``summaries``:
  ``metrics.frames.summary`` of each set. Written atomically."""
  plt = figures.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key, label in zip(axes, ('psnr', 'ssim'), ('PSNR (dB)', 'SSIM')):
    for name, summary in summaries.items():
      values = [np.nan if v is None else v for v in summary[f'{key}_per_frame']]
      mean = 'n/a' if summary[key] is None else f'{summary[key]:.3g}'
      ax.plot(range(len(values)), values, '-o', markersize=3, label=f'{name} ({mean})')
    ax.axvspan(-0.5, given_frames - 0.5, color='green', alpha=0.1, label='given frames')
    ax.set_xlabel('frame')
    ax.set_ylabel(label)
  axes[0].legend(fontsize=7)
  fig.suptitle('Per frame, mean over clips (legend: the mean over the predicted frames)')
  figures.save_png(fig, path)
