"""Meshes, logical-axis shardings, sharded training and decoding, and two-process training.

This process already runs JAX on one CPU device, so the 8-device checks run in a subprocess
(``tests/helpers/parallel_checks.py`` with ``--xla_force_host_platform_device_count=8``), and the
multi-host checks in two processes of 2 devices each (``tests/helpers/multihost_checks.py``) that
form one JAX cluster over localhost.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.extend
import multihost_checks
import numpy as np
import parallel_checks
import pytest
from conftest import CPU_FAST_COMPILE, HELPERS
from jax.sharding import PartitionSpec as P

from nested_decode import config_lib, parallel
from nested_decode.data import pipeline
from nested_decode.models import partitioning
from nested_decode.models.transformer import NestedMaskedTransformer
from nested_decode.training import train_transformer

TESTS = HELPERS
# 8 virtual devices on 2 busy cores can reach a collective far apart; don't let XLA abort.
SLOW_COLLECTIVES = '--xla_cpu_collective_call_terminate_timeout_seconds=600'


def subprocess_env(devices: int, cache_dir, **extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('JAX_', 'SLURM_', 'TPU_')) and k != 'XLA_FLAGS'}
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {SLOW_COLLECTIVES} '
                       f'{CPU_FAST_COMPILE}',
             JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', **extra)
  return env


def start(script: str, workdir, env: dict) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, os.path.join(TESTS, script), str(workdir)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result_of(process: subprocess.Popen, timeout: float = 420) -> dict:
  try:
    out, err = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    out, err = process.communicate()
  lines = [line for line in out.splitlines() if line.startswith('RESULT ')]
  if process.returncode != 0 or not lines:
    noise = ('W1', 'I1', '    @')  # XLA's partitioner warnings and stack frames
    tail = '\n'.join([line for line in err.splitlines() if not line.startswith(noise)][-40:])
    pytest.fail(f'{process.args} exited with {process.returncode}:\n{tail}')
  return json.loads(lines[-1][len('RESULT '):])


# ----------------------------------------------------------------------------------------------
# One device: mesh construction, rules, multi-host detection
# ----------------------------------------------------------------------------------------------

def test_mesh_axes_resolve_minus_one_to_the_remaining_devices():
  assert parallel.mesh_shape(dict(data=-1, fsdp=1, tensor=1), 8) == (8, 1, 1)
  assert parallel.mesh_shape(dict(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
  assert parallel.mesh_shape(dict(data=2, fsdp=4, tensor=1), 8) == (2, 4, 1)


@pytest.mark.parametrize('axes, named', [
    (dict(data=3, fsdp=1, tensor=1), 'config.mesh.data=3'),
    (dict(data=-1, fsdp=3, tensor=1), 'config.mesh.fsdp=3'),
    (dict(data=-1, fsdp=-1, tensor=1), 'config.mesh.fsdp=-1'),
    (dict(data=0, fsdp=1, tensor=1), 'config.mesh.data=0'),
    (dict(data=-1, fsdp=1, tensor=1.5), 'config.mesh.tensor=1.5'),
    (dict(data=-1, fdsp=2), 'config.mesh.fdsp=2'),
])
def test_mesh_errors_name_the_key(axes, named):
  with pytest.raises(config_lib.ConfigError, match=named.replace('.', r'\.')):
    parallel.mesh_shape(axes, 8)


def test_a_mesh_larger_than_the_devices_is_a_config_error():
  config = parallel_checks.tiny_config()
  config.mesh.data = 2
  with pytest.raises(config_lib.ConfigError, match=r'config\.mesh\.data=2.*there are 1'):
    parallel.make_mesh(config)
  assert parallel.make_mesh(parallel_checks.tiny_config()).shape == dict(data=1, fsdp=1,
                                                                         tensor=1)


def test_validate_checks_the_mesh():
  config = parallel_checks.tiny_config()
  config_lib.validate(config)
  config.mesh.tensor = -1
  with pytest.raises(config_lib.ConfigError, match=r'config\.mesh\.tensor'):
    config_lib.validate(config)


def test_rules_can_come_from_the_config():
  config = parallel_checks.tiny_config()
  assert parallel.logical_rules(config) == parallel.RULES
  config.mesh.rules = (('embed', None), ('mlp', ('fsdp', 'tensor')))
  config_lib.validate(config)
  assert parallel.logical_rules(config) == (('embed', None), ('mlp', ('fsdp', 'tensor')))
  config.mesh.rules = (('embed', 'model'),)
  with pytest.raises(config_lib.ConfigError, match=r'config\.mesh\.rules'):
    config_lib.validate(config)


def test_logical_names_map_to_mesh_axes_that_divide_them():
  mesh = jax.sharding.AbstractMesh((2, 2, 2), parallel.AXES)
  spec = lambda names, shape: partitioning.logical_spec(names, shape, mesh.shape, parallel.RULES)
  assert spec(('layers', 'embed', 'mlp'), (4, 64, 256)) == P(None, 'fsdp', 'tensor')
  # 17 rows (16 codes and the mask id) do not split in two: replicated.
  assert spec(('vocab', 'embed'), (17, 64)) == P(None, 'fsdp')
  assert spec(('batch', 'length'), (8, 16)) == P(('data', 'fsdp'), None)
  # A mesh axis is used once per array.
  assert spec(('mlp', 'vocab'), (4, 4)) == P('tensor', None)


def _constraint_specs(fn, *args, mesh=None, rules=parallel.RULES) -> list[P]:
  """The specs of the sharding constraints in ``fn``'s program traced under ``mesh``."""
  with jax.sharding.use_abstract_mesh(mesh), partitioning.use_rules(rules):
    jaxpr = jax.make_jaxpr(fn)(*args)
  found = []

  def visit(jaxpr):
    found.extend(eqn.params['sharding'].spec for eqn in jaxpr.eqns
                 if eqn.primitive.name == 'sharding_constraint')
    for sub in jax.extend.core.subjaxprs(jaxpr):
      visit(sub)
  visit(jaxpr.jaxpr)
  return found


def test_activations_are_pinned_by_name_on_a_mesh_and_left_alone_without_one():
  mesh = jax.sharding.AbstractMesh((2, 2, 2), parallel.AXES,
                                   axis_types=(jax.sharding.AxisType.Auto,) * 3)
  x = np.zeros((8, 5, 6, 4), np.float32)
  assert partitioning.constrain(x, partitioning.HEADS) is x  # no context mesh
  heads = lambda: lambda x: partitioning.constrain(x, partitioning.HEADS)  # one trace each
  assert _constraint_specs(heads(), x, mesh=mesh) == [P(('data', 'fsdp'), None, 'tensor', None)]
  assert _constraint_specs(heads(), x, mesh=mesh, rules=(('batch', 'data'),)) == \
      [P('data', None, None, None)]
  # the transformer: the residual stream split over the batch only (never over 'embed', which
  # the embedding tables are split along), heads and MLP units over 'tensor'
  config = parallel_checks.tiny_config()
  model = NestedMaskedTransformer(config_lib.transformer_config(config))
  tokens, labels = np.zeros((8, 16), np.int32), np.zeros((8,), np.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, labels))
  specs = _constraint_specs(lambda p: model.apply(p, tokens, labels, width_factor=(1, 2)),
                            params, mesh=mesh)
  assert P(('data', 'fsdp'), None, None) in specs
  assert P(('data', 'fsdp'), None, 'tensor', None) in specs  # 8 and 4 heads
  assert P(('data', 'fsdp'), None, 'tensor') in specs  # MLP units, logits
  assert all(spec[0] == ('data', 'fsdp') for spec in specs)


def test_merged_heads_are_split_where_the_heads_are_and_never_inside_one():
  mesh = jax.sharding.AbstractMesh((2, 2, 2), parallel.AXES,
                                   axis_types=(jax.sharding.AxisType.Auto,) * 3)
  merged = lambda heads: lambda x: partitioning.constrain_merged_heads(x, heads)
  x = np.zeros((8, 5, 24), np.float32)
  assert partitioning.constrain_merged_heads(x, 6) is x  # no context mesh
  assert _constraint_specs(merged(6), x, mesh=mesh) == [P(('data', 'fsdp'), None, 'tensor')]
  # 3 heads of 8 do not split over tensor=2; 24 columns would, through the middle of a head
  assert _constraint_specs(merged(3), x, mesh=mesh) == [P(('data', 'fsdp'), None, None)]
  head_dim_too = (('batch', 'fsdp'), ('heads', 'tensor'), ('kv', 'data'))
  assert _constraint_specs(merged(6), x, mesh=mesh, rules=head_dim_too) == \
      [P('fsdp', None, ('tensor', 'data'))]


def test_every_parameter_name_of_the_transformer_has_a_rule():
  config = parallel_checks.tiny_config()
  model = NestedMaskedTransformer(config_lib.transformer_config(config))
  boxed = jax.eval_shape(train_transformer.boxed_init(config, model))
  names = set()
  for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, 'names')):
    names.update(getattr(leaf, 'names', ()))
  assert names and names <= {name for name, _ in parallel.RULES}, names


def test_row_shares_pad_the_last_batch_and_gather_drops_the_padding():
  mesh = parallel.make_mesh(config_lib.base_config(
      num_layers=1, width=8, num_heads=1, token_shape=(2,), codebook_size=4, num_classes=0,
      guidance_scale=0.0, batch_size=1))
  shares = list(parallel.row_shares(5, 4, mesh))
  assert [s.rows.tolist() for s in shares] == [[0, 1, 2, 3], [4, 4, 4, 4]]
  assert [s.num_valid for s in shares] == [4, 1]
  values = np.arange(5) * 10
  assert [parallel.gather_share(s.take(values), s).tolist() for s in shares] == [
      [0, 10, 20, 30], [40]]


def test_batch_sizes_are_global_and_split_evenly_over_processes(monkeypatch):
  assert parallel.process_batch_size(256, 'training.batch_size') == 256
  monkeypatch.setattr(parallel.jax, 'process_count', lambda: 4)
  assert parallel.process_batch_size(256, 'training.batch_size') == 64
  with pytest.raises(config_lib.ConfigError,
                     match=r'config.tokenizer_training.batch_size=250 .* over the 4 processes'):
    parallel.process_batch_size(250, 'tokenizer_training.batch_size')


@pytest.mark.parametrize('environ, kind', [
    ({}, None),
    ({'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '1'},
     'explicit'),
    ({'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'n[1-2]', 'SLURM_NTASKS': '2',
      'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}, 'slurm'),
    ({'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'n1', 'SLURM_NTASKS': '1',
      'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}, None),
    ({'TPU_WORKER_HOSTNAMES': 'w-0,w-1'}, 'tpu'),
    ({'TPU_WORKER_HOSTNAMES': 'w-0,w-1', 'NESTED_DECODE_DISTRIBUTED': '0'}, None),
    ({'NESTED_DECODE_DISTRIBUTED': '1'}, 'auto'),
])
def test_cluster_detection(environ, kind):
  assert parallel.cluster_kind(environ) == kind


def test_partial_explicit_cluster_variables_are_an_error():
  with pytest.raises(ValueError, match='JAX_PROCESS_ID'):
    parallel.cluster_kind({'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '2'})


# ----------------------------------------------------------------------------------------------
# 8 devices (subprocess)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('eight_devices')
  env = subprocess_env(8, tmp_path_factory.mktemp('compile_cache'))
  return result_of(start('parallel_checks.py', workdir, env))


def test_sharded_training_matches_one_device(eight_devices):
  losses = eight_devices['losses']
  one = losses['one_device']
  assert sorted(one) == ['1', '2', '3', '4']
  for mesh in ('data2_fsdp4', 'data2_fsdp2_tensor2'):
    assert losses[mesh], mesh
    for step, loss in losses[mesh].items():
      assert loss == pytest.approx(one[step], rel=1e-5, abs=1e-5), (mesh, step)
  # Steps 3-4 ran on the tensor-parallel mesh from the checkpoint the fsdp mesh wrote at 2.
  assert sorted(losses['data2_fsdp2_tensor2']) == ['3', '4']
  assert eight_devices['final_step'] == 4


def test_parameters_and_optimizer_state_are_sharded(eight_devices):
  fsdp = eight_devices['shardings']['data2_fsdp4']
  # [layers, embed, mlp] = [2, 64, 256]: embed over fsdp=4.
  assert fsdp['mlp_in_kernel']['shard_shapes'] == [[2, 16, 256]]
  assert fsdp['mlp_in_kernel_adam_mu'] == fsdp['mlp_in_kernel']
  assert fsdp['mlp_in_kernel_ema'] == fsdp['mlp_in_kernel']  # the weight average too
  assert fsdp['query_kernel']['shard_shapes'] == [[2, 16, 8, 8]]
  assert fsdp['step']['spec'] == 'P()'
  tensor = eight_devices['shardings']['data2_fsdp2_tensor2']
  assert tensor['mlp_in_kernel']['shard_shapes'] == [[2, 32, 128]]  # embed/2, mlp/2
  assert tensor['query_kernel']['shard_shapes'] == [[2, 32, 4, 8]]  # embed/2, heads/2
  assert tensor['token_embedding']['shard_shapes'] == [[17, 32]]  # 17 rows: vocab replicated
  assert tensor['mlp_in_kernel_ema'] == tensor['mlp_in_kernel']
  assert eight_devices['shardings']['load_params']['mlp_in_kernel'] == tensor['mlp_in_kernel']


def test_sharded_tokenizer_training_matches_one_device(eight_devices):
  one, mesh = (eight_devices['tokenizer'][k] for k in ('one_device', 'data2_fsdp4'))
  assert len(one['losses']) == 2
  np.testing.assert_allclose(mesh['losses'], one['losses'], rtol=1e-5)
  np.testing.assert_allclose(mesh['reconstruction_mse'], one['reconstruction_mse'], rtol=1e-5)
  assert one['split_params'] == 0 and mesh['split_params'] > 0
  assert all('fsdp' in spec for spec in mesh['split_specs'])


def test_decoding_a_sharded_batch_gives_the_one_device_tokens(eight_devices):
  assert eight_devices['reference_devices'] == 1
  assert eight_devices['decoded_tokens']['shard_shapes'] == [[2, 16]]  # 16 rows over 8
  compiled, expected = eight_devices['decode_executables']
  assert compiled == expected
  assert eight_devices['data_parallel_decode_collectives'] == 0
  assert eight_devices['whole_batch_rule_decode_collectives'] > 0  # config.mesh.rules apply
  assert eight_devices['tokens_equal'] == 1.0


def test_indivisible_batch_names_the_key_and_the_mesh(eight_devices):
  message = eight_devices['batch_size_error']
  assert 'config.training.batch_size=6' in message and 'data=4 x fsdp=2' in message


# ----------------------------------------------------------------------------------------------
# Two processes x 2 devices (one JAX cluster on localhost)
# ----------------------------------------------------------------------------------------------

def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def reference_losses(config, steps: int) -> list[float]:
  """The same steps on this process's one device, over the two processes' halves of each
  global batch joined."""
  source = multihost_checks.token_source()
  loaders = [iter(pipeline.make_loader(source, batch_size=config.training.batch_size // 2,
                                       seed=config.seed, train=True, shard_index=i,
                                       shard_count=2)) for i in range(2)]
  model = NestedMaskedTransformer(config_lib.transformer_config(config))
  mesh = parallel.make_mesh(config)
  state = train_transformer.create_train_state(config, model, mesh)
  train_step = train_transformer.make_train_step(config, model, mesh)
  losses = []
  for _ in range(steps):
    parts = [next(loader) for loader in loaders]
    batch = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    state, metrics = train_step(state, parallel.shard_batch(batch, mesh))
    losses.append(float(metrics['loss']))
  return losses


def test_two_processes_train_checkpoint_and_restore_together(tmp_path):
  address = f'127.0.0.1:{free_port()}'
  processes = [
      start('multihost_checks.py', tmp_path / 'run',
            subprocess_env(2, tmp_path / 'cache', JAX_COORDINATOR_ADDRESS=address,
                           JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i)))
      for i in range(2)]
  try:
    config = multihost_checks.config_for_test()
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    expected = reference_losses(config, config.training.num_steps)
    results = [result_of(p) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  a, b = results
  assert (a['process'], b['process'], a['processes'], a['devices']) == (0, 1, 2, 4)
  assert a['first'] == b['first'] and a['resumed'] == b['resumed']  # one global computation
  assert sorted(a['first']) == ['1', '2', '3'] and sorted(a['resumed']) == ['3', '4', '5']
  assert a['resumed']['3'] == pytest.approx(a['first']['3'], rel=1e-6)  # resumed from step 2
  steps = {**a['first'], **a['resumed']}
  for step, loss in steps.items():
    assert loss == pytest.approx(expected[int(step) - 1], rel=1e-5), step
  assert a['checksum'] == b['checksum']
  with open(tmp_path / 'run' / 'transformer_metrics.jsonl') as f:  # process 0 alone writes it
    assert [json.loads(line)['step'] for line in f] == [1, 2, 3, 3, 4, 5]
  assert a['restored_equal'] and b['restored_equal']
  # fsdp=4 over both processes: each holds a quarter of the kernel on each of its devices.
  assert a['kernel_local_shards'] == b['kernel_local_shards'] == [[2, 16, 256]] * 2
  # Each process fed half of the decode batch; gathered, both have all of it, as unsplit.
  assert (a['local_rows'], b['local_rows']) == ([0, 8], [8, 16])
  assert a['decoded'] == b['decoded'] and np.asarray(a['decoded']).shape == (16, 16)
  assert a['decoded_equal'] and b['decoded_equal']
  # Global batches of 8 rows of 10: each process computes on its own rows (the last batch is
  # padded with copies of row 9), and both gather every row once, in order.
  assert a['share_rows'] == [[0, 1, 2, 3], [8, 9, 9, 9]]
  assert b['share_rows'] == [[4, 5, 6, 7], [9, 9, 9, 9]]
  assert a['share_valid'][1] == [True, True, False, False] and not any(b['share_valid'][1])
  assert a['computed'] == [[0, 10, 20, 30], [80, 90, 90, 90]]
  assert b['computed'] == [[40, 50, 60, 70], [90, 90, 90, 90]]
  assert a['gathered'] == b['gathered'] == [[0, 10, 20, 30, 40, 50, 60, 70], [80, 90]]
