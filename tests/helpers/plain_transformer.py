"""A plain (non-nested) transformer written independently in jax.numpy, as a test reference.

It knows nothing of nesting: it takes ordinary weights of a width-d model. The tests build those
weights by slicing the nested model's full parameters and check that both give the same logits.
"""

import jax
import jax.numpy as jnp
import numpy as np


def layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def attention(x, w):
  batch, length, _ = x.shape
  heads, head_dim = w['query'].shape[1:]
  q = jnp.einsum('bld,dhk->bhlk', x, w['query'])
  k = jnp.einsum('bld,dhk->bhlk', x, w['key'])
  v = jnp.einsum('bld,dhk->bhlk', x, w['value'])
  weights = jax.nn.softmax(q @ k.swapaxes(-1, -2) / jnp.sqrt(head_dim), axis=-1)
  out = (weights @ v).transpose(0, 2, 1, 3)  # [b, l, h, k]
  return jnp.einsum('blhk,hkd->bld', out, w['attention_out'])


def block(x, w):
  x = x + attention(layer_norm(x, *w['attention_norm']), w)
  y = layer_norm(x, *w['mlp_norm'])
  y = jax.nn.gelu(y @ w['mlp_in'][0] + w['mlp_in'][1])
  return x + y @ w['mlp_out'][0] + w['mlp_out'][1]


def forward(weights, tokens, labels):
  """Logits [B, N, V] of content tokens, class token first in the sequence."""
  x = jnp.concatenate([weights['class_embed'][labels][:, None], weights['token_embed'][tokens]],
                      axis=1)
  x = x + weights['position_embed'][None]
  for layer in weights['layers']:
    x = block(x, layer)
  x = layer_norm(x[:, 1:], *weights['final_norm'])
  return x @ weights['logits'][0] + weights['logits'][1]


def position_rows(position_params, cut):
  """The sliced ``[1 + N, D/p]`` position table: stored whole, or (per-axis positions) each
  grid position's row written out as the sum of its axes' rows."""
  if 'embedding' in position_params:
    return cut(position_params['embedding'], [0, 1])
  axes = [cut(position_params[f'axis_{i}'], [0, 1])
          for i in range(len(position_params) - 1)]
  grid = [len(table) for table in axes]
  rows = [cut(position_params['class_position'], [0, 1])[0]]
  for index in np.ndindex(*grid):
    rows.append(sum(table[i] for table, i in zip(axes, index)))
  return jnp.stack(rows)


def weights_from_nested(params, factor: int, num_layers: int):
  """Slices a nested model's full parameters into plain width-D/p weights."""
  p = params['params']

  def cut(array, nested_dims):
    index = tuple(slice(0, n // factor) if nested else slice(None)
                  for n, nested in zip(array.shape, nested_dims))
    return array[index]

  layers = []
  for i in range(num_layers):
    lp = jax.tree.map(lambda a, i=i: a[i], p['layers'])
    layers.append(dict(
        attention_norm=(cut(lp['attention_norm']['scale'], [1]),
                        cut(lp['attention_norm']['bias'], [1])),
        query=cut(lp['query']['kernel'], [1, 1, 0]),
        key=cut(lp['key']['kernel'], [1, 1, 0]),
        value=cut(lp['value']['kernel'], [1, 1, 0]),
        attention_out=cut(lp['attention_out']['kernel'], [1, 0, 1]),
        mlp_norm=(cut(lp['mlp_norm']['scale'], [1]), cut(lp['mlp_norm']['bias'], [1])),
        mlp_in=(cut(lp['mlp_in']['kernel'], [1, 1]), cut(lp['mlp_in']['bias'], [1])),
        mlp_out=(cut(lp['mlp_out']['kernel'], [1, 1]), cut(lp['mlp_out']['bias'], [1])),
    ))
  return dict(
      class_embed=cut(p['class_embed']['embedding'], [0, 1]),
      token_embed=cut(p['token_embed']['embedding'], [0, 1]),
      position_embed=position_rows(p['position_embed'], cut),
      layers=layers,
      final_norm=(cut(p['final_norm']['scale'], [1]), cut(p['final_norm']['bias'], [1])),
      logits=(cut(p['logits']['kernel'], [1, 0]), p['logits']['bias']),
  )
