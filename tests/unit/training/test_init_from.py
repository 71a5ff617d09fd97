"""A job's transformer started from an exported one (``training.init_from``)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from nested_decode import config_lib, io_utils, main, parallel
from nested_decode.config_lib import ConfigError
from nested_decode.inference import restore, tokenizer, tokenizer_file
from nested_decode.models import vqgan
from nested_decode.pipeline import stages


def small_mnist():
  config = load_config('mnist', 'tiny')
  config.model.update(num_layers=1, width=64, num_heads=8, mlp_dim=128)
  config.training.update(num_steps=2, batch_size=8, log_every=1, checkpoint_every=2)
  config_lib.validate(config)
  return config


def write_tokenizer(config, path, seed):
  """A tokenizer file of randomly initialised weights: the jobs below train none."""
  model = vqgan.VQGAN(tokenizer.tokenizer_config(config))
  shape = tokenizer.example_shape(config, 1)
  params = {'params': model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + shape))['params']}
  tokenizer_file.write(config, params, path)


def write_tokens(config, workdir):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.tokens.codebook_size, (16, config_lib.seq_len(config)))
  io_utils.write_npz(stages.token_shard_path(workdir, 'train', 0, 1),
                     tokens=tokens.astype(np.int32), labels=rng.integers(0, 10, 16),
                     rows=np.arange(16))


def trained(config, workdir):
  write_tokens(config, workdir)
  stages.transformer_stage(config, workdir, parallel.make_mesh(config))
  return jax.device_get(restore.transformer_params(config, workdir, parallel.make_mesh(config)))


def test_a_job_starts_from_the_exported_transformer_and_refuses_another_tokenizer(tmp_path):
  """--mode=export_transformer writes the sampling weights; a job whose training.init_from
  names the file starts from them (with a learning rate of 0 its trained weights are the
  file's exactly, where a job without it ends elsewhere); a job whose tokenizer is another
  one is refused with the key and what differs."""
  config = small_mnist()
  config.tokenizer_training.pretrained = str(tmp_path / 'tokenizer.msgpack')
  write_tokenizer(config, config.tokenizer_training.pretrained, seed=0)
  source_dir = str(tmp_path / 'source')
  exported = trained(config, source_dir)
  main.run_export_transformer(main.Run(config, 'mnist:tiny', source_dir))

  config.training.learning_rate = 0.0
  scratch = trained(config, str(tmp_path / 'scratch'))
  config.training.init_from = os.path.join(source_dir, 'transformer.msgpack')
  started = trained(config, str(tmp_path / 'started'))
  jax.tree.map(np.testing.assert_array_equal, started, exported)
  differ = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), scratch, exported))
  assert any(differ)

  config.tokenizer_training.pretrained = str(tmp_path / 'other_tokenizer.msgpack')
  write_tokenizer(config, config.tokenizer_training.pretrained, seed=1)
  with pytest.raises(ConfigError, match=r'config.training.init_from=.* holds a transformer of '
                     r"another config: tokenizer is '\w+' in the file, '\w+' in the config"):
    trained(config, str(tmp_path / 'other'))


def test_export_transformer_needs_a_trained_one(tmp_path):
  with pytest.raises(ConfigError, match='holds no trained transformer'):
    main.run_export_transformer(main.Run(small_mnist(), 'mnist:tiny', str(tmp_path)))


def test_a_missing_init_from_file_is_named_unless_the_run_resumes(tmp_path):
  config = small_mnist()
  config.tokenizer_training.pretrained = str(tmp_path / 'tokenizer.msgpack')
  write_tokenizer(config, config.tokenizer_training.pretrained, seed=0)
  config.training.init_from = str(tmp_path / 'missing.msgpack')
  with pytest.raises(ConfigError, match=r'config.training.init_from=.*no such file'):
    trained(config, str(tmp_path / 'job'))

  # A run resumed from its own checkpoint never reads the file.
  config.training.init_from = ''
  trained(config, str(tmp_path / 'resumed'))
  config.training.update(init_from=str(tmp_path / 'missing.msgpack'), num_steps=3)
  trained(config, str(tmp_path / 'resumed'))
