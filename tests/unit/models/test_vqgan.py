import functools
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nested_decode.models import conv3d, vqgan
from nested_decode.models.vqgan import VQGAN, TokenizerConfig

MNIST = TokenizerConfig(image_channels=1, base_channels=8, channel_multipliers=(1, 2, 4),
                        num_res_blocks=1, embedding_dim=8, codebook_size=16, num_groups=4)
RGB = MNIST._replace(image_channels=3, channel_multipliers=(1, 1, 2))
TINY = MNIST._replace(channel_multipliers=(1, 2))  # 16x16 -> 8x8, for the gradient-heavy tests


def rbg_key(seed: int) -> jax.Array:
  """An ``rbg`` key: initializers then compile in seconds rather than ~10 s with threefry."""
  return jax.random.key(seed, impl='rbg')


@functools.cache
def init_params(config: TokenizerConfig, image_shape: tuple[int, ...]):
  images = jnp.zeros((1,) + image_shape, jnp.float32)
  return jax.jit(VQGAN(config).init)(rbg_key(0), images)


def blobs(num: int, size: int, seed: int = 0) -> np.ndarray:
  """Sums of three random Gaussian blobs, scaled to [-1, 1], ``[num, size, size, 1]``."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  images = np.zeros((num, size, size, 1), np.float32)
  for image in images:
    for _ in range(3):
      cy, cx = rng.uniform(0, size, 2)
      width = rng.uniform(1.5, 4.0)
      image[..., 0] += rng.uniform(0.5, 1.0) * np.exp(
          -((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width ** 2))
  return np.clip(images, 0, 1) * 2 - 1


@pytest.mark.parametrize('config,image_shape,grid', [(MNIST, (28, 28, 1), (7, 7)),
                                                     (RGB, (32, 32, 3), (8, 8))])
def test_encode_decode_shapes(config, image_shape, grid):
  model = VQGAN(config)
  params = init_params(config, image_shape)
  images = jax.random.uniform(jax.random.key(1), (2,) + image_shape, minval=-1, maxval=1)

  @jax.jit
  def run(params, images):
    ids, quantized, stats = model.apply(params, images, method=model.encode)
    decoded = model.apply(params, ids, method=model.decode_ids)
    return ids, quantized, stats, decoded, model.apply(params, images)

  ids, quantized, stats, decoded, (reconstruction, call_ids, _) = run(params, images)
  assert config.latent_shape(*image_shape[:2]) == grid
  assert ids.shape == (2,) + grid and ids.dtype == jnp.int32
  assert quantized.shape == (2,) + grid + (config.embedding_dim,)
  assert reconstruction.shape == decoded.shape == (2,) + image_shape
  np.testing.assert_array_equal(ids, call_ids)
  np.testing.assert_allclose(decoded, reconstruction, atol=1e-5)
  assert set(stats) == {'codebook_loss', 'commitment_loss', 'perplexity', 'usage'}


def test_paper_scale_shapes():
  config = TokenizerConfig(image_channels=3, base_channels=128,
                           channel_multipliers=(1, 1, 2, 2, 4), num_res_blocks=2,
                           embedding_dim=256, codebook_size=1024)
  model = VQGAN(config)
  images = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), images)
  reconstruction, ids, _ = jax.eval_shape(model.apply, params, images)
  assert ids.shape == (1, 16, 16)
  assert reconstruction.shape == (1, 256, 256, 3)
  assert params['params']['quantizer']['codebook'].shape == (1024, 256)


def test_straight_through_gradients():
  model = VQGAN(TINY)
  params = init_params(TINY, (16, 16, 1))
  images = jnp.asarray(blobs(4, 16))

  def losses(params):
    reconstruction, _, stats = model.apply(params, images)
    return (jnp.mean((reconstruction - images) ** 2), stats['codebook_loss'],
            stats['commitment_loss'])

  recon_grads, codebook_grads, commit_grads = jax.jit(jax.jacrev(losses))(params)

  def norms(grads, part):
    return [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads['params'][part])]

  assert min(norms(recon_grads, 'encoder')) > 0  # every encoder tensor gets a gradient
  assert min(norms(commit_grads, 'encoder')) > 0
  assert max(norms(codebook_grads, 'encoder') + norms(codebook_grads, 'decoder')) == 0
  assert norms(recon_grads, 'quantizer') == norms(commit_grads, 'quantizer') == [0.0]
  assert norms(codebook_grads, 'quantizer')[0] > 0


def test_quantizer_picks_nearest_code():
  quantizer = vqgan.VectorQuantizer(codebook_size=32, embedding_dim=8)
  k1, k2 = jax.random.split(jax.random.key(0))
  z = jax.random.normal(k1, (3, 5, 5, 8))
  codebook = jax.random.normal(k2, (32, 8))
  quantized, ids, _ = jax.jit(quantizer.apply)({'params': {'codebook': codebook}}, z)
  flat = np.asarray(z, np.float64).reshape(-1, 1, 8)
  distances = np.sum((flat - np.asarray(codebook, np.float64)[None]) ** 2, axis=-1)
  np.testing.assert_array_equal(np.asarray(ids).reshape(-1), distances.argmin(-1))
  np.testing.assert_allclose(quantized, np.asarray(codebook)[np.asarray(ids)], atol=1e-6)


def test_perplexity_and_usage():
  uniform = vqgan.codebook_usage(jnp.arange(40) % 8, 8)
  np.testing.assert_allclose(uniform['perplexity'], 8.0, rtol=1e-6)
  np.testing.assert_allclose(uniform['usage'], 1.0)
  single = vqgan.codebook_usage(jnp.full((2, 3, 3), 5), 8)
  np.testing.assert_allclose(single['perplexity'], 1.0, rtol=1e-6)
  np.testing.assert_allclose(single['usage'], 1 / 8)


def test_update_usage_ema():
  ids = jnp.array([[0, 0, 1], [3, 3, 3]])
  ema = vqgan.update_usage_ema(jnp.ones(4), ids, codebook_size=4, decay=0.5)
  np.testing.assert_allclose(ema, [1.5, 1.0, 0.5, 2.0])


@pytest.mark.parametrize('num_rows', [64, 5])  # enough rows for distinct picks, and too few
def test_restart_replaces_exactly_dead_codes(num_rows):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  codebook = jax.random.normal(k1, (16, 4))
  encodings = 10 + jax.random.normal(k2, (num_rows, 4))
  usage = jnp.where(jnp.arange(16) % 3 == 0, 0.1, 2.0)
  new = np.asarray(jax.jit(vqgan.restart_dead_codes)(codebook, usage, encodings, k3, 1.0))
  dead = np.asarray(usage < 1.0)
  np.testing.assert_array_equal(new[~dead], np.asarray(codebook)[~dead])
  matches = np.all(new[dead][:, None] == np.asarray(encodings)[None], axis=-1)
  assert np.all(matches.sum(-1) >= 1)  # every dead code is now an encoder output
  if num_rows >= 16:
    assert len(np.unique(new[dead], axis=0)) == dead.sum()


def test_restart_from_sown_encodings():
  model = VQGAN(TINY)
  params = init_params(TINY, (16, 16, 1))
  images = jnp.asarray(blobs(2, 16))

  @jax.jit
  def restart(params, images, rng):
    (ids, _, _), state = model.apply(params, images, method=model.encode,
                                     mutable=['intermediates'])
    (encodings,) = state['intermediates']['encodings']
    usage = vqgan.update_usage_ema(jnp.zeros(TINY.codebook_size), ids, TINY.codebook_size, 0.0)
    codebook = params['params']['quantizer']['codebook']
    flat = encodings.reshape(-1, TINY.embedding_dim)
    return usage, flat, vqgan.restart_dead_codes(codebook, usage, flat, rng, 0.5)

  usage, flat, new = restart(params, images, jax.random.key(1))
  assert flat.shape == (2 * 8 * 8, TINY.embedding_dim)
  used = np.asarray(usage) > 0
  codebook = np.asarray(params['params']['quantizer']['codebook'])
  np.testing.assert_array_equal(np.asarray(new)[used], codebook[used])
  for row in np.asarray(new)[~used]:
    assert np.any(np.all(row == np.asarray(flat), axis=-1))


def test_adam_steps_lower_the_loss():
  model = VQGAN(TINY)
  params = init_params(TINY, (16, 16, 1))
  images = jnp.asarray(blobs(16, 16))
  optimizer = optax.adam(3e-3)

  def loss_fn(params):
    reconstruction, _, stats = model.apply(params, images)
    return vqgan.tokenizer_loss(reconstruction, images, stats, TINY.commitment_cost)

  # 30 steps in one program: at the suite's LLVM optimisation level 0 (conftest) they run 2.5x
  # slower than at level 1, which saving on this one compile does not make up for.
  @functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 1})
  def train(params):
    def step(carry, _):
      params, opt_state = carry
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = optimizer.update(grads, opt_state)
      return (optax.apply_updates(params, updates), opt_state), (loss, metrics)
    return jax.lax.scan(step, (params, optimizer.init(params)), length=30)[1]

  losses, metrics = train(params)
  assert set(metrics) == {'reconstruction_mse', 'codebook_loss', 'commitment_loss',
                          'perplexity', 'usage'}
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0]


def test_indivisible_image_size_raises():
  model = VQGAN(MNIST)
  with pytest.raises(ValueError, match=r'30x28 .* factor 4'):
    model.init(jax.random.key(0), jnp.zeros((1, 30, 28, 1)))


def test_num_groups_must_divide_channels():
  model = VQGAN(MNIST._replace(base_channels=6))
  with pytest.raises(ValueError, match='num_groups=4'):
    model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


def test_adversarial_losses_and_r1():
  np.testing.assert_allclose(vqgan.discriminator_loss(jnp.zeros(3), jnp.zeros(3)),
                             2 * np.log(2), rtol=1e-6)
  np.testing.assert_allclose(vqgan.generator_adversarial_loss(jnp.zeros(3)), np.log(2),
                             rtol=1e-6)
  assert vqgan.discriminator_loss(jnp.full(3, 10.0), jnp.full(3, -10.0)) < 1e-3

  # A linear discriminator's input gradient is its weight, whatever the image.
  weight = jax.random.normal(jax.random.key(0), (8, 8, 1))
  linear = lambda w, x: jnp.sum(x * w, axis=(1, 2, 3))
  np.testing.assert_allclose(vqgan.r1_penalty(linear, weight, jnp.ones((3, 8, 8, 1))),
                             jnp.sum(weight ** 2), rtol=1e-5)

  discriminator = vqgan.PatchDiscriminator(base_channels=8, num_layers=2, num_groups=4)
  images = jnp.asarray(blobs(2, 16))
  params = jax.jit(discriminator.init)(rbg_key(1), images)
  penalty_and_grad = jax.jit(jax.value_and_grad(
      functools.partial(vqgan.r1_penalty, discriminator.apply), argnums=0))
  penalty, grads = penalty_and_grad(params, images)
  assert discriminator.apply(params, images).shape == (2, 4, 4, 1)
  assert penalty > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


VIDEO = MNIST._replace(video=True, temporal_downsample=(True, True))  # t = 4, 4x spatial


def test_video_tokenizer_shapes_17_frames_to_5_latent_frames():
  assert VIDEO.latent_shape(17, 16, 16) == (5, 4, 4)
  assert vqgan.causal_frames(16, 4) == 17 and vqgan.causal_frames(9, 4) == 9
  with pytest.raises(ValueError, match='16 frames do not fit'):
    VIDEO.latent_shape(16, 16, 16)
  videos = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 9, 16, 16, 1)), jnp.float32)
  params = init_params(VIDEO, (9, 16, 16, 1))
  assert params['params']['encoder']['conv_in']['kernel'].shape == (3, 3, 3, 1, 8)
  reconstruction, ids, _ = jax.jit(VQGAN(VIDEO).apply)(params, videos)
  assert reconstruction.shape == videos.shape and ids.shape == (2, 3, 4, 4)
  decoded = jax.jit(functools.partial(VQGAN(VIDEO).apply, method='decode_ids'))(params, ids)
  assert decoded.shape == videos.shape


def test_video_tokens_of_the_first_frames_do_not_depend_on_later_frames():
  """Causality: what frame prediction relies on to give the condition as known tokens."""
  videos = np.random.default_rng(1).uniform(-1, 1, (2, 9, 16, 16, 1)).astype(np.float32)
  changed = videos.copy()
  changed[:, 5:] = np.random.default_rng(2).uniform(-1, 1, changed[:, 5:].shape)
  params = init_params(VIDEO, (9, 16, 16, 1))
  encode = jax.jit(functools.partial(VQGAN(VIDEO).apply, method='encode'))
  ids, _, _ = encode(params, videos)
  ids_changed, _, _ = encode(params, changed)
  ids_alone, _, _ = encode(params, videos[:, :5])
  np.testing.assert_array_equal(ids[:, :2], ids_changed[:, :2])
  np.testing.assert_array_equal(ids[:, :2], ids_alone)
  assert np.any(np.asarray(ids[:, 2:]) != np.asarray(ids_changed[:, 2:]))


def test_video_tokenizer_gradients_reach_every_parameter():
  videos = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, 5, 16, 16, 1)), jnp.float32)
  params = init_params(VIDEO, (5, 16, 16, 1))
  model = VQGAN(VIDEO)

  def loss(p):
    reconstruction, _, stats = model.apply(p, videos)
    return vqgan.tokenizer_loss(reconstruction, videos, stats, VIDEO.commitment_cost)[0]

  grads = jax.jit(jax.grad(loss))(params)
  norms = {jax.tree_util.keystr(path): float(jnp.linalg.norm(g))
           for path, g in jax.tree_util.tree_leaves_with_path(grads)}
  assert all(np.isfinite(n) and n > 0 for n in norms.values()), norms


def test_video_discriminator_gives_patch_logits():
  videos = jnp.zeros((1, 8, 16, 16, 1))
  disc = vqgan.PatchDiscriminator(base_channels=8, num_layers=2)
  logits = disc.apply(disc.init(rbg_key(0), videos), videos)
  assert logits.shape == (1, 2, 4, 4, 1)


def test_video_discriminator_and_its_r1_penalty_equal_flax_3d_convolutions():
  videos = jax.random.normal(rbg_key(0), (2, 8, 16, 16, 1))
  disc = vqgan.PatchDiscriminator(base_channels=8, num_layers=2)
  params = disc.init(rbg_key(1), videos)
  # R1 differentiates twice: through the input, then the parameters.
  r1_grads = lambda: jax.grad(functools.partial(vqgan.r1_penalty, disc.apply))(params, videos)
  logits, grads = disc.apply(params, videos), r1_grads()
  with mock.patch.object(conv3d, 'Conv3D', nn.Conv):
    assert jax.tree.map(np.shape, disc.init(rbg_key(1), videos)) == jax.tree.map(
        np.shape, params)
    want_logits, want_grads = disc.apply(params, videos), r1_grads()
  np.testing.assert_allclose(logits, want_logits, atol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
