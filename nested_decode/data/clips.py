"""Clips of in-memory videos: ``num_frames`` frames every ``stride``-th, resized and cropped.

``RandomClip`` starts at a uniformly random frame (training; grain's per-example rng makes it
reproducible and resumable), ``FirstClip`` at the first frame (evaluation). Both turn
``{'video': uint8 [T, H, W, C], 'label'}`` into ``{'video': uint8 [num_frames, S, S, C],
'label': int32}``; a video shorter than the clip repeats its last frame.
"""

import dataclasses
from typing import Any

import grain.python as grain
import numpy as np

from nested_decode.data import clip_views, video_files


def select_frames(video: Any, start: int, num_frames: int, stride: int,
                  image_size: int, crop: float = 0.5) -> np.ndarray:
  """uint8 ``[num_frames, S, S, 3]``: frames ``start, start + stride, ...`` resized, cropped
  (``crop``: the square's place along the long side, 0.5 central)."""
  video = np.asarray(video, np.uint8)
  indices = video_files.frame_indices(len(video), start, num_frames, stride)
  return np.stack([video_files.resize_center_crop(video[index], image_size, crop)
                   for index in indices])


@dataclasses.dataclass(frozen=True)
class RandomClip(grain.RandomMapTransform):
  """``num_frames`` frames from a uniformly random start, their square crop at a uniformly
  random place along the long side (MAGVIT's random windows and crops), from grain's
  per-example rng."""
  num_frames: int = 16
  stride: int = 1
  image_size: int = 128

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    start = video_files.clip_start(len(element['video']), self.num_frames, self.stride, rng)
    video = select_frames(element['video'], start, self.num_frames, self.stride,
                          self.image_size, crop=float(rng.random()))
    return {'video': video, 'label': np.int32(element['label'])}


@dataclasses.dataclass(frozen=True)
class FirstClip(grain.MapTransform):
  """``num_frames`` frames from the first one, center-cropped, or from the window and crop of a
  ``clip_views`` element."""
  num_frames: int = 16
  stride: int = 1
  image_size: int = 128

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    video = element['video']
    start = clip_views.view_start(element, len(video),
                                  video_files.clip_span(self.num_frames, self.stride))
    video = select_frames(video, start, self.num_frames, self.stride, self.image_size,
                          clip_views.view_crop(element))
    return {'video': video, 'label': np.int32(element['label'])}
