"""Videos side by side as an animated GIF: one row per clip, one titled column per source.

Frames the task gave (the condition) get a green border, generated frames a red one, so a
viewer sees where prediction starts.
"""

import io

import numpy as np
from PIL import Image, ImageDraw

from nested_decode import io_utils

BORDER = 2
GAP = 4
MARGIN = 4
GIVEN_COLOR = (40, 170, 60)
GENERATED_COLOR = (200, 50, 50)


def _check_columns(columns: dict[str, np.ndarray]) -> tuple[int, int, int, int]:
  shapes = {name: np.asarray(videos).shape for name, videos in columns.items()}
  if not columns or len(set(shapes.values())) != 1:
    raise ValueError(f'columns need videos of one shape [n, T, H, W, C]; got {shapes}')
  n, frames, height, width, channels = next(iter(shapes.values()))
  if channels not in (1, 3) or any(np.asarray(v).dtype != np.uint8 for v in columns.values()):
    raise ValueError(f'expected uint8 videos [n, T, H, W, 1 or 3]; got {shapes}')
  return n, frames, height, width


def comparison_frames(columns: dict[str, np.ndarray], given_frames: int,
                      scale: int = 2) -> list[Image.Image]:
  """The GIF's frames: ``columns`` maps a title to uint8 videos ``[n, T, H, W, C]``."""
  n, num_frames, height, width = _check_columns(columns)
  tile_h, tile_w = height * scale + 2 * BORDER, width * scale + 2 * BORDER
  measure = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  title_h = max(measure.textbbox((0, 0), title)[3] for title in columns)
  column_w = max(tile_w, max(measure.textbbox((0, 0), t)[2] for t in columns))
  top = 2 * MARGIN + title_h
  size = (2 * MARGIN + len(columns) * (column_w + GAP) - GAP,
          top + n * (tile_h + GAP) - GAP + MARGIN)
  frames = []
  for t in range(num_frames):
    canvas = Image.new('RGB', size, 'white')
    draw = ImageDraw.Draw(canvas)
    border = GIVEN_COLOR if t < given_frames else GENERATED_COLOR
    for c, (title, videos) in enumerate(columns.items()):
      left = MARGIN + c * (column_w + GAP)
      draw.text((left, MARGIN), title, fill='black')
      for row in range(n):
        frame = np.asarray(videos[row, t])
        tile = Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame).convert('RGB')
        tile = tile.resize((width * scale, height * scale), Image.Resampling.NEAREST)
        y = top + row * (tile_h + GAP)
        draw.rectangle([left, y, left + tile_w - 1, y + tile_h - 1], fill=border)
        canvas.paste(tile, (left + BORDER, y + BORDER))
    frames.append(canvas)
  return frames


def save_comparison_gif(path: str, columns: dict[str, np.ndarray], *, given_frames: int,
                        fps: float = 4.0) -> None:
  """Writes the columns' videos as one looping GIF (atomically)."""
  frames = comparison_frames(columns, given_frames)
  buffer = io.BytesIO()
  frames[0].save(buffer, format='GIF', save_all=True, append_images=frames[1:],
                 duration=int(1000 / fps), loop=0)
  io_utils.write_bytes(path, buffer.getvalue())
