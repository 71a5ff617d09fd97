import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params, small_config

from nested_decode.decoding.mask_schedule import MASK_SCHEDULES, mask_ratio, masked_counts
from nested_decode.decoding.plan import make_plan
from nested_decode.decoding.sampler import (
  Decoder,
  SamplingOptions,
  mask_least_confident,
  program_key,
  sample_tokens,
)
from nested_decode.models.transformer import NestedMaskedTransformer

SCHEDULES = [((8, 3), (4, 3), (2, 3), (1, 3)), ((8, 6), (1, 6)), ((1, 12),),
             ((2, 2), (8, 4), (1, 6))]


@pytest.fixture(scope='module')
def setup():
  config = small_config(seq_len=32)
  return NestedMaskedTransformer(config), init_params(config)


def all_masked(config, batch=4):
  return jnp.full((batch, config.seq_len), config.mask_id, jnp.int32)


@functools.cache
def shared_decoder(model, options):
  return Decoder(model, options)


def decode(setup, widths, cache='refresh_on_switch', refresh_every=1, init=None, seed=1,
           query_buckets=0, **options):
  model, params = setup
  config = model.config
  init = all_masked(config) if init is None else init
  num_unknown = int(np.sum(np.asarray(init[0]) == config.mask_id))
  plan = make_plan(config.seq_len, num_unknown, widths, cache, refresh_every,
                   query_buckets=query_buckets)
  decoder = shared_decoder(model, SamplingOptions(**{'guidance_scale': 1.0, **options}))
  labels = jnp.arange(init.shape[0]) % config.num_classes
  return plan, decoder(params, init, labels, jax.random.key(seed), plan)


@pytest.fixture(scope='module')
def one_layer():
  """With one layer a token's keys and values depend only on it and its position, so a cached
  pass that recomputes exactly the tokens that changed gives the full pass's logits."""
  config = small_config(seq_len=32, num_layers=1)
  return NestedMaskedTransformer(config), init_params(config)


@pytest.mark.parametrize('widths', SCHEDULES[3:])  # narrow, wide, full: switches both ways
@pytest.mark.parametrize('cache,refresh_every,query_buckets', [
    ('refresh_on_switch', 1, 0), ('refresh_on_switch', 1, 3), ('refresh_every_k', 2, 0)])
def test_one_layer_cached_decode_equals_the_uncached_one_token_for_token(
    one_layer, widths, cache, refresh_every, query_buckets):
  """Also with cached steps padded to 3 query buckets: the padding's samples are unused."""
  _, uncached = decode(one_layer, widths, cache='none')
  plan, cached = decode(one_layer, widths, cache=cache, refresh_every=refresh_every,
                        query_buckets=query_buckets)
  assert sum(not step.full_pass for step in plan) >= 1
  if query_buckets:
    assert any(step.num_queries > step.num_active for step in plan)
  np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(uncached.tokens))
  np.testing.assert_array_equal(cached.masked_counts, uncached.masked_counts)


def test_a_sample_does_not_depend_on_the_batch_it_is_decoded_in(setup):
  model, params = setup
  config = model.config
  plan = make_plan(config.seq_len, config.seq_len, ((8, 3), (1, 3)), 'refresh_on_switch')
  decoder = shared_decoder(model, SamplingOptions(guidance_scale=1.0))
  labels = jnp.arange(4) % config.num_classes
  whole = decoder(params, all_masked(config, 4), labels, jax.random.key(3), plan)
  part = decoder(params, all_masked(config, 2), labels[2:], jax.random.key(3), plan,
                 jnp.array([2, 3], jnp.int32))
  np.testing.assert_array_equal(np.asarray(part.tokens), np.asarray(whole.tokens)[2:])
  other_rows = decoder(params, all_masked(config, 2), labels[2:], jax.random.key(3), plan)
  assert np.any(np.asarray(other_rows.tokens) != np.asarray(part.tokens))


def test_refresh_on_switch_runs_only_active_tokens(setup):
  widths = ((8, 3), (4, 3), (2, 3), (1, 3))
  plan, out = decode(setup, widths)
  n = setup[0].config.seq_len
  expected_logits = []
  counts = masked_counts(n, 12)
  for t, step in enumerate(plan):
    switched = t == 0 or widths_at(widths, t) != widths_at(widths, t - 1)
    assert step.full_pass == switched
    # After a cached step, active = still masked + revealed at the previous step.
    expected_logits.append(n if switched else ([n] + counts)[t - 1])
  np.testing.assert_array_equal(out.logit_counts, expected_logits)
  assert [s.num_logits for s in plan] == expected_logits
  assert min(expected_logits) < n


def widths_at(widths, t):
  return [factor for factor, steps in widths for _ in range(steps)][t]


def test_refresh_every_k_refreshes_on_schedule(setup):
  plan, _ = decode(setup, ((8, 6), (1, 6)), cache='refresh_every_k', refresh_every=3)
  assert [s.full_pass for s in plan] == [True, False, False, True, False, False] * 2


@pytest.mark.parametrize('cache', ['none', 'refresh_on_switch'])
def test_known_tokens_are_never_changed_and_no_mask_is_left(setup, cache):
  config = setup[0].config
  rng = np.random.default_rng(0)
  known = rng.integers(0, config.codebook_size, (4, config.seq_len))
  given = np.zeros((4, config.seq_len), bool)
  for row in range(4):  # the same number of given tokens per row, at different positions
    given[row, rng.choice(config.seq_len, 10, replace=False)] = True
  init = jnp.asarray(np.where(given, known, config.mask_id))
  _, out = decode(setup, ((4, 6), (1, 6)), cache=cache, init=init)
  tokens = np.asarray(out.tokens)
  np.testing.assert_array_equal(tokens[given], known[given])
  assert not np.any(tokens == config.mask_id)
  assert np.all((tokens >= 0) & (tokens < config.codebook_size))
  np.testing.assert_array_equal(out.masked_counts[:, 0], masked_counts(22, 12))


def test_rows_with_a_different_number_of_unknown_tokens_are_rejected(setup):
  config = setup[0].config
  init = all_masked(config).at[0, 3].set(5)
  with pytest.raises(ValueError, match='masked tokens'):
    decode(setup, ((1, 12),), init=init)


def test_same_key_same_tokens_and_different_key_different_tokens(setup):
  widths = ((8, 6), (1, 6))
  _, a = decode(setup, widths, seed=7)
  _, b = decode(setup, widths, seed=7)
  _, c = decode(setup, widths, seed=8)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert np.mean(np.asarray(a.tokens) != np.asarray(c.tokens)) > 0.5


def test_cosine_masked_counts_follow_the_maskgit_rule():
  # MaskGIT: after step t, floor(N * cos(pi/2 * (t+1)/T)) stay masked, clamped to
  # [1, remaining - 1], and none after the last step.
  expected = [253, 247, 236, 221, 203, 181, 155, 128, 97, 66, 33, 0]
  assert masked_counts(256, 12, 'cosine') == expected


def test_sampler_reports_the_maskgit_counts_for_256_tokens():
  config = small_config(seq_len=256, num_layers=1)
  model, params = NestedMaskedTransformer(config), init_params(config)
  _, out = decode((model, params), ((8, 6), (1, 6)), cache='none')  # 2 programs to compile
  expected = [253, 247, 236, 221, 203, 181, 155, 128, 97, 66, 33, 0]
  np.testing.assert_array_equal(out.masked_counts, np.repeat([expected], 4, axis=0).T)


@pytest.mark.parametrize('schedule', MASK_SCHEDULES)
def test_mask_schedules_decrease_to_zero(schedule):
  assert mask_ratio(0.0, schedule, 64) == pytest.approx(1.0, abs=1 / 64)
  assert mask_ratio(1.0, schedule, 64) == pytest.approx(0.0)
  counts = masked_counts(64, 8, schedule)
  assert counts[-1] == 0
  assert all(a > b for a, b in zip([64] + counts, counts))


@pytest.mark.parametrize('num_unknown', [64, 256, 1280])
def test_mask_schedules_are_maskgits_formulas(num_unknown):
  # google-research/maskgit libml/mask_schedule.py, written with numpy's base-2 functions.
  ratios = np.linspace(0.01, 1.0, 23)
  expected = {
      'cosine': np.cos(np.pi / 2 * ratios),
      'linear': 1 - ratios,
      'square': 1 - ratios**2,
      'cubic': 1 - ratios**3,
      'sqrt': 1 - np.sqrt(ratios),
      'log': np.clip(-np.log2(ratios) / np.log2(num_unknown), 0, 1),
      'exp': 1 - np.exp2(-np.log2(num_unknown) * (1 - ratios)),
  }
  assert set(expected) == set(MASK_SCHEDULES)
  for schedule, values in expected.items():
    got = [mask_ratio(r, schedule, num_unknown) for r in ratios]
    np.testing.assert_allclose(got, values, atol=1e-12, err_msg=schedule)


def test_unknown_mask_schedule_is_named():
  with pytest.raises(ValueError, match="'sine'"):
    masked_counts(16, 4, 'sine')


def test_top_k_one_samples_the_argmax():
  logits = jax.random.normal(jax.random.key(0), (3, 5, 11))
  noise = jax.random.gumbel(jax.random.key(1), logits.shape)
  ids, log_probs = sample_tokens(logits, noise, temperature=1.0, top_k=1)
  np.testing.assert_array_equal(ids, jnp.argmax(logits, -1))
  np.testing.assert_allclose(log_probs, 0.0, atol=1e-6)


def test_top_k_limits_samples_to_the_k_most_likely():
  logits = jax.random.normal(jax.random.key(0), (1, 2000, 11))
  ids, _ = sample_tokens(logits, jax.random.gumbel(jax.random.key(1), logits.shape),
                        temperature=2.0, top_k=3)
  top3 = jax.lax.top_k(logits, 3)[1]
  assert bool(jnp.all(jnp.any(ids[..., None] == top3, axis=-1)))


def test_guidance_changes_the_samples(setup):
  widths = ((1, 12),)
  _, plain = decode(setup, widths, cache='none', guidance_scale=0.0)
  _, guided = decode(setup, widths, cache='none', guidance_scale=3.0)
  assert np.any(np.asarray(plain.tokens) != np.asarray(guided.tokens))


def guided_logits(setup, tokens, labels, w):
  """(1 + w) * conditional - w * unconditional logits, computed by hand with the model."""
  model, params = setup
  cond = model.apply(params, tokens, labels)[0]
  uncond = model.apply(params, tokens, jnp.full_like(labels, model.config.unconditional_id))[0]
  return (1 + w) * cond - w * uncond


@pytest.mark.parametrize('schedule,weight_at_first_step', [('constant', 4.0), ('linear', 2.0)])
def test_guided_first_step_takes_the_argmax_of_the_hand_computed_guided_logits(
    setup, schedule, weight_at_first_step):
  """Two steps of the full model, near-zero temperature and no choice noise: the tokens the
  first step reveals are the argmax of (1 + w) cond - w uncond with w = 4 (constant) or
  4 * 1/2 (linear, w grows to 4 over the 2 steps)."""
  model, params = setup
  config = model.config
  init = all_masked(config)
  labels = jnp.arange(init.shape[0]) % config.num_classes
  plan = make_plan(config.seq_len, config.seq_len, ((1, 2),), 'none')
  options = SamplingOptions(temperature=1e-6, choice_temperature=0.0, guidance_scale=4.0,
                            guidance_schedule=schedule)
  output = Decoder(model, options)(params, init, labels, jax.random.key(0), plan,
                                   record_steps=True)
  first = np.asarray(output.step_tokens[:, 0])
  revealed = first != config.mask_id
  expected = np.asarray(jnp.argmax(guided_logits(setup, init, labels, weight_at_first_step), -1))
  np.testing.assert_array_equal(first[revealed], expected[revealed])
  other = 4.0 if schedule == 'linear' else 2.0  # another weight reveals other tokens here
  assert np.any(np.asarray(jnp.argmax(guided_logits(setup, init, labels, other), -1))[revealed]
                != first[revealed])


def test_guidance_weight_zero_in_the_guided_pass_equals_no_guidance(setup, monkeypatch):
  """The guided pass (conditional and unconditional rows in one batch) with w = 0 decodes what
  the unguided pass decodes, token for token: the doubled batch mixes nothing between rows."""
  widths = ((8, 3), (1, 3))
  _, plain = decode(setup, widths, guidance_scale=0.0)
  monkeypatch.setattr(SamplingOptions, 'guidance_at', lambda self, ratio: 0.0)
  _, guided_with_zero = decode(setup, widths, guidance_scale=1.0)
  np.testing.assert_array_equal(np.asarray(guided_with_zero.tokens), np.asarray(plain.tokens))


def test_steps_and_schedules_of_one_width_and_bucket_share_one_executable(setup):
  """Two schedules with cached steps padded to 4 buckets compile one program per (width, pass
  kind, bucket) and one for the noise, not per step or schedule; decoding again compiles
  nothing."""
  model, params = setup
  n = model.config.seq_len
  decoder = Decoder(model, SamplingOptions(guidance_scale=1.0))
  labels = jnp.arange(4) % model.config.num_classes
  plans = [make_plan(n, n, widths, 'refresh_on_switch', query_buckets=4)
           for widths in (((8, 4), (1, 8)), ((8, 6), (1, 6)))]
  for plan in plans:
    decoder(params, all_masked(model.config), labels, jax.random.key(0), plan)
  programs = len({program_key(step) for plan in plans for step in plan}) + 1  # + the noise
  assert decoder.num_compiled == programs < sum(map(len, plans)) - 6
  decoder(params, all_masked(model.config), labels, jax.random.key(1), plans[0])
  assert decoder.num_compiled == programs


def test_only_a_step_whose_cache_the_next_step_reads_returns_one(setup):
  model, params = setup
  config = model.config
  plan = make_plan(config.seq_len, config.seq_len, ((8, 2), (1, 2)), 'refresh_on_switch')
  assert [step.keeps_cache for step in plan] == [True, False, True, False]
  decoder = Decoder(model, SamplingOptions())
  tokens, labels = all_masked(config), jnp.zeros((4,), jnp.int32)
  steps = decoder.compile_plan(params, tokens, labels, jax.random.key(0), plan)[1::2]
  caches = [jax.tree.leaves(step.out_info.cache) for step in steps]
  assert [len(leaves) for leaves in caches] == [2, 0, 2, 0]  # keys and values, or nothing
  baseline = make_plan(config.seq_len, config.seq_len, ((1, 3),), 'none')
  assert not any(step.keeps_cache for step in baseline)


def test_mask_least_confident_keeps_exactly_count_lowest_with_ties_to_the_lower_position():
  confidence = jnp.array([[0.5, -1.0, 0.5, jnp.inf, 0.2], [3.0, 2.0, 1.0, 0.0, -1.0]])
  np.testing.assert_array_equal(mask_least_confident(confidence, jnp.int32(3)),
                                [[True, True, False, False, True],
                                 [False, False, True, True, True]])
  np.testing.assert_array_equal(mask_least_confident(confidence, 0), np.zeros((2, 5), bool))


def test_a_decode_never_drops_anything():
  """A model configured with dropout decodes exactly as the same weights without it."""
  config = small_config(seq_len=32, num_layers=1)
  params = init_params(config)
  with_dropout = NestedMaskedTransformer(config._replace(dropout_rate=0.5,
                                                         attention_dropout_rate=0.5))
  _, plain = decode((NestedMaskedTransformer(config), params), ((8, 2), (1, 2)))
  _, dropped = decode((with_dropout, params), ((8, 2), (1, 2)))
  np.testing.assert_array_equal(plain.tokens, dropped.tokens)
