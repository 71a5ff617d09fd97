"""Device meshes, logical-axis rules and shardings; multi-host start-up.

The mesh has three axes, sized by ``config.mesh`` (``-1``: the devices the others leave):

* ``data``: batch only (pure data parallelism, parameters replicated);
* ``fsdp``: batch, and parameters sharded along their ``embed`` dimension (ZeRO-3 style);
* ``tensor``: heads, MLP hidden units and the vocabulary (Megatron-style tensor parallelism).

Every parameter of the transformer carries logical axis names (``nn.with_logical_partitioning``
in ``models/nested_layers.py``; ``layers`` is added by ``nn.scan``), and its activations are
pinned to named layouts (``models/partitioning.py``). ``RULES`` maps the names to mesh axes; a
dimension whose size the mesh axes do not divide, or whose mesh axis another dimension of the
same array already uses, is replicated instead. Optimizer state is sharded like the parameters it
belongs to, scalars are replicated, batches are split over ``('data', 'fsdp')``.

State is created directly sharded: ``sharded_init`` compiles the initialiser with
``out_shardings``, so no device ever holds the whole unsharded model.
"""

import dataclasses
import functools
import importlib.util
import math
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nested_decode import config_lib, platforms
from nested_decode.config_lib import ConfigError
from nested_decode.models import partitioning

AXES = config_lib.MESH_AXES  # ('data', 'fsdp', 'tensor')
BATCH_AXES = partitioning.BATCH_AXES
RULES = partitioning.RULES
Rules = partitioning.Rules


def default_mesh_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))


def mesh_shape(mesh_config: Mapping[str, int], device_count: int) -> tuple[int, ...]:
  """``(data, fsdp, tensor)`` sizes with a ``-1`` entry resolved; ``ConfigError`` otherwise."""
  config_lib.validate_mesh(mesh_config)
  sizes = {axis: mesh_config.get(axis, 1) for axis in AXES}
  rest = [axis for axis, size in sizes.items() if size == -1]
  known = math.prod(size for size in sizes.values() if size != -1)
  described = ', '.join(f'config.mesh.{a}={s}' for a, s in sizes.items())
  if rest:
    if device_count % known:
      raise ConfigError(f'{described}: the fixed axes need a multiple of {known} devices, '
                        f'but there are {device_count}')
    sizes[rest[0]] = device_count // known
  elif known != device_count:
    raise ConfigError(f'{described}: the mesh has {known} devices but there are '
                      f'{device_count}; make the product equal or set one axis to -1')
  return tuple(sizes[axis] for axis in AXES)


def mesh_config_of(config: ml_collections.ConfigDict) -> Mapping[str, int]:
  return config.get('mesh') or default_mesh_config()


def make_mesh(config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ``('data', 'fsdp', 'tensor')`` mesh over all devices (of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config_of(config), len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def describe(mesh: Mesh) -> str:
  return ' x '.join(f'{name}={size}' for name, size in mesh.shape.items())


def logical_rules(config: ml_collections.ConfigDict | None = None) -> Rules:
  """``config.mesh.rules`` when given (same form as ``RULES``), else ``RULES``; hashable (lists
  of mesh axes become tuples), as the cached tokenizer programs key on it."""
  rules = None if config is None else mesh_config_of(config).get('rules')
  if rules is None:
    return RULES
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules = RULES) -> Any:
  """``NamedSharding`` of every leaf of a state whose parameters are boxed with logical names
  (``jax.eval_shape`` of an initialiser that has not unboxed them); the result has the
  structure of the *unboxed* state. Unnamed leaves (step, RNG, optimizer counts) replicate."""
  def sharding(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, partitioning.logical_spec(leaf.names, leaf.value.shape,
                                                              mesh.shape, rules))
    if _is_box(leaf):  # already mesh axis names
      return NamedSharding(mesh, P(*leaf.names))
    return NamedSharding(mesh, P())
  return jax.tree.map(sharding, abstract_state, is_leaf=_is_box)


def fsdp_shardings(abstract_tree: Any, mesh: Mesh, min_size: int = 2 ** 14) -> Any:
  """For parameters without logical names (the VQGAN): shards the largest dimension that
  ``fsdp`` divides of every array with at least ``min_size`` entries; replicates the rest."""
  fsdp = mesh.shape['fsdp']

  def sharding(leaf):
    leaf = nn.unbox(leaf) if _is_box(leaf) else leaf
    shape = tuple(getattr(leaf, 'shape', ()))
    spec = [None] * len(shape)
    if fsdp > 1 and math.prod(shape) >= min_size:
      fits = [i for i, size in enumerate(shape) if size % fsdp == 0]
      if fits:
        spec[max(fits, key=lambda i: shape[i])] = 'fsdp'
    return NamedSharding(mesh, P(*spec))
  return jax.tree.map(sharding, abstract_tree, is_leaf=_is_box)


def sharded_init(init: Callable[[], Any], shardings: Any) -> Any:
  """Runs ``init`` (which may return boxed parameters) compiled, each leaf created directly
  with its sharding; returns the unboxed state."""
  return jax.jit(lambda: nn.unbox(init()), out_shardings=shardings)()


def abstract_state(init: Callable[[], Any], shardings: Any) -> Any:
  """Shapes and dtypes of ``init()``'s (unboxed) result with ``shardings``: the target that a
  checkpoint is restored onto, whatever mesh or process count wrote it."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      jax.eval_shape(lambda: nn.unbox(init())), shardings)


def under_mesh(jitted: Any, mesh: Mesh, rules: Rules = RULES) -> Callable:
  """``jitted`` (a ``jax.jit`` function; also its ``.lower``) called with ``mesh`` as the
  context mesh and ``rules`` as the activation rules: the model's sharding constraints
  (``partitioning.constrain``) and kernels that XLA cannot partition (splash attention, placed
  with ``shard_map``) read them when the function is traced."""
  def call(*args):
    with jax.set_mesh(mesh), partitioning.use_rules(rules):
      return jitted(*args)

  def lower(*args):
    with jax.set_mesh(mesh), partitioning.use_rules(rules):
      return jitted.lower(*args)
  call.lower = lower
  return call


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over ``('data', 'fsdp')``, everything else replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


@functools.cache  # shard_batch asks every step; a mesh's answer never changes
def local_batch_shards(mesh: Mesh) -> int:
  """How many distinct batch slices this process's devices hold (its share of the
  data-parallel degree): the per-process batch must be a multiple of it."""
  indices = batch_sharding(mesh).addressable_devices_indices_map((data_parallel_size(mesh),))
  return len({index[0].indices(data_parallel_size(mesh)) for index in indices.values()})


def process_batch_size(global_batch: int, key: str) -> int:
  """This process's share of the global batch ``config.<key>`` (as in MaskGIT and big_vision,
  batch sizes in configs are global, so the recipe does not change with the slice size)."""
  processes = jax.process_count()
  if global_batch % processes:
    raise ConfigError(
        f'config.{key}={global_batch} is invalid: it is the global batch and must split evenly '
        f'over the {processes} processes; make it a multiple of {processes}')
  return global_batch // processes


def check_batch_size(global_batch: int, mesh: Mesh, key: str) -> None:
  """``ConfigError`` naming ``config.<key>`` unless the global batch splits evenly over the
  processes and over the mesh's batch shards (``data`` x ``fsdp``) on each of them."""
  per_process = process_batch_size(global_batch, key)
  dp, shards = data_parallel_size(mesh), local_batch_shards(mesh)
  if global_batch % dp or per_process % shards:
    raise ConfigError(
        f'config.{key}={global_batch} is invalid: the global batch must be divisible by the '
        f'{dp} data-parallel shards of mesh {describe(mesh)} (batch over data x fsdp), '
        f'{shards} of them on each of the {jax.process_count()} process(es); change '
        f'config.{key} or config.mesh')


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Every leaf of this process's ``batch`` (numpy, leading batch dimension) as one global
  array split over ``('data', 'fsdp')``; on several hosts the global batch is the
  concatenation of the processes' batches."""
  sharding = batch_sharding(mesh)
  shards = local_batch_shards(mesh)

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % shards:
      raise ValueError(f'A batch of shape {x.shape} does not split over the {shards} '
                       f'data-parallel shards of this process (mesh {describe(mesh)})')
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.tree.map(put, batch)


def local_rows(global_size: int, mesh: Mesh) -> slice:
  """The rows of a global batch of ``global_size`` (the same on every process, e.g. the labels
  to sample) that this process passes to ``shard_batch``."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_size,))
  spans = sorted({index[0].indices(global_size)[:2] for index in index_map.values()})
  start, stop = spans[0][0], spans[-1][1]
  if sum(b - a for a, b in spans) != stop - start:
    raise ValueError(f'This process holds rows {spans} of the batch, not one range')
  return slice(start, stop)


def to_host(array: jax.Array) -> np.ndarray:
  """The whole of a global array as numpy on every process (gathered across hosts)."""
  if array.is_fully_addressable:
    return np.asarray(array)
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def local_part(array: jax.Array) -> np.ndarray:
  """This process's rows of an array split over the batch (``shard_batch``'s layout), in row
  order, each once (devices that replicate a slice hold the same rows)."""
  if array.is_fully_addressable:
    return np.asarray(array)
  pieces = {}
  for shard in array.addressable_shards:
    start = shard.index[0].indices(array.shape[0])[0] if shard.index else 0
    pieces.setdefault(start, shard.data)
  return np.concatenate([np.asarray(pieces[start]) for start in sorted(pieces)])


def apply_to_local_rows(fn: Callable[..., Any], mesh: Mesh, *arrays: np.ndarray) -> Any:
  """``fn`` of the global batch made of every process's rows of ``arrays`` (split over the
  mesh's batch axes, so each process computes on its own rows); returns this process's rows of
  every output leaf. Every process calls it with the same number of rows (a collective); rows
  are padded to the process's shard count and the padding dropped."""
  count = len(arrays[0])
  pad = -count % local_batch_shards(mesh)
  if pad:
    arrays = tuple(np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) for a in arrays)
  outputs = fn(*shard_batch(tuple(np.asarray(a) for a in arrays), mesh))
  return jax.tree.map(lambda x: local_part(x)[:count], outputs)


@dataclasses.dataclass(frozen=True)
class RowShare:
  """This process's rows of one global batch ``[start, start + size)`` of ``total`` rows that
  every process works through together: ``rows`` index the ``total`` rows (a last, short batch
  is padded with copies of the last row so every process has as many), ``valid`` is False on
  that padding."""
  start: int
  rows: np.ndarray
  valid: np.ndarray

  def take(self, array: np.ndarray) -> np.ndarray:
    return np.asarray(array)[self.rows]

  @property
  def num_valid(self) -> int:
    return int(self.valid.sum())


def row_shares(total: int, global_batch: int, mesh: Mesh) -> Iterator[RowShare]:
  """Splits ``total`` rows into global batches of ``global_batch`` and yields this process's
  share of each (the rows its devices hold under ``batch_sharding``)."""
  own = local_rows(global_batch, mesh)
  for start in range(0, total, global_batch):
    rows = start + np.arange(own.start, own.stop)
    yield RowShare(start, np.minimum(rows, total - 1), rows < total)


def gather_share(values: np.ndarray, share: RowShare) -> np.ndarray:
  """The rows of one global batch, in order, on every process, from each process's ``values``
  of its ``share`` (padding dropped; rows several processes hold counted once)."""
  values, rows, valid = np.asarray(values), share.rows, share.valid
  if jax.process_count() > 1:
    values, rows, valid = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                           for x in (values, rows, valid))
  _, first = np.unique(np.where(valid, rows, -1), return_index=True)  # sorted by row
  return values[first[valid[first]]]


# ----------------------------------------------------------------------------------------------
# Multi-host
# ----------------------------------------------------------------------------------------------

EXPLICIT_VARS = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')
SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
              'SLURM_LOCALID')
SWITCH = 'NESTED_DECODE_DISTRIBUTED'  # 0: never initialise; 1: always (jax auto-detects)


def cluster_kind(environ: Mapping[str, str] = os.environ) -> str | None:
  """``'explicit'``, ``'slurm'``, ``'tpu'``, ``'auto'`` (forced) or None (one process)."""
  switch = environ.get(SWITCH)
  if switch == '0':
    return None
  present = [name for name in EXPLICIT_VARS if environ.get(name)]
  if present:
    if len(present) < len(EXPLICIT_VARS):
      missing = [name for name in EXPLICIT_VARS if name not in present]
      raise ValueError(f'{", ".join(present)} set but {", ".join(missing)} not: set all of '
                       f'{", ".join(EXPLICIT_VARS)} to start several processes by hand')
    return 'explicit'
  if all(name in environ for name in SLURM_VARS) and int(environ['SLURM_NTASKS']) > 1:
    return 'slurm'
  if len([h for h in environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1:
    return 'tpu'
  if switch == '1':
    return 'auto'
  if platforms.has_tpu_chips() and importlib.util.find_spec('libtpu') is not None:
    return 'tpu'
  return None


def initialize_distributed(environ: Mapping[str, str] = os.environ) -> bool:
  """Calls ``jax.distributed.initialize`` when this process is one of several: a Cloud TPU VM
  (pod slice), a SLURM job of several tasks, or processes started by hand with
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
  (``NESTED_DECODE_DISTRIBUTED=0``/``1`` turns detection off/forces it). Must run before any
  other JAX call. Returns whether JAX runs distributed."""
  if jax.distributed.is_initialized():
    return True
  kind = cluster_kind(environ)
  if kind is None:
    return False
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU-only clusters
  if kind == 'explicit':
    jax.distributed.initialize(coordinator_address=environ['JAX_COORDINATOR_ADDRESS'],
                               num_processes=int(environ['JAX_NUM_PROCESSES']),
                               process_id=int(environ['JAX_PROCESS_ID']))
  else:
    jax.distributed.initialize()
  logging.info('JAX distributed (%s): process %d of %d, %d local of %d devices', kind,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True
