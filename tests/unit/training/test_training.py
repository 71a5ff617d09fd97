import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nested_decode import config_lib, parallel
from nested_decode.checkpoints import (
  TRANSFORMER,
  Checkpointer,
  CheckpointShapeError,
  checkpoint_dir,
)
from nested_decode.data import pipeline, sources
from nested_decode.inference import restore
from nested_decode.models.transformer import NestedMaskedTransformer
from nested_decode.training import loop, objective, train_transformer


def tiny_config(num_steps=8):
  config = config_lib.base_config(num_layers=2, width=64, num_heads=8, token_shape=(4, 4),
                                  codebook_size=16, num_classes=3, guidance_scale=1.0,
                                  batch_size=2)
  config.training = config_lib.training_config(
      num_steps=num_steps, batch_size=8, learning_rate=3e-3, warmup_steps=2, log_every=1,
      checkpoint_every=3)
  return config


class TokenIterator:
  """Deterministic synthetic token batches whose position is a JSON-able int."""

  def __init__(self, position=0):
    self.position = position

  def __next__(self):
    rng = np.random.default_rng(self.position)
    self.position += 1
    labels = rng.integers(0, 3, 8)
    # Tokens depend on the label so there is something to learn.
    tokens = (labels[:, None] * 5 + np.arange(16)[None] % 5) % 16
    return {'tokens': tokens.astype(np.int32), 'label': labels.astype(np.int32)}


def make_iterator(state):
  return TokenIterator(0 if state is None else state['position'])


def position(iterator):
  return {'position': iterator.position}


def read_metrics(workdir):
  with open(workdir / 'transformer_metrics.jsonl') as f:
    return {row['step']: row for row in map(json.loads, f)}


def test_random_mask_follows_the_cosine_rule():
  mask = objective.random_mask(jax.random.key(0), 2000, 64)
  counts = np.asarray(mask.sum(-1))
  assert counts.min() >= 1 and counts.max() <= 64
  # E[cos(pi/2 r)] = 2/pi of the tokens are masked on average.
  assert abs(counts.mean() / 64 - 2 / np.pi) < 0.03


def test_distillation_sends_no_gradient_into_the_teacher():
  student = jax.random.normal(jax.random.key(0), (2, 5, 7))
  teacher = jax.random.normal(jax.random.key(1), (2, 5, 7))
  loss = lambda s, t: objective.distillation_cross_entropy(s, t).sum()
  grad_student, grad_teacher = jax.grad(loss, argnums=(0, 1))(student, teacher)
  assert np.all(np.asarray(grad_teacher) == 0)
  assert np.any(np.asarray(grad_student) != 0)


def test_a_real_train_step_sends_no_distillation_gradient_into_the_teacher(monkeypatch):
  """widths (1, 2), labels weight 0: the sub-model learns from the teacher's probabilities
  only. The step's gradient norm equals that of teacher label loss + student distillation to the
  teacher's logits taken as constants, and differs when the stop-gradient is removed."""
  config = tiny_config()
  config.training.update(widths=(1, 2), distill_lambda_start=0.0, distill_lambda_end=0.0,
                         label_dropout=0.0)
  model = NestedMaskedTransformer(config_lib.transformer_config(config))
  batch = next(TokenIterator())

  def step_grad_norm():
    state = train_transformer.create_train_state(config, model, parallel.make_mesh(config))
    rng, params = jnp.copy(state.rng), jax.tree.map(jnp.copy, state.params)  # the step donates
    step = train_transformer.make_train_step(config, model, parallel.make_mesh(config))
    _, metrics = step(state, batch)
    return float(metrics['grad_norm']), params, rng

  grad_norm, params, rng = step_grad_norm()
  # The step's own masking, recomputed: rng -> (next, mask, label dropout).
  _, mask_rng, _ = jax.random.split(rng, 3)
  tokens, labels = jnp.asarray(batch['tokens']), jnp.asarray(batch['label'])
  mask = objective.random_mask(mask_rng, *tokens.shape)
  inputs = jnp.where(mask, model.config.mask_id, tokens)
  teacher = lambda p: model.apply(p, inputs, labels, width_factor=1)[0]
  constant_teacher = jax.jit(teacher)(params)
  smoothing = config.training.label_smoothing

  def expected_loss(p):
    label = objective.masked_mean(
        objective.smoothed_cross_entropy(teacher(p), tokens, smoothing), mask)
    student = model.apply(p, inputs, labels, width_factor=2)[0]
    distill = objective.masked_mean(objective.soft_cross_entropy(
        student, jax.nn.softmax(constant_teacher)), mask)
    return label + distill

  expected = float(optax_norm(jax.jit(jax.grad(expected_loss))(params)))
  assert grad_norm == pytest.approx(expected, rel=1e-4)
  monkeypatch.setattr(objective, 'distillation_cross_entropy', lambda s, t: (
      objective.soft_cross_entropy(s, jax.nn.softmax(t))))
  assert step_grad_norm()[0] != pytest.approx(expected, rel=1e-3)  # the test can fail


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_nested_losses_weight_labels_and_teacher_by_lambda():
  targets = jnp.array([[1, 2, 3]])
  mask = jnp.ones((1, 3), bool)
  logits = {1: jax.random.normal(jax.random.key(0), (1, 3, 5)),
            2: jax.random.normal(jax.random.key(1), (1, 3, 5))}
  _, at_one = objective.nested_losses(logits, targets, mask, 0.0, 1.0)
  _, at_zero = objective.nested_losses(logits, targets, mask, 0.0, 0.0)
  label_loss = objective.masked_mean(
      objective.smoothed_cross_entropy(logits[2], targets, 0.0), mask)
  np.testing.assert_allclose(at_one['loss/p2'], label_loss, rtol=1e-6)
  np.testing.assert_allclose(at_zero['loss/p2'], at_zero['distill_loss/p2'], rtol=1e-6)


def test_a_few_steps_lower_the_loss_of_every_width(tmp_path):
  config = tiny_config(num_steps=30)
  config.training.checkpoint_every = 30
  config.training.distill_lambda_end = 1.0  # label loss only, comparable across steps
  config.model.num_layers, config.model.width = 1, 128  # p=8 still has 16 features
  train_transformer.train(config, str(tmp_path), make_iterator, position,
                          parallel.make_mesh(config))
  metrics = read_metrics(tmp_path)
  for factor in (1, 2, 4, 8):
    first = np.mean([metrics[s][f'loss/p{factor}'] for s in (1, 2, 3)])
    last = np.mean([metrics[s][f'loss/p{factor}'] for s in (28, 29, 30)])
    assert last < 0.9 * first, (factor, first, last)


def grain_batches():
  """The real input path: a shuffled grain loader whose position goes into the checkpoint."""
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 200).astype(np.int32)
  tokens = ((labels[:, None] * 5 + np.arange(16)[None]) % 16).astype(np.int32)
  source = pipeline.ArraySource('synthetic-tokens', tokens=tokens, label=labels)
  return sources.resumable_batches(source, None, global_batch_size=8, seed=0)


def test_killed_and_resumed_run_matches_an_uninterrupted_run(tmp_path):
  config = tiny_config(num_steps=8)
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  train_transformer.train(config, str(straight), *grain_batches(), parallel.make_mesh(config))
  # Preempted after 4 steps: the last checkpoint is step 3, so step 4 is redone on resume.
  train_transformer.train(config, str(resumed), *grain_batches(), parallel.make_mesh(config),
                          stop_after=4)
  assert Checkpointer(str(resumed / 'transformer')).latest_step() == 3
  final = train_transformer.train(config, str(resumed), *grain_batches(),
                                  parallel.make_mesh(config))
  assert int(final.step) == 8
  a, b = read_metrics(straight), read_metrics(resumed)
  for step in range(4, 9):
    assert a[step]['loss'] == pytest.approx(b[step]['loss'], rel=1e-5), step
  assert restore.transformer_is_trained(config, str(resumed))


def test_restoring_into_another_model_shape_names_both_shapes(tmp_path):
  config = tiny_config(num_steps=3)
  model = NestedMaskedTransformer(config_lib.transformer_config(config))
  state = train_transformer.create_train_state(config, model, parallel.make_mesh(config))
  checkpointer = Checkpointer(checkpoint_dir(str(tmp_path), TRANSFORMER))
  checkpointer.save(3, state, {'position': 3}, config)  # what training writes at its end
  checkpointer.close()
  wider = tiny_config(num_steps=3)
  wider.model.width = 128
  expected = r'params/.* has shape \(\d+, 64\) but the model expects \(\d+, 128\)'
  with pytest.raises(CheckpointShapeError, match=expected):
    restore.transformer_params(wider, str(tmp_path), parallel.make_mesh(wider))


def test_weight_decay_shrinks_the_kernels_only():
  """One step with zero gradients moves only what weight decay acts on: every dense kernel
  shrinks by lr x decay, LayerNorm parameters, biases and embedding tables stay."""
  config = tiny_config()
  config.training.warmup_steps = 0
  model = NestedMaskedTransformer(config_lib.transformer_config(config))
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32),
                                                jnp.zeros((1,), jnp.int32))))()
  optimizer = train_transformer.make_optimizer(config.training)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(optimizer.update)(zeros, optimizer.init(params), params)
  decayed = {jax.tree_util.keystr(path): bool(jnp.any(update != 0))
             for path, update in jax.tree_util.tree_leaves_with_path(updates)}
  kernels = {name for name in decayed if name.endswith("['kernel']")}
  assert len(kernels) == 7 and all(decayed[name] for name in kernels)  # q, k, v, out, 2 mlp, head
  assert not any(decayed[name] for name in set(decayed) - kernels)
  assert {'embedding', 'scale', 'bias'} <= {name.rsplit("'", 2)[-2] for name in decayed}
  lr = float(loop.lr_schedule(config.training)(0))
  kernel = params['params']['logits']['kernel']
  np.testing.assert_allclose(updates['params']['logits']['kernel'],
                             -lr * config.training.weight_decay * kernel, rtol=1e-5)


def test_parameters_load_from_a_checkpoint_with_an_older_optimizer_state(tmp_path):
  """Sampling reads the parameters alone: a workdir whose optimizer state has another
  structure (an older version's adamw, without the decay mask) still loads."""
  config = tiny_config()
  model = NestedMaskedTransformer(config_lib.transformer_config(config))
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32),
                               jnp.zeros((1,), jnp.int32)))
  older = optax.adamw(1e-3, weight_decay=0.1)
  state = train_transformer.TrainState(step=jnp.int32(8), params=params,
                                       opt_state=older.init(params), rng=jnp.zeros(2, jnp.uint32))
  checkpointer = Checkpointer(checkpoint_dir(str(tmp_path), TRANSFORMER))
  checkpointer.save(8, state, {'position': 0}, config)
  checkpointer.close()
  loaded = restore.transformer_params(config, str(tmp_path), parallel.make_mesh(config))
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def one_batch():
  return parallel.shard_batch(next(TokenIterator()), parallel.make_mesh(tiny_config()))


def test_the_weight_average_follows_its_recurrence_and_is_what_sampling_loads(tmp_path):
  config = tiny_config(num_steps=3)
  config.model.num_layers = 1
  config.training.ema_decay = 0.9
  model = NestedMaskedTransformer(config_lib.transformer_config(config))
  mesh = parallel.make_mesh(config)
  state = train_transformer.create_train_state(config, model, mesh)
  step = train_transformer.make_train_step(config, model, mesh)
  ema = jax.device_get(state.ema_params)
  for i in range(3):
    state, _ = step(state, one_batch())
    weight = min(0.9, (1 + i) / (10 + i))  # 0.1, 0.18, 0.25: the early-training ramp
    ema = jax.tree.map(lambda e, p, w=weight: w * e + (1 - w) * p, ema,
                       jax.device_get(state.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ema,
               jax.device_get(state.ema_params))
  # The average never feeds back: the weights trained beside it are those of a run without it
  # (so --mode=recipe_study reads plain and ema from one run).
  config.training.ema_decay = 0.0
  plain = train_transformer.create_train_state(config, model, mesh)
  plain_step = train_transformer.make_train_step(config, model, mesh)
  for _ in range(3):
    plain, _ = plain_step(plain, one_batch())
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(plain.params),
               jax.device_get(state.params))
  config.training.ema_decay = 0.9
  shardings = train_transformer.state_shardings(config, model, mesh)
  assert jax.tree.structure(shardings.ema_params) == jax.tree.structure(shardings.params)

  checkpointer = Checkpointer(checkpoint_dir(str(tmp_path), TRANSFORMER))
  checkpointer.save(3, state, {'position': 3}, config)  # what the training loop writes
  checkpointer.close()
  assert restore.transformer_weights(str(tmp_path)) == restore.EMA
  loaded = restore.transformer_params(config, str(tmp_path), mesh)
  trained = restore.transformer_params(config, str(tmp_path), mesh, restore.TRAINED)
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(state.ema_params))
  jax.tree.map(np.testing.assert_array_equal, trained, jax.device_get(state.params))


def test_training_past_num_steps_continues_or_restarts_the_schedules_as_declared(tmp_path):
  """Resumed with num_steps 6 -> 10: 'none' keeps the first run's schedules (learning rate at
  its final value 0, distillation weight at its end 0); 'warm' warms the learning rate up again
  and decays it to step 10, the distillation weight going on from where it was (0), never
  jumping back towards 1 (what a schedule rebuilt over 10 steps gives: 1 - 6/9)."""
  config = tiny_config(num_steps=6)
  config.model.num_layers = 1
  mesh = parallel.make_mesh(config)
  first = tmp_path / 'first'
  train_transformer.train(config, str(first), make_iterator, position, mesh)
  assert restore.transformer_weights(str(first)) == restore.TRAINED  # no average kept
  config.training.num_steps = 10
  lr = {}
  for restart in ('none', 'warm'):
    workdir = tmp_path / restart
    shutil.copytree(first, workdir)
    config.training.restart = restart
    if restart == 'warm':  # preempted at step 9 (a checkpoint of the new segment), resumed
      train_transformer.train(config, str(workdir), make_iterator, position, mesh, stop_after=3)
    train_transformer.train(config, str(workdir), make_iterator, position, mesh)
    metrics = read_metrics(workdir)
    lr[restart] = {s: metrics[s]['learning_rate'] for s in range(7, 11)}
    assert all(metrics[s]['distill_lambda'] == 0.0 for s in range(7, 11))
  assert all(value == 0.0 for value in lr['none'].values())
  expected = loop.lr_schedule(config.training, 6, 4)  # the new segment starts at step 6
  for s, value in lr['warm'].items():  # the step-s update uses the schedule at count s - 1
    assert value == pytest.approx(float(expected(s - 1)), abs=1e-9), s
  assert lr['warm'][8] == pytest.approx(config.training.learning_rate / 2)  # warmup of 2 steps
