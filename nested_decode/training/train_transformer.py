"""Nested joint training of the masked transformer on VQ tokens, resumable from checkpoints."""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from nested_decode import checkpoints, config_lib, parallel, tasks
from nested_decode.models.transformer import NestedMaskedTransformer
from nested_decode.training import loop, objective


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays


def is_kernel(params: Any) -> Any:
  """True at the dense kernels, the only parameters weight decay applies to (LayerNorm scales
  and biases, biases and embedding tables are not decayed, as in MaskGIT-style recipes)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(key, 'key', None) == 'kernel' for key in path), params)


def make_optimizer(training: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(training.grad_clip),
      optax.adamw(loop.lr_schedule(training), b1=training.b1, b2=training.b2,
                  weight_decay=training.weight_decay, mask=is_kernel))


def boxed_init(config: ml_collections.ConfigDict, model: NestedMaskedTransformer
               ) -> Callable[[], TrainState]:
  """The initialiser of the train state, parameters and their optimizer state still boxed
  with logical axis names (``parallel.state_shardings`` reads them)."""
  def init() -> TrainState:
    rng = jax.random.PRNGKey(config.seed)
    init_rng, train_rng = jax.random.split(rng)
    tokens = jnp.zeros((1, model.config.seq_len), jnp.int32)
    labels = jnp.zeros((1,), jnp.int32)
    params = model.init(init_rng, tokens, labels)
    optimizer = make_optimizer(config.training)
    return TrainState(step=jnp.array(0, jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=train_rng)
  return init


def state_shardings(config: ml_collections.ConfigDict, model: NestedMaskedTransformer,
                    mesh: Mesh) -> TrainState:
  """Where each leaf of the train state lives on ``mesh`` (``parallel.RULES``)."""
  return parallel.state_shardings(jax.eval_shape(boxed_init(config, model)), mesh,
                                  parallel.logical_rules(config))


def create_train_state(config: ml_collections.ConfigDict, model: NestedMaskedTransformer,
                       mesh: Mesh) -> TrainState:
  """The initial train state, created directly sharded over ``mesh``."""
  return parallel.sharded_init(boxed_init(config, model), state_shardings(config, model, mesh))


def make_train_step(config: ml_collections.ConfigDict, model: NestedMaskedTransformer,
                    mesh: Mesh) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The compiled step; the state keeps its shardings on ``mesh`` and is donated, batches come
  split over ``('data', 'fsdp')`` (``parallel.shard_batch``), metrics come back replicated. It
  runs (and lowers) with ``mesh`` as the context mesh (``parallel.under_mesh``)."""
  shardings = state_shardings(config, model, mesh)
  training = config.training
  optimizer = make_optimizer(training)
  widths = objective.widths_in_order(training.widths)
  mc = model.config
  generated = ~tasks.task_of(config).given_mask()

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng, mask_rng, drop_rng = jax.random.split(state.rng, 3)
    tokens, labels = batch['tokens'], batch['label']
    mask = objective.random_mask(mask_rng, *tokens.shape, maskable=generated)
    inputs = jnp.where(mask, mc.mask_id, tokens)
    dropped = jax.random.uniform(drop_rng, labels.shape) < training.label_dropout
    labels = jnp.where(dropped, mc.unconditional_id, labels)
    lam = objective.linear_lambda(state.step, training.num_steps,
                                  training.distill_lambda_start, training.distill_lambda_end)

    def loss_fn(params):
      logits = dict(zip(widths, model.apply(params, inputs, labels, width_factor=widths)[0]))
      return objective.nested_losses(logits, tokens, mask, training.label_smoothing, lam)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update(loss=loss, distill_lambda=lam, grad_norm=optax.tree.norm(grads),
                   learning_rate=loop.lr_schedule(training)(state.step))
    return TrainState(state.step + 1, params, opt_state, rng), metrics

  jitted = jax.jit(train_step, in_shardings=(shardings, parallel.batch_sharding(mesh)),
                   out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))
  return parallel.under_mesh(jitted, mesh, parallel.logical_rules(config))


def train(config: ml_collections.ConfigDict, workdir: str, make_iterator: loop.MakeIterator,
          iterator_state: loop.IteratorState, mesh: Mesh, stop_after: int | None = None
          ) -> TrainState:
  """Trains to ``config.training.num_steps`` on ``mesh``, resuming from the latest checkpoint
  (``stop_after``: return after that many steps of this run)."""
  training = config.training
  model = NestedMaskedTransformer(config_lib.transformer_config(config))
  parallel.check_batch_size(training.batch_size, mesh, 'training.batch_size')
  return loop.run(
      name=checkpoints.TRANSFORMER, config=config, workdir=workdir,
      initial_state=create_train_state(config, model, mesh),
      train_step=make_train_step(config, model, mesh), batches=(make_iterator, iterator_state),
      prepare=lambda batch: parallel.shard_batch(batch, mesh),
      num_steps=training.num_steps, log_every=training.log_every,
      checkpoint_every=training.checkpoint_every, keep_checkpoints=training.keep_checkpoints,
      stop_after=stop_after)
