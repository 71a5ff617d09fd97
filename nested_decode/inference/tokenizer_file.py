"""A trained tokenizer in one file, for jobs that use it instead of training their own.

``--mode=export_tokenizer`` writes ``DIR/tokenizer.msgpack`` from a workdir whose tokenizer has
finished training. A config whose ``tokenizer_training.pretrained`` names such a file (local or
``gs://``) trains no tokenizer: ``inference/restore.py`` reads its parameters instead. The file
keeps the tokenizer's config (``config.tokenizer``, the codebook size and the image channels),
and reading it into a config that builds a different tokenizer is an error naming the keys.
"""

from typing import Any

import ml_collections

from nested_decode.inference import model_file

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
  model_file.write(path, description(config), params)


def read(config: ml_collections.ConfigDict, abstract_params: Any) -> Any:
  """The parameters in ``config``'s pretrained file as numpy arrays, checked against the
  tokenizer ``config`` builds (its ``description`` and every shape of ``abstract_params``)."""
  return model_file.read(pretrained_path(config), key=KEY, what='tokenizer',
                         written_by='--mode=export_tokenizer', description=description(config),
                         abstract_params=abstract_params)
