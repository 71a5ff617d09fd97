r"""Kinetics-600 frame prediction: 16 frames of 128x128, the first 5 given, 11 generated.

  python -m nested_decode.main --config=configs/k600.py --workdir=gs://BUCKET/k600 \
      --config.data.video_dir=/data/k600 --config.data.train_csv=/data/k600/train.csv \
      --config.data.eval_csv=/data/k600/validate.csv

Clips come from a folder of the user's video files and the official CSVs (K600 is not in TFDS).
The causal 3D tokenizer turns 16 frames (padded to 17 with a copy of the last) into 5x16x16
tokens; the first 2 latent frames encode exactly the 5 condition frames and are the sampler's
known tokens (see nested_decode/tasks.py). No labels: the class token is the unconditional id
and guidance is off. `:base` gives the MAGVIT-B transformer (12 layers x 768).

`:tiny` is the offline job of a 2-core machine (18 minutes): Moving MNIST generated from
the embedded MNIST digits (2 digits bouncing in 64x64, shown at 32x32), 5 given frames and 11
generated, a small transformer, GIFs and FVD with the real I3D network. Its tokenizer halves
time once (9x8x8 tokens) and is the repository's `weights/k600_tiny_tokenizer_9x8x8.msgpack`,
trained by this config's own tokenizer stage for 9600 steps (78 minutes here, longer than the
whole job: docs/results.md); `--config.tokenizer_training.pretrained=''` trains one instead.
Its transformer starts from the repository's `weights/k600_tiny_transformer_2000.msgpack`
(this config's train stage, 2000 steps, 50 minutes here) and trains 320 more steps;
`--config.training.init_from=''` starts it from scratch.
"""

import pathlib

import ml_collections

from nested_decode import config_lib

# The transformer of each variant: MAGVIT-L, MAGVIT-B's width with 16 heads (to nest by 8), and a
# small one for a 2-core machine.
TRANSFORMERS = {
    None: dict(num_layers=24, width=1024, num_heads=16),
    'base': dict(num_layers=12, width=768, num_heads=16),
    'tiny': dict(num_layers=4, width=128, num_heads=8),
}


# The tokenizer the offline job decodes through, and the transformer it starts training from,
# found beside this file wherever it is run from.
WEIGHTS = pathlib.Path(__file__).resolve().parent.parent / 'weights'
TINY_TOKENIZER = str(WEIGHTS / 'k600_tiny_tokenizer_9x8x8.msgpack')
TINY_TRANSFORMER = str(WEIGHTS / 'k600_tiny_transformer_2000.msgpack')


def get_config(arg=None):
  if arg not in TRANSFORMERS:
    raise ValueError(f'Unknown variant {arg!r} of configs/k600.py; allowed: base, tiny')
  task = ml_collections.ConfigDict(dict(name='frame_prediction', condition_frames=5))
  if arg == 'tiny':
    return tiny_config(task)
  data = ml_collections.ConfigDict(dict(
      name='kinetics600', video_dir='', train_csv='', eval_csv='', num_frames=16,
      frame_stride=1, image_size=128, channels=3,
      # 4 random windows and crops of each training video, encoded once (MAGVIT draws a random
      # clip at every step; ~380k videos x 4 views is 1.5M clips, 7.8 GB of tokens).
      token_views=4,
      # Decoding video files (PyAV) is the heaviest input work of any config here.
      **config_lib.data_workers(16)))
  config = config_lib.video_config(tiny=False, model=TRANSFORMERS[arg], data=data, task=task,
                                   num_classes=0, guidance_scale=0.0)
  # MAGVIT's protocol (appendix B.3): 50,000 x 4 samples, real clips and conditions from 2
  # temporal windows x 3 spatial crops of each validation video, FVD at 64x64.
  # No PSNR and SSIM: pairing every set with its real clips would decode the 200,000 clips
  # from the video files once more per schedule.
  config.eval.update(num_samples=50_000, num_folds=4, clip_views=(2, 3), fvd_image_size=64,
                     frame_metrics=False)
  return config


def tiny_config(task):
  data = ml_collections.ConfigDict(dict(
      name='moving_mnist', num_frames=16, image_size=32, channels=1, num_train_clips=4000,
      num_eval_clips=128, **config_lib.data_workers(0)))
  config = config_lib.video_config(tiny=True, model=TRANSFORMERS['tiny'], data=data, task=task,
                                   num_classes=0, guidance_scale=0.0)
  # Time halved once, not twice: at 4x each token covers 4 frames of digits too thin for I3D to
  # see (docs/results.md, the video tokenizer). 16 frames (17 with the copy) give 9 latent frames.
  config.tokenizer.temporal_downsample = (True, False)
  config.tokens.shape = config_lib.video_token_shape(data, config.tokenizer)
  # 577 tokens and heads of 16: attention's score passes are most of a CPU train step, and the
  # deferred normalisation halves them (models/attention.py).
  config.model.attention_impl = 'deferred'
  config.tokenizer_training.update(dict(
      num_steps=9600, batch_size=8, num_frames=9, learning_rate=1e-3, warmup_steps=50,
      b1=0.9, b2=0.99, adversarial_weight=0.0, dead_code_threshold=0.05, restart_every=50,
      log_every=25, checkpoint_every=200, pretrained=TINY_TOKENIZER))
  # A nested train step of 576 tokens at batch 8 takes 1.9 s on 2 cores (3.9 at 16);
  # the encoding and the evaluation (I3D's 7 sets of 128 clips are most of it) about 9 minutes.
  # 320 steps of 8 clips cost what 160 of 16 did, and reach a lower loss at every width and a
  # lower validation FVD (docs/results.md).
  # The transformer starts from the repository's, which this config's train stage trained for
  # 2000 steps (50 minutes here, longer than the job; --config.training.num_steps=2000
  # --config.training.init_from=''): from scratch, 320 steps only tie with repeating the last
  # frame (docs/results.md).
  config.training = config_lib.training_config(
      num_steps=320, batch_size=8, learning_rate=1e-3, warmup_steps=40, log_every=40,
      checkpoint_every=80, init_from=TINY_TRANSFORMER)
  # Chosen by --mode=tune_temperature on 64 validation clips with a model of 240 steps of 16
  # (baseline FVD 213.5 at 0.5, 214.6 at 0.2, 228.1 at 0.1, 267.6 at 1.0), not re-swept for
  # 320 of 8: docs/results.md.
  config.sampling.temperature = 0.5
  # MaGNeTS beside the full width with fewer steps at about its FLOPs (4x and 6x fewer).
  config.eval.schedules = ml_collections.ConfigDict(dict(
      magnets=config_lib.default_schedules().magnets,
      fewer_steps_4x=config_lib.schedule(((1, 3),), cache='none'),
      fewer_steps_6x=config_lib.schedule(((1, 2),), cache='none')))
  config.eval.num_samples = 128
  config.eval.batch_size = 64
  config.eval.saved_clips = 16
  config.eval.gif_clips = 6
  return config
