"""A trained transformer in one file, for jobs that start training from it.

``--mode=export_transformer`` writes ``DIR/transformer.msgpack`` from a workdir whose
transformer has finished training: the weights it samples with (the weight average when there
is one). A config whose ``training.init_from`` names such a file (local or ``gs://``) starts its
transformer from those weights instead of a random initialisation, with a fresh optimizer and
its own schedules; a run that resumes from a checkpoint ignores it.

Token ids mean nothing without the tokenizer that made them, so the file keeps a fingerprint of
the tokenizer's parameters beside the token grid and task, and reading it into a job with
another tokenizer is an error naming what differs.
"""

import hashlib
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from nested_decode.inference import model_file

KEY = 'training.init_from'


def init_path(config: ml_collections.ConfigDict) -> str:
  """The file ``config.training.init_from`` names, or '' (a random initialisation)."""
  return config.training.get('init_from', '')


def fingerprint(params: Any) -> str:
  """A digest of every array (name, dtype, shape and bytes) of a parameter tree."""
  digest = hashlib.sha256()
  for name, leaf in sorted(traverse_util.flatten_dict(jax.device_get(params), sep='/').items()):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f'{name}:{leaf.dtype}:{leaf.shape};'.encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()[:16]


def description(config: ml_collections.ConfigDict, tokenizer_params: Any) -> dict:
  """What a transformer's weights mean: the token grid and codebook, the task, and the
  tokenizer (``fingerprint`` of its parameters) whose tokens it learned."""
  task = config.get('task')
  return dict(tokens=config.tokens.to_dict(), task=task.to_dict() if task else None,
              tokenizer=fingerprint(tokenizer_params))


def write(config: ml_collections.ConfigDict, tokenizer_params: Any, params: Any,
          path: str) -> None:
  model_file.write(path, description(config, tokenizer_params), params)


def read(config: ml_collections.ConfigDict, tokenizer_params: Any, abstract_params: Any) -> Any:
  """The weights in ``config``'s ``training.init_from`` file, checked against ``config``'s
  tokens, task and tokenizer and against every shape of ``abstract_params``."""
  return model_file.read(init_path(config), key=KEY, what='transformer',
                         written_by='--mode=export_transformer',
                         description=description(config, tokenizer_params),
                         abstract_params=abstract_params)
