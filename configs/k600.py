r"""Kinetics-600 frame prediction, 16x128x128 frames as 4x16x16 tokens (MAGVIT-L sized).

No labels: the class token is always the unconditional id and guidance is off. `:base` gives the
MAGVIT-B transformer (12 layers x 768), `:tiny` one for a 2-core machine.
"""

from nested_decode import config_lib


def get_config(arg=None):
  return config_lib.video_config(arg, config_file='configs/k600.py', num_classes=0,
                                 guidance_scale=0.0)
