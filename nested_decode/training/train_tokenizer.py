"""VQGAN tokenizer training: L2 reconstruction, codebook and commitment losses, dead-code restarts,
and an optional adversarial loss with an R1-penalised patch discriminator."""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from nested_decode import checkpoints, parallel
from nested_decode.checkpoints import path_name
from nested_decode.data import pixels
from nested_decode.inference.tokenizer import example_shape, host_inputs, tokenizer_config
from nested_decode.models import vqgan
from nested_decode.training import loop


@flax.struct.dataclass
class TokenizerState:
  step: jax.Array
  params: Any
  opt_state: Any
  disc_params: Any      # empty when the adversarial loss is off
  disc_opt_state: Any
  usage_ema: jax.Array  # [K] picks per batch, for dead-code restarts
  rng: jax.Array


def _optimizer(training: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(training.grad_clip),
                     optax.adam(loop.lr_schedule(training), b1=training.b1, b2=training.b2))


def _discriminator(training: ml_collections.ConfigDict) -> vqgan.PatchDiscriminator:
  return vqgan.PatchDiscriminator(base_channels=training.discriminator_channels)


def _init_fn(config: ml_collections.ConfigDict) -> Callable[[], TokenizerState]:
  training = config.tokenizer_training

  def init() -> TokenizerState:
    model = vqgan.VQGAN(tokenizer_config(config))
    rng = jax.random.PRNGKey(config.seed)
    init_rng, disc_rng, train_rng = jax.random.split(rng, 3)
    images = jnp.zeros((1,) + example_shape(config, training.get('num_frames', 1)), jnp.float32)
    params = {'params': model.init(init_rng, images)['params']}  # not the sown intermediates
    optimizer = _optimizer(training)
    disc_params, disc_opt_state = {}, {}
    if training.adversarial_weight > 0:
      disc_params = _discriminator(training).init(disc_rng, images)
      disc_opt_state = optimizer.init(disc_params)
    return TokenizerState(
        step=jnp.array(0, jnp.int32), params=params, opt_state=optimizer.init(params),
        disc_params=disc_params, disc_opt_state=disc_opt_state,
        usage_ema=jnp.full((config.tokens.codebook_size,), training.dead_code_threshold * 2,
                           jnp.float32),
        rng=train_rng)
  return init


def state_shardings(config: ml_collections.ConfigDict, mesh: Mesh) -> TokenizerState:
  """The convolutions have no logical axis names: large arrays are split over ``fsdp``
  (``parallel.fsdp_shardings``), the rest replicated; the batch goes over data x fsdp."""
  return parallel.fsdp_shardings(jax.eval_shape(_init_fn(config)), mesh)


def create_state(config: ml_collections.ConfigDict, mesh: Mesh) -> TokenizerState:
  """The initial state, created directly sharded over ``mesh``."""
  return parallel.sharded_init(_init_fn(config), state_shardings(config, mesh))


def with_codebook(params: Any, codebook: jax.Array) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda path, x: codebook if path_name(path) == 'params/quantizer/codebook' else x, params)


def make_train_step(config: ml_collections.ConfigDict, mesh: Mesh):
  """The compiled step over a uint8 batch split over data x fsdp (``parallel.shard_batch`` of
  ``host_inputs``); the state keeps its shardings and is donated. It runs with ``mesh`` as the
  context mesh, so the feature maps stay split over the batch (``vqgan.conv``)."""
  shardings = state_shardings(config, mesh)
  training = config.tokenizer_training
  model = vqgan.VQGAN(tokenizer_config(config))
  optimizer = _optimizer(training)
  discriminator = _discriminator(training)
  adversarial = training.adversarial_weight > 0
  codebook_size = config.tokens.codebook_size

  def generator_loss(params, disc_params, images):
    (reconstruction, ids, stats), state = model.apply(params, images,
                                                      mutable=['intermediates'])
    loss, metrics = vqgan.tokenizer_loss(reconstruction, images, stats,
                                         model.config.commitment_cost)
    if adversarial:
      fake_logits = discriminator.apply(disc_params, reconstruction)
      adversarial_loss = vqgan.generator_adversarial_loss(fake_logits)
      loss = loss + training.adversarial_weight * adversarial_loss
      metrics['generator_adversarial_loss'] = adversarial_loss
    encodings = state['intermediates']['encodings'][0]
    return loss, (metrics, ids, reconstruction, encodings)

  def discriminator_loss(disc_params, images, reconstruction):
    apply = discriminator.apply
    loss = vqgan.discriminator_loss(apply(disc_params, images),
                                    apply(disc_params, jax.lax.stop_gradient(reconstruction)))
    r1 = vqgan.r1_penalty(apply, disc_params, images)
    return loss + training.r1_gamma / 2 * r1, {'discriminator_loss': loss, 'r1_penalty': r1}

  def train_step(state: TokenizerState, images: jax.Array):
    images = pixels.to_float(images)
    rng, restart_rng = jax.random.split(state.rng)
    grad_fn = jax.value_and_grad(generator_loss, has_aux=True)
    (loss, (metrics, ids, reconstruction, encodings)), grads = grad_fn(
        state.params, state.disc_params, images)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    usage = vqgan.update_usage_ema(state.usage_ema, ids, codebook_size, training.usage_decay)
    restart_now = (state.step + 1) % training.restart_every == 0
    codebook = params['params']['quantizer']['codebook']
    restarted = vqgan.restart_dead_codes(codebook, usage,
                                         encodings.reshape(-1, encodings.shape[-1]),
                                         restart_rng, training.dead_code_threshold)
    dead = usage < training.dead_code_threshold
    metrics['dead_codes'] = jnp.sum(dead)
    params = with_codebook(params, jnp.where(restart_now, restarted, codebook))
    # A restarted code gets a fresh usage estimate, so it is not restarted again at once.
    usage = jnp.where(restart_now & dead, training.dead_code_threshold * 2, usage)

    disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
    if adversarial:
      (_, disc_metrics), disc_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(
          disc_params, images, reconstruction)
      disc_updates, disc_opt_state = optimizer.update(disc_grads, disc_opt_state, disc_params)
      disc_params = optax.apply_updates(disc_params, disc_updates)
      metrics.update(disc_metrics)
    metrics['loss'] = loss
    new_state = TokenizerState(state.step + 1, params, opt_state, disc_params, disc_opt_state,
                               usage, rng)
    return new_state, metrics

  jitted = jax.jit(train_step, in_shardings=(shardings, parallel.batch_sharding(mesh)),
                   out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))
  return parallel.under_mesh(jitted, mesh, parallel.logical_rules(config))


def train(config: ml_collections.ConfigDict, workdir: str, make_iterator: loop.MakeIterator,
          iterator_state: loop.IteratorState, mesh: Mesh) -> TokenizerState:
  """Trains to ``config.tokenizer_training.num_steps`` on ``mesh``, resuming from the latest
  checkpoint."""
  training = config.tokenizer_training
  parallel.check_batch_size(training.batch_size, mesh, 'tokenizer_training.batch_size')
  return loop.run(
      name=checkpoints.TOKENIZER, config=config, workdir=workdir,
      initial_state=create_state(config, mesh),
      train_step=make_train_step(config, mesh), batches=(make_iterator, iterator_state),
      prepare=lambda batch: parallel.shard_batch(host_inputs(config, batch), mesh),
      num_steps=training.num_steps,
      log_every=training.log_every, checkpoint_every=training.checkpoint_every,
      keep_checkpoints=2)
