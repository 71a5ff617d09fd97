"""Logical axis names of parameters and activations, and the mesh axes they map to.

Parameters are named where they are declared (``nn.with_logical_partitioning`` in
``nested_layers.py``; ``layers`` is added by ``nn.scan``); ``parallel.state_shardings`` places
them. Activations are pinned with ``constrain`` at the boundaries of every block: the batch over
``data`` x ``fsdp``, heads, MLP units and vocabulary over ``tensor``, and the model width
replicated. Without these constraints XLA may propagate a parameter's ``embed`` (``fsdp``)
sharding into the activations and give up the batch split, which turns FSDP into a layout that
all-reduces the whole batch's activations in every projection (docs/tpu_fit.md).

``constrain`` reads the mesh from the context (``jax.set_mesh``: the train steps, the decode and
the TPU compile set it) and the rules from ``use_rules`` (default ``RULES``); with no context
mesh, or a mesh of one device, it does nothing.
"""

import contextlib
import contextvars
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')
TENSOR_AXIS = 'tensor'

# (logical name, mesh axes or None); the first rule of a name that fits the array is used.
RULES = (
    ('batch', BATCH_AXES),   # activations: the examples of a batch
    ('length', None),        # activations: sequence positions
    ('layers', None),        # the nn.scan axis
    ('embed', 'fsdp'),       # parameters: model width D (activations keep theirs replicated)
    ('heads', TENSOR_AXIS),
    ('kv', None),            # head_dim
    ('mlp', TENSOR_AXIS),    # MLP hidden units
    ('vocab', TENSOR_AXIS),  # codebook (+ mask id): token embedding rows, logits columns
    ('position', None),      # position-embedding rows
    ('classes', None),       # class-embedding rows
)

Rules = Sequence[tuple[str, Any]]

# Activation layouts by the names of their dimensions (None: replicated).
HIDDEN = ('batch', 'length', None)            # [B, S, D/p], the residual stream
HEADS = ('batch', 'length', 'heads', 'kv')    # [B, S, H/p, head_dim]: queries, keys, values
MLP = ('batch', 'length', 'mlp')              # [B, S, M/p]
LOGITS = ('batch', 'length', 'vocab')         # [B, S, V]

_rules: contextvars.ContextVar[Rules] = contextvars.ContextVar('partitioning_rules',
                                                               default=RULES)


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[None]:
  """``constrain`` maps names with ``rules`` while this context is open (e.g. around the
  lowering of a step built for ``config.mesh.rules``). Rules are read when a function is
  traced: a jitted function keeps the rules of its first trace for its mesh and shapes, so
  build one per set of rules (as ``make_train_step`` does)."""
  token = _rules.set(tuple(rules))
  try:
    yield
  finally:
    _rules.reset(token)


def _mesh_axes(axes: Any) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_spec(names: Sequence[str | None], shape: Sequence[int],
                 mesh_shape: Mapping[str, int], rules: Rules) -> P:
  """The ``PartitionSpec`` of an array of ``shape`` whose dimensions are ``names`` on a mesh of
  ``mesh_shape`` (``mesh.shape``). A dimension whose size the rule's mesh axes do not divide,
  or whose axes another dimension already uses, is replicated (or takes a later rule)."""
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    chosen = None
    for logical, axes in rules:
      axes = tuple(a for a in _mesh_axes(axes) if a in mesh_shape)
      if logical != name or not axes or used.intersection(axes):
        continue
      if size % math.prod(mesh_shape[a] for a in axes) == 0:
        chosen = axes
        break
    if chosen:
      used.update(chosen)
      spec.append(chosen[0] if len(chosen) == 1 else chosen)
    else:
      spec.append(None)
  return P(*spec)


def current_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Any) -> P:
  """``logical_spec`` on ``mesh`` (a ``Mesh`` or ``AbstractMesh``) under the current rules."""
  return logical_spec(names, shape, dict(mesh.shape), _rules.get())


def fsdp_sharded(name: str) -> bool:
  """Whether the context mesh has an ``fsdp`` axis of several devices and the current rules
  shard the logical dimension ``name`` over it (``embed`` by default)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or dict(mesh.shape).get('fsdp', 1) == 1:
    return False
  return any(logical == name and 'fsdp' in _mesh_axes(axes) for logical, axes in _rules.get())


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """``x`` pinned to the layout of ``names`` on the context mesh (no-op without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, current_spec(names, x.shape, mesh))


def constrain_merged_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """``x [B, S, H * head_dim]``, heads merged into one dimension, pinned as ``HEADS`` pins the
  unmerged ``[B, S, H, head_dim]``: the merged dimension is split where the heads (and head_dim)
  are, so merging and splitting them again moves no data between devices."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  unmerged = x.shape[:2] + (num_heads, x.shape[2] // num_heads)
  batch, length, heads, kv = current_spec(HEADS, unmerged, mesh)
  merged = _mesh_axes(heads) + _mesh_axes(kv)
  merged = None if not merged else merged[0] if len(merged) == 1 else merged
  return jax.lax.with_sharding_constraint(x, P(batch, length, merged))


def constrain_batch(x: jax.Array) -> jax.Array:
  """``x`` split over the batch axes along its leading dimension, the rest replicated (the
  tokenizers' feature maps)."""
  return constrain(x, ('batch',) + (None,) * (x.ndim - 1))
