import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import plain_transformer
import pytest
from conftest import init_params, jitted_apply, small_config

from nested_decode.models.nested_layers import NestedAxisPositions, NestedDense
from nested_decode.models.transformer import NestedMaskedTransformer

FACTORS = (1, 2, 4, 8)
# Position embeddings: one vector per position, or one table per axis of a 2 x 2 x 4 token grid.
POSITION_GRIDS = pytest.mark.parametrize('position_grid', ((), (2, 2, 4)),
                                         ids=('per_position', 'per_axis'))


def random_batch(config, seed=0, batch=3):
  k1, k2 = jax.random.split(jax.random.key(seed))
  tokens = jax.random.randint(k1, (batch, config.seq_len), 0, config.codebook_size + 1)
  labels = jax.random.randint(k2, (batch,), 0, config.num_classes + 1)
  return tokens, labels


@jax.jit
def perturbed(params, seed=1, scale=0.1):
  """Params with every entry moved, so biases and norms are not trivially 0/1."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


@POSITION_GRIDS
@pytest.mark.parametrize('factor', FACTORS)
def test_submodel_equals_plain_transformer_with_sliced_weights(factor, position_grid):
  config = small_config(position_grid=position_grid)
  model = NestedMaskedTransformer(config)
  apply = jitted_apply(model)
  params = perturbed(init_params(config))
  tokens, labels = random_batch(config)
  logits, _ = apply(params, tokens, labels, width_factor=factor)
  weights = plain_transformer.weights_from_nested(params, factor, config.num_layers)
  assert weights['layers'][0]['query'].shape == (64 // factor, 8 // factor, 8)
  expected = jax.jit(plain_transformer.forward)(weights, tokens, labels)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('factor', (2, 4, 8))
def test_submodel_gradient_is_zero_outside_its_slice(factor):
  config = small_config()
  model = NestedMaskedTransformer(config)
  params = perturbed(init_params(config))
  tokens, labels = random_batch(config)
  targets = jax.random.randint(jax.random.key(3), tokens.shape, 0, config.codebook_size)

  def loss(p):
    logits, _ = model.apply(p, tokens, labels, width_factor=factor)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

  grads = jax.jit(jax.grad(loss))(params)
  specs = nn.get_partition_spec(jax.eval_shape(model.init, jax.random.key(0), tokens, labels))
  for (path, grad), (_, axes) in zip(jax.tree_util.tree_leaves_with_path(grads),
                                     jax.tree_util.tree_leaves_with_path(specs)):
    name = jax.tree_util.keystr(path)
    nested = [axis in ('embed', 'heads', 'mlp') for axis in axes]
    inside_index = tuple(slice(0, n // factor) if is_nested else slice(None)
                         for n, is_nested in zip(grad.shape, nested))
    grad = np.array(grad)
    inside = grad[inside_index].copy()
    grad[inside_index] = 0
    assert not grad.any(), f'{name} has gradient outside its slice'
    if 'class_embed' not in name and 'token_embed' not in name:
      assert inside.any(), f'{name} gets no gradient inside its slice'


def test_scanned_and_unscanned_layers_agree():
  scanned = small_config(scan_layers=True)
  unrolled = small_config(scan_layers=False)
  params = perturbed(init_params(scanned))
  layers = params['params']['layers']
  unrolled_params = {'params': {k: v for k, v in params['params'].items() if k != 'layers'}}
  for i in range(scanned.num_layers):
    unrolled_params['params'][f'layers_{i}'] = jax.tree.map(lambda a, i=i: a[i], layers)
  tokens, labels = random_batch(scanned)
  for factor in FACTORS:
    a, cache_a = jitted_apply(NestedMaskedTransformer(scanned))(params, tokens, labels,
                                                                width_factor=factor)
    b, cache_b = jitted_apply(NestedMaskedTransformer(unrolled))(unrolled_params, tokens, labels,
                                                                 width_factor=factor)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache_a.keys, cache_b.keys, rtol=1e-5, atol=1e-5)


def test_remat_does_not_change_outputs_or_gradients():
  params = perturbed(init_params(small_config()))
  tokens, labels = random_batch(small_config())

  def loss(config, p):
    return jnp.sum(NestedMaskedTransformer(config).apply(p, tokens, labels, width_factor=2)[0])

  plain = jax.jit(jax.value_and_grad(lambda p: loss(small_config(), p)))(params)
  # a policy that keeps a named activation: nn.remat with a policy, and the name in the block
  remat = jax.jit(jax.value_and_grad(
      lambda p: loss(small_config(remat='save_attention_out'), p)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), plain, remat)


@POSITION_GRIDS
@pytest.mark.parametrize('factor', FACTORS)
def test_cached_pass_over_unchanged_tokens_matches_full_pass(factor, position_grid):
  """Keys/values in the cache are exactly what a full pass over the same tokens computes."""
  config = small_config(position_grid=position_grid)
  model = NestedMaskedTransformer(config)
  apply = jitted_apply(model)
  params = perturbed(init_params(config))
  tokens, labels = random_batch(config)
  full_logits, cache = apply(params, tokens, labels, width_factor=factor)
  positions = jnp.array([[0, 3, 7, 15], [1, 2, 4, 8], [0, 13, 14, 15]])  # ascending, distinct
  active = jnp.take_along_axis(tokens, positions, axis=1)
  logits, new_cache = apply(params, active, width_factor=factor, positions=positions + 1,
                                  cache=cache)
  expected = jnp.take_along_axis(full_logits, positions[..., None], axis=1)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_cache.values, cache.values, rtol=1e-5, atol=1e-5)


def test_per_axis_positions_share_each_axis_row_across_the_others():
  """Moving one frame on adds the same vector at every row and column."""
  config = small_config(position_grid=(2, 2, 4))
  params = perturbed(init_params(config))['params']['position_embed']
  table = NestedAxisPositions((2, 2, 4), 64)
  rows = table.apply({'params': params}, jnp.arange(17), 1)[1:].reshape(2, 2, 4, 64)
  step = rows[1] - rows[0]
  np.testing.assert_allclose(step, np.broadcast_to(step[0, 0], step.shape), atol=1e-6)
  np.testing.assert_allclose(step[0, 0], params['axis_0'][1] - params['axis_0'][0], atol=1e-6)


def test_cached_pass_sees_the_other_tokens_through_the_cache():
  config = small_config()
  model = NestedMaskedTransformer(config)
  apply = jitted_apply(model)
  params = perturbed(init_params(config))
  tokens, labels = random_batch(config)
  _, cache = apply(params, tokens, labels, width_factor=1)
  changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % config.codebook_size)
  _, other_cache = apply(params, changed, labels, width_factor=1)
  positions = jnp.zeros((tokens.shape[0], 1), jnp.int32) + 1
  a, _ = apply(params, tokens[:, :1], width_factor=1, positions=positions, cache=cache)
  b, _ = apply(params, tokens[:, :1], width_factor=1, positions=positions,
                     cache=other_cache)
  assert not np.allclose(a, b)


def test_parameters_carry_logical_axis_names():
  config = small_config()
  model = NestedMaskedTransformer(config)
  tokens, labels = random_batch(config)
  specs = nn.get_partition_spec(jax.eval_shape(model.init, jax.random.key(0), tokens,
                                               labels))['params']
  assert tuple(specs['layers']['query']['kernel']) == ('layers', 'embed', 'heads', 'kv')
  assert tuple(specs['layers']['mlp_in']['kernel']) == ('layers', 'embed', 'mlp')
  assert tuple(specs['token_embed']['embedding']) == ('vocab', 'embed')
  assert tuple(specs['logits']['kernel']) == ('embed', 'vocab')


def test_unknown_width_factor_is_a_clear_error(model_and_params):
  model, params = model_and_params
  tokens, labels = random_batch(model.config)
  with pytest.raises(ValueError, match='width_factor=3 is not one of nesting_factors'):
    model.apply(params, tokens, labels, width_factor=3)


def test_class_token_conditions_the_logits():
  config = small_config()
  model = NestedMaskedTransformer(config)
  apply = jitted_apply(model)
  params = perturbed(init_params(config))
  tokens, _ = random_batch(config)
  a, _ = apply(params, tokens, jnp.zeros(3, jnp.int32), width_factor=1)
  b, _ = apply(params, tokens, jnp.full(3, config.unconditional_id), width_factor=1)
  assert not np.allclose(a, b)


def test_nested_pass_equals_one_pass_per_width():
  """The training pass of several widths at once (one loop over the layers) gives each width
  the logits of its own full pass (the gradients: tests/unit/training/test_training.py, the real
  step)."""
  config = small_config(scan_layers=True)
  model = NestedMaskedTransformer(config)
  params = perturbed(init_params(config))
  tokens, labels = random_batch(config)
  widths = (1, 8)
  joint, cache = jitted_apply(model)(params, tokens, labels, width_factor=widths)
  assert cache is None  # training keeps no keys and values
  for logits, width in zip(joint, widths):
    alone, _ = jitted_apply(model)(params, tokens, labels, width_factor=width)
    np.testing.assert_allclose(logits, alone, rtol=1e-5, atol=1e-5)


def test_bfloat16_model_gives_float32_logits():
  """Under bfloat16 the logits are accumulated and biased in float32 (not rounded to bf16, whose
  spacing is 0.03-0.06 at |logit| 8-16); the rest of the model is unchanged."""
  bf16 = small_config(dtype='bfloat16')
  params = perturbed(init_params(bf16), scale=0.5)
  tokens, labels = random_batch(bf16)
  logits, _ = jitted_apply(NestedMaskedTransformer(bf16))(params, tokens, labels, width_factor=1)
  assert logits.dtype == jnp.float32
  rounded = np.asarray(logits.astype(jnp.bfloat16).astype(jnp.float32))
  assert np.mean(np.asarray(logits) != rounded) > 0.9
  # The layer: bf16 operands, products summed and the bias added in float32.
  layer = NestedDense(in_shape=(64,), out_shape=(32,), in_nested=(True,), out_nested=(False,),
                      logical_axes=('embed', 'vocab'), use_bias=True, bias_nested=False,
                      dtype=jnp.bfloat16, output_dtype=jnp.float32)
  x = jax.random.normal(jax.random.key(3), (4, 64))
  weights = perturbed(nn.unbox(layer.init(jax.random.key(4), x, 1)), scale=0.5)
  rounded = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32))
  expected = rounded(x) @ rounded(weights['params']['kernel']) + weights['params']['bias']
  np.testing.assert_allclose(layer.apply(weights, x, 1), expected, rtol=1e-5, atol=1e-5)


def test_dropout_acts_in_training_passes_only():
  """A train-mode pass differs between two dropout keys (and repeats with one); a pass without
  ``train`` is the dropout-free model's, so a decode never drops anything."""
  config = small_config(dropout_rate=0.1, attention_dropout_rate=0.1)
  model = NestedMaskedTransformer(config)
  params = perturbed(init_params(config))
  tokens, labels = random_batch(config)
  train = jax.jit(lambda key: model.apply(params, tokens, labels, width_factor=(1, 4), train=True,
                                          rngs={'dropout': key})[0])
  a, b, again = train(jax.random.key(0)), train(jax.random.key(1)), train(jax.random.key(0))
  for x, y, z in zip(a, b, again):
    assert not np.allclose(x, y)
    np.testing.assert_array_equal(x, z)
  plain = NestedMaskedTransformer(small_config())
  for factor in (1, 4):
    kept, _ = jitted_apply(model)(params, tokens, labels, width_factor=factor)
    expected, _ = jitted_apply(plain)(params, tokens, labels, width_factor=factor)
    np.testing.assert_array_equal(kept, expected)
