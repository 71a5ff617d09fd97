"""The trained parameters in a workdir: whether each model finished training, and its latest
checkpoint's parameters restored onto a mesh (the optimizer state is never read).

A trainer writes its checkpoints to ``<workdir>/<name>/`` (``checkpoints.TOKENIZER``,
``checkpoints.TRANSFORMER``). A transformer trained with ``training.ema_decay > 0`` samples with
the moving average of its weights (``EMA``), as MaskGIT's did.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from nested_decode import config_lib, parallel
from nested_decode.checkpoints import (
  TOKENIZER,
  TRANSFORMER,
  Checkpointer,
  checkpoint_dir,
  is_finished,
)
from nested_decode.inference import tokenizer, tokenizer_file, transformer_file
from nested_decode.models import vqgan
from nested_decode.models.transformer import NestedMaskedTransformer


def tokenizer_is_trained(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Whether the workdir's tokenizer finished training, or the config names a pretrained one."""
  return bool(tokenizer_file.pretrained_path(config)) or is_finished(
      workdir, TOKENIZER, config.tokenizer_training.num_steps)


def transformer_is_trained(config: ml_collections.ConfigDict, workdir: str) -> bool:
  return is_finished(workdir, TRANSFORMER, config.training.num_steps)


# Which of a transformer checkpoint's weights sampling uses.
EMA, TRAINED = 'ema_params', 'params'


def restore_params(workdir: str, name: str, abstract_params: Any, entry: str = TRAINED) -> Any:
  """The parameters ``entry`` of trainer ``name``'s latest checkpoint, shape-checked against
  the model."""
  return Checkpointer(checkpoint_dir(workdir, name)).restore_params(abstract_params,
                                                                    entry=entry)


def transformer_weights(workdir: str) -> str:
  """``EMA`` when the transformer's latest checkpoint holds a weight average, else ``TRAINED``."""
  entries = Checkpointer(checkpoint_dir(workdir, TRANSFORMER)).state_entries()
  return EMA if EMA in entries else TRAINED


def tokenizer_params(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> Any:
  """The tokenizer's latest parameters, or those of the file ``tokenizer_training.pretrained``
  names (``tokenizer_file.py``), large convolutions split over ``fsdp`` as in training
  (``parallel.fsdp_shardings``)."""
  model = vqgan.VQGAN(tokenizer.tokenizer_config(config))
  shape = tokenizer.example_shape(config, config.tokenizer_training.get('num_frames', 1))
  init = lambda: {'params': model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape))['params']}
  shardings = parallel.fsdp_shardings(jax.eval_shape(init), mesh)
  abstract = parallel.abstract_state(init, shardings)
  if tokenizer_file.pretrained_path(config):
    return jax.device_put(tokenizer_file.read(config, abstract), shardings)
  return restore_params(workdir, TOKENIZER, abstract)


def abstract_transformer_params(config: ml_collections.ConfigDict, mesh: Mesh) -> Any:
  """Shapes, dtypes and placements of the transformer's parameters, by their logical axes
  (``parallel.RULES`` or ``config.mesh.rules``) as in training."""
  model = NestedMaskedTransformer(config_lib.transformer_config(config))
  tokens = jnp.zeros((1, model.config.seq_len), jnp.int32)
  init = lambda: model.init(jax.random.PRNGKey(0), tokens, jnp.zeros((1,), jnp.int32))
  shardings = parallel.state_shardings(jax.eval_shape(init), mesh, parallel.logical_rules(config))
  return parallel.abstract_state(init, shardings)


def transformer_params(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
                       weights: str | None = None) -> Any:
  """The transformer's latest parameters, placed as in training: ``weights`` (``EMA`` or
  ``TRAINED``; default ``transformer_weights(workdir)``, the average when there is one)."""
  weights = transformer_weights(workdir) if weights is None else weights
  return restore_params(workdir, TRANSFORMER, abstract_transformer_params(config, mesh), weights)


def initial_transformer_params(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh
                               ) -> Any | None:
  """The weights of the file ``training.init_from`` names (``transformer_file.py``) as numpy
  arrays, checked against the workdir's tokenizer and the model's shapes (the trainer places
  them with its state); None when it names none."""
  if not transformer_file.init_path(config):
    return None
  return transformer_file.read(config, tokenizer_params(config, workdir, mesh),
                               abstract_transformer_params(config, mesh))
