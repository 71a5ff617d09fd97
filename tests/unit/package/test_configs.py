import ml_collections
import pytest
from conftest import load_config as load

from nested_decode import config_lib
from nested_decode.config_lib import ConfigError

VARIANTS = [('imagenet256', None), ('imagenet256', 'tiny'), ('ucf101', None), ('ucf101', 'base'),
            ('ucf101', 'tiny'), ('k600', None), ('k600', 'base'), ('k600', 'tiny'),
            ('mnist', None), ('mnist', 'tiny'), ('mnist', 'tokens256')]


@pytest.mark.parametrize('name,arg', VARIANTS)
def test_every_config_validates(name, arg):
  config_lib.validate(load(name, arg))


def test_paper_scale_sizes():
  image = load('imagenet256')
  assert (image.model.num_layers, image.model.width, image.model.num_heads) == (24, 768, 16)
  assert config_lib.seq_len(image) == 256 and image.tokens.codebook_size == 1024
  video = load('k600')
  assert (video.model.num_layers, video.model.width) == (24, 1024)
  # 16 frames padded to 17 for the causal tokenizer: 5 latent frames, the first 2 given.
  assert tuple(video.tokens.shape) == (5, 16, 16) and video.tokens.num_classes == 0
  assert video.task.condition_frames == 5 and video.data.num_frames == 16
  assert load('ucf101').tokens.num_classes == 101
  assert load('k600', 'base').model.num_layers == 12


def test_mnist_tokens256_has_imagenets_token_count_from_padded_digits():
  config = load('mnist', 'tokens256')
  assert config_lib.seq_len(config) == 256 and config.data.image_size == 32
  levels = len(config.tokenizer.channel_multipliers) - 1
  assert config.data.image_size // 2**levels == config.tokens.shape[0] == 16


def test_default_magnets_schedule_needs_three_times_fewer_flops_on_imagenet256():
  from nested_decode.inference.decode_cost import flops_rows
  rows = {row['schedule']: row for row in flops_rows(load('imagenet256'))}
  assert rows['baseline']['flop_ratio'] == 1.0
  assert rows['magnets']['flop_ratio'] >= 3.0


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match="'huge'"):
    load('imagenet256', 'huge')


def bad(**changes):
  config = load('imagenet256', 'tiny')
  for key, value in changes.items():
    *sections, name = key.split('__')
    node = config
    for section in sections:
      node = node[section]
    node[name] = value
  with pytest.raises(ConfigError) as error:
    config_lib.validate(config)
  return str(error.value)


def test_factor_that_does_not_divide_the_heads():
  message = bad(model__num_heads=12)
  assert 'config.model.num_heads=12' in message and 'nesting_factors' in message


def test_factor_that_does_not_divide_the_width():
  message = bad(model__nesting_factors=(1, 3))
  assert 'config.model.width' in message and '[3]' in message


def test_schedule_with_its_own_number_of_steps_validates_up_to_one_step_per_token():
  config = load('imagenet256', 'tiny')
  config.eval.schedules.magnets.widths = ((8, 3), (1, 3))  # 6 steps, not sampling.steps
  config_lib.validate(config)
  tokens = config_lib.seq_len(config)
  message = bad(eval__schedules__magnets__widths=((8, tokens), (1, 1)))
  assert 'config.eval.schedules.magnets.widths' in message
  assert f'more than the {tokens} tokens to generate' in message


def test_schedule_with_a_factor_outside_the_nesting_factors():
  message = bad(eval__schedules__magnets__widths=((16, 6), (1, 6)))
  assert 'config.eval.schedules.magnets.widths' in message and '[16]' in message


def test_unknown_cache_policy():
  message = bad(eval__schedules__magnets__cache='sometimes')
  assert "config.eval.schedules.magnets.cache='sometimes'" in message
  assert 'refresh_on_switch' in message


def test_unknown_mask_schedule():
  message = bad(sampling__mask_schedule='sine')
  assert "config.sampling.mask_schedule='sine'" in message and 'cosine' in message


def test_guidance_without_labels():
  config = load('k600', 'tiny')
  config.sampling.guidance_scale = 2.0
  with pytest.raises(ConfigError, match='config.sampling.guidance_scale'):
    config_lib.validate(config)


def test_reserved_schedule_name():
  config = load('imagenet256', 'tiny')
  config.eval.schedules.baseline = config_lib.schedule(((1, 12),))
  with pytest.raises(ConfigError, match='reserved'):
    config_lib.validate(config)


def test_token_grid_that_does_not_match_the_tokenizer():
  config = load('mnist')
  config.data.image_size = 32
  with pytest.raises(ConfigError, match=r'config.tokens.shape=\(7, 7\).*image_size=32.*\(8, 8\)'):
    config_lib.validate(config)


def test_nested_training_needs_the_teacher():
  message = bad(training__widths=(2, 4))
  assert 'config.training.widths' in message and 'include 1' in message


def test_unknown_remat_policy():
  message = bad(model__remat='some')
  assert "config.model.remat='some'" in message and 'save_attention_out' in message


@pytest.mark.parametrize('remat,policy', [(True, 'full'), (False, 'none')])
def test_boolean_remat_of_older_configs_still_works(remat, policy):
  from nested_decode import api  # pylint: disable=import-outside-toplevel
  config = load('imagenet256', 'tiny')
  config.model = ml_collections.ConfigDict(dict(config.model.items(), remat=remat))
  loaded = api.config_from_json(config.to_json())
  assert config_lib.transformer_config(loaded).remat == policy


def test_unknown_attention_implementation():
  message = bad(model__attention_impl='flash')
  assert "config.model.attention_impl='flash'" in message and 'splash' in message


def test_decodes_use_the_training_attention_unless_sampling_names_another():
  config = load('imagenet256', 'tiny')
  assert config_lib.decoding_transformer_config(config) == config_lib.transformer_config(config)
  config.sampling.attention_impl = 'deferred'
  decoding = config_lib.decoding_transformer_config(config)
  assert decoding == config_lib.transformer_config(config)._replace(attention_impl='deferred')
  message = bad(sampling__attention_impl='flash')
  assert "config.sampling.attention_impl='flash'" in message and "'deferred'" in message


def test_attention_dropout_with_an_implementation_that_has_none():
  message = bad(model__attention_impl='splash', model__attention_dropout_rate=0.1)
  assert 'config.model.attention_dropout_rate=0.1' in message and "'deferred'" in message
  config = load('imagenet256', 'tiny')
  config.model.update(attention_impl='deferred', attention_dropout_rate=0.1)
  config_lib.validate(config)


def test_bad_data_worker_and_bench_train_keys():
  assert 'config.data.worker_count=-1' in bad(data__worker_count=-1)
  assert 'config.data.worker_buffer_size=0' in bad(data__worker_buffer_size=0)
  assert 'config.bench.train_steps=0' in bad(bench__train_steps=0)


def test_malformed_tpu_topology():
  message = bad(tpu_fit__topology='v5e')
  assert "config.tpu_fit.topology='v5e'" in message and 'v5e:4x4' in message


def test_compile_tpu_with_nothing_to_compile():
  message = bad(tpu_fit__train=False, tpu_fit__decodes=False)
  assert 'config.tpu_fit.decodes=False' in message and 'tpu_fit.train is False' in message
  message = bad(tpu_fit__train=False, tpu_fit__single_width=True)
  assert 'config.tpu_fit.single_width=True' in message and 'tpu_fit.train=True' in message


def test_negative_chip_memory():
  message = bad(tpu_fit__hbm_gib=-1.0)
  assert 'config.tpu_fit.hbm_gib=-1.0' in message


@pytest.mark.parametrize('name,arg,keys', [
    ('k600', 'tiny', tuple(config_lib.VIDEO_EVAL_DEFAULTS)),
    ('imagenet256', None, tuple(config_lib.FID_EVAL_DEFAULTS))])
def test_saved_configs_of_older_versions_load_with_the_new_keys_defaulted(name, arg, keys):
  from nested_decode import api  # pylint: disable=import-outside-toplevel
  config = load(name, arg)
  for key in keys:
    del config.eval[key]
  loaded = api.config_from_json(config.to_json())
  for key in keys:  # the defaults are what these configs set
    assert loaded.eval[key] == load(name, arg).eval[key]


def test_configs_saved_before_per_axis_positions_keep_one_vector_per_position():
  from nested_decode import api  # pylint: disable=import-outside-toplevel
  config = load('k600', 'tiny')
  config.model.position_embedding = 'per_axis'
  assert config_lib.transformer_config(config).position_grid == (9, 8, 8)
  del config.model['position_embedding']
  loaded = api.config_from_json(config.to_json())
  assert loaded.model.position_embedding == 'per_position'
  assert config_lib.transformer_config(loaded).position_grid == ()
  assert bad(model__position_embedding='learned').count("config.model.position_embedding='learned'")


def test_configs_saved_before_data_workers_read_in_the_training_thread():
  from nested_decode import api  # pylint: disable=import-outside-toplevel
  from nested_decode.data import sources  # pylint: disable=import-outside-toplevel
  config = load('imagenet256')
  del config.data.worker_count, config.data.worker_buffer_size, config.sampling.query_buckets
  with pytest.raises(config_lib.ConfigError, match='config.data.worker_count is missing'):
    config_lib.validate(config)
  loaded = api.config_from_json(config.to_json())
  assert sources.worker_options(loaded) == dict(worker_count=0, worker_buffer_size=2)
  assert loaded.sampling.query_buckets == config_lib.QUERY_BUCKETS
  config_lib.validate(loaded)
