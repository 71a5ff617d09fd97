import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from conftest import ROOT

from nested_decode import main, parallel
from nested_decode.config_lib import ConfigError
from nested_decode.data import sources
from nested_decode.inference import restore, tokenizer
from nested_decode.pipeline import stages
from nested_decode.training import train_tokenizer

CONFIG_PATH = os.path.join(ROOT, 'configs', 'mnist.py')


def mnist_tiny():
  spec = importlib.util.spec_from_file_location('mnist_config', CONFIG_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config('tiny')


def test_tokenizer_training_lowers_reconstruction_error_on_real_digits(tmp_path):
  config = mnist_tiny()
  config.tokenizer_training.num_steps = 40
  config.tokenizer_training.log_every = 10
  config.tokenizer_training.checkpoint_every = 40
  train, _, _, _ = sources.data_sources(config)
  train_tokenizer.train(config, str(tmp_path),
                        *sources.resumable_batches(train, None, 16, config.seed),
                        parallel.make_mesh(config))
  lines = (tmp_path / 'tokenizer_metrics.jsonl').read_text().splitlines()
  first, last = json.loads(lines[0]), json.loads(lines[-1])
  assert last['reconstruction_mse'] < 0.7 * first['reconstruction_mse']
  assert restore.tokenizer_is_trained(config, str(tmp_path))

  params = restore.tokenizer_params(config, str(tmp_path), parallel.make_mesh(config))
  images, _ = sources.all_images(train)
  mesh = parallel.make_mesh(config)
  tokens = tokenizer.encode_batch(config, params, {'image': images[:10]}, mesh)
  assert tokens.shape == (10, 49) and tokens.dtype == np.int32
  assert tokens.min() >= 0 and tokens.max() < config.tokens.codebook_size
  decoded = tokenizer.decode_tokens(config, params, tokens, parallel.make_mesh(config))
  assert decoded.shape == (10, 28, 28, 1) and decoded.dtype == np.uint8
  check_pretrained_file_replaces_training(config, str(tmp_path), params, images[:10], tokens)


def check_pretrained_file_replaces_training(config, trained_dir, params, images, tokens):
  """--mode=export_tokenizer writes a trained tokenizer to one file; a job whose
  tokenizer_training.pretrained names it trains none and encodes with the same parameters."""
  mesh = parallel.make_mesh(config)
  job_dir = os.path.join(trained_dir, 'job')
  main.run_export_tokenizer(main.Run(config, 'mnist:tiny', trained_dir))
  config.tokenizer_training.pretrained = os.path.join(trained_dir, 'tokenizer.msgpack')
  assert restore.tokenizer_is_trained(config, job_dir)
  loaded = stages.tokenizer_stage(config, job_dir, mesh)
  assert not os.path.exists(os.path.join(job_dir, 'tokenizer'))
  np.testing.assert_array_equal(
      tokenizer.encode_batch(config, loaded, {'image': images}, mesh), tokens)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(params))

  config.tokenizer.base_channels = 16
  with pytest.raises(ConfigError, match=r'holds a tokenizer of another config: '
                     r'tokenizer.base_channels is 8 in the file, 16 in the config'):
    restore.tokenizer_params(config, job_dir, mesh)
  config.tokenizer_training.pretrained = os.path.join(trained_dir, 'missing.msgpack')
  with pytest.raises(ConfigError, match=r'config.tokenizer_training.pretrained=.*no such file'):
    restore.tokenizer_params(config, job_dir, mesh)


def test_adversarial_loss_trains_the_discriminator_too(tmp_path):
  config = mnist_tiny()
  config.tokenizer_training.adversarial_weight = 0.1
  config.tokenizer_training.discriminator_channels = 8
  train, _, _, _ = sources.data_sources(config)
  state = train_tokenizer.train(config, str(tmp_path),
                                *sources.resumable_batches(train, None, 16, config.seed),
                                parallel.make_mesh(config))
  rows = [json.loads(line) for line in
          (tmp_path / 'tokenizer_metrics.jsonl').read_text().splitlines()]
  for key in ('discriminator_loss', 'r1_penalty', 'generator_adversarial_loss'):
    assert np.isfinite(rows[-1][key]), key
  initial = train_tokenizer.create_state(config, parallel.make_mesh(config)).disc_params
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
           zip(jax.tree.leaves(initial), jax.tree.leaves(state.disc_params))]
  assert max(moved) > 0
