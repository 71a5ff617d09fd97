"""ImageNet 2012 through TFDS data sources, with numpy/PIL augmentation (no TensorFlow).

``tfds.data_source`` reads the ArrayRecord files of a prepared ``imagenet2012`` and decodes each
example in Python: ``{'image': uint8 [H, W, 3], 'label': int64, 'file_name': str}``. The
transforms here turn such an example into ``{'image': uint8 [S, S, 3], 'label'}``; the loader in
``pipeline`` then scales to ``[-1, 1]`` and batches.

An image that cannot be decoded stops the run with ``io_utils.CorruptDataError`` naming the
split and example (or file): preparing the dataset already decoded every image, so a bad one
means damaged files to rebuild, and skipping it would silently change which examples make up
each batch of a resumable, seeded stream.
"""

import dataclasses
import io
import math
from typing import Any, Optional, Sequence

import grain.python as grain
import numpy as np
from PIL import Image

from nested_decode.io_utils import CorruptDataError

# What PIL and TFDS's decoders raise for bytes that are not a (whole) image; OpenCV's decoder
# returns None, which TFDS then fails on with AttributeError.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, AttributeError)

DATASET = 'imagenet2012'
NUM_CLASSES = 1000


def imagenet_source(split: str, data_dir: Optional[str] = None,
                    manual_dir: Optional[str] = None) -> Sequence[dict[str, Any]]:
  """The TFDS random-access source of ``split`` (``'train'``, ``'validation'``, slices).

  Args:
    split: a TFDS split, e.g. ``'train'`` or ``'validation[:10%]'``.
    data_dir: where the prepared dataset lives (default: TFDS's, ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    manual_dir: if given, the folder holding ``ILSVRC2012_img_train.tar`` and
      ``ILSVRC2012_img_val.tar``, and the dataset is prepared from it first when missing
      (preparing needs TensorFlow: ``pip install -e ".[tf]"``). If None, it must be prepared.

  Raises:
    FileNotFoundError: the dataset is not prepared in ArrayRecord format under ``data_dir``.
  """
  import tensorflow_datasets as tfds  # lazily: keeps the core importable without it

  prepare_kwargs = None
  if manual_dir is not None:
    prepare_kwargs = {'download_config': tfds.download.DownloadConfig(manual_dir=manual_dir)}
  try:
    source = tfds.data_source(DATASET, split=split, data_dir=data_dir,
                              download=manual_dir is not None,
                              builder_kwargs={'file_format': 'array_record'},
                              download_and_prepare_kwargs=prepare_kwargs)
    return DecodeCheckedSource(source, f'{DATASET} {split} in {data_dir or "the TFDS data_dir"}')
  except (KeyError, FileNotFoundError, NotImplementedError) as err:
    if manual_dir is not None:
      raise
    where = data_dir or tfds.core.constants.DATA_DIR
    raise FileNotFoundError(
        f'No prepared {DATASET} (ArrayRecord) in data_dir {where}. Download '
        'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org into a manual '
        f'dir, then run `tfds build {DATASET} --data_dir={where} --manual_dir=<manual dir> '
        '--file_format=array_record` (needs TensorFlow), or set manual_dir '
        '(--config.data.manual_dir) to prepare it on first use.') from err


class DecodeCheckedSource:
  """A random-access source whose decoding errors name the example they come from.

  The ``repr`` is the wrapped source's: grain checks it against saved iterator states.
  """

  def __init__(self, source: Sequence[dict[str, Any]], description: str):
    self._source = source
    self._description = description

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      return self._source[index]
    except DECODE_ERRORS as err:
      raise CorruptDataError(
          f'Example {index} of {self._description} cannot be decoded '
          f'({type(err).__name__}: {err}); the prepared dataset is damaged: delete it and run '
          '`tfds build` again') from err

  def __repr__(self) -> str:
    return repr(self._source)

  def __getattr__(self, name: str) -> Any:
    # Only for names the wrapper lacks. While a grain worker process unpickles it, ``_source``
    # is not set yet: looking it up here again would recurse without end.
    if name == '_source':
      raise AttributeError(name)
    return getattr(self._source, name)


def to_rgb(image: Any, name: str = 'image') -> np.ndarray:
  """uint8 ``[H, W, 3]`` from encoded bytes or decoded ``[H, W]`` / ``[H, W, 1|3|4]`` pixels.

  Raises:
    CorruptDataError: ``image`` is bytes that do not decode; the message names ``name``.
  """
  if isinstance(image, (bytes, np.bytes_)):
    try:
      with Image.open(io.BytesIO(image)) as decoded:
        return np.asarray(decoded.convert('RGB'))
    except DECODE_ERRORS as err:
      raise CorruptDataError(f'{name} cannot be decoded ({type(err).__name__}: {err}); the '
                             'prepared dataset is damaged: delete it and run `tfds build` '
                             'again') from err
  image = np.asarray(image, np.uint8)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  return image[..., :3]


def sample_crop(height: int, width: int, rng: np.random.Generator,
                scale: tuple[float, float] = (0.08, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3),
                attempts: int = 10) -> tuple[int, int, int, int]:
  """``(top, left, crop_height, crop_width)`` of a random-resized crop.

  Draws an area fraction uniformly from ``scale`` and an aspect ratio log-uniformly from
  ``ratio`` until the crop fits; after ``attempts`` misses, takes the largest central crop whose
  aspect ratio lies in ``ratio``.
  """
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    area = height * width * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    crop_width = round(math.sqrt(area * aspect))
    crop_height = round(math.sqrt(area / aspect))
    if 0 < crop_width <= width and 0 < crop_height <= height:
      top = int(rng.integers(0, height - crop_height + 1))
      left = int(rng.integers(0, width - crop_width + 1))
      return top, left, crop_height, crop_width
  crop_height, crop_width = height, width
  if width / height < ratio[0]:
    crop_height = round(width / ratio[0])
  elif width / height > ratio[1]:
    crop_width = round(height * ratio[1])
  return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def _example_name(element: dict[str, Any]) -> str:
  file_name = element.get('file_name')
  if isinstance(file_name, (bytes, np.bytes_)):
    file_name = file_name.decode(errors='replace')
  return f'{DATASET} image {file_name}' if file_name else f'{DATASET} image'


def _crop_resize(image: np.ndarray, box: tuple[float, float, float, float],
                 image_size: int) -> np.ndarray:
  """Resizes the ``(left, top, right, bottom)`` box of ``image`` to ``image_size`` squared."""
  resized = Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BICUBIC,
                                          box=box)
  return np.asarray(resized)


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.RandomMapTransform):
  """Random-resized crop to ``image_size`` and a random horizontal flip.

  The randomness comes from grain's per-example rng, so it is fixed by the loader's seed and the
  example's position in the epoch stream, and reproduces after a restore.
  """
  image_size: int
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image = to_rgb(element['image'], _example_name(element))
    top, left, height, width = sample_crop(*image.shape[:2], rng, self.scale, self.ratio)
    image = _crop_resize(image, (left, top, left + width, top + height), self.image_size)
    if rng.random() < 0.5:
      image = image[:, ::-1]
    return {'image': np.ascontiguousarray(image), 'label': element['label']}


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.MapTransform):
  """Resize the shorter side to ``image_size``, then center-crop ``image_size`` squared.

  Done as one resize of the central square, which is the same crop without the intermediate.
  """
  image_size: int

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    image = to_rgb(element['image'], _example_name(element))
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) / 2, (width - side) / 2
    image = _crop_resize(image, (left, top, left + side, top + side), self.image_size)
    return {'image': image, 'label': element['label']}
