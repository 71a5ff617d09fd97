"""Shared pieces of the ml_collections configs, their validation, and typed views of them.

Config files in ``configs/`` build on ``base_config``; everything that runs calls ``validate``
first, so a bad value fails before any compilation with one error that names the key.
"""

import math

import ml_collections

from nested_decode import tasks
from nested_decode.decoding.mask_schedule import MASK_SCHEDULES
from nested_decode.decoding.sampler import GUIDANCE_SCHEDULES, SamplingOptions
from nested_decode.decoding.schedule import BASELINE, DecodeTask, Schedule, ScheduleError
from nested_decode.models import attention, vqgan
from nested_decode.models.transformer import REMAT_POLICIES, TransformerConfig

DTYPES = ('float32', 'bfloat16')
ATTENTION_IMPLS = attention.IMPLEMENTATIONS


# Cached decode steps run their exact token count (0), or that count padded to one of this many
# sizes so that more steps share a compiled program, at the padding's FLOPs (decoding/plan.py).
QUERY_BUCKETS = 0
# The attention the decodes run ('': model.attention_impl, the training's). Every implementation
# takes the same parameters, so a model decodes with another than it trained with: the TPU
# compiler models 'deferred' faster for decodes and 'xla' for imagenet256's train step
# (docs/tpu_time.md).
DECODE_ATTENTION = ''


class ConfigError(ValueError):
  """A config value is invalid; the message names the key and what is allowed."""


def schedule(widths, cache='refresh_on_switch', refresh_every=1) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(widths=tuple(tuple(s) for s in widths), cache=cache,
                                        refresh_every=refresh_every))


def default_schedules() -> ml_collections.ConfigDict:
  """Small-to-large MaGNeTS schedules over 12 decode steps."""
  even = ((8, 3), (4, 3), (2, 3), (1, 3))
  return ml_collections.ConfigDict(dict(
      magnets=schedule(even),
      magnets_nocache=schedule(even, cache='none'),
      magnets_small_heavy=schedule(((8, 4), (4, 4), (2, 2), (1, 2))),
  ))


def scaling_schedules() -> ml_collections.ConfigDict:
  """The rows ``--mode=scaling_study`` scores for every model: the baseline, the even
  small-to-large split with and without cache, and the cached candidates for the best schedule
  at >= 3x and >= 4x fewer FLOPs on the 128-wide model of docs/results.md (among them the
  schedule the search found there)."""
  even = ((8, 3), (4, 3), (2, 3), (1, 3))
  return ml_collections.ConfigDict(dict(
      baseline_T12=schedule(((1, 12),), cache='none'),
      up_8x3_4x3_2x3_1x3=schedule(even, cache='none'),
      up_8x3_4x3_2x3_1x3_cached=schedule(even),
      up_8x2_4x2_2x4_1x4_cached=schedule(((8, 2), (4, 2), (2, 4), (1, 4))),
      up_8x4_4x4_2x2_1x2_cached=schedule(((8, 4), (4, 4), (2, 2), (1, 2))),
      searched_8x1_2x8_1x3_cached=schedule(((8, 1), (2, 8), (1, 3))),
  ))


def base_config(*, num_layers, width, num_heads, token_shape, codebook_size, num_classes,
                guidance_scale, batch_size, dtype='float32') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict(dict(
      num_layers=num_layers, width=width, num_heads=num_heads, mlp_dim=4 * width,
      nesting_factors=(1, 2, 4, 8), scan_layers=True, remat='none', dtype=dtype,
      attention_impl='xla', position_embedding=POSITION_EMBEDDING,
      **MODEL_DROPOUT_DEFAULTS))
  config.tokens = ml_collections.ConfigDict(dict(
      shape=tuple(token_shape), codebook_size=codebook_size, num_classes=num_classes))
  config.sampling = ml_collections.ConfigDict(dict(
      steps=12, mask_schedule='cosine', temperature=1.0, top_k=0, choice_temperature=4.5,
      guidance_scale=guidance_scale, guidance_schedule='constant',
      query_buckets=QUERY_BUCKETS, attention_impl=DECODE_ATTENTION))
  config.eval = ml_collections.ConfigDict(dict(schedules=default_schedules()))
  # --mode=bench uses batch_size, warmup_runs, timed_runs; --mode=bench_train the train_ keys.
  config.bench = ml_collections.ConfigDict(dict(batch_size=batch_size, warmup_runs=1,
                                                timed_runs=5, train_warmup_steps=2,
                                                train_steps=20))
  config.training = training_config()
  # Device mesh (nested_decode/parallel.py); -1: the devices the other axes leave.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # --mode=compile_tpu: the TPU slice to compile for, its HBM per chip in GiB (0: known from
  # the chip generation, see tpu_fit.HBM_GIB), whether to compile the train step and the
  # decodes (each takes minutes on a small CPU), whether to compile a
  # single-width train step (training.widths=(1,)) too, to compare its collective traffic and
  # time, whether to read the compiler's modeled time (a second compile of each program
  # with its layers unrolled, see tools/tpu_time.py), and whether to compile the simpler
  # cheaper decodes too (fewer full-width steps, a sub-model alone; tpu_fit.family_schedules).
  config.tpu_fit = ml_collections.ConfigDict(dict(topology='v5e:4x4', hbm_gib=0.0,
                                                  train=True, decodes=True,
                                                  single_width=False,
                                                  modeled_time=True, families=False))
  return config


# MaskGIT's regularisation of the transformer (google-research/maskgit, the class-conditional
# ImageNet config): dropout on the hidden and attention-probability paths, Polyak averaging.
MASKGIT_DROPOUT_RATE = 0.1
MASKGIT_EMA_DECAY = 0.999


def with_maskgit_regularisation(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """MaskGIT's dropout and weight average, for the configs that reproduce published models."""
  config.model.update(dropout_rate=MASKGIT_DROPOUT_RATE,
                      attention_dropout_rate=MASKGIT_DROPOUT_RATE)
  config.training.ema_decay = MASKGIT_EMA_DECAY
  return config


def video_config(*, tiny: bool, model: dict, data: ml_collections.ConfigDict,
                 task: ml_collections.ConfigDict, num_classes: int,
                 guidance_scale: float) -> ml_collections.ConfigDict:
  """16-frame clips as the tokens of a causal 3D tokenizer (17 frames: the 16 and a copy of the
  last) for a transformer of ``model``'s size (``num_layers``, ``width``, ``num_heads``):
  MAGVIT's tokenizer and 1024 codes in bfloat16, or (``tiny``) a small tokenizer and 256 codes
  for a 2-core machine."""
  tokenizer = video_tokenizer(base_channels=8 if tiny else 64,
                              channel_multipliers=(1, 2, 4) if tiny else (1, 2, 2, 4),
                              num_res_blocks=1 if tiny else 2,
                              embedding_dim=16 if tiny else 256, num_groups=8 if tiny else 32)
  token_shape = video_token_shape(data, tokenizer)
  if tiny:
    config = base_config(**model, token_shape=token_shape, codebook_size=256,
                         num_classes=num_classes, guidance_scale=guidance_scale, batch_size=8)
  else:
    config = base_config(**model, token_shape=token_shape, codebook_size=1024,
                         num_classes=num_classes, guidance_scale=guidance_scale, batch_size=32,
                         dtype='bfloat16')
    # Rematerialised, keeping only each block's attention output, the train step of 1281 tokens
    # needs 12.3 GiB per chip at batch 256 on 16 chips, a v5e has 16 (docs/tpu_fit.md).
    config.model.remat = 'save_attention_out'
    with_maskgit_regularisation(config)  # MAGVIT's transformer is MaskGIT's
    # The deferred softmax (docs/tpu_time.md): on a v5e:4x4 k600's nested train step is
    # modeled at 2246 ms against 2794 with 'xla', in 14.92 GiB per chip against 14.26 (ucf101's,
    # the same transformer, also at 2246 ms), and its baseline decode at 424 ms against 588.
    config.model.attention_impl = 'deferred'
  config.data = data
  config.task = task
  config.tokenizer = tokenizer
  config.tokenizer_training = ml_collections.ConfigDict(dict(
      num_steps=500_000, batch_size=64, num_frames=data.num_frames, learning_rate=1e-4,
      warmup_steps=5000, final_lr_fraction=0.1, b1=0.5, b2=0.9, grad_clip=1.0,
      adversarial_weight=0.1, discriminator_channels=64, r1_gamma=10.0, usage_decay=0.99,
      dead_code_threshold=0.01, restart_every=1000, log_every=100, checkpoint_every=5000,
      pretrained=PRETRAINED_TOKENIZER))
  config.eval.num_samples = 50_000
  config.eval.batch_size = 64
  config.eval.saved_clips = 64
  config.eval.gif_clips = 8
  config.eval.update(VIDEO_EVAL_DEFAULTS)
  return config


# What resuming with a larger training.num_steps does to the schedules: 'none' keeps them (the
# learning rate stays at its final value), 'warm' runs them again from the resumed step
# (training/train_transformer.py, segment_to_train).
RESTARTS = ('none', 'warm')
RESTART = 'none'
# A file of --mode=export_tokenizer that a job uses instead of training a tokenizer ('': train
# one; inference/tokenizer_file.py).
PRETRAINED_TOKENIZER = ''
# A file of --mode=export_transformer that a job's transformer starts training from ('': a
# random initialisation; inference/transformer_file.py).
INIT_FROM = ''
# The transformer's weight average (training.ema_decay; 0: none), off unless a config sets it.
EMA_DECAY = 0.0
# Dropout in training (nested_decode/models/transformer.py); MaskGIT's configs use 0.1 for both.
MODEL_DROPOUT_DEFAULTS = dict(dropout_rate=0.0, attention_dropout_rate=0.0)
# model.position_embedding: 'per_position' learns a vector for each sequence position (MaskGIT's),
# 'per_axis' one table per axis of tokens.shape, summed (models/nested_layers.py).
POSITION_EMBEDDINGS = ('per_position', 'per_axis')
POSITION_EMBEDDING = 'per_position'
# The FVD protocol (README, "Video evaluation protocols"): real clips from this split, as
# (temporal windows, spatial crops) clips per video; FVD on each of num_folds sets of
# num_samples clips; clips resized to fvd_image_size first (0: as generated). frame_metrics:
# frame prediction's PSNR and SSIM of every set against its real clips, which reads the real
# clips again for each set.
# temperature_sweep: --mode=tune_temperature's candidates and validation clips
# (studies/temperature_sweep.py).
VIDEO_EVAL_DEFAULTS = dict(real_split='eval', clip_views=(1, 1), num_folds=1, fvd_image_size=0,
                           frame_metrics=True,
                           temperature_sweep=dict(temperatures=(1.0, 0.5, 0.2, 0.1),
                                                  num_clips=64))
# ImageNet's FID protocol (README, "Evaluating an ImageNet model").
FID_EVAL_DEFAULTS = dict(fid_reference='train', min_reference_images=10_000, inception_weights='')


def video_tokenizer(**fields) -> ml_collections.ConfigDict:
  """A causal 3D VQ tokenizer halving time at the first two downsampling levels (t = 4)."""
  levels = len(fields['channel_multipliers']) - 1
  return ml_collections.ConfigDict(dict(
      commitment_cost=0.25, temporal_downsample=tuple(i < 2 for i in range(levels)), **fields))


def video_token_shape(data: ml_collections.ConfigDict, tokenizer: ml_collections.ConfigDict
                      ) -> tuple[int, int, int]:
  """``(t, h, w)`` latent grid of ``data.num_frames`` frames of ``data.image_size`` pixels."""
  levels = len(tokenizer.channel_multipliers) - 1
  temporal = vqgan.temporal_factor(tokenizer.temporal_downsample)
  side = data.image_size // 2 ** levels
  return (1 + -(-(data.num_frames - 1) // temporal), side, side)


def training_config(**overrides) -> ml_collections.ConfigDict:
  """MaskGIT's recipe (Adam 0.9/0.96, weight decay 0.045, lr 1e-4, 5000 warmup, batch 256),
  nested over every width with distillation weight on the labels going 1 -> 0."""
  fields = dict(
      num_steps=300_000, batch_size=256, learning_rate=1e-4, warmup_steps=5000,
      final_lr_fraction=0.0, b1=0.9, b2=0.96, weight_decay=0.045, grad_clip=1.0,
      label_smoothing=0.1, label_dropout=0.1, widths=(1, 2, 4, 8),
      distill_lambda_start=1.0, distill_lambda_end=0.0, ema_decay=EMA_DECAY, restart=RESTART,
      log_every=100, checkpoint_every=5000, keep_checkpoints=3, init_from=INIT_FROM)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def _fail(key, value, allowed, prefix='config.'):
  raise ConfigError(f'{prefix}{key}={value!r} is invalid: {allowed}')


def _check_choice(config, key, allowed):
  section, name = key.split('.')
  value = config[section][name]
  if value not in allowed:
    _fail(key, value, f'allowed values are {tuple(allowed)}')


def _check_positive_int(config, key):
  section, name = key.split('.')
  value = config[section][name]
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    _fail(key, value, 'must be a positive integer')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ``ConfigError`` naming the first bad key."""
  for key in ('model.num_layers', 'model.width', 'model.num_heads', 'model.mlp_dim',
              'tokens.codebook_size', 'sampling.steps', 'bench.batch_size', 'bench.timed_runs'):
    _check_positive_int(config, key)
  for key in ('bench.train_warmup_steps', 'bench.train_steps'):
    if key.split('.')[1] in config.bench:  # configs saved before the keys existed lack them
      _check_positive_int(config, key)
  model = config.model
  factors = tuple(model.nesting_factors)
  if not factors or any(not isinstance(f, int) or f <= 0 for f in factors) or 1 not in factors:
    _fail('model.nesting_factors', factors, 'must be positive integers including 1')
  for key in ('width', 'num_heads', 'mlp_dim'):
    bad = [f for f in factors if model[key] % f]
    if bad:
      _fail(f'model.{key}', model[key],
            f'must be divisible by every nesting factor (config.model.nesting_factors={factors}; '
            f'not divisible by {bad})')
  if model.width % model.num_heads:
    _fail('model.width', model.width, f'must be divisible by model.num_heads={model.num_heads}')
  _check_choice(config, 'model.dtype', DTYPES)
  _check_choice(config, 'model.attention_impl', ATTENTION_IMPLS)
  _check_choice(config, 'model.position_embedding', POSITION_EMBEDDINGS)
  for key in ('dropout_rate', 'attention_dropout_rate'):
    if not 0.0 <= model[key] < 1.0:
      _fail(f'model.{key}', model[key], 'must be in [0, 1)')
  if (model.attention_dropout_rate > 0
      and model.attention_impl not in attention.DROPOUT_IMPLEMENTATIONS):
    _fail('model.attention_dropout_rate', model.attention_dropout_rate,
          f'config.model.attention_impl={model.attention_impl!r} has no attention-weight '
          f'dropout: set it to 0 or use one of {attention.DROPOUT_IMPLEMENTATIONS}')
  if model.remat not in REMAT_POLICIES:
    _fail('model.remat', model.remat, f'allowed values are {tuple(REMAT_POLICIES)}')
  if not config.tokens.shape or any(int(s) <= 0 for s in config.tokens.shape):
    _fail('tokens.shape', config.tokens.shape, 'must be a non-empty tuple of positive sizes')
  if config.tokens.num_classes < 0:
    _fail('tokens.num_classes', config.tokens.num_classes, 'must be >= 0')

  if 'tokenizer' in config:
    levels = len(config.tokenizer.channel_multipliers)
    side = config.data.image_size // 2 ** (levels - 1)
    expected = (side, side)
    if config.data.get('num_frames'):
      expected = video_token_shape(config.data, config.tokenizer)
    if tuple(config.tokens.shape) != expected:
      _fail('tokens.shape', tuple(config.tokens.shape),
            f'config.data.image_size={config.data.image_size} downsampled {levels - 1} times '
            f'(config.tokenizer.channel_multipliers) gives {expected} tokens')
  if 'task' in config:
    try:
      task = tasks.task_of(config)
    except ValueError as error:
      raise ConfigError(f'config.task: {error}') from error
    if task.num_generated <= 0:
      _fail('task.condition_frames', config.task.condition_frames,
            'leaves no latent frames to generate')
    validate_video_eval(config.eval, conditions_from_real_clips=task.num_given > 0)
  if 'data' in config:
    validate_data_workers(config.data)
    if 'token_views' in config.data:
      _check_positive_int(config, 'data.token_views')
  training = config.training
  for key in ('training.num_steps', 'training.batch_size', 'training.log_every',
              'training.checkpoint_every', 'training.keep_checkpoints'):
    _check_positive_int(config, key)
  bad_widths = [w for w in training.widths if w not in factors]
  if 1 not in training.widths or bad_widths:
    _fail('training.widths', training.widths,
          f'must include 1 (the teacher) and only factors from config.model.nesting_factors='
          f'{factors}')
  if training.restart not in RESTARTS:
    _fail('training.restart', training.restart, f'allowed values are {RESTARTS}')
  if not 0.0 <= training.ema_decay < 1.0:
    _fail('training.ema_decay', training.ema_decay, 'must be in [0, 1) (0: no average)')
  for key in ('label_smoothing', 'label_dropout', 'distill_lambda_start', 'distill_lambda_end'):
    if not 0.0 <= training[key] <= 1.0:
      _fail(f'training.{key}', training[key], 'must be in [0, 1]')

  if 'mesh' in config:
    validate_mesh(config.mesh)
  if 'tpu_fit' in config:
    validate_tpu_fit(config.tpu_fit)

  sampling = config.sampling
  _check_choice(config, 'sampling.mask_schedule', MASK_SCHEDULES)
  _check_choice(config, 'sampling.attention_impl', ('',) + ATTENTION_IMPLS)
  _check_choice(config, 'sampling.guidance_schedule', GUIDANCE_SCHEDULES)
  if sampling.guidance_scale < 0:
    _fail('sampling.guidance_scale', sampling.guidance_scale, 'must be >= 0')
  if sampling.guidance_scale > 0 and config.tokens.num_classes == 0:
    _fail('sampling.guidance_scale', sampling.guidance_scale,
          'guidance needs labels; set it to 0 when config.tokens.num_classes=0')
  if sampling.temperature <= 0:
    _fail('sampling.temperature', sampling.temperature, 'must be > 0')
  if not 0 <= sampling.top_k <= config.tokens.codebook_size:
    _fail('sampling.top_k', sampling.top_k,
          f'must be in [0, tokens.codebook_size={config.tokens.codebook_size}]')
  if not isinstance(sampling.query_buckets, int) or sampling.query_buckets < 0:
    _fail('sampling.query_buckets', sampling.query_buckets,
          'must be an integer >= 0 (0: cached steps run their exact token count)')
  if sampling.steps > seq_len(config):
    _fail('sampling.steps', sampling.steps, f'must be <= the number of tokens {seq_len(config)}')

  for name, sched in config.eval.schedules.items():
    key = f'eval.schedules.{name}'
    if name == BASELINE:
      _fail(key, name, f'the name {BASELINE!r} is reserved for the full-width baseline')
    check_schedule(config, sched, key)


def check_schedule(config: ml_collections.ConfigDict, sched, key: str,
                   prefix: str = 'config.') -> Schedule:
  """The ``Schedule`` of ``sched`` (a config entry or a ``Schedule``); a ``ConfigError`` naming
  ``prefix + key`` unless ``config``'s model decodes it (``Schedule.check``)."""
  try:
    schedule = Schedule.parse(sched)
    schedule.check(decode_task(config))
  except ScheduleError as error:
    _fail(f'{key}.{error.field}', error.value, error.problem, prefix)
  return schedule


MESH_AXES = ('data', 'fsdp', 'tensor')


def data_workers(worker_count: int, worker_buffer_size: int = 2) -> dict[str, int]:
  """``config.data`` keys of the pixel pipeline's grain worker processes (per process of the
  job; 0: decode in the training thread) and the batches each prepares ahead."""
  return dict(worker_count=worker_count, worker_buffer_size=worker_buffer_size)


def validate_data_workers(data: ml_collections.ConfigDict) -> None:
  for key, minimum in (('worker_count', 0), ('worker_buffer_size', 1)):
    if key not in data:
      raise ConfigError(f'config.data.{key} is missing: set the data workers with '
                        f'config_lib.data_workers(...)')
    value = data[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
      _fail(f'data.{key}', value, f'must be an integer >= {minimum}')


def validate_video_eval(evaluation: ml_collections.ConfigDict,
                        conditions_from_real_clips: bool) -> None:
  """Checks the FVD protocol keys of a video config's ``eval``."""
  if evaluation.real_split not in ('eval', 'train'):
    _fail('eval.real_split', evaluation.real_split, "allowed values are ('eval', 'train')")
  if conditions_from_real_clips and evaluation.real_split != 'eval':
    _fail('eval.real_split', evaluation.real_split,
          "frame prediction conditions on the real clips, which come from the 'eval' split")
  views = tuple(evaluation.clip_views)
  if len(views) != 2 or views[0] < 1 or views[1] not in (1, 2, 3):
    _fail('eval.clip_views', views, '(temporal windows >= 1, spatial crops 1 to 3)')
  for key in ('num_samples', 'num_folds'):
    if not isinstance(evaluation[key], int) or evaluation[key] < 2 - (key == 'num_folds'):
      _fail(f'eval.{key}', evaluation[key], 'must be an integer >= 2 (>= 1 for num_folds)')
  if evaluation.fvd_image_size < 0:
    _fail('eval.fvd_image_size', evaluation.fvd_image_size, 'must be >= 0 (0: as generated)')


def validate_mesh(mesh: ml_collections.ConfigDict) -> None:
  """Checks ``config.mesh`` without looking at devices (``parallel.make_mesh`` does that)."""
  unknown = [key for key in mesh.keys() if key not in (*MESH_AXES, 'rules')]
  if unknown:
    _fail(f'mesh.{unknown[0]}', mesh[unknown[0]], f'unknown key; allowed: {MESH_AXES} and rules')
  for axis in MESH_AXES:
    size = mesh.get(axis, 1)
    if not isinstance(size, int) or isinstance(size, bool) or (size <= 0 and size != -1):
      _fail(f'mesh.{axis}', size, 'must be a positive integer or -1 (the devices the other '
            'axes leave)')
  rest = [axis for axis in MESH_AXES if mesh.get(axis, 1) == -1]
  if len(rest) > 1:
    _fail(f'mesh.{rest[1]}', -1, f'only one mesh axis may be -1 (config.mesh.{rest[0]} is)')
  for rule in mesh.get('rules') or ():
    axes = rule[1] if len(rule) == 2 else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    if len(rule) != 2 or any(a not in MESH_AXES for a in axes):
      _fail('mesh.rules', rule, f'each rule is (logical_name, mesh axes or None) over '
            f'{MESH_AXES}')


def validate_tpu_fit(tpu_fit: ml_collections.ConfigDict) -> None:
  """Checks the form of ``config.tpu_fit``; whether libtpu knows the topology is checked
  when ``--mode=compile_tpu`` asks it."""
  topology = tpu_fit.topology
  generation, _, shape = str(topology).partition(':')
  if not isinstance(topology, str) or not generation or not shape:
    _fail('tpu_fit.topology', topology, 'must be "<generation>:<chips>", e.g. "v5e:4x4" or '
          '"v5p:2x2x2"')
  hbm = tpu_fit.hbm_gib
  if isinstance(hbm, bool) or not isinstance(hbm, (int, float)) or hbm < 0:
    _fail('tpu_fit.hbm_gib', hbm, 'must be a number of GiB >= 0 (0: from the chip generation)')
  for key in ('train', 'decodes', 'single_width', 'modeled_time', 'families'):
    if not isinstance(tpu_fit.get(key, False), bool):
      _fail(f'tpu_fit.{key}', tpu_fit[key], 'must be True or False')
  if not (tpu_fit.get('train', True) or tpu_fit.decodes):
    _fail('tpu_fit.decodes', tpu_fit.decodes, 'must be True when tpu_fit.train is False: '
          'there would be nothing to compile')
  if tpu_fit.get('single_width', False) and not tpu_fit.get('train', True):
    _fail('tpu_fit.single_width', True, 'compiles a second train step, so it needs '
          'tpu_fit.train=True')


def seq_len(config: ml_collections.ConfigDict) -> int:
  return math.prod(int(s) for s in config.tokens.shape)


def transformer_config(config: ml_collections.ConfigDict) -> TransformerConfig:
  m = config.model
  return TransformerConfig(
      num_layers=m.num_layers, width=m.width, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
      codebook_size=config.tokens.codebook_size, num_classes=config.tokens.num_classes,
      seq_len=seq_len(config), nesting_factors=tuple(m.nesting_factors),
      scan_layers=m.scan_layers, remat=m.remat, dtype=m.dtype,
      attention_impl=m.attention_impl, dropout_rate=m.dropout_rate,
      attention_dropout_rate=m.attention_dropout_rate,
      position_grid=(tuple(int(s) for s in config.tokens.shape)
                     if m.position_embedding == 'per_axis' else ()))


def decoding_transformer_config(config: ml_collections.ConfigDict) -> TransformerConfig:
  """``transformer_config`` with the decodes' attention (``sampling.attention_impl``)."""
  model = transformer_config(config)
  return model._replace(attention_impl=config.sampling.attention_impl or model.attention_impl)


def sampling_options(config: ml_collections.ConfigDict) -> SamplingOptions:
  s = config.sampling
  return SamplingOptions(temperature=s.temperature, top_k=s.top_k,
                         choice_temperature=s.choice_temperature,
                         guidance_scale=s.guidance_scale, guidance_schedule=s.guidance_schedule)


def decode_task(config: ml_collections.ConfigDict) -> DecodeTask:
  """What a decode plan of ``config``'s model depends on besides its schedule."""
  return DecodeTask(seq_len=seq_len(config), num_generated=tasks.task_of(config).num_generated,
                    nesting_factors=tuple(config.model.nesting_factors),
                    mask_schedule=config.sampling.mask_schedule,
                    query_buckets=config.sampling.query_buckets)


def schedules_with_baseline(config: ml_collections.ConfigDict) -> dict[str, Schedule]:
  """``{name: Schedule}`` of ``config.eval.schedules`` with the full-width, uncached T-step
  baseline first."""
  result = {BASELINE: Schedule.baseline(config.sampling.steps)}
  result.update((name, Schedule.parse(sched)) for name, sched in config.eval.schedules.items())
  return result
