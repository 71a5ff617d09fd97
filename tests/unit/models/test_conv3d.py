"""The 3D convolution as one 2D convolution over stacked time taps equals ``nn.Conv``."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from nested_decode.models import conv3d


@pytest.mark.parametrize('kernel,strides,padding', [
    ((3, 3, 3), (1, 1, 1), 'SAME'),
    ((4, 4, 4), (2, 2, 2), 'SAME'),      # the video discriminator's
    ((7, 7, 7), (2, 2, 2), 'SAME'),      # I3D's stem: asymmetric 'SAME' padding in every axis
    ((1, 1, 1), (1, 1, 1), 'SAME'),
    ((3, 3, 3), (2, 2, 2), [(0, 0), (1, 1), (0, 1)]),  # the causal tokenizer's downsampling
    ((2, 3, 1), (1, 2, 1), 'VALID'),
])
def test_conv3d_equals_flax_conv_with_the_same_parameters(kernel, strides, padding):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 11, 10, 3))
  reference = nn.Conv(5, kernel, strides=strides, padding=padding)
  params = reference.init(jax.random.PRNGKey(1), x)
  params = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  folded = conv3d.Conv3D(5, kernel, strides=strides, padding=padding)
  assert jax.tree.map(np.shape, folded.init(jax.random.PRNGKey(1), x)) == jax.tree.map(
      np.shape, params)
  expected = reference.apply(params, x)
  np.testing.assert_allclose(folded.apply(params, x), expected, atol=1e-4, rtol=1e-4)


def test_conv3d_gradients_equal_flax_convs():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8, 8, 4))
  reference = nn.Conv(3, (3, 3, 3), padding='SAME')
  params = reference.init(jax.random.PRNGKey(1), x)
  folded = conv3d.Conv3D(3, (3, 3, 3))

  def grads(module):
    return jax.grad(lambda p, x: (module.apply(p, x) ** 2).sum(), argnums=(0, 1))(params, x)
  for got, want in zip(jax.tree.leaves(grads(folded)), jax.tree.leaves(grads(reference))):
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-4)


def test_conv3d_names_a_mismatched_input():
  with pytest.raises(ValueError, match=r'expected \[B, T, H, W, 4\]'):
    conv3d.conv3d(np.zeros((1, 3, 4, 4, 2)), np.zeros((3, 3, 3, 4, 5)))
  with pytest.raises(ValueError, match='fewer than the temporal kernel'):
    conv3d.conv3d(np.zeros((1, 2, 4, 4, 4)), np.zeros((3, 3, 3, 4, 5)), padding='VALID')
