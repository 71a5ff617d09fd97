r"""Class-conditional ImageNet 256x256 (MaskGIT transformer: 24 layers x 768, 16x16 tokens).

  python -m nested_decode.main --config=configs/imagenet256.py --workdir=runs/in256 --mode=flops
  python -m nested_decode.main --config=configs/imagenet256.py:tiny --workdir=runs/tiny --mode=bench
"""

from nested_decode import config_lib


def get_config(arg=None):
  if arg == 'tiny':
    return config_lib.base_config(
        num_layers=4, width=256, num_heads=8, token_shape=(16, 16), codebook_size=512,
        num_classes=10, guidance_scale=1.0, batch_size=8)
  if arg is not None:
    raise ValueError(f'Unknown variant {arg!r} of configs/imagenet256.py; allowed: tiny')
  return config_lib.base_config(
      num_layers=24, width=768, num_heads=16, token_shape=(16, 16), codebook_size=1024,
      num_classes=1000, guidance_scale=1.0, batch_size=128, dtype='bfloat16')
