import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from nested_decode.decoding.plan import make_plan
from nested_decode.decoding.sampler import Decoder, SamplingOptions
from nested_decode.models.flops import decode_flops, pass_flops, step_flops
from nested_decode.models.transformer import NestedMaskedTransformer, TransformerConfig

# Wide enough that head_dim is realistic; unscanned so XLA counts every layer.
CONFIG = TransformerConfig(num_layers=2, width=256, num_heads=8, mlp_dim=1024, codebook_size=512,
                           num_classes=10, seq_len=64, scan_layers=False)
BATCH = 2


def cost(executable) -> dict:
  analysis = executable.cost_analysis()
  return analysis[0] if isinstance(analysis, list) else analysis  # older jax: one per computation


def xla_flops(fn, *args) -> float:
  return cost(jax.jit(fn).lower(*args).compile())['flops']


@pytest.fixture(scope='module')
def abstract_inputs():
  model = NestedMaskedTransformer(CONFIG)
  tokens = jnp.zeros((BATCH, CONFIG.seq_len), jnp.int32)
  labels = jnp.zeros((BATCH,), jnp.int32)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens, labels))
  return model, params, tokens, labels


@pytest.mark.parametrize('factor', (1, 2, 4, 8))
def test_full_pass_flops_match_xla_cost_analysis(abstract_inputs, factor):
  model, params, tokens, labels = abstract_inputs
  measured = xla_flops(lambda p, t, y: model.apply(p, t, y, width_factor=factor)[0],
                       params, tokens, labels)
  n = CONFIG.seq_len
  counted = BATCH * pass_flops(CONFIG, factor, n + 1, n + 1, n).total
  assert measured == pytest.approx(counted, rel=0.05)


@pytest.mark.parametrize('factor,active', [(1, 40), (2, 17), (8, 5)])
def test_cached_pass_flops_match_xla_cost_analysis(abstract_inputs, factor, active):
  model, params, tokens, labels = abstract_inputs
  _, cache = jax.eval_shape(lambda p: model.apply(p, tokens, labels, width_factor=factor), params)
  step = lambda p, t, pos, c: model.apply(p, t, width_factor=factor, positions=pos, cache=c)[0]
  measured = xla_flops(step, params, tokens[:, :active], tokens[:, :active], cache)
  counted = BATCH * pass_flops(CONFIG, factor, active, CONFIG.seq_len + 1, active).total
  assert measured == pytest.approx(counted, rel=0.05)


def test_scan_cost_analysis_counts_one_layer():
  """Why the tests above unroll: XLA's cost analysis of a scan counts a single iteration."""
  config = CONFIG._replace(num_layers=4, scan_layers=True)
  model = NestedMaskedTransformer(config)
  tokens = jnp.zeros((BATCH, config.seq_len), jnp.int32)
  labels = jnp.zeros((BATCH,), jnp.int32)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens, labels))
  measured = xla_flops(lambda p: model.apply(p, tokens, labels)[0], params)
  n = config.seq_len
  four_layers = BATCH * pass_flops(config, 1, n + 1, n + 1, n).total
  assert measured < 0.5 * four_layers


def test_guidance_doubles_and_cache_reduces_decode_flops():
  n = CONFIG.seq_len
  widths = ((8, 3), (4, 3), (2, 3), (1, 3))
  uncached = make_plan(n, n, widths, 'none')
  cached = make_plan(n, n, widths, 'refresh_on_switch')
  assert sum(decode_flops(CONFIG, uncached, guided=True)) == 2 * sum(
      decode_flops(CONFIG, uncached, guided=False))
  assert sum(decode_flops(CONFIG, cached, False)) < sum(decode_flops(CONFIG, uncached, False))
  baseline = make_plan(n, n, ((1, 12),), 'none')
  assert sum(decode_flops(CONFIG, baseline, False)) == 12 * step_flops(CONFIG, baseline[0], False)


def test_matmul_flops_by_hand():
  config = TransformerConfig(num_layers=1, width=8, num_heads=2, mlp_dim=32, codebook_size=16,
                             num_classes=1, seq_len=3)
  f = pass_flops(config, width_factor=2, num_queries=4, num_keys=4, num_logits=3)
  d, m = 4, 16
  assert f.projections == 2 * 4 * d * d * 4
  assert f.attention == 2 * 2 * 4 * 4 * d
  assert f.mlp == 2 * 2 * 4 * d * m
  assert f.head == 2 * 3 * d * 16


@pytest.mark.parametrize('widths,cache', [(((1, 12),), 'none'),
                                          (((8, 3), (4, 3), (2, 3), (1, 3)), 'refresh_on_switch')])
def test_whole_guided_decode_flops_match_xla_cost_analysis(abstract_inputs, widths, cache):
  """The compiled step programs of a decode (guidance, caching, sampling and the padding of
  cached steps to 4 query buckets included) against the step-wise count."""
  model, params, _, labels = abstract_inputs
  plan = make_plan(CONFIG.seq_len, CONFIG.seq_len, widths, cache, query_buckets=4)
  decoder = Decoder(model, SamplingOptions(guidance_scale=1.0))
  init = jnp.full((BATCH, CONFIG.seq_len), CONFIG.mask_id, jnp.int32)
  executables = decoder.compile_plan(params, init, labels, jax.random.key(0), plan)
  measured = sum(cost(executable)['flops'] for executable in executables)
  counted = BATCH * sum(decode_flops(CONFIG, plan, guided=True))
  assert measured == pytest.approx(counted, rel=0.05)


def test_padding_cached_steps_to_query_buckets_is_counted():
  n = CONFIG.seq_len
  widths = ((8, 3), (4, 3), (2, 3), (1, 3))
  exact = make_plan(n, n, widths, 'refresh_on_switch')
  padded = make_plan(n, n, widths, 'refresh_on_switch', query_buckets=4)
  assert [s.num_active for s in padded] == [s.num_queries for s in exact]
  assert all(s.num_queries % (n // 4) == 0 for s in padded if not s.full_pass)
  extra = sum(decode_flops(CONFIG, padded, False)) - sum(decode_flops(CONFIG, exact, False))
  assert extra == sum(pass_flops(CONFIG, s.width_factor, s.num_queries, n + 1, s.num_queries).total
                      - pass_flops(CONFIG, s.width_factor, s.num_active, n + 1, s.num_active).total
                      for s in padded) > 0
