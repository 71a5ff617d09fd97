"""Real test images for the Inception network: crops of scikit-image's sample photographs.

32 RGB crops of 8 photographs resized to 256x256 (ImageNet's evaluation size) and 4 grayscale
photographs at 64x64 (a small image upsampled, one channel repeated), as uint8.
"""

import numpy as np
import skimage.data
from PIL import Image

RGB_PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field', 'retina',
              'immunohistochemistry', 'logo')
GRAY_PHOTOS = ('camera', 'moon', 'coins', 'brick')


def _resized(image: np.ndarray, size: int) -> np.ndarray:
  mode = 'L' if image.ndim == 2 else 'RGB'
  resized = np.asarray(Image.fromarray(image, mode).resize((size, size), Image.BICUBIC))
  return resized if resized.ndim == 3 else resized[..., None]


def rgb_images() -> np.ndarray:
  """uint8 ``[32, 256, 256, 3]``: the four corner-anchored crops (60% of the short side)."""
  crops = []
  for name in RGB_PHOTOS:
    photo = getattr(skimage.data, name)()[..., :3]
    h, w = photo.shape[:2]
    side = int(0.6 * min(h, w))
    for top, left in ((0, 0), (0, w - side), (h - side, 0), (h - side, w - side)):
      crops.append(_resized(photo[top:top + side, left:left + side], 256))
  return np.stack(crops)


def gray_images() -> np.ndarray:
  """uint8 ``[4, 64, 64, 1]``: whole grayscale photographs, downsized."""
  return np.stack([_resized(getattr(skimage.data, name)(), 64) for name in GRAY_PHOTOS])
