"""Nested joint training of the masked transformer on VQ tokens, resumable from checkpoints."""

import os
from typing import Any, Callable, Iterator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from nested_decode import config_lib
from nested_decode.models.transformer import NestedMaskedTransformer
from nested_decode.training import objective
from nested_decode.training.checkpoints import Checkpointer
from nested_decode.training.metrics import MetricLogger


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays


def lr_schedule(training: ml_collections.ConfigDict) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=training.learning_rate,
      warmup_steps=min(training.warmup_steps, training.num_steps - 1),
      decay_steps=training.num_steps, end_value=training.learning_rate * training.final_lr_fraction)


def make_optimizer(training: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(training.grad_clip),
      optax.adamw(lr_schedule(training), b1=training.b1, b2=training.b2,
                  weight_decay=training.weight_decay))


def create_train_state(config: ml_collections.ConfigDict, model: NestedMaskedTransformer
                       ) -> TrainState:
  rng = jax.random.PRNGKey(config.seed)
  init_rng, train_rng = jax.random.split(rng)
  tokens = jnp.zeros((1, model.config.seq_len), jnp.int32)
  labels = jnp.zeros((1,), jnp.int32)
  params = nn.unbox(model.init(init_rng, tokens, labels))
  optimizer = make_optimizer(config.training)
  return TrainState(step=jnp.array(0, jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=train_rng)


def make_train_step(config: ml_collections.ConfigDict, model: NestedMaskedTransformer
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  training = config.training
  optimizer = make_optimizer(training)
  widths = objective.widths_in_order(training.widths)
  mc = model.config

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng, mask_rng, drop_rng = jax.random.split(state.rng, 3)
    tokens, labels = batch['tokens'], batch['label']
    mask = objective.random_mask(mask_rng, *tokens.shape)
    inputs = jnp.where(mask, mc.mask_id, tokens)
    dropped = jax.random.uniform(drop_rng, labels.shape) < training.label_dropout
    labels = jnp.where(dropped, mc.unconditional_id, labels)
    lam = objective.linear_lambda(state.step, training.num_steps,
                                  training.distill_lambda_start, training.distill_lambda_end)

    def loss_fn(params):
      logits = {p: model.apply(params, inputs, labels, width_factor=p)[0] for p in widths}
      return objective.nested_losses(logits, tokens, mask, training.label_smoothing, lam)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update(loss=loss, distill_lambda=lam, grad_norm=optax.tree.norm(grads),
                   learning_rate=lr_schedule(training)(state.step))
    return TrainState(state.step + 1, params, opt_state, rng), metrics

  return jax.jit(train_step, donate_argnums=(0,))


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, 'transformer')


def is_trained(config: ml_collections.ConfigDict, workdir: str) -> bool:
  directory = checkpoint_dir(workdir)
  return os.path.isdir(directory) and Checkpointer(directory).latest_step() == \
      config.training.num_steps


def load_params(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Parameters of the latest transformer checkpoint in ``workdir``."""
  model = NestedMaskedTransformer(config_lib.transformer_config(config))
  abstract = jax.eval_shape(lambda: create_train_state(config, model))
  state, _, _ = Checkpointer(checkpoint_dir(workdir)).restore(abstract)
  return state.params


def train(config: ml_collections.ConfigDict, workdir: str,
          make_iterator: Callable[[Any], Iterator[dict]],
          iterator_state: Callable[[Iterator[dict]], Any],
          stop_after: int | None = None) -> TrainState:
  """Trains to ``config.training.num_steps``, resuming from the latest checkpoint.

  ``make_iterator(state_or_None)`` gives the batch iterator (restored to a saved position when
  given one) and ``iterator_state(it)`` its JSON-serialisable position. ``stop_after`` ends the
  run early after that many steps of this call, as a preemption would (used by tests).
  """
  training = config.training
  model = NestedMaskedTransformer(config_lib.transformer_config(config))
  checkpointer = Checkpointer(checkpoint_dir(workdir), max_to_keep=training.keep_checkpoints)
  state = create_train_state(config, model)
  data_state = None
  if checkpointer.latest_step() is not None:
    state, data_state, _ = checkpointer.restore(jax.eval_shape(lambda: state))
    logging.info('Resuming transformer training from step %d', int(state.step))
  iterator = make_iterator(data_state)
  train_step = make_train_step(config, model)
  logger = MetricLogger(workdir, 'transformer', training.num_steps)
  start = int(state.step)
  for step in range(start + 1, training.num_steps + 1):
    batch = next(iterator)
    state, metrics = train_step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    logger.accumulate(metrics)
    loss = float(metrics['loss'])
    if not np.isfinite(loss):
      raise FloatingPointError(f'Transformer loss became {loss} at step {step}; the last good '
                               f'checkpoint in {checkpointer.directory} is kept')
    if step % training.log_every == 0 or step == training.num_steps:
      logger.write(step)
    if step % training.checkpoint_every == 0 or step == training.num_steps:
      checkpointer.save(step, state, iterator_state(iterator), config)
    if stop_after is not None and step - start >= stop_after:
      break
  checkpointer.close()
  return state
