r"""Class-conditional UCF101 video, 16x128x128 frames as 4x16x16 tokens (MAGVIT-L sized).

`:base` gives the MAGVIT-B transformer (12 layers x 768), `:tiny` one for a 2-core machine.
"""

from nested_decode import config_lib


def get_config(arg=None):
  return config_lib.video_config(arg, config_file='configs/ucf101.py', num_classes=101,
                                 guidance_scale=1.0)
