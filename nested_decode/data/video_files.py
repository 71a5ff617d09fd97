"""Kinetics-600 clips from a folder of the user's video files and the official CSV (no TFDS).

K600 is not in TFDS: the videos are downloaded from YouTube by the user. ``VideoFileSource``
matches the rows of an official CSV (header ``label,youtube_id,time_start,time_end,split``; the
test CSV has no ``label``) to files under a folder (searched recursively), named either
``{youtube_id}_{time_start:06d}_{time_end:06d}.{mp4|webm|mkv}`` (the usual name of a downloaded,
already trimmed 10 s clip) or ``{youtube_id}.{mp4|webm|mkv}``. A plain-named file that is more
than ``0.5`` s longer than ``time_end - time_start`` is taken as the whole YouTube video and cut
to ``[time_start, time_end)``; otherwise it is taken as the clip itself.

Protocol (MAGVIT K600 frame prediction): ``num_frames`` (16) frames at the clip's native frame
rate, every ``stride``-th (1: consecutive) decoded frame, from a random start when training and
from the first frame for evaluation; each frame's shorter side is resized to ``image_size`` (128)
and the central square cropped. Decoding uses PyAV (``import av``).

Design: grain's ``__getitem__`` must return an example for every index, so unusable clips have to
be known before indexing. The source therefore scans every file once when it is built (in
threads; optionally cached in a JSON file): it opens the container, reads the frame count from
the header (``exact_frame_count=True`` decodes every frame instead) and decodes the first frame.
Files that are missing, do not decode, or have fewer than ``(num_frames - 1) * stride + 1``
frames are skipped, counted in ``skipped`` and reported in one log line. The random start must
come from grain's per-example rng to be reproducible and resumable, which only a transform sees,
so the source returns a light reference ``{'clip': ClipFile, 'label'}`` and the decoding happens
in ``TrainClip`` / ``EvalClip`` (``source.train_transform()`` / ``source.eval_transform()``),
which give ``{'video': uint8 [num_frames, S, S, 3], 'label': int32}``. Only the frames up to the
last one needed are decoded.

Paths: the CSVs and the scan cache may be on Cloud Storage (``gs://``); the video folder must be
local. Decoding seeks back and forth in every file, which over HTTP range reads would be slow,
and the scan cache keys files by their local size and modification time; a ``gs://`` video
folder is refused with an error that says to copy it to local disk first.
"""

import collections
import concurrent.futures
import csv
import dataclasses
import io
import json
import os
from typing import Any, Iterator, Optional, Sequence

import grain.python as grain
import numpy as np
from absl import logging
from PIL import Image

from nested_decode import io_utils
from nested_decode.data import clip_views

VIDEO_EXTENSIONS = ('.mp4', '.webm', '.mkv')
# A plain ``{youtube_id}`` file this much longer than its clip is the full YouTube video.
FULL_VIDEO_MARGIN_S = 0.5
SKIP_REASONS = ('missing', 'unreadable', 'too_short')


def clip_span(num_frames: int, stride: int) -> int:
  """Decoded frames a clip of ``num_frames`` frames every ``stride``-th frame covers."""
  if num_frames < 1 or stride < 1:
    raise ValueError(f'num_frames ({num_frames}) and stride ({stride}) must be >= 1')
  return (num_frames - 1) * stride + 1


def clip_start(frame_count: int, num_frames: int, stride: int,
               rng: Optional[np.random.Generator] = None) -> int:
  """First frame of a clip: uniform over the valid starts with ``rng``, else 0 (the first)."""
  last_start = max(frame_count - clip_span(num_frames, stride), 0)
  return 0 if rng is None else int(rng.integers(0, last_start + 1))


def frame_indices(frame_count: int, start: int, num_frames: int, stride: int) -> np.ndarray:
  """``start, start + stride, ...``; indices past the end repeat the last frame."""
  indices = start + stride * np.arange(num_frames)
  return np.minimum(indices, max(frame_count - 1, 0))


def resize_center_crop(frame: Any, image_size: int, position: float = 0.5) -> np.ndarray:
  """Resizes the shorter side to ``image_size`` and crops the central square (``position``
  along the long side: 0 its start, 0.5 the center, 1 its end).

  ``frame`` is a PIL image or uint8 ``[H, W, C]``; done as one antialiased bicubic resize of the
  square (the same crop without the intermediate). Returns uint8 ``[S, S, C]``.
  """
  if isinstance(frame, Image.Image):
    image, channels = frame, None
  else:
    frame = np.asarray(frame, np.uint8)
    channels = frame.shape[-1]
    image = Image.fromarray(frame[..., 0] if channels == 1 else frame)
  width, height = image.size
  side = min(width, height)
  left, top = (width - side) * position, (height - side) * position
  resized = np.asarray(image.resize((image_size, image_size), Image.Resampling.BICUBIC,
                                    box=(left, top, left + side, top + side)))
  return resized[..., None] if channels == 1 else resized


@dataclasses.dataclass(frozen=True)
class ClipRow:
  """One row of an official Kinetics CSV; ``label`` is None in the test CSV."""
  youtube_id: str
  time_start: int
  time_end: int
  label: Optional[str]

  def file_stems(self) -> tuple[str, str]:
    """File names without extension to look for, in order of preference."""
    return (f'{self.youtube_id}_{self.time_start:06d}_{self.time_end:06d}', self.youtube_id)


def read_clip_csv(csv_path: str) -> list[ClipRow]:
  """The rows of a Kinetics CSV (``label,youtube_id,time_start,time_end,split``)."""
  if not io_utils.exists(csv_path):
    raise FileNotFoundError(f'Kinetics CSV {csv_path} does not exist')
  with io.StringIO(io_utils.read_text(csv_path), newline='') as f:
    reader = csv.DictReader(f)
    missing = {'youtube_id', 'time_start', 'time_end'} - set(reader.fieldnames or ())
    if missing:
      raise ValueError(f'{csv_path}: columns {sorted(missing)} missing; header is '
                       f'{reader.fieldnames}')
    return [ClipRow(row['youtube_id'], int(float(row['time_start'])),
                    int(float(row['time_end'])), row.get('label') or None) for row in reader]


@dataclasses.dataclass(frozen=True)
class ClipFile:
  """A decodable video file; ``window`` (seconds) cuts a clip out of a full-length video."""
  path: str
  frame_count: int
  window: Optional[tuple[float, float]] = None


def _stream_offset(stream: Any) -> float:
  return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def _frame_rate(stream: Any) -> Optional[float]:
  rate = stream.average_rate or stream.guessed_rate or stream.base_rate
  return float(rate) if rate else None


def _duration(container: Any, stream: Any) -> Optional[float]:
  if stream.duration is not None and stream.time_base is not None:
    return float(stream.duration * stream.time_base)
  if container.duration is not None:
    return container.duration / 1_000_000  # AV_TIME_BASE
  return None


def _window_frames(container: Any, stream: Any,
                   window: Optional[tuple[float, float]]) -> Iterator[Any]:
  """Decoded frames of ``stream`` in order, only those inside ``window`` when given."""
  if window is None:
    yield from container.decode(stream)
    return
  offset, rate = _stream_offset(stream), _frame_rate(stream) or 30.0
  begin, end = window[0] - 0.5 / rate, window[1] - 0.5 / rate  # frames whose time rounds in
  if window[0] > 0:
    container.seek(int(window[0] / stream.time_base) + (stream.start_time or 0), stream=stream)
  seconds = window[0] - 1 / rate if window[0] > 0 else -1 / rate
  for frame in container.decode(stream):
    # Without a timestamp, a frame follows the one before (the first after a seek, the start).
    seconds = frame.time - offset if frame.time is not None else seconds + 1 / rate
    if seconds >= end:
      return
    if seconds >= begin:
      yield frame


def probe_file(path: str, clip_seconds: Optional[float] = None,
               time_start: float = 0.0, exact: bool = False) -> ClipFile:
  """Opens ``path``, checks it decodes, and counts its frames.

  Args:
    path: a video file.
    clip_seconds: for a plain ``{youtube_id}`` file, the clip's length; a file more than
      ``FULL_VIDEO_MARGIN_S`` longer is cut to ``[time_start, time_start + clip_seconds)``.
    time_start: the clip's start in the full video, in seconds.
    exact: count by decoding every frame instead of trusting the header.

  Raises:
    Exception: whatever PyAV raises for a file it cannot read; ``ValueError`` for a file without
      a video stream or without frames.
  """
  import av  # lazily: only video files need PyAV

  with av.open(path) as container:
    if not container.streams.video:
      raise ValueError('no video stream')
    stream = container.streams.video[0]
    duration = _duration(container, stream)
    window = None
    if (clip_seconds is not None and duration is not None
        and duration > clip_seconds + FULL_VIDEO_MARGIN_S):
      window = (float(time_start), float(time_start + clip_seconds))
    rate = _frame_rate(stream)
    header_count = window is None and stream.frames > 0
    if exact or not (header_count or (rate and (window or duration))):
      frame_count = sum(1 for _ in _window_frames(container, stream, window))
    else:
      if next(_window_frames(container, stream, window), None) is None:
        raise ValueError('no decodable frame' + (f' in window {window}' if window else ''))
      if header_count:
        frame_count = stream.frames
      else:  # from the duration: webm / mkv headers have no frame count
        begin, end = window or (0.0, duration)
        frame_count = round((min(end, duration or end) - begin) * rate)
    if frame_count < 1:
      raise ValueError('no decodable frame')
    return ClipFile(path, int(frame_count), window)


def _decode_selected(clip: ClipFile, start: int, num_frames: int, stride: int,
                     image_size: int, crop: float = 0.5) -> tuple[list[np.ndarray], int]:
  """The selected frames, resized, and how many frames were decoded to find them."""
  import av  # lazily: only video files need PyAV

  wanted = set(range(start, start + clip_span(num_frames, stride), stride))
  last = max(wanted)
  frames, seen = [], 0
  try:
    with av.open(clip.path) as container:
      stream = container.streams.video[0]
      stream.thread_type = 'AUTO'
      for index, frame in enumerate(_window_frames(container, stream, clip.window)):
        seen = index + 1
        if index in wanted:
          frames.append(resize_center_crop(frame.to_image(), image_size, crop))
        if index >= last:
          break
  except (av.FFmpegError, OSError, ValueError) as err:  # e.g. a file truncated after the scan
    logging.warning('Decoding %s stopped after %d frames: %s', clip.path, seen, err)
  return frames, seen


def decode_clip(clip: ClipFile, start: int, num_frames: int, stride: int,
                image_size: int, crop: float = 0.5) -> np.ndarray:
  """uint8 ``[num_frames, S, S, 3]``: frames ``start, start + stride, ...`` of ``clip``.

  If the file holds fewer frames than its scanned count, the clip moves back to end at the last
  frame; if it is shorter than the clip, the last frame repeats (black frames if none decodes),
  with a warning, rather than stopping a training run.
  """
  frames, seen = _decode_selected(clip, start, num_frames, stride, image_size, crop)
  span = clip_span(num_frames, stride)
  if len(frames) < num_frames and start > 0 and seen >= span:
    logging.warning('%s has %d frames, fewer than its scanned %d; ending the clip at the last',
                    clip.path, seen, clip.frame_count)
    frames, seen = _decode_selected(clip, seen - span, num_frames, stride, image_size, crop)
  if len(frames) < num_frames:
    logging.warning('%s: only %d of the %d frames needed decode; repeating the last',
                    clip.path, seen, span)
    pad = frames[-1] if frames else np.zeros((image_size, image_size, 3), np.uint8)
    frames += [pad] * (num_frames - len(frames))
  return np.stack(frames)


@dataclasses.dataclass(frozen=True)
class EvalClip(grain.MapTransform):
  """``{'clip', 'label'}`` -> ``{'video': uint8 [T, S, S, 3], 'label'}`` from the first frame,
  center-cropped, or from the window and crop of a ``clip_views`` element."""
  num_frames: int = 16
  stride: int = 1
  image_size: int = 128

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    clip = element['clip']
    start = clip_views.view_start(element, clip.frame_count,
                                  clip_span(self.num_frames, self.stride))
    video = decode_clip(clip, start, self.num_frames, self.stride, self.image_size,
                        clip_views.view_crop(element))
    return {'video': video, 'label': np.int32(element['label'])}


@dataclasses.dataclass(frozen=True)
class TrainClip(grain.RandomMapTransform):
  """Like ``EvalClip`` from a uniformly random start and crop place along the long side,
  drawn from grain's per-example rng."""
  num_frames: int = 16
  stride: int = 1
  image_size: int = 128

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    clip = element['clip']
    start = clip_start(clip.frame_count, self.num_frames, self.stride, rng)
    video = decode_clip(clip, start, self.num_frames, self.stride, self.image_size,
                        crop=float(rng.random()))
    return {'video': video, 'label': np.int32(element['label'])}


def _index_files(video_dir: str) -> dict[str, str]:
  """File stem -> path of every video file under ``video_dir`` (first in sorted walk order)."""
  files = {}
  for root, dirs, names in os.walk(video_dir):
    dirs.sort()
    for name in sorted(names):
      stem, ext = os.path.splitext(name)
      if ext.lower() in VIDEO_EXTENSIONS:
        files.setdefault(stem, os.path.join(root, name))
  return files


class VideoFileSource:
  """Random-access source over the usable clips of a Kinetics CSV, found in a video folder.

  ``source[i]`` is ``{'clip': ClipFile, 'label': int32}`` (label -1 without a label column);
  decode it with ``source.train_transform()`` or ``source.eval_transform()``, or read a clip
  directly with ``source.video(i)``. ``skipped`` maps each reason (``'missing'``,
  ``'unreadable'``, ``'too_short'``) to the CSV rows' file stems skipped for it, and ``counts``
  gives the numbers, with ``'usable'``.
  """

  def __init__(self, video_dir: str, csv_path: str, *, num_frames: int = 16, stride: int = 1,
               image_size: int = 128, class_names: Optional[Sequence[str]] = None,
               exact_frame_count: bool = False, scan_workers: int = 8,
               cache_path: Optional[str] = None, name: Optional[str] = None):
    """Scans the clips of ``csv_path`` in ``video_dir``.

    Args:
      video_dir: folder holding the video files, in any subfolders.
      csv_path: an official Kinetics CSV.
      num_frames: frames per clip.
      stride: take every ``stride``-th decoded frame (1: consecutive, native frame rate).
      image_size: side of the square frames the transforms produce.
      class_names: label names in class-index order; default the sorted labels of this CSV
        (pass the training source's ``class_names`` to other splits to be safe).
      exact_frame_count: count frames by decoding every file instead of reading headers.
      scan_workers: threads that open files during the scan.
      cache_path: optional JSON file remembering each file's scan (keyed by path, size and
        modification time), so later runs skip unchanged files.
      name: describes the data in ``repr`` (grain checks it on restore); default the CSV's name.

    Raises:
      FileNotFoundError: ``video_dir`` or ``csv_path`` does not exist.
      NotADirectoryError: ``video_dir`` is on Cloud Storage (see the module docstring).
      ValueError: a CSV label is not in ``class_names``.
    """
    if io_utils.is_cloud(video_dir):
      raise NotADirectoryError(
          f'Video folder {video_dir} is on Cloud Storage, but video files are decoded from a '
          f'local folder: copy them to local disk (gcloud storage cp -r {video_dir} DIR) and '
          'pass that; the CSVs may stay on gs://')
    if not os.path.isdir(video_dir):
      raise FileNotFoundError(f'Video folder {video_dir} does not exist')
    rows = read_clip_csv(csv_path)
    self.num_frames, self.stride, self.image_size = num_frames, stride, image_size
    span = clip_span(num_frames, stride)
    self.name = name or os.path.basename(csv_path)
    if class_names is None:
      class_names = sorted({row.label for row in rows if row.label is not None})
    self.class_names = tuple(class_names)
    label_index = {label: index for index, label in enumerate(self.class_names)}
    unknown = {row.label for row in rows if row.label is not None} - set(label_index)
    if unknown:
      raise ValueError(f'{csv_path}: labels not in class_names: {sorted(unknown)[:10]}')

    files = _index_files(video_dir)
    found = []
    self.skipped = {reason: [] for reason in SKIP_REASONS}
    for row in rows:
      stems = row.file_stems()
      path = next((files[stem] for stem in stems if stem in files), None)
      if path is None:
        self.skipped['missing'].append(stems[0])
      else:
        plain = os.path.splitext(os.path.basename(path))[0] == row.youtube_id
        found.append((row, path, plain))

    cache = _ScanCache(cache_path, exact_frame_count)
    def scan(item):
      row, path, plain = item
      clip_seconds = row.time_end - row.time_start if plain else None
      return cache.probe(path, clip_seconds, row.time_start)
    with concurrent.futures.ThreadPoolExecutor(max(scan_workers, 1)) as pool:
      scanned = list(pool.map(scan, found))
    cache.save()

    self._clips, self._labels = [], []
    errors = collections.Counter()
    for (row, path, _), result in zip(found, scanned):
      stem = os.path.splitext(os.path.basename(path))[0]
      if isinstance(result, str):
        self.skipped['unreadable'].append(stem)
        errors[result.split(':')[0]] += 1  # the error's type
      elif result.frame_count < span:
        self.skipped['too_short'].append(stem)
      else:
        self._clips.append(result)
        self._labels.append(-1 if row.label is None else label_index[row.label])
    self.counts = {'usable': len(self._clips),
                   **{reason: len(stems) for reason, stems in self.skipped.items()}}
    log = logging.warning if len(self._clips) < len(rows) else logging.info
    log('%s: %d of %d clips usable; skipped %d missing, %d unreadable, %d too short '
        '(< %d frames for %d frames at stride %d) in %s', self.name, len(self._clips),
        len(rows), self.counts['missing'], self.counts['unreadable'], self.counts['too_short'],
        span, num_frames, stride, video_dir)
    for reason, stems in self.skipped.items():
      if stems:
        logging.info('%s: %s clips, e.g. %s', self.name, reason, ', '.join(stems[:5]))
    if errors:
      logging.info('%s: unreadable because %s', self.name, dict(errors.most_common(5)))

  def __len__(self) -> int:
    return len(self._clips)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {'clip': self._clips[index], 'label': np.int32(self._labels[index])}

  def __repr__(self) -> str:
    return (f'VideoFileSource({self.name}, n={len(self)}, frames={self.num_frames}, '
            f'stride={self.stride})')

  def train_transform(self) -> TrainClip:
    """Decodes a random-start clip with this source's frames, stride and size."""
    return TrainClip(self.num_frames, self.stride, self.image_size)

  def eval_transform(self) -> EvalClip:
    """Decodes the clip from the first frame with this source's frames, stride and size."""
    return EvalClip(self.num_frames, self.stride, self.image_size)

  def video(self, index: int, start: int = 0) -> np.ndarray:
    """uint8 ``[num_frames, S, S, 3]`` of clip ``index`` from frame ``start``."""
    return decode_clip(self._clips[index], start, self.num_frames, self.stride,
                       self.image_size)


class _ScanCache:
  """``probe_file`` results (a ``ClipFile`` or an error string), optionally kept in JSON."""

  def __init__(self, path: Optional[str], exact: bool):
    self._path, self._exact, self._entries = path, exact, {}
    if path and io_utils.exists(path):
      self._entries = json.loads(io_utils.read_text(path))

  def probe(self, path: str, clip_seconds: Optional[float], time_start: float) -> ClipFile | str:
    stat = os.stat(path)
    key = f'{os.path.abspath(path)}|{clip_seconds}|{time_start}|{self._exact}'
    entry = self._entries.get(key)
    if entry is not None and entry['size'] == stat.st_size and entry['mtime'] == stat.st_mtime_ns:
      if entry['error'] is not None:
        return entry['error']
      window = tuple(entry['window']) if entry['window'] else None
      return ClipFile(path, entry['frames'], window)
    try:
      result = probe_file(path, clip_seconds, time_start, self._exact)
    except Exception as err:  # pylint: disable=broad-except  # any unreadable file is skipped
      result = f'{type(err).__name__}: {err}'.split('\n')[0][:200]
    self._entries[key] = {
        'size': stat.st_size, 'mtime': stat.st_mtime_ns,
        'error': result if isinstance(result, str) else None,
        'frames': None if isinstance(result, str) else result.frame_count,
        'window': None if isinstance(result, str) else result.window}
    return result

  def save(self) -> None:
    if self._path:
      io_utils.write_text(self._path, json.dumps(self._entries))
