r"""Kinetics-600 frame prediction, 16x128x128 frames as 4x16x16 tokens (MAGVIT-L sized).

No labels: the class token is always the unconditional id and guidance is off. `:base` gives the
MAGVIT-B transformer (12 layers x 768), `:tiny` one for a 2-core machine.
"""

from nested_decode import config_lib

SIZES = {
    None: dict(num_layers=24, width=1024, num_heads=16),  # MAGVIT-L
    'base': dict(num_layers=12, width=768, num_heads=16),  # MAGVIT-B width, 16 heads to nest by 8
}


def get_config(arg=None):
  if arg == 'tiny':
    return config_lib.base_config(
        num_layers=4, width=256, num_heads=8, token_shape=(2, 8, 8), codebook_size=512,
        num_classes=0, guidance_scale=0.0, batch_size=8)
  if arg not in SIZES:
    raise ValueError(f'Unknown variant {arg!r} of configs/k600.py; allowed: base, tiny')
  return config_lib.base_config(**SIZES[arg], token_shape=(4, 16, 16), codebook_size=1024,
                                num_classes=0, guidance_scale=0.0, batch_size=32,
                                dtype='bfloat16')
