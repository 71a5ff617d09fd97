r"""Class-conditional UCF101: 16 frames of 128x128, 101 classes, every token generated.

  python -m nested_decode.main --config=configs/ucf101.py --workdir=gs://BUCKET/ucf101

UCF101 comes through TFDS (prepare it once with `pip install -e ".[tf]"`; set
`--config.data.data_dir` where it lives). The causal 3D tokenizer turns 16 frames (padded to 17)
into 5x16x16 tokens. `:base` gives the MAGVIT-B transformer (12 layers x 768), `:tiny` a small
model on the same data for smoke runs and benchmarks.
"""

import ml_collections
from ml_collections import config_dict

from nested_decode import config_lib

# The transformer of each variant: MAGVIT-L, MAGVIT-B's width with 16 heads (to nest by 8), and a
# small one for smoke runs and benchmarks.
TRANSFORMERS = {
    None: dict(num_layers=24, width=1024, num_heads=16),
    'base': dict(num_layers=12, width=768, num_heads=16),
    'tiny': dict(num_layers=4, width=128, num_heads=8),
}


def get_config(arg=None):
  if arg not in TRANSFORMERS:
    raise ValueError(f'Unknown variant {arg!r} of configs/ucf101.py; allowed: base, tiny')
  data = ml_collections.ConfigDict(dict(
      name='ucf101', data_dir=config_dict.placeholder(str), num_frames=16, frame_stride=1,
      image_size=32 if arg == 'tiny' else 128, channels=3,
      # The transformer trains on 16 random windows and crops of each training video, encoded
      # once (MAGVIT draws a random clip at every step; 9.5k videos x 16 views is 153k clips).
      token_views=1 if arg == 'tiny' else 16,
      # Frame decoding of TFDS records off the training thread; fewer for the small machines of
      # :tiny.
      **config_lib.data_workers(2 if arg == 'tiny' else 8)))
  task = ml_collections.ConfigDict(dict(name='class_conditional'))
  config = config_lib.video_config(tiny=arg == 'tiny', model=TRANSFORMERS[arg], data=data,
                                   task=task, num_classes=101, guidance_scale=1.0)
  # MAGVIT's protocol (appendix B.3): 10,000 x 4 samples against clips of the training videos
  # (here 2 temporal windows x 3 spatial crops of each), each sample of its real clip's class.
  config.eval.update(num_samples=10_000, num_folds=4, real_split='train', clip_views=(2, 3))
  if arg == 'tiny':
    config.eval.update(num_samples=500, num_folds=1)
  return config
