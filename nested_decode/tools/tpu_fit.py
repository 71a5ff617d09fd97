"""Does a config fit the chips? Ahead-of-time compiles for a TPU topology, on any machine.

With ``libtpu`` installed, JAX describes the devices of a TPU slice (``config.tpu_fit.topology``,
e.g. ``v5e:4x4``) without having one, and compiles programs for them; JAX itself keeps running
on its default (CPU) backend. This module builds ``config.mesh`` over those devices and compiles
what a run would: the nested train step (state sharded as in training, a global batch of
``config.training.batch_size`` rows) and the baseline decode and every ``config.eval.schedules``
decode (parameters replicated in the model dtype, a global batch of ``config.eval.batch_size``
split over the batch axes). Only shapes matter: the given tokens of frame-prediction tasks are
ordinary int32 inputs of the decode, its plan generates the task's tokens only.

Per program it reports XLA's per-device memory (arguments, outputs, temporaries; the total is
arguments + temporaries + outputs not aliased to arguments) against the chip's HBM, and FLOPs
per device. A decode runs one executable per step (shared between steps and schedules, see
``decoding/sampler.py``): its memory is its largest executable's, its FLOPs the sum over steps.
XLA's cost analysis counts one iteration of a ``scan``: with scanned layers the counts are
multiplied by ``num_layers``, which also multiplies the work outside the layers (embeddings,
output head, sampling) and so slightly overstates the total.

Train steps also report the bytes their collectives move per device in one step
(``tools/collectives.py``: all-gather, reduce-scatter, all-reduce, all-to-all,
collective-permute, loops counted by their trip counts), and with ``config.tpu_fit.single_width``
a single-width train step (``training.widths=(1,)``, the same model) is compiled too, so the
nested step's row says how much more it moves (``collective_vs_single``, on the ring estimate).

With ``config.tpu_fit.modeled_time`` every row also carries the compiler's modeled time of the
program (``tools/tpu_time.py``: each program compiled a second time with its layers unrolled),
and decodes their FLOP ratio and modeled speedup over the baseline; ``config.tpu_fit.families``
adds the simpler cheaper decodes (``family_schedules``) as rows.
"""

import re
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from nested_decode import config_lib, parallel, platforms
from nested_decode.config_lib import ConfigError
from nested_decode.decoding import families
from nested_decode.decoding.sampler import Decoder
from nested_decode.decoding.schedule import Schedule
from nested_decode.models.transformer import NestedMaskedTransformer, cast_for_inference
from nested_decode.tools import collectives, tpu_time
from nested_decode.training import train_transformer

GIB = 2 ** 30
# HBM per chip by ``device_kind``; JAX reports no memory for devices it cannot address.
HBM_GIB = {'TPU v5 lite': 16, 'TPU v6 lite': 32, 'TPU v5': 95, 'TPU v4': 32}
# "... the total memory required for HLO temporaries (77.01G) exceeds available HBM (15.75G)"
OOM_TEMPORARIES = re.compile(r'HLO temporaries \(([\d.]+)([KMGT])\)')


def topology_devices(topology: str) -> list[jax.Device]:
  """The devices of a TPU slice, e.g. ``'v5e:4x4'`` (16 chips), for compiling only."""
  platforms.prepare_libtpu_for_compiling_only()
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(platform='tpu', topology_name=topology).devices)
  except Exception as error:  # libtpu raises a bare RuntimeError or JaxRuntimeError
    raise ConfigError(f'config.tpu_fit.topology={topology!r} is invalid: libtpu cannot '
                      f'describe it ({type(error).__name__}: {error}); is libtpu installed? '
                      f'Examples: v5e:2x2, v5e:4x4, v6e:4x4, v5p:2x2x2, v4:2x2x2') from error


def hbm_bytes(config: ml_collections.ConfigDict, device: jax.Device) -> int:
  """HBM per chip: ``config.tpu_fit.hbm_gib`` when set, else known from the device kind."""
  if config.tpu_fit.hbm_gib:
    return int(config.tpu_fit.hbm_gib * GIB)
  if device.device_kind not in HBM_GIB:
    raise ConfigError(f'config.tpu_fit.hbm_gib=0 but the HBM of a {device.device_kind!r} is not '
                      f'known (known: {sorted(HBM_GIB)}); set config.tpu_fit.hbm_gib')
  return HBM_GIB[device.device_kind] * GIB


def check_global_batch(batch_size: int, mesh: Mesh, key: str) -> None:
  shards = parallel.data_parallel_size(mesh)
  if batch_size % shards:
    raise ConfigError(f'config.{key}={batch_size} is invalid: the global batch must be '
                      f'divisible by the {shards} batch shards of mesh {parallel.describe(mesh)}')


def train_inputs(config: ml_collections.ConfigDict, model: NestedMaskedTransformer,
                 mesh: Mesh) -> tuple[Any, dict]:
  """Abstract ``(state, batch)`` of the train step, sharded as in training."""
  state = parallel.abstract_state(train_transformer.boxed_init(config, model),
                                 train_transformer.state_shardings(config, model, mesh))
  rows = config.training.batch_size
  check_global_batch(rows, mesh, 'training.batch_size')
  split = parallel.batch_sharding(mesh)
  batch = dict(
      tokens=jax.ShapeDtypeStruct((rows, model.config.seq_len), jnp.int32, sharding=split),
      label=jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=split))
  return state, batch


def decode_inputs(config: ml_collections.ConfigDict, model: NestedMaskedTransformer,
                  mesh: Mesh) -> tuple[Any, ...]:
  """Abstract ``(params, init_tokens, labels, rng)`` of a decode: parameters replicated and
  cast for inference as sampling casts them, the batch split over the batch axes."""
  cfg = model.config
  tokens = jnp.zeros((1, cfg.seq_len), jnp.int32)
  labels = jnp.zeros((1,), jnp.int32)
  params = jax.eval_shape(lambda: cast_for_inference(
      nn.unbox(model.init(jax.random.PRNGKey(0), tokens, labels)), cfg.dtype))
  replicated = parallel.replicated(mesh)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        params)
  rows = config.eval.batch_size
  check_global_batch(rows, mesh, 'eval.batch_size')
  split = parallel.batch_sharding(mesh)
  return (params, jax.ShapeDtypeStruct((rows, cfg.seq_len), jnp.int32, sharding=split),
          jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=split),
          jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated))


def out_of_memory_report(message: str, hbm: int, seconds: float) -> dict:
  """The row of a program the TPU compiler refused because it needs more than the chip's HBM
  (it reports only the temporaries it would need)."""
  needed = OOM_TEMPORARIES.search(message)
  temps = None
  if needed:
    temps = float(needed.group(1)) * 1024 ** ('KMGT'.index(needed.group(2)) + 1) / GIB
  return dict(argument_gib=None, output_gib=None, alias_gib=None, temp_gib=temps,
              total_gib=None, hbm_gib=hbm / GIB, fits=False, xla_tflops_per_device=None,
              tflops_per_device=None, compile_seconds=seconds,
              error=message.strip().splitlines()[0][:300])


COLLECTIVE_COLUMNS = tuple(kind.replace('-', '_') + '_gib' for kind in collectives.KINDS)


def collective_report(hlos: list[str]) -> dict:
  """Per-device GiB of one run of the programs ``hlos`` per collective kind (the larger side of
  each collective, ``collectives.py``), their total, and the ring estimate of what is sent."""
  summaries = [collectives.collective_bytes(hlo) for hlo in hlos]
  total = lambda kind, field: sum(summary[kind][field] for summary in summaries)
  row = {column: total(kind, 'bytes') / GIB
         for column, kind in zip(COLLECTIVE_COLUMNS, collectives.KINDS)}
  row.update(collective_gib=total('total', 'bytes') / GIB,
             collective_wire_gib=total('total', 'wire_bytes') / GIB,
             collective_count=total('total', 'count'))
  return row


def compile_program(compile_steps: Callable[[], list[Any]], mesh: Mesh
                    ) -> tuple[list[Any] | None, float, str | None]:
  """``(executables, seconds, None)``: what a program runs (``compile_steps``: the executable of
  each of its steps, the train step's one or a decode's one per step, shared ones repeated),
  compiled with ``mesh`` as the context mesh (for kernels placed with ``shard_map``); or
  ``(None, seconds, message)`` when the compiler refuses it for lack of HBM."""
  start = time.perf_counter()
  try:
    with jax.set_mesh(mesh):  # only around lowering: eager ops under it would target the TPUs
      executables = compile_steps()
  except jax.errors.JaxRuntimeError as error:
    if 'RESOURCE_EXHAUSTED' not in str(error):
      raise
    return None, time.perf_counter() - start, str(error)
  return executables, time.perf_counter() - start, None


def memory_report(executables: list[Any], hbm: int, layers: int, seconds: float,
                  count_collectives: bool = False) -> dict:
  """Per-device memory (of the largest executable: they run one after another), FLOPs (of all
  steps) and, with ``count_collectives``, the collective traffic of a compiled program (none
  where its HLO cannot be read, ``tpu_time.hlo_text``)."""
  memory = max((executable.memory_analysis() for executable in executables),
               key=lambda m: m.argument_size_in_bytes + m.temp_size_in_bytes
               + m.output_size_in_bytes - m.alias_size_in_bytes)
  total = (memory.argument_size_in_bytes + memory.temp_size_in_bytes
           + memory.output_size_in_bytes - memory.alias_size_in_bytes)
  flops = sum(executable.cost_analysis().get('flops', 0.0) for executable in executables)
  traffic = {}
  if count_collectives:
    texts = [tpu_time.hlo_text(executable) for executable in executables]
    traffic = (dict(collectives_unreadable=True) if None in texts
               else collective_report(texts))
  return dict(
      argument_gib=memory.argument_size_in_bytes / GIB,
      output_gib=memory.output_size_in_bytes / GIB,
      alias_gib=memory.alias_size_in_bytes / GIB,
      temp_gib=memory.temp_size_in_bytes / GIB,
      total_gib=total / GIB, hbm_gib=hbm / GIB, fits=total <= hbm,
      xla_tflops_per_device=flops / 1e12,
      tflops_per_device=flops * layers / 1e12,
      compile_seconds=seconds, **traffic)


def modeled_time_report(executables: list[Any], timing_steps: Callable[[], list[Any]] | None,
                        mesh: Mesh, device_kind: str, layers: int, decode: bool) -> dict:
  """The compiler's modeled time of a program (``tpu_time.py``): of ``timing_steps``, the
  program with its layers unrolled, when given, else of ``executables``; and the scanned
  program's estimate times ``layers`` beside it, to show what scaling a scan would give.
  ``decode``: the program's steps are decode steps, each modeled under one second."""
  report = lambda programs: tpu_time.time_report(programs, device_kind, short_programs=decode)
  try:
    scan_scaled = layers * report(executables)['modeled_seconds']
  except tpu_time.UnreadableEstimate:
    scan_scaled = None
  timed, seconds = executables, 0.0
  if timing_steps is not None:
    timed, seconds, error = compile_program(timing_steps, mesh)
    if timed is None:
      return dict(modeled_error=error.strip().splitlines()[0][:300])
  try:
    timed_report = report(timed)
  except tpu_time.UnreadableEstimate as error:
    return dict(modeled_error=str(error))
  return dict(timed_report, timing_compile_seconds=seconds,
              scan_scaled_over_modeled=(None if scan_scaled is None
                                        else scan_scaled / timed_report['modeled_seconds']))


def single_width_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` training the full width only (the same model and parameters)."""
  single = config.copy_and_resolve_references()
  single.training.widths = (1,)
  return single


def program_compilers(config: ml_collections.ConfigDict, mesh: Mesh
                      ) -> list[tuple[str, int, Callable[[], list[Any]]]]:
  """``(program, global batch, compile_steps)`` of the train step (``config.tpu_fit.train``),
  then (``config.tpu_fit.decodes``) of the baseline's and each schedule's decode."""
  model = NestedMaskedTransformer(config_lib.transformer_config(config))
  programs = []
  if config.tpu_fit.get('train', True):
    train = train_inputs(config, model, mesh)
    compile_train = lambda train_config: lambda: [train_transformer.make_train_step(
        train_config, model, mesh).lower(*train).compile()]
    programs.append(('train', config.training.batch_size, compile_train(config)))
    if config.tpu_fit.get('single_width', False):
      programs.append(('train:single_width', config.training.batch_size,
                       compile_train(single_width_config(config))))
  schedules = config_lib.schedules_with_baseline(config) if config.tpu_fit.decodes else {}
  if config.tpu_fit.decodes and config.tpu_fit.families:
    schedules.update(family_schedules(config))
  inputs = decode_inputs(config, model, mesh) if schedules else None
  decoder = Decoder(NestedMaskedTransformer(config_lib.decoding_transformer_config(config)),
                    config_lib.sampling_options(config), rules=parallel.logical_rules(config))
  for name, sched in schedules.items():
    plan = sched.plan(config_lib.decode_task(config))
    programs.append((f'decode:{name}', config.eval.batch_size,
                     lambda plan=plan: decoder.compile_plan(*inputs, plan)))
  return programs


def family_schedules(config: ml_collections.ConfigDict) -> dict[str, Schedule]:
  """The simpler ways to decode cheaper (``decoding/families.py``): the full width with
  ``1..sampling.steps`` steps and each sub-model alone with ``sampling.steps``, with and without
  the cache, named ``'<family>:<decode>'``. Their steps share a few executables per width."""
  steps = config.sampling.steps
  decodes = families.one_width_decodes(config.training.widths, 1, steps)
  chosen = decodes[families.FEWER_STEPS] + [
      d for d in decodes[families.SUB_MODEL] if d.widths[0][1] == steps]
  return {f'{families.family_of(d.widths)}:{d.name}': Schedule(d.widths, d.cache)
          for d in chosen}


def compile_rows(config: ml_collections.ConfigDict, log: Callable[[str], None] = print
                 ) -> list[dict]:
  """One row per program of ``program_compilers``: its memory, FLOPs, collective traffic (train
  steps) and, with ``config.tpu_fit.modeled_time``, the compiler's modeled time."""
  devices = topology_devices(config.tpu_fit.topology)
  mesh = parallel.make_mesh(config, devices)
  hbm = hbm_bytes(config, devices[0])
  model_config = config_lib.transformer_config(config)
  attention_of = {'train': model_config.attention_impl,
                  'decode': config_lib.decoding_transformer_config(config).attention_impl}
  layers = config.model.num_layers if config.model.scan_layers else 1
  common = dict(topology=config.tpu_fit.topology, device_kind=devices[0].device_kind,
                devices=len(devices), mesh=parallel.describe(mesh), remat=model_config.remat)
  programs = program_compilers(config, mesh)
  timing = tpu_time.timing_config(config) if config.tpu_fit.modeled_time else None
  timing_steps = ([steps for _, _, steps in program_compilers(timing, mesh)] if timing
                  else [None] * len(programs))

  rows = []
  for (program, batch, compile_steps), time_steps in zip(programs, timing_steps):
    row = dict(program=program, global_batch=batch, **common,
               attention_impl=attention_of[program.split(':')[0]])
    executables, seconds, error = compile_program(compile_steps, mesh)
    if executables is None:
      row.update(out_of_memory_report(error, hbm, seconds))
      log(f"{program:>28s}: DOES NOT FIT: {row['error']}")
      rows.append(row)
      continue
    row.update(memory_report(executables, hbm, layers, seconds,
                             count_collectives=program.startswith('train')))
    log(f"{program:>28s}: {row['argument_gib']:.2f} GiB args + {row['temp_gib']:.2f} temps "
        f"= {row['total_gib']:.2f} of {row['hbm_gib']:.0f} GiB per chip, "
        f"{'fits' if row['fits'] else 'DOES NOT FIT'} "
        f"(compiled in {row['compile_seconds']:.0f} s)")
    if 'collective_gib' in row:
      log(f"{program:>28s}: collectives move {row['collective_gib']:.2f} GiB per chip per step "
          f"(ring estimate {row['collective_wire_gib']:.2f} GiB sent)")
    if row.get('collectives_unreadable'):
      log(f"{program:>28s}: its HLO cannot be read back, so its collectives are not counted")
    if config.tpu_fit.modeled_time:
      row.update(modeled_time_report(executables, time_steps, mesh, common['device_kind'],
                                     layers, decode=program.startswith('decode:')))
      if 'modeled_seconds' in row:
        log(f"{program:>28s}: modeled {1000 * row['modeled_seconds']:.2f} ms, "
            f"{row['modeled_tflops_per_second']:.1f} TFLOP/s per chip")
      else:
        log(f"{program:>28s}: no modeled time: {row['modeled_error']}")
    rows.append(row)
  compare_programs(rows)
  return rows


def compare_programs(rows: list[dict]) -> None:
  """Adds to the nested train step its collective traffic and modeled time over the
  single-width step's, and to each decode its FLOP ratio and modeled speedup over the
  baseline's."""
  by_program = {row['program']: row for row in rows}
  ratio = lambda a, b, key: a[key] / b[key] if a.get(key) and b.get(key) else None
  nested, single = by_program.get('train'), by_program.get('train:single_width')
  if nested and single:
    nested['collective_vs_single'] = ratio(nested, single, 'collective_wire_gib')
    nested['modeled_time_vs_single'] = ratio(nested, single, 'modeled_seconds')
  baseline = by_program.get('decode:baseline')
  for row in rows:
    if baseline and row['program'].startswith('decode:'):
      flops = 'timed_tflops_per_device' if 'timed_tflops_per_device' in row else (
          'tflops_per_device')
      row['flop_ratio'] = ratio(baseline, row, flops)
      row['modeled_speedup'] = ratio(baseline, row, 'modeled_seconds')


MARKDOWN_COLUMNS = (
    ('config', '{}'), ('topology', '{}'), ('mesh', '{}'), ('program', '{}'),
    ('global_batch', '{}'), ('remat', '{}'), ('attention_impl', '{}'),
    ('argument_gib', '{:.2f}'), ('temp_gib', '{:.2f}'), ('total_gib', '{:.2f}'),
    ('hbm_gib', '{:.0f}'), ('fits', '{}'), ('tflops_per_device', '{:.3g}'),
    ('compile_seconds', '{:.0f}'))


def markdown_table(rows: list[dict], config_name: str) -> str:
  """The rows of ``compile_rows`` as a markdown table (``docs/tpu_fit.md`` joins several)."""
  return _table(rows, config_name, MARKDOWN_COLUMNS)


COLLECTIVE_MARKDOWN_COLUMNS = (
    ('config', '{}'), ('topology', '{}'), ('mesh', '{}'), ('program', '{}'),
    ('global_batch', '{}'), ('remat', '{}'),
    *((column, '{:.3f}') for column in COLLECTIVE_COLUMNS),
    ('collective_gib', '{:.2f}'), ('collective_wire_gib', '{:.2f}'),
    ('collective_vs_single', '{:.2f}x'))


def collectives_table(rows: list[dict], config_name: str) -> str:
  """The train rows' collective traffic (GiB per chip per step) as a markdown table."""
  return _table([row for row in rows if 'collective_gib' in row], config_name,
                COLLECTIVE_MARKDOWN_COLUMNS)


MODELED_TIME_MARKDOWN_COLUMNS = (
    ('config', '{}'), ('topology', '{}'), ('program', '{}'), ('global_batch', '{}'),
    ('timed_tflops_per_device', '{:.3g}'), ('modeled_ms', '{:.3g}'),
    ('modeled_tflops_per_second', '{:.1f}'), ('modeled_fraction_of_peak', '{:.0%}'),
    ('flop_ratio', '{:.2f}x'), ('modeled_speedup', '{:.2f}x'),
    ('speedup_over_flop_ratio', '{:.2f}'), ('modeled_time_vs_single', '{:.2f}x'),
    ('scan_scaled_over_modeled', '{:.2f}'), ('unmodeled_kernels', '{}'),
    ('unreadable_programs', '{}'))


def modeled_time_table(rows: list[dict], config_name: str) -> str:
  """The rows' modeled time (``tpu_time.py``) as a markdown table: per chip, one train step or
  one decode of the global batch."""
  timed = [dict(row, modeled_ms=1000 * row['modeled_seconds'],
                speedup_over_flop_ratio=(row['modeled_speedup'] / row['flop_ratio']
                                         if row.get('modeled_speedup') and row.get('flop_ratio')
                                         else None))
           for row in rows if row.get('modeled_seconds')]
  return _table(timed, config_name, MODELED_TIME_MARKDOWN_COLUMNS)


def _table(rows: list[dict], config_name: str, columns: tuple) -> str:
  lines = ['| ' + ' | '.join(name for name, _ in columns) + ' |',
           '|' + ' --- |' * len(columns)]
  for row in rows:
    row = dict(row, config=config_name, fits='yes' if row.get('fits') else '**no**')
    cells = ('?' if row.get(name) is None else form.format(row[name]) for name, form in columns)
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
