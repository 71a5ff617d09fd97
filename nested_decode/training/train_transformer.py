"""Nested joint training of the masked transformer on VQ tokens, resumable from checkpoints."""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh

from nested_decode import checkpoints, config_lib, io_utils, parallel, tasks
from nested_decode.models.transformer import NestedMaskedTransformer
from nested_decode.training import loop, objective


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays
  # The exponential moving average of ``params`` (``training.ema_decay``; None when 0), which
  # sampling and evaluation use when a checkpoint has it (inference/restore.py).
  ema_params: Any = None
  schedule: 'Segment | None' = None  # the schedules' segment this state trains in


@flax.struct.dataclass
class Segment:
  """Where the learning-rate and distillation schedules run: from step ``start`` for ``steps``
  steps, the distillation weight going from ``distill_lambda`` to
  ``training.distill_lambda_end``. A run has one segment from 0 to ``training.num_steps``; a
  declared warm restart (``training.restart='warm'``) opens another one where it resumes."""
  start: int
  steps: int
  distill_lambda: float

  @classmethod
  def first(cls, training: ml_collections.ConfigDict) -> 'Segment':
    return cls(0, training.num_steps, training.distill_lambda_start)

  def as_arrays(self) -> 'Segment':
    return Segment(jnp.int32(self.start), jnp.int32(self.steps),
                   jnp.float32(self.distill_lambda))

  def distill_lambda_at(self, step, end: float):
    return objective.linear_lambda(step - self.start, self.steps, self.distill_lambda, end)


def segment_to_train(training: ml_collections.ConfigDict, saved: Segment | None,
                     step: int) -> Segment:
  """The segment a run resumed at ``step`` trains in. Resumed with a larger
  ``training.num_steps``, ``restart='none'`` keeps the saved schedules (past their end the
  learning rate stays at its final value and the distillation weight at its end) and
  ``restart='warm'`` opens a segment from ``step`` to the new end: the learning rate warms up
  and decays again, the distillation weight goes on from its value at ``step``."""
  if saved is None:
    return Segment.first(training)
  saved = Segment(int(saved.start), int(saved.steps), float(saved.distill_lambda))
  end = saved.start + saved.steps
  if training.num_steps <= end:
    return saved
  if training.restart == 'warm':
    logging.warning('Warm restart at step %d: the schedules run again to training.num_steps=%d',
                    step, training.num_steps)
    lam = float(saved.distill_lambda_at(step, training.distill_lambda_end))
    return Segment(step, training.num_steps - step, lam)
  logging.warning(
      'training.num_steps=%d is past the end of the schedules this run started with (step %d): '
      'the learning rate stays at its final value and the distillation weight at its end; set '
      "training.restart='warm' to run the schedules again from step %d", training.num_steps,
      end, step)
  return saved


def saved_segment(workdir: str) -> tuple[Segment | None, int]:
  """The segment and step of the latest transformer checkpoint in ``workdir`` ((None, 0) when
  there is none), read without the rest of the state."""
  directory = checkpoints.checkpoint_dir(workdir, checkpoints.TRANSFORMER)
  if not io_utils.exists(directory):
    return None, 0
  checkpointer = checkpoints.Checkpointer(directory)
  if checkpointer.latest_step() is None:
    return None, 0
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)
  abstract = Segment(scalar(jnp.int32), scalar(jnp.int32), scalar(jnp.float32))
  step = int(checkpointer.restore_params(scalar(jnp.int32), entry='step'))
  return checkpointer.restore_params(abstract, entry='schedule'), step


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """The averaging weight of the old EMA at ``step``: ``decay``, lowered early in training to
  ``(1 + step) / (10 + step)`` (TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``),
  so a short run's average is not dominated by the initial weights; from step ~9000 on (at
  0.999) it is ``decay`` itself."""
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def updated_ema(ema_params: Any, params: Any, step: jax.Array, decay: float) -> Any:
  weight = ema_decay_at(step, decay)
  return jax.tree.map(lambda ema, new: weight * ema + (1 - weight) * new, ema_params, params)


def is_kernel(params: Any) -> Any:
  """True at the dense kernels, the only parameters weight decay applies to (LayerNorm scales
  and biases, biases and embedding tables are not decayed, as in MaskGIT-style recipes)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(key, 'key', None) == 'kernel' for key in path), params)


def make_optimizer(training: ml_collections.ConfigDict, segment: Segment | None = None
                   ) -> optax.GradientTransformation:
  """AdamW whose learning rate follows ``segment`` (default: the first, from step 0); the
  schedule reads the optimizer's update count, which is the train step."""
  segment = Segment.first(training) if segment is None else segment
  return optax.chain(
      optax.clip_by_global_norm(training.grad_clip),
      optax.adamw(loop.lr_schedule(training, segment.start, segment.steps), b1=training.b1,
                  b2=training.b2, weight_decay=training.weight_decay, mask=is_kernel))


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
                      opt_state=optimizer.init(params), rng=train_rng,
                      ema_params=params if config.training.ema_decay > 0 else None,
                      schedule=Segment.first(config.training).as_arrays())
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
                    mesh: Mesh, segment: Segment | None = None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The compiled step, its schedules in ``segment`` (default: the first); the state keeps its
  shardings on ``mesh`` and is donated, batches come split over ``('data', 'fsdp')``
  (``parallel.shard_batch``), metrics come back replicated. It runs (and lowers) with ``mesh``
  as the context mesh (``parallel.under_mesh``)."""
  shardings = state_shardings(config, model, mesh)
  training = config.training
  segment = Segment.first(training) if segment is None else segment
  optimizer = make_optimizer(training, segment)
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
    lam = segment.distill_lambda_at(state.step, training.distill_lambda_end)
    rngs = {}
    if mc.dropout_rate > 0 or mc.attention_dropout_rate > 0:  # else the stream is as before
      rng, rngs['dropout'] = jax.random.split(rng)

    def loss_fn(params):
      logits = dict(zip(widths, model.apply(params, inputs, labels, width_factor=widths,
                                            train=True, rngs=rngs)[0]))
      return objective.nested_losses(logits, tokens, mask, training.label_smoothing, lam)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_params is not None:
      ema_params = updated_ema(ema_params, params, state.step, training.ema_decay)
    learning_rate = loop.lr_schedule(training, segment.start, segment.steps)(state.step)
    metrics.update(loss=loss, distill_lambda=lam, grad_norm=optax.tree.norm(grads),
                   learning_rate=learning_rate)
    return TrainState(state.step + 1, params, opt_state, rng, ema_params,
                      segment.as_arrays()), metrics

  jitted = jax.jit(train_step, in_shardings=(shardings, parallel.batch_sharding(mesh)),
                   out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))
  return parallel.under_mesh(jitted, mesh, parallel.logical_rules(config))


def train(config: ml_collections.ConfigDict, workdir: str, make_iterator: loop.MakeIterator,
          iterator_state: loop.IteratorState, mesh: Mesh, stop_after: int | None = None,
          initial_params: Callable[[], Any | None] = lambda: None) -> TrainState:
  """Trains to ``config.training.num_steps`` on ``mesh``, resuming from the latest checkpoint
  (``stop_after``: return after that many steps of this run). A run with no checkpoint starts
  from the weights ``initial_params()`` gives (``training.init_from``; the weight average too,
  if any), or from a random initialisation when it gives None; a resumed run never calls it."""
  training = config.training
  model = NestedMaskedTransformer(config_lib.transformer_config(config))
  parallel.check_batch_size(training.batch_size, mesh, 'training.batch_size')
  saved, step = saved_segment(workdir)
  segment = segment_to_train(training, saved, step)
  state = create_train_state(config, model, mesh)
  initial = initial_params() if saved is None else None
  if initial is not None:
    logging.info('Starting the transformer from %s', config.training.init_from)
    params = jax.device_put(initial, jax.tree.map(lambda x: x.sharding, state.params))
    state = state.replace(params=params,
                          ema_params=None if state.ema_params is None else params)
  return loop.run(
      name=checkpoints.TRANSFORMER, config=config, workdir=workdir, initial_state=state,
      train_step=make_train_step(config, model, mesh, segment),
      batches=(make_iterator, iterator_state),
      prepare=lambda batch: parallel.shard_batch(batch, mesh),
      num_steps=training.num_steps, log_every=training.log_every,
      checkpoint_every=training.checkpoint_every, keep_checkpoints=training.keep_checkpoints,
      stop_after=stop_after)
