"""Ahead-of-time compiles for a small TPU slice (v5e:2x2, 4 chips) on this CPU, through the code
of ``--mode=compile_tpu``; JAX keeps running on the CPU."""

import importlib.util
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from conftest import load_config as load
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nested_decode import config_lib, main, parallel
from nested_decode.config_lib import ConfigError
from nested_decode.models import attention
from nested_decode.tools import tpu_fit, tpu_time

if importlib.util.find_spec('libtpu') is None:
  pytest.skip('libtpu is not installed: compiling for TPU topologies needs it '
              '(pip install -e ".[dev]")', allow_module_level=True)

pytestmark = pytest.mark.usefixtures('tpu_compiler')

TOPOLOGY = 'v5e:2x2'
# nested / single-width collective traffic of the train step of small_config(data=2, tensor=2)
# (docs/tpu_fit.md)
TINY_TENSOR_RATIO = 2.05


def small_config(**mesh):
  """MNIST :tiny with splash attention, full remat and 2-step decodes."""
  config = load('mnist', 'tiny')
  config.tpu_fit.topology = TOPOLOGY
  config.model.update(attention_impl='splash', remat='full')
  config.sampling.steps = 2
  config.eval.schedules = ml_collections.ConfigDict(dict(
      magnets=config_lib.schedule(((1, 2),))))  # its second step is a cached pass
  config.eval.batch_size = config.training.batch_size = 8
  config.mesh.update(mesh)
  config_lib.validate(config)
  return config


def test_the_test_process_runs_on_cpu():
  assert jax.default_backend() == 'cpu'


def test_train_step_and_decodes_compile_and_fit(tmp_path, capsys):
  config = small_config(data=2, tensor=2)
  config.tpu_fit.single_width = True
  main.run_compile_tpu(main.Run(config, 'mnist:tiny', str(tmp_path)))
  with open(tmp_path / 'compile_tpu.json') as f:
    report = json.load(f)
  rows = report['rows']
  assert report['config'] == 'mnist:tiny'
  assert [row['program'] for row in rows] == ['train', 'train:single_width', 'decode:baseline',
                                              'decode:magnets']
  out = capsys.readouterr().out
  assert '| mnist:tiny | v5e:2x2 | data=2 x fsdp=1 x tensor=2 | train | 8 | full | splash |' in out
  # collective traffic of the train steps (docs/tpu_fit.md): all-reduces of activations over
  # 'tensor' and of gradients over 'data', and for the narrow widths, whose heads and MLP units
  # all sit on the first tensor shard, collective-permutes
  nested, single = rows[0], rows[1]
  assert f"| {nested['collective_vs_single']:.2f}x |" in out
  assert nested['collective_vs_single'] == pytest.approx(
      nested['collective_wire_gib'] / single['collective_wire_gib'])
  assert nested['collective_vs_single'] == pytest.approx(TINY_TENSOR_RATIO, rel=0.02)
  assert nested['collective_permute_gib'] > 0 == single['collective_permute_gib']
  assert 0 < single['all_reduce_gib'] < nested['all_reduce_gib']
  assert all('collective_gib' not in row for row in rows[2:])
  for row in rows:
    assert row['device_kind'] == 'TPU v5 lite' and row['devices'] == 4
    assert row['mesh'] == 'data=2 x fsdp=1 x tensor=2' and row['hbm_gib'] == 16
    assert 0 < row['argument_gib'] < row['total_gib'] < 0.1 and row['fits']
    assert row['tflops_per_device'] > 0
  # the compiler's modeled time (tools/tpu_time.py): one layer, so the scanned program is timed
  assert '| modeled_ms | modeled_tflops_per_second |' in out
  for row in rows:
    assert row['modeled_seconds'] > 0 and row['timing_compile_seconds'] == 0
    assert 0 < row['modeled_fraction_of_peak'] < 1  # no program beats the chip's peak
    assert row['modeled_tflops_per_second'] == pytest.approx(
        row['timed_tflops_per_device'] / row['modeled_seconds'])
    assert row['unmodeled_kernels'] > 0  # splash attention's Pallas kernels
  assert nested['modeled_time_vs_single'] > 1
  baseline, magnets = rows[2], rows[3]
  assert baseline['modeled_speedup'] == 1 == baseline['flop_ratio']
  assert magnets['modeled_speedup'] == pytest.approx(
      baseline['modeled_seconds'] / magnets['modeled_seconds'])
  assert jax.default_backend() == 'cpu'


def test_modeled_time_counts_every_layer_of_a_scan():
  """The modeled time of a two-layer scanned train step (one width: a smaller program) is that
  of the same program with its layers unrolled, which the cost model sees whole; the scanned
  program's estimate is not."""
  config = small_config()
  config.model.update(num_layers=2, attention_impl='xla')
  config.training.widths = (1,)
  config.tpu_fit.update(topology='v5e:1x1', decodes=False)  # one chip compiles faster
  unrolled = config.copy_and_resolve_references()
  unrolled.model.scan_layers = False
  with jax.default_matmul_precision('default'):  # conftest's 'highest' triples the compile
    scanned_row, = tpu_fit.compile_rows(config, log=lambda line: None)
    unrolled_row, = tpu_fit.compile_rows(unrolled, log=lambda line: None)
  assert scanned_row['timing_compile_seconds'] > 0 == unrolled_row['timing_compile_seconds']
  assert scanned_row['modeled_seconds'] == unrolled_row['modeled_seconds']
  assert scanned_row['timed_tflops_per_device'] == unrolled_row['timed_tflops_per_device']
  assert unrolled_row['scan_scaled_over_modeled'] == 1 != scanned_row['scan_scaled_over_modeled']
  assert scanned_row['unmodeled_kernels'] == 0


def test_the_simpler_cheaper_decodes_get_rows_with_their_modeled_speedups():
  """With tpu_fit.families, the full width with fewer steps and the sub-model alone, each with
  and without the cache; uncached decodes of one width run one executable per step. Without
  tpu_fit.train, no train step. The decodes run sampling.attention_impl, here XLA's attention,
  not the model's Pallas splash kernels."""
  config = small_config()
  config.sampling.attention_impl = 'xla'
  config.training.widths = (1, 2)
  config.tpu_fit.update(topology='v5e:1x1', families=True, train=False)  # one chip: faster
  with jax.default_matmul_precision('default'):  # conftest's 'highest' triples the compile
    rows = {row['program']: row for row in tpu_fit.compile_rows(config, log=lambda line: None)}
  assert sorted(rows) == sorted(
      ['decode:baseline', 'decode:magnets'] + [f'decode:{family}:{decode}' for family,
      decode in [('fewer_steps', '1x1_nocache'), ('fewer_steps', '1x1_cached'),
                 ('fewer_steps', '1x2_nocache'), ('fewer_steps', '1x2_cached'),
                 ('sub_model', '2x2_nocache'), ('sub_model', '2x2_cached')]])
  assert all(row['attention_impl'] == 'xla' and row['unmodeled_kernels'] == 0
             for row in rows.values())
  baseline = rows['decode:baseline']
  assert rows['decode:fewer_steps:1x2_nocache']['modeled_seconds'] == pytest.approx(
      baseline['modeled_seconds'], rel=1e-9)
  one_step = rows['decode:fewer_steps:1x1_nocache']
  assert one_step['modeled_speedup'] == pytest.approx(2, rel=1e-9)
  assert one_step['flop_ratio'] == pytest.approx(2, rel=1e-9)
  assert rows['decode:sub_model:2x2_nocache']['flop_ratio'] > 1


def test_fsdp_shards_the_state_and_per_chip_memory_falls_as_the_fsdp_axis_grows():
  """The nested train step of a 256-wide model at a global batch of 16 (the state outweighs
  the activations), compiled for 4 chips: 4-way FSDP holds about a quarter of the parameters and
  optimizer state per chip, its total is below data parallelism's, and it moves each parameter
  at most three times per step (ZeRO-3: gathered for the forward and the backward pass, its
  gradient reduce-scattered). Without the model's activation constraints XLA gave up the batch
  split (the activations took the parameters' 'embed' sharding) and all-reduced activations
  instead: 0.029 GiB per chip here against 0.015, and per-chip memory above data
  parallelism's in the program of a model without the two-step slicing of nested_param."""
  rows = {}
  for fsdp in (1, 4):
    config = load('mnist', 'tiny')
    config.tpu_fit.update(topology=TOPOLOGY, decodes=False)
    config.model.update(width=256, num_heads=8, mlp_dim=1024, num_layers=2)
    config.training.batch_size = 16
    config.mesh.update(data=4 // fsdp, fsdp=fsdp)
    config.tpu_fit.modeled_time = False
    with jax.default_matmul_precision('default'):  # conftest's 'highest' triples the compile
      rows[fsdp], = tpu_fit.compile_rows(config, log=lambda line: None)
  replicated, sharded = rows[1], rows[4]
  assert sharded['argument_gib'] < 0.4 * replicated['argument_gib']
  assert sharded['total_gib'] < 0.8 * replicated['total_gib']
  param_gib = replicated['argument_gib'] / 3  # float32 parameters and two AdamW moments
  assert sharded['collective_wire_gib'] < 3 * param_gib


def test_splash_kernel_compiles_for_tpu_under_a_mesh():
  mesh = jax.make_mesh((2, 1, 2), parallel.AXES, devices=tpu_fit.topology_devices(TOPOLOGY),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  split = NamedSharding(mesh, P(parallel.BATCH_AXES, None, 'tensor', None))
  q = jax.ShapeDtypeStruct((4, 300, 4, 64), jnp.bfloat16, sharding=split)
  attend = jax.jit(jax.grad(lambda q, k, v: attention.attend(q, k, v, 'splash').sum()))
  # conftest asks for 'highest' matmul precision, which Mosaic cannot give bf16 operands
  with jax.set_mesh(mesh), jax.default_matmul_precision('default'):
    hlo = attend.lower(q, q, q).compile().as_text()
  assert 'tpu_custom_call' in hlo  # the Mosaic kernel, not interpreted


def test_modeled_time_removes_the_cost_models_minus_one_second_per_concat_bitcast():
  """Splash attention's forward pass on one v5e chip: the compiler inserts a ConcatBitcast,
  which its cost model charges -1 s, and the Pallas kernel, which it does not model."""
  mesh = jax.make_mesh((1, 1, 1), parallel.AXES, devices=tpu_fit.topology_devices('v5e:1x1'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  split = NamedSharding(mesh, P(parallel.BATCH_AXES, None, 'tensor', None))
  q = jax.ShapeDtypeStruct((8, 1280, 16, 64), jnp.bfloat16, sharding=split)
  attend = jax.jit(lambda q, k, v: attention.attend(q, k, v, 'splash'))
  with jax.set_mesh(mesh), jax.default_matmul_precision('default'):
    compiled = attend.lower(q, q, q).compile()
  raw = compiled.cost_analysis()['optimal_seconds']
  bitcasts = compiled.as_text().count(tpu_time.MINUS_ONE_SECOND_CALL)
  assert bitcasts >= 1 and -bitcasts < raw < 0
  assert tpu_time.modeled_seconds(compiled, compiled.as_text()) == pytest.approx(raw + bitcasts)
  assert tpu_time.time_report([compiled], 'TPU v5 lite')['unmodeled_kernels'] == 1


def test_modeled_time_of_a_large_matmul_is_near_the_chips_peak():
  """[65536, 768] @ [768, 768] in bfloat16 on one v5e chip: 77 GFLOP, 0.39 ms at its 197 TFLOP/s
  peak; the cost model says 0.94 ms (42% of peak, issue 29)."""
  device = tpu_fit.topology_devices('v5e:1x1')[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  x = jax.ShapeDtypeStruct((65536, 768), jnp.bfloat16, sharding=sharding)
  w = jax.ShapeDtypeStruct((768, 768), jnp.bfloat16, sharding=sharding)
  with jax.default_matmul_precision('default'):
    compiled = jax.jit(jnp.matmul).lower(x, w).compile()
  report = tpu_time.time_report([compiled], device.device_kind)
  assert report['timed_tflops_per_device'] == pytest.approx(2 * 65536 * 768 ** 2 / 1e12)
  assert 0.3 < report['modeled_fraction_of_peak'] < 0.6
  assert report['unmodeled_kernels'] == 0


def test_a_v6e_program_whose_hlo_cannot_be_read_back_is_timed_only_as_a_short_program():
  """On v6e the compiler offloads a large gather to the SparseCore, and jaxlib cannot read that
  program's HLO back (an async-update it rejects), so its sentinels cannot be counted: a decode
  step (short) gets the fractional part of its estimate, any other program no time."""
  device = tpu_fit.topology_devices('v6e:1x1')[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  logits = jax.ShapeDtypeStruct((1280, 128), jnp.float32, sharding=sharding)
  ids = jax.ShapeDtypeStruct((1280,), jnp.int32, sharding=sharding)
  pick = lambda logits, ids: jnp.take_along_axis(logits, ids[:, None], axis=-1)
  compiled = jax.jit(pick).lower(logits, ids).compile()
  assert tpu_time.hlo_text(compiled) is None
  raw = compiled.cost_analysis()['optimal_seconds']
  report = tpu_time.time_report([compiled, compiled], device.device_kind, short_programs=True)
  assert report['modeled_seconds'] == pytest.approx(2 * (raw - math.floor(raw)))
  assert report['unreadable_programs'] == 1 and report['unmodeled_kernels'] is None
  with pytest.raises(tpu_time.UnreadableEstimate, match='may run a second or more'):
    tpu_time.time_report([compiled], device.device_kind)


def test_sentinels_of_an_unreadable_program_come_from_the_fraction_of_its_estimate():
  # -3.999375 s: a v6e decode step whose XLA text dump held 4 ConcatBitcasts (tpu_time.py)
  assert tpu_time.seconds_without_sentinels(-3.999375) == pytest.approx(0.000625)
  assert tpu_time.seconds_without_sentinels(-4.6, least_seconds=0.1) == pytest.approx(0.4)
  for raw, least_seconds in ((-2.0, 0.0), (0.0005, 0.001), (-3.9999, 0.001)):
    with pytest.raises(tpu_time.UnreadableEstimate, match='cannot be counted'):
      tpu_time.seconds_without_sentinels(raw, least_seconds)


def test_unknown_topology_is_a_config_error():
  config = small_config()
  config.tpu_fit.topology = 'v9z:3x3'
  with pytest.raises(ConfigError, match=r"config.tpu_fit.topology='v9z:3x3'"):
    tpu_fit.compile_rows(config)


def test_batch_that_does_not_split_over_the_slice_is_a_config_error():
  config = small_config()
  config.eval.batch_size = 6
  with pytest.raises(ConfigError, match=r'config.eval.batch_size=6.*4 batch shards'):
    tpu_fit.compile_rows(config)


def test_a_program_the_compiler_refuses_for_lack_of_hbm_is_a_row_that_does_not_fit():
  message = ('RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total '
             'memory required for HLO temporaries (77.01G) exceeds available HBM (15.75G).')
  row = tpu_fit.out_of_memory_report(message, hbm=16 * tpu_fit.GIB, seconds=3.0)
  assert not row['fits'] and row['temp_gib'] == pytest.approx(77.01) and row['hbm_gib'] == 16
  table = tpu_fit.markdown_table([dict(row, program='train', topology=TOPOLOGY, mesh='fsdp=4',
                                       global_batch=8, remat='none', attention_impl='xla')],
                                 'k600')
  assert '| 8 | none | xla | ? | 77.01 | ? | 16 | **no** | ? | 3 |' in table
