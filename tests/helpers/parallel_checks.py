"""Multi-device checks on 8 CPU devices; ``tests/integration/test_parallel.py`` runs this in a
subprocess:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python tests/helpers/parallel_checks.py WORKDIR

prints one ``RESULT {json}`` line:

* ``losses``: per-step losses of the same few training steps through
  ``train_transformer.train`` on one device and on meshes: steps 1-3 on ``data=2, fsdp=4``,
  then, resumed from its step-2 checkpoint, steps 3-4 on ``data=2, fsdp=2, tensor=2``;
* ``shardings``: the partition spec and per-device shard shapes of some parameters and of
  their optimizer state;
* ``tokenizer``: the same for two steps of the MNIST VQGAN tokenizer;
* ``tokens_equal``: the fraction of decoded tokens equal to the one-device decode, for a batch
  split over ``('data', 'fsdp')`` with sharded parameters.
"""

import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nested_decode import config_lib, parallel
from nested_decode.decoding.sampler import Decoder, program_key
from nested_decode.inference import restore
from nested_decode.models.transformer import NestedMaskedTransformer
from nested_decode.tools import collectives
from nested_decode.training import train_tokenizer, train_transformer

jax.config.update('jax_default_matmul_precision', 'highest')

MESHES = {
    'data2_fsdp4': dict(data=2, fsdp=4, tensor=1),
    'data2_fsdp2_tensor2': dict(data=2, fsdp=2, tensor=2),
}


def tiny_config(num_steps: int = 4):
  """Two layers, width 64, 8 heads, 4x4 tokens; global batch 8; widths 1 and 2."""
  config = config_lib.base_config(num_layers=2, width=64, num_heads=8, token_shape=(4, 4),
                                  codebook_size=16, num_classes=3, guidance_scale=1.0,
                                  batch_size=8)
  config.training = config_lib.training_config(
      num_steps=num_steps, batch_size=8, learning_rate=3e-3, warmup_steps=1, log_every=1,
      checkpoint_every=2, widths=(1, 2))
  config.sampling.steps = 4
  config.eval.schedules = ml_collections.ConfigDict(
      dict(small=config_lib.schedule(((2, 2), (1, 2)))))
  return config


class TokenIterator:
  """Deterministic token batches whose position is a JSON-able int."""

  def __init__(self, position: int = 0):
    self.position = position

  def __next__(self):
    rng = np.random.default_rng(self.position)
    self.position += 1
    labels = rng.integers(0, 3, 8)
    tokens = (labels[:, None] * 5 + rng.integers(0, 5, (8, 16))) % 16
    return {'tokens': tokens.astype(np.int32), 'label': labels.astype(np.int32)}


BATCHES = (lambda state: TokenIterator(0 if state is None else state['position']),
           lambda iterator: {'position': iterator.position})


def metric_rows(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'transformer_metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f]


def read_losses(workdir: str, skip: int = 0) -> dict[int, float]:
  """``{step: loss}`` of the metrics rows after the first ``skip``."""
  return {row['step']: row['loss'] for row in metric_rows(workdir)[skip:]}


def shard_shapes(array: jax.Array) -> list[list[int]]:
  return sorted({tuple(s.data.shape) for s in array.addressable_shards})


def described(array: jax.Array) -> dict:
  return dict(shape=list(array.shape), spec=str(array.sharding.spec),
              shard_shapes=[list(s) for s in shard_shapes(array)])


class ImageIterator:
  """Deterministic batches of 16 random uint8 28x28 images."""

  def __init__(self, position: int = 0):
    self.position = position

  def __next__(self):
    rng = np.random.default_rng(self.position)
    self.position += 1
    return {'image': rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8),
            'label': rng.integers(0, 10, 16).astype(np.int32)}


def tokenizer_checks(workdir: str, result: dict) -> None:
  """The MNIST VQGAN tokenizer for two steps on one device and on
  ``data=2, fsdp=4``: the losses, and the specs of the parameters the mesh splits."""
  spec = importlib.util.spec_from_file_location(
      'mnist_config', os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'mnist.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  batches = (lambda state: ImageIterator(0 if state is None else state['position']),
             lambda iterator: {'position': iterator.position})
  result['tokenizer'] = {}
  for name, axes, devices in (('one_device', dict(data=1, fsdp=1, tensor=1), 1),
                              ('data2_fsdp4', MESHES['data2_fsdp4'], 8)):
    config = module.get_config()  # not :tiny, whose convolutions are too small to split
    config.tokenizer_training.update(num_steps=2, batch_size=16, log_every=1,
                                     checkpoint_every=2)  # no discriminator: compiles faster
    config.mesh.update(axes)
    directory = os.path.join(workdir, f'tokenizer_{name}')
    began = time.perf_counter()
    state = train_tokenizer.train(config, directory, *batches,
                                  mesh=parallel.make_mesh(config, jax.devices()[:devices]))
    result['seconds'][f'tokenizer_{name}'] = time.perf_counter() - began
    with open(os.path.join(directory, 'tokenizer_metrics.jsonl')) as f:
      rows = [json.loads(line) for line in f]
    split = [str(leaf.sharding.spec) for leaf in jax.tree.leaves(state.params)
             if any(leaf.sharding.spec)]
    result['tokenizer'][name] = dict(
        losses=[row['loss'] for row in rows],
        reconstruction_mse=[row['reconstruction_mse'] for row in rows],
        split_params=len(split), split_specs=sorted(set(split)))


def main(workdir: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  result = dict(losses={}, shardings={}, seconds={})
  one_device = parallel.make_mesh(tiny_config(), jax.devices()[:1])

  # Losses: one device against the same steps on a mesh (data=2, fsdp=4), checkpointed there at
  # step 2, stopped after step 3 and resumed on another mesh (data=2, fsdp=2, tensor=2), so
  # steps 3 and 4 run there from the restored (resharded) checkpoint.
  config = tiny_config()
  config.training.ema_decay = 0.99  # its average is placed like the parameters
  began = time.perf_counter()
  train_transformer.train(config, os.path.join(workdir, 'one'), *BATCHES, mesh=one_device)
  result['seconds']['one_device'] = time.perf_counter() - began
  result['losses']['one_device'] = read_losses(os.path.join(workdir, 'one'))
  states = {}
  directory = os.path.join(workdir, 'mesh')
  for name, stop_after in (('data2_fsdp4', 3), ('data2_fsdp2_tensor2', None)):
    config.mesh.update(MESHES[name])
    written = len(metric_rows(directory))
    began = time.perf_counter()
    states[name] = train_transformer.train(config, directory, *BATCHES, parallel.make_mesh(config),
                                           stop_after=stop_after)
    result['seconds'][name] = time.perf_counter() - began
    result['losses'][name] = read_losses(directory, skip=written)
  result['final_step'] = int(states['data2_fsdp2_tensor2'].step)

  for name, state in states.items():
    layers = state.params['params']['layers']
    mu = state.opt_state[1][0].mu['params']['layers']
    result['shardings'][name] = dict(
        mlp_in_kernel=described(layers['mlp_in']['kernel']),
        mlp_in_kernel_adam_mu=described(mu['mlp_in']['kernel']),
        mlp_in_kernel_ema=described(state.ema_params['params']['layers']['mlp_in']['kernel']),
        query_kernel=described(layers['query']['kernel']),
        token_embedding=described(state.params['params']['token_embed']['embedding']),
        step=described(state.step))
  loaded = restore.transformer_params(config, directory, parallel.make_mesh(config))
  result['shardings']['load_params'] = dict(
      mlp_in_kernel=described(loaded['params']['layers']['mlp_in']['kernel']))

  # Decoding a batch split over ('data', 'fsdp') with fsdp-sharded parameters.
  model = NestedMaskedTransformer(config_lib.transformer_config(config))
  schedule = config.eval.schedules.small
  plan = config_lib.check_schedule(config, schedule, 'schedule').plan(
      config_lib.decode_task(config))
  decode = Decoder(model, config_lib.sampling_options(config))
  labels = np.arange(16, dtype=np.int32) % 3
  init = np.full((16, model.config.seq_len), model.config.mask_id, np.int32)
  rng = jax.random.PRNGKey(1)
  params = states['data2_fsdp4'].params
  single = jax.device_put(params, jax.devices()[0])
  reference = decode(single, jnp.asarray(init), jnp.asarray(labels), rng, plan).tokens
  batch = parallel.shard_batch({'init': init, 'labels': labels}, states['data2_fsdp4'].step
                               .sharding.mesh)
  began = time.perf_counter()
  sharded = decode(params, batch['init'], batch['labels'], rng, plan).tokens
  result['seconds']['sharded_decode'] = time.perf_counter() - began
  result['tokens_equal'] = float(np.mean(np.asarray(sharded) == np.asarray(reference)))
  result['decoded_tokens'] = described(sharded)
  result['reference_devices'] = len(reference.sharding.device_set)
  # One executable per step program and input placement (the sharded steps hand each other
  # their state placed as the next program expects, so none compiles twice), and one noise
  # program for both: its inputs, the key and the row ids, are the same host arrays.
  result['decode_executables'] = [decode.num_compiled,
                                  2 * len({program_key(s) for s in plan}) + 1]
  # Data parallel decoding moves nothing between devices: guidance runs its two passes on a
  # new leading axis and the scatters are mapped over the rows, so no program has a collective.
  data_mesh = parallel.make_mesh(tiny_config())  # data=-1: all 8 devices
  replicated = jax.device_put(params, parallel.replicated(data_mesh))
  split = parallel.shard_batch({'init': init, 'labels': labels}, data_mesh)
  executables = decode.compile_plan(replicated, split['init'], split['labels'], np.asarray(rng),
                                    plan, parallel.shard_batch(np.arange(16, dtype=np.int32),
                                                               data_mesh))
  result['data_parallel_decode_collectives'] = sum(
      collectives.collective_bytes(executable.as_text())['total']['count']
      for executable in executables)
  # The decode lays its activations out by the config's rules, as training does: a rule that
  # keeps the batch whole makes the same plan gather the rows split over the devices.
  whole_batch = tuple(rule for rule in parallel.RULES if rule[0] != 'batch')
  executables = Decoder(model, config_lib.sampling_options(config), rules=whole_batch
                        ).compile_plan(replicated, split['init'], split['labels'],
                                       np.asarray(rng), plan,
                                       parallel.shard_batch(np.arange(16, dtype=np.int32),
                                                            data_mesh))
  result['whole_batch_rule_decode_collectives'] = sum(
      collectives.collective_bytes(executable.as_text())['total']['count']
      for executable in executables)

  tokenizer_checks(workdir, result)

  # A per-process batch that the mesh's batch shards do not divide is a named config error.
  config = tiny_config()
  config.training.batch_size = 6
  config.mesh.update(data=4, fsdp=2, tensor=1)
  try:
    train_transformer.train(config, os.path.join(workdir, 'bad_batch'), *BATCHES,
                            parallel.make_mesh(config))
  except config_lib.ConfigError as error:
    result['batch_size_error'] = str(error)
  print('RESULT ' + json.dumps(result), flush=True)


if __name__ == '__main__':
  main(sys.argv[1])
