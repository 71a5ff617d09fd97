"""UCF-101 through TFDS data sources, with numpy/PIL frame selection and resizing.

``tfds.data_source('ucf101/<config>')`` reads the ArrayRecord files of a prepared ``ucf101`` and
decodes each example in Python: ``{'video': uint8 [T, H, W, 3], 'label': int64 0..100}``. The
TFDS configs are ``ucf101_1_256`` (TFDS's default: split 1, every frame squashed to 256 x 256 by
ffmpeg) and ``ucf101_1`` / ``ucf101_2`` / ``ucf101_3`` (the three official splits at the native
320 x 240); splits are ``'train'`` and ``'test'``. The default here is ``ucf101_1``: it keeps the
aspect ratio, so resizing the shorter side and center-cropping follows the usual protocol.

The transforms (``clips.RandomClip`` / ``clips.FirstClip``) take ``num_frames`` (16) frames,
every ``stride``-th one, from a random start when training and from the first frame for
evaluation, and resize the shorter side to ``image_size`` (128) and crop the central square:
``{'video': uint8 [16, 128, 128, 3], 'label': int32}``. A video shorter than the clip repeats
its last frame (UCF-101 videos have at least 29 frames).

TensorFlow: with tfds 4.9.x, ``tfds.features.Video`` calls TensorFlow in its constructor, so
reading (not only preparing) ``ucf101`` needs TensorFlow installed (``pip install -e ".[tf]"``).
"""

import importlib
import os
from typing import Any, Optional, Sequence

from nested_decode import io_utils

DATASET = 'ucf101'
DEFAULT_CONFIG = 'ucf101_1'
CONFIGS = ('ucf101_1_256', 'ucf101_1', 'ucf101_2', 'ucf101_3')
NUM_CLASSES = 101


def ucf101_source(split: str, data_dir: Optional[str] = None, config: str = DEFAULT_CONFIG,
                  download: bool = False) -> Sequence[dict[str, Any]]:
  """The TFDS random-access source of ``split`` (``'train'``, ``'test'``, slices).

  Args:
    split: a TFDS split, e.g. ``'train'`` or ``'test[:10%]'``.
    data_dir: where the prepared dataset lives (default: TFDS's, ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    config: one of ``CONFIGS``.
    download: download (6.5 GB) and prepare the dataset first when missing (needs TensorFlow
      and ffmpeg). If False, it must be prepared.

  Raises:
    FileNotFoundError: the dataset is not prepared in ArrayRecord format under ``data_dir``.
    ImportError: it is prepared, but TensorFlow, which tfds needs to read it, is not installed.
  """
  import tensorflow_datasets as tfds  # lazily: keeps the core importable without it

  if config not in CONFIGS:
    raise ValueError(f'Unknown UCF-101 config {config!r}; expected one of {CONFIGS}')
  importlib.import_module('tensorflow_datasets.video')  # registers the ucf101 builder
  where = data_dir or tfds.core.constants.DATA_DIR
  how_to_prepare = (
      f'Run `tfds build {DATASET} --config={config} --data_dir={where} '
      '--file_format=array_record` (needs TensorFlow and ffmpeg; downloads 6.5 GB), or pass '
      'download=True here.')
  try:
    return tfds.data_source(f'{DATASET}/{config}', split=split, data_dir=data_dir,
                            download=download,
                            builder_kwargs={'file_format': 'array_record'})
  except ModuleNotFoundError as err:
    if download or 'tensorflow' not in str(err):
      raise
    if not io_utils.exists(io_utils.join(os.path.expanduser(where), DATASET, config)):
      raise FileNotFoundError(
          f'No prepared {DATASET}/{config} (ArrayRecord) in data_dir {where}. '
          f'{how_to_prepare}') from err
    raise ImportError(
        f'{DATASET}/{config} is prepared in {where}, but tensorflow_datasets needs TensorFlow '
        'to read video features (tfds.features.Video); pip install -e ".[tf]"') from err
  except (KeyError, FileNotFoundError, NotImplementedError) as err:
    if download:
      raise
    raise FileNotFoundError(
        f'No prepared {DATASET}/{config} (ArrayRecord) in data_dir {where}. '
        f'{how_to_prepare}') from err
