"""Configs saved by older versions (in a workdir's checkpoints, in exported models), brought up
to today's keys: every change of the config's form that a saved config may predate is here."""

import ml_collections

from nested_decode import config_lib

# What the boolean ``model.remat`` of older versions meant.
REMAT_BOOLS = {True: 'full', False: 'none'}


def _scored_by_fid(dataset_name: str | None) -> bool:
  from nested_decode.data import sources  # grain and the readers: only for a saved config
  return dataset_name in sources.DATASETS and sources.DATASETS[dataset_name].scoring == 'fid'


def upgrade(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with the keys added since it was written set to their defaults."""
  defaults = {}
  if 'task' in config:
    defaults = config_lib.VIDEO_EVAL_DEFAULTS
  elif config.get('data') and _scored_by_fid(config.data.get('name')):
    defaults = config_lib.FID_EVAL_DEFAULTS
  for key, value in defaults.items():
    if key not in config.eval:
      config.eval[key] = value
  model_defaults = dict(config_lib.MODEL_DROPOUT_DEFAULTS,
                        position_embedding=config_lib.POSITION_EMBEDDING)
  for key, value in model_defaults.items():
    if key not in config.model:
      config.model[key] = value
  for key, value in (('ema_decay', config_lib.EMA_DECAY), ('restart', config_lib.RESTART),
                     ('init_from', config_lib.INIT_FROM)):
    if key not in config.training:
      config.training[key] = value
  if 'tokenizer_training' in config and 'pretrained' not in config.tokenizer_training:
    config.tokenizer_training.pretrained = config_lib.PRETRAINED_TOKENIZER
  if 'query_buckets' not in config.sampling:
    config.sampling.query_buckets = config_lib.QUERY_BUCKETS
  if 'attention_impl' not in config.sampling:
    config.sampling.attention_impl = config_lib.DECODE_ATTENTION
  if config.get('data'):  # saved before grain workers: read in the training thread
    for key, value in config_lib.data_workers(0).items():
      if key not in config.data:
        config.data[key] = value
  if isinstance(config.model.get('remat'), bool):  # a typed field: rebuilt, not assigned
    config.model = ml_collections.ConfigDict(
        dict(config.model.items(), remat=REMAT_BOOLS[config.model.remat]))
  return config
