"""Generated samples on disk: a labelled PNG grid to look at and an NPZ to score later."""

import io

import numpy as np
from PIL import Image, ImageDraw

from nested_decode import io_utils

GAP = 2
MARGIN = 4
SMALL_IMAGE = 64  # images up to this size are upscaled x2 (nearest) in the grid


def _check_samples(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  images, labels = np.asarray(images), np.asarray(labels)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'expected uint8 images [n, H, W, 1 or 3], got {images.dtype} '
                     f'{images.shape}')
  if labels.shape != (images.shape[0],):
    raise ValueError(f'expected labels [{images.shape[0]}], got {labels.shape}')
  return images, labels


def _layout(labels: np.ndarray, rows_by_class: bool,
            per_row: int) -> list[tuple[str, list[int]]]:
  """``(row label, sample indices)`` per row of the grid."""
  if rows_by_class:
    return [(str(label), list(np.flatnonzero(labels == label)[:per_row]))
            for label in np.unique(labels)]
  return [('', list(range(start, min(start + per_row, labels.shape[0]))))
          for start in range(0, labels.shape[0], per_row)]


def save_grid_png(path: str, images: np.ndarray, labels: np.ndarray, *, title: str,
                  rows_by_class: bool = True, per_row: int = 10) -> None:
  """Writes ``images [n, H, W, C]`` (uint8, gray or RGB) as a titled PNG grid.

  With ``rows_by_class`` each row holds the first ``per_row`` samples of one label, which is
  written to the left of the row; otherwise samples fill rows of ``per_row`` in order.
  """
  images, labels = _check_samples(images, labels)
  rows = _layout(labels, rows_by_class, per_row)
  scale = 2 if max(images.shape[1:3]) <= SMALL_IMAGE else 1
  tile_h, tile_w = images.shape[1] * scale, images.shape[2] * scale
  mode = 'L' if images.shape[-1] == 1 else 'RGB'

  measure = ImageDraw.Draw(Image.new(mode, (1, 1)))
  text_size = lambda text: measure.textbbox((0, 0), text)[2:]
  title_w, title_h = text_size(title)
  label_w = max((text_size(label)[0] for label, _ in rows), default=0)
  grid_left = MARGIN + label_w + (MARGIN if label_w else 0)
  grid_top = 2 * MARGIN + title_h
  width = max(grid_left + per_row * (tile_w + GAP) - GAP, MARGIN + title_w) + MARGIN
  height = grid_top + len(rows) * (tile_h + GAP) - GAP + MARGIN

  canvas = Image.new(mode, (width, height), 'white')
  draw = ImageDraw.Draw(canvas)
  draw.text((MARGIN, MARGIN), title, fill='black')
  for row, (label, indices) in enumerate(rows):
    top = grid_top + row * (tile_h + GAP)
    draw.text((MARGIN, top + (tile_h - text_size(label)[1]) // 2), label, fill='black')
    for column, index in enumerate(indices):
      tile = Image.fromarray(images[index].squeeze(-1) if mode == 'L' else images[index])
      tile = tile.resize((tile_w, tile_h), Image.Resampling.NEAREST)
      canvas.paste(tile, (grid_left + column * (tile_w + GAP), top))

  buffer = io.BytesIO()
  canvas.save(buffer, format='PNG')
  io_utils.write_bytes(path, buffer.getvalue())


def save_samples_npz(path: str, images: np.ndarray, labels: np.ndarray) -> None:
  """Writes uint8 ``images [n, H, W, C]`` and int32 ``labels [n]`` under those keys."""
  images, labels = _check_samples(images, labels)
  io_utils.write_npz(path, images=images, labels=labels.astype(np.int32))
