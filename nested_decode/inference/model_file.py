"""One trained model in one file: its parameters beside a description of what fixes them.

``tokenizer_file`` and ``transformer_file`` say what each model's description holds. Reading a
file checks its description against the config's and every array's shape against the model's,
and names what differs.
"""

import json
from typing import Any

import flax
import jax
import numpy as np
from flax import traverse_util

from nested_decode import config_lib, io_utils
from nested_decode.networks import weight_shapes


def write(path: str, description: dict, params: Any) -> None:
  """``params`` and ``description`` (JSON-serialisable) to ``path``, atomically."""
  payload = dict(description=json.dumps(description, sort_keys=True),
                 params=jax.device_get(params))
  io_utils.write_bytes(path, flax.serialization.msgpack_serialize(payload))


def read(path: str, *, key: str, what: str, written_by: str, description: dict,
         abstract_params: Any) -> Any:
  """The parameters of the ``what`` (a model's name) in ``path`` as numpy arrays, checked
  against ``description`` and the shapes of ``abstract_params``; errors name the config key
  ``key`` that gave the path, and ``written_by`` (the mode that writes such files)."""
  if not io_utils.exists(path):
    raise config_lib.ConfigError(f'config.{key}={path!r}: no such file (write one with '
                                 f'{written_by})')
  payload = flax.serialization.msgpack_restore(io_utils.read_bytes(path))
  saved = json.loads(payload['description'])
  wanted = json.loads(json.dumps(description))  # tuples as lists, as saved
  if saved != wanted:
    differ = sorted(_differences(saved, wanted))
    raise config_lib.ConfigError(
        f'config.{key}={path!r} holds a {what} of another config: {"; ".join(differ)}')
  params = jax.tree.map(np.asarray, payload['params'])
  weight_shapes.check_matches(
      traverse_util.flatten_dict(params),
      {name: tuple(leaf.shape)
       for name, leaf in traverse_util.flatten_dict(abstract_params).items()},
      f'config.{key}={path!r}')
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
