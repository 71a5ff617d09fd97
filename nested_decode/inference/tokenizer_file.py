"""A trained tokenizer in one file, for jobs that use it instead of training their own.

``--mode=export_tokenizer`` writes ``DIR/tokenizer.msgpack`` from a workdir whose tokenizer has
finished training. A config whose ``tokenizer_training.pretrained`` names such a file (local or
``gs://``) trains no tokenizer: ``inference/restore.py`` reads its parameters instead. The file
keeps the tokenizer's config (``config.tokenizer``, the codebook size and the image channels),
and reading it into a config that builds a different tokenizer is an error naming the keys.
"""

import json
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
from flax import traverse_util

from nested_decode import config_lib, io_utils
from nested_decode.networks import weight_shapes

KEY = 'tokenizer_training.pretrained'


def pretrained_path(config: ml_collections.ConfigDict) -> str:
  """The file ``config.tokenizer_training.pretrained`` names, or '' (train a tokenizer)."""
  return config.tokenizer_training.get('pretrained', '')


def description(config: ml_collections.ConfigDict) -> dict:
  """What fixes a tokenizer's parameters and tokens: its config, codebook and image channels."""
  return dict(tokenizer=config.tokenizer.to_dict(), codebook_size=config.tokens.codebook_size,
              image_channels=config.data.channels)


def write(config: ml_collections.ConfigDict, params: Any, path: str) -> None:
  """``params`` (``{'params': ...}``) of ``config``'s tokenizer to ``path``, atomically."""
  payload = dict(description=json.dumps(description(config), sort_keys=True),
                 params=jax.device_get(params))
  io_utils.write_bytes(path, flax.serialization.msgpack_serialize(payload))


def read(config: ml_collections.ConfigDict, abstract_params: Any) -> Any:
  """The parameters in ``config``'s pretrained file as numpy arrays, checked against the
  tokenizer ``config`` builds (its ``description`` and every shape of ``abstract_params``)."""
  path = pretrained_path(config)
  if not io_utils.exists(path):
    raise config_lib.ConfigError(f'config.{KEY}={path!r}: no such file (write one with '
                                 '--mode=export_tokenizer)')
  payload = flax.serialization.msgpack_restore(io_utils.read_bytes(path))
  saved, wanted = json.loads(payload['description']), description(config)
  wanted = json.loads(json.dumps(wanted))  # tuples as lists, as saved
  if saved != wanted:
    differ = sorted(_differences(saved, wanted))
    raise config_lib.ConfigError(
        f'config.{KEY}={path!r} holds a tokenizer of another config: {"; ".join(differ)}')
  params = jax.tree.map(np.asarray, payload['params'])
  weight_shapes.check_matches(
      traverse_util.flatten_dict(params),
      {key: tuple(leaf.shape) for key, leaf in traverse_util.flatten_dict(abstract_params).items()},
      f'config.{KEY}={path!r}')
  return params


def _differences(saved: dict, wanted: dict, prefix: str = '') -> list[str]:
  out = []
  for key in sorted(saved.keys() | wanted.keys()):
    a, b = saved.get(key), wanted.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _differences(a, b, f'{prefix}{key}.')
    elif a != b:
      out.append(f'{prefix}{key} is {a!r} in the file, {b!r} in the config')
  return out
