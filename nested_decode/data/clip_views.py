"""Several evaluation clips per video: temporal windows x spatial crops (MAGVIT's protocol).

MAGVIT (Yu et al. 2023, appendix B.3) forms the real distribution of FVD from 16-frame clips
sampled without replacement, on Kinetics-600 "6 sampled clips (2 temporal windows and 3 spatial
crops) from each evaluation video". ``ClipViews`` makes such a source from one of whole videos:
``len(views) = len(videos) * windows * crops``, ordered view by view (every video's first view,
then every video's second, ...), so the first clips of the source cover every video once before
any video repeats. Its elements carry the view (``view_window``, ``view_windows``,
``view_crop``), which the evaluation transforms (``clips.FirstClip``, ``video_files.EvalClip``)
turn into the clip's first frame and the crop's place along the long side.
"""

from typing import Any, Sequence

import numpy as np

# Crop positions along the long side, the center first: (1, 1) views are the central clip.
_CROP_ORDER = {1: (0.5,), 2: (0.0, 1.0), 3: (0.5, 0.0, 1.0)}


class ClipViews:
  """``windows * crops`` views of each video of ``videos`` (a random-access source)."""

  def __init__(self, videos: Sequence[dict[str, Any]], windows: int, crops: int):
    if windows < 1 or crops not in _CROP_ORDER:
      raise ValueError(f'config.eval.clip_views=({windows}, {crops}): need at least 1 temporal '
                       f'window and 1 to 3 spatial crops')
    self.videos, self.windows, self.crops = videos, windows, crops

  def __len__(self) -> int:
    return len(self.videos) * self.windows * self.crops

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(f'clip view {index} of {len(self)}')
    view, video = divmod(int(index), len(self.videos))
    crop, window = divmod(view, self.windows)
    element = dict(self.videos[video])
    element.update(view_window=np.int32(window), view_windows=np.int32(self.windows),
                   view_crop=np.float32(_CROP_ORDER[self.crops][crop]))
    return element

  def __repr__(self) -> str:
    return f'ClipViews({self.videos!r}, windows={self.windows}, crops={self.crops})'


def view_start(element: dict[str, Any], frame_count: int, span: int) -> int:
  """First frame of the element's temporal window: windows spread evenly from the first frame
  to the last possible start (0 for an element without a view)."""
  windows = int(element.get('view_windows', 1))
  if windows <= 1:
    return 0
  return int(element['view_window']) * max(frame_count - span, 0) // (windows - 1)


def view_crop(element: dict[str, Any]) -> float:
  """Where the square crop sits along the long side: 0 start, 0.5 center, 1 end."""
  return float(element.get('view_crop', 0.5))
