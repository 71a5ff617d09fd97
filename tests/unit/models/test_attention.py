"""Splash attention (Pallas, interpret mode on CPU) and the deferred-normalisation attention
against XLA attention; weight dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params, small_config

from nested_decode.models import attention
from nested_decode.models.transformer import NestedMaskedTransformer


@pytest.mark.parametrize('q_len,kv_len', [(300, 300), (37, 300), (128, 128)])
def test_splash_equals_xla_attention_with_and_without_padding(q_len, kv_len):
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (2, q_len, 4, 32))
  k = jax.random.normal(kk, (2, kv_len, 4, 32))
  v = jax.random.normal(kv, (2, kv_len, 4, 32))
  splash = jax.jit(lambda *x: attention.attend(*x, 'splash'))(q, k, v)
  np.testing.assert_allclose(splash, attention.attend(q, k, v, 'xla'), atol=2e-6)


def test_splash_gradient_equals_xla():
  kq, kk, kv = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(key, (1, 130, 2, 16)) for key in (kq, kk, kv))

  def grads(implementation):
    loss = lambda q, k, v: jnp.sum(jnp.sin(attention.attend(q, k, v, implementation)))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  for a, b in zip(grads('splash'), grads('xla')):
    np.testing.assert_allclose(a, b, atol=2e-6)


@pytest.mark.parametrize('scale', (1.0, 300.0))
def test_deferred_equals_xla_attention_and_its_gradient(scale):
  """At ``scale`` 300 the scores reach thousands: exp without the shift would overflow."""
  kq, kk, kv = jax.random.split(jax.random.key(3), 3)
  q = scale * jax.random.normal(kq, (2, 37, 4, 16))
  k, v = (jax.random.normal(key, (2, 41, 4, 16)) for key in (kk, kv))

  def grads(implementation):
    loss = lambda q, k, v: jnp.sum(jnp.sin(attention.attend(q, k, v, implementation)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

  (deferred, deferred_grads), (xla, xla_grads) = grads('deferred'), grads('xla')
  np.testing.assert_allclose(deferred, xla, rtol=1e-5)
  for a, b in zip(deferred_grads, xla_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5 * scale)
  np.testing.assert_allclose(attention.attend(q, k, v, 'deferred'),
                             attention.attend(q, k, v, 'xla'), atol=2e-6 * scale)


def test_deferred_in_bfloat16_is_as_close_to_float32_attention_as_xla_is():
  """The written-out backward's casts: in bfloat16 its gradients differ from float32's by
  rounding, on average no more than XLA attention's do (the largest single error is noisy)."""
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 33, 4, 16)) for i in range(3))

  def grads(implementation, dtype):
    loss = lambda *x: jnp.sum(jnp.sin(attention.attend(*x, implementation)).astype(jnp.float32))
    args = (x.astype(dtype) for x in (q, k, v))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)

  exact = grads('xla', jnp.float32)
  for deferred, xla, reference in zip(grads('deferred', jnp.bfloat16),
                                      grads('xla', jnp.bfloat16), exact):
    assert deferred.dtype == jnp.bfloat16
    error = lambda g, reference=reference: float(jnp.abs(g.astype(jnp.float32) - reference).mean())
    assert error(deferred) <= 1.25 * error(xla)


def test_unknown_implementation_is_named():
  q = jnp.zeros((1, 4, 1, 8))
  with pytest.raises(ValueError, match="'flash'"):
    attention.attend(q, q, q, 'flash')


@pytest.mark.parametrize('implementation', ('splash', 'deferred'))
@pytest.mark.parametrize('factor', (2, 8))
def test_model_equals_xla_full_and_cached_pass(factor, implementation):
  """Nested widths (4 and 1 of 8 heads), 1 + 130 tokens (not a multiple of 128), and a
  cached pass of 5 queries over the cache."""
  xla_config = small_config(seq_len=130)
  params = init_params(xla_config)
  tokens = jax.random.randint(jax.random.key(2), (2, 130), 0, xla_config.codebook_size)
  labels = jnp.array([1, 3])
  positions = jnp.array([[1, 4, 9, 50, 130], [2, 3, 70, 71, 129]])

  def passes(config):
    model = NestedMaskedTransformer(config)

    @jax.jit
    def run(params):
      logits, cache = model.apply(params, tokens, labels, width_factor=factor)
      cached, _ = model.apply(params, tokens[:, :5], labels, width_factor=factor,
                              positions=positions, cache=cache)
      return logits, cached
    return run(params)

  for a, b in zip(passes(small_config(seq_len=130, attention_impl=implementation)),
                  passes(xla_config)):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_model_train_pass_with_attention_dropout_equals_xla_and_its_gradient():
  """A nested train pass (widths 1 and 4) with MaskGIT's weight dropout: one dropout key drops
  the same weights under either implementation, so training may use either."""
  xla_config = small_config(attention_dropout_rate=0.1)
  params = init_params(xla_config)
  tokens = jax.random.randint(jax.random.key(5), (2, xla_config.seq_len), 0,
                              xla_config.codebook_size)
  labels = jnp.array([1, 3])

  def loss_and_grads(config):
    model = NestedMaskedTransformer(config)

    def loss(params):
      logits, _ = model.apply(params, tokens, labels, width_factor=(1, 4), train=True,
                              rngs={'dropout': jax.random.key(6)})
      return sum(jnp.mean(jnp.sin(x)) for x in logits)
    return jax.jit(jax.value_and_grad(loss))(params)

  (deferred, deferred_grads), (xla, xla_grads) = (
      loss_and_grads(small_config(attention_dropout_rate=0.1, attention_impl='deferred')),
      loss_and_grads(xla_config))
  np.testing.assert_allclose(deferred, xla, rtol=1e-5)
  assert abs(deferred - loss_and_grads(small_config(attention_impl='deferred'))[0]) > 1e-4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               deferred_grads, xla_grads)


def test_attention_with_dropout_is_softmax_attention_with_weights_dropped():
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 5, 4, 8)) for i in range(3))
  rng = jax.random.key(7)
  kept = attention.attend(q, k, v, 'xla', 1e-9, rng)  # nothing dropped at this rate
  np.testing.assert_allclose(kept, attention.attend(q, k, v, 'xla'), rtol=1e-5, atol=1e-5)
  rate = 0.5
  dropped = attention.attend(q, k, v, 'xla', rate, rng)
  weights = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(8), axis=-1)
  keep = jax.random.bernoulli(rng, 1 - rate, weights.shape)
  expected = jnp.einsum('bhqk,bkhd->bqhd', jnp.where(keep, weights / (1 - rate), 0), v)
  np.testing.assert_allclose(dropped, expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"implementations \('xla', 'deferred'\), not 'splash'"):
    attention.attend(q, k, v, 'splash', rate, rng)


def test_deferred_with_dropout_drops_what_xla_drops_and_has_its_gradient():
  """One key drops the same weights in both; the deferred backward draws the mask again."""
  kq, kk, kv = jax.random.split(jax.random.key(4), 3)
  q = jax.random.normal(kq, (2, 37, 4, 16))
  k, v = (jax.random.normal(key, (2, 41, 4, 16)) for key in (kk, kv))
  rng = jax.random.key(9)

  def grads(implementation):
    loss = lambda q, k, v: jnp.sum(jnp.sin(attention.attend(q, k, v, implementation, 0.3, rng)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

  (deferred, deferred_grads), (xla, xla_grads) = grads('deferred'), grads('xla')
  np.testing.assert_allclose(deferred, xla, rtol=1e-5)
  for a, b in zip(deferred_grads, xla_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
  undropped = attention.attend(q, k, v, 'deferred')
  assert float(jnp.abs(attention.attend(q, k, v, 'deferred', 0.3, rng) - undropped).max()) > 0.1
