"""Configs saved by older versions (in a workdir's checkpoints, in exported models), brought up
to today's keys: every change of the config's form that a saved config may predate is here."""

import ml_collections

from nested_decode import config_lib
from nested_decode.data import sources

# What the boolean ``model.remat`` of older versions meant.
REMAT_BOOLS = {True: 'full', False: 'none'}


def upgrade(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with the keys added since it was written set to their defaults."""
  defaults = {}
  if 'task' in config:
    defaults = config_lib.VIDEO_EVAL_DEFAULTS
  elif config.get('data') and sources.dataset(config).scoring == 'fid':
    defaults = config_lib.FID_EVAL_DEFAULTS
  for key, value in defaults.items():
    if key not in config.eval:
      config.eval[key] = value
  if 'query_buckets' not in config.sampling:
    config.sampling.query_buckets = config_lib.QUERY_BUCKETS
  if config.get('data'):  # saved before grain workers: read in the training thread
    for key, value in config_lib.data_workers(0).items():
      if key not in config.data:
        config.data[key] = value
  if isinstance(config.model.get('remat'), bool):  # a typed field: rebuilt, not assigned
    config.model = ml_collections.ConfigDict(
        dict(config.model.items(), remat=REMAT_BOOLS[config.model.remat]))
  return config
