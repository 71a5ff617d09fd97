"""Frame prediction: given tokens stay out of the mask and the loss, and are never resampled."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import init_params, load_config, small_config

from nested_decode import config_lib, parallel, tasks
from nested_decode.decoding.plan import make_plan
from nested_decode.decoding.sampler import Decoder, SamplingOptions
from nested_decode.models.transformer import NestedMaskedTransformer
from nested_decode.training import objective, train_transformer

SHAPE = (3, 2, 4)  # 3 latent frames of 2x4 tokens; the first 2 are given
GIVEN_FRAMES = 2


def test_frame_prediction_gives_the_latent_frames_of_the_condition():
  assert tasks.given_latent_frames(5, 4) == 2  # frames 0 | 1-4
  assert tasks.given_latent_frames(1, 4) == 1
  with pytest.raises(ValueError, match='6 condition frames'):
    tasks.given_latent_frames(6, 4)
  task = tasks.Task('frame_prediction', (5, 16, 16), 2)
  assert (task.num_given, task.num_generated) == (512, 768)
  assert task.given_mask()[:512].all() and not task.given_mask()[512:].any()


def test_config_task_that_does_not_fit_the_tokenizer_is_named():
  config = load_k600_tiny()
  config.task.condition_frames = 4
  with pytest.raises(config_lib.ConfigError, match='config.task.*4 condition frames'):
    config_lib.validate(config)


def load_k600_tiny():
  return load_config('k600', 'tiny')


def test_random_mask_never_masks_given_tokens():
  task = tasks.Task('frame_prediction', SHAPE, GIVEN_FRAMES)
  generated = ~task.given_mask()
  mask = np.asarray(objective.random_mask(jax.random.key(0), 500, task.seq_len,
                                          maskable=generated))
  assert not mask[:, ~generated].any()
  counts = mask.sum(-1)
  assert counts.min() >= 1 and counts.max() == task.num_generated


@pytest.mark.parametrize('cache', ['none', 'refresh_on_switch'])
def test_sampling_never_changes_the_condition_tokens(cache):
  config = small_config(seq_len=24, num_classes=0)
  model, params = NestedMaskedTransformer(config), init_params(config)
  task = tasks.Task('frame_prediction', SHAPE, GIVEN_FRAMES)
  condition = np.random.default_rng(0).integers(0, config.codebook_size, (3, task.seq_len))
  init = task.initial_tokens(condition, config.mask_id)
  assert (init[:, task.num_given:] == config.mask_id).all()
  # Cached steps padded to 4 query buckets: the padding runs given tokens too.
  plan = make_plan(task.seq_len, task.num_generated, ((4, 3), (1, 3)), cache, query_buckets=4)
  decode = Decoder(model, SamplingOptions())
  out = decode(params, jnp.asarray(init), jnp.zeros(3, jnp.int32), jax.random.key(0), plan)
  tokens = np.asarray(out.tokens)
  np.testing.assert_array_equal(tokens[:, :task.num_given], condition[:, :task.num_given])
  assert not (tokens == config.mask_id).any()


def frame_prediction_config(num_steps):
  config = config_lib.base_config(num_layers=1, width=128, num_heads=8, token_shape=SHAPE,
                                  codebook_size=16, num_classes=0, guidance_scale=0.0,
                                  batch_size=2)
  config.tokenizer = ml_collections.ConfigDict(dict(temporal_downsample=(True, True)))
  config.task = ml_collections.ConfigDict(dict(name='frame_prediction', condition_frames=5))
  config.training = config_lib.training_config(
      num_steps=num_steps, batch_size=8, learning_rate=3e-3, warmup_steps=2, log_every=1,
      checkpoint_every=num_steps, distill_lambda_end=1.0)
  return config


class ContinuationIterator:
  """Clips whose given frames hold one random id c and whose generated frame holds c + 1:
  predictable from the condition only (chance is 1/16)."""

  def __init__(self, position=0):
    self.position = position

  def __next__(self):
    rng = np.random.default_rng(self.position)
    self.position += 1
    ids = rng.integers(0, 16, (8, 1))
    tokens = np.where(np.arange(24) < 16, ids, (ids + 1) % 16)
    return {'tokens': tokens.astype(np.int32), 'label': np.zeros(8, np.int32)}


def test_a_few_frame_prediction_steps_lower_the_loss_on_the_generated_region(tmp_path):
  config = frame_prediction_config(num_steps=40)
  assert tasks.task_of(config).num_given == 16
  train_transformer.train(
      config, str(tmp_path),
      lambda state: ContinuationIterator(0 if state is None else state['position']),
      lambda iterator: {'position': iterator.position}, parallel.make_mesh(config))
  with open(tmp_path / 'transformer_metrics.jsonl') as f:
    metrics = {row['step']: row for row in map(json.loads, f)}
  first = np.mean([metrics[s]['loss/p1'] for s in (1, 2, 3)])
  last = np.mean([metrics[s]['loss/p1'] for s in (38, 39, 40)])
  assert last < 0.7 * first, (first, last)
  assert metrics[40]['accuracy/p1'] > 0.5


def k600_with_kinetics_labels(workdir, num_classes=0):
  """configs/k600.py's model path, shrunk, over a token split whose labels are Kinetics class
  indices 0..599 as the video-file reader gives them."""
  from nested_decode import io_utils
  from nested_decode.pipeline import stages
  config = load_config('k600')
  config.model.update(num_layers=1, width=64, num_heads=8, mlp_dim=128, dtype='float32')
  config.tokens.num_classes = num_classes
  config.data.token_views = 1  # the split below holds one view of each clip
  config.training.update(num_steps=1, batch_size=2, log_every=1, checkpoint_every=1)
  config_lib.validate(config)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.tokens.codebook_size, (4, config_lib.seq_len(config)))
  io_utils.write_npz(stages.token_shard_path(str(workdir), 'train', 0, 1),
                     tokens=tokens.astype(np.int32), labels=np.array([0, 599, 300, 7], np.int32),
                     rows=np.arange(4))
  return config


def test_kinetics_labels_train_an_unconditional_frame_predictor_with_a_finite_loss(tmp_path):
  from nested_decode.pipeline import stages
  config = k600_with_kinetics_labels(tmp_path)
  _, labels = stages.token_dataset(config, str(tmp_path), 'train', parallel.make_mesh(config))
  assert (labels == 0).all()  # the unconditional id, whatever the clips' classes
  stages.transformer_stage(config, str(tmp_path), parallel.make_mesh(config))
  with open(tmp_path / 'transformer_metrics.jsonl') as f:
    (row,) = map(json.loads, f)
  assert np.isfinite(row['loss'])


def test_labels_past_the_class_table_name_the_value_and_the_key(tmp_path):
  from nested_decode.pipeline import stages
  config = k600_with_kinetics_labels(tmp_path, num_classes=10)
  with pytest.raises(tasks.LabelError, match=r'label 599 .*config.tokens.num_classes=10'):
    stages.token_dataset(config, str(tmp_path), 'train', parallel.make_mesh(config))
  np.testing.assert_array_equal(tasks.conditioning_labels([0, 9], 10, 'x'), [0, 9])
  with pytest.raises(tasks.LabelError, match='label -1'):
    tasks.conditioning_labels([-1], 10, 'x')
