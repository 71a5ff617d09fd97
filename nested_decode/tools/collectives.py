"""Bytes moved by the collectives of a compiled program, read from its HLO text.

``collective_bytes(compiled.as_text())`` finds every all-gather, reduce-scatter, all-reduce,
all-to-all and collective-permute of the (SPMD-partitioned, per-device) program and adds up,
per kind, how many bytes one device handles when the program runs once:

* ``bytes``: the per-device size of the *larger* side of the collective (the logical shape, no
  tiling padding): an all-gather's result, a reduce-scatter's operand (its result times the
  group size), an all-reduce's operand (= result), an all-to-all's or collective-permute's
  operand. Tuple-shaped (combined) collectives count all their arrays.
* ``wire_bytes``: what a ring implementation sends per device for that: ``(g-1)/g * bytes``
  for all-gather, reduce-scatter and all-to-all, ``2 (g-1)/g * bytes`` for all-reduce
  (reduce-scatter + all-gather), ``bytes`` for collective-permute; ``g`` is the size of the
  replica group. This is the number to compare layouts with.

Each collective counts once per *execution*: a collective inside a ``while`` body (``nn.scan``
over layers, ``lax.scan``) is multiplied by the loop's trip count, read from XLA's
``known_trip_count`` annotation when present, else from the loop itself: the condition compares
the induction variable (an element of the loop tuple) with a constant, the initial value comes
from the ``while`` operand tuple, the step from the body's ``add``. Nested loops multiply; a loop
whose count cannot be read this way is an error, not a guess.
Computations called by fusions (the TPU compiler wraps collectives in async fusions and turns a
reduce-scatter into an all-reduce fused with a dynamic slice, ``all-reduce-scatter``), calls and
conditionals inherit their caller's count (a conditional branch counts as if it ran).
The TPU compiler copies an async collective into the fusion that starts it (its root an
``AsyncCollectiveStart`` custom call), the compute fusions it overlaps and the fusion that ends
it (``AsyncCollectiveDone``): only the start counts (copies with the same ``channel_id``, shape
and groups but no start count once).
"""

import collections
import dataclasses
import math
import re
from typing import Iterable

KINDS = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')

DTYPE_BYTES = {
    'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1,
    'f8e4m3': 1, 'f8e4m3b11fnuz': 1, 'f8e4m3fnuz': 1, 'f8e5m2fnuz': 1,
    's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4,
    's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}

_COMPUTATION = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$')
_ARRAY = re.compile(r'\b([a-z]+\d*[a-z\d]*)\[([\d,]*)\]')
_CALLEES = re.compile(r'\b(calls|body|condition|to_apply|branch_computations|true_computation|'
                      r'false_computation)=(\{[^}]*\}|%?[\w.\-]+)')
_OPERANDS = re.compile(r'%([\w.\-]+)')
_OPCODES = {'all-gather': 'all-gather', 'all-gather-start': 'all-gather',
            'reduce-scatter': 'reduce-scatter', 'all-reduce': 'all-reduce',
            'all-reduce-start': 'all-reduce', 'all-to-all': 'all-to-all',
            'ragged-all-to-all': 'all-to-all', 'collective-permute': 'collective-permute',
            'collective-permute-start': 'collective-permute'}


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str  # the result type as printed, e.g. 'bf16[1,256,256]{2,1,0:T(8,128)}'
  opcode: str
  rest: str  # operands and attributes
  root: bool


@dataclasses.dataclass
class Collective:
  kind: str
  name: str
  computation: str
  bytes: float  # per device, one execution
  group_size: int
  executions: int  # times the program runs it (loop trip counts multiplied)

  @property
  def wire_bytes(self) -> float:
    g = self.group_size
    if self.kind == 'collective-permute':
      return self.bytes
    factor = 2 * (g - 1) / g if self.kind == 'all-reduce' else (g - 1) / g
    return self.bytes * factor


def array_shapes(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """``(dtype, dims)`` of every array in an HLO result type (tuples flattened)."""
  shape = re.sub(r'\{[^{}]*\}', '', shape)  # layouts, e.g. {2,1,0:T(8,128)(2,1)S(1)}
  return [(dtype, tuple(int(d) for d in dims.split(',') if d))
          for dtype, dims in _ARRAY.findall(shape) if dtype in DTYPE_BYTES]


def shape_bytes(shape: str) -> float:
  return sum(DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in array_shapes(shape))


def parse_module(hlo: str) -> tuple[dict[str, list[Instruction]], str, int]:
  """``({computation: instructions}, entry name, num_partitions)`` of an HLO module's text."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = None, None
  partitions = re.search(r'num_partitions=(\d+)', hlo)
  for line in hlo.splitlines():
    header = _COMPUTATION.match(line)
    if header and not line.startswith(' '):
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
      continue
    if current is None:
      continue
    match = _INSTRUCTION.match(line)
    if match:
      root, name, shape, opcode, rest = match.groups()
      computations[current].append(Instruction(name, shape, opcode, rest, bool(root)))
  if entry is None:
    raise ValueError('No ENTRY computation in the HLO text')
  return computations, entry, int(partitions.group(1)) if partitions else 1


def _attribute(rest: str, key: str) -> str | None:
  match = re.search(rf'\b{key}=', rest)
  if not match:
    return None
  start, depth, i = match.end(), 0, match.end()
  while i < len(rest):
    char = rest[i]
    if char in '{[(':
      depth += 1
    elif char in '}])':
      if depth == 0:
        break
      depth -= 1
    elif char == ',' and depth == 0:
      break
    i += 1
  return rest[start:i].strip()


def group_size(rest: str, num_partitions: int) -> int:
  """Devices in each replica group: ``{{0,1},{2,3}}``, iota ``[2,2]<=[4]`` or mesh
  ``mesh['x'=4,'y'=2] {'x'}``; no groups (or ``{}``) means all devices."""
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
  if mesh:
    sizes = {name: int(size) for name, size in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
    return math.prod(sizes[name] for name in re.findall(r"'([^']+)'", mesh.group(2)))
  iota = re.search(r'replica_groups=\[([\d,]+)\]<=', rest)
  if iota:
    return int(iota.group(1).split(',')[-1])
  listed = re.search(r'replica_groups=\{\{([^}]*)\}', rest)
  if listed:
    return len([d for d in listed.group(1).split(',') if d.strip()])
  return num_partitions


def _source(computation: list[Instruction], name: str, passed: tuple[str, ...]
            ) -> Instruction | None:
  """The instruction that defines ``name``, looking through up to 8 ``passed`` opcodes."""
  by_name = {i.name: i for i in computation}
  for _ in range(8):
    inst = by_name.get(name)
    if inst is None or inst.opcode not in passed:
      return inst
    name = _OPERANDS.findall(inst.rest)[0]
  return None


def _constant(computation: list[Instruction], name: str) -> int | None:
  """The integer value of ``name`` if it is a constant (possibly through copies/converts)."""
  inst = _source(computation, name, ('copy', 'convert', 'bitcast', 'reshape'))
  if inst is None or inst.opcode != 'constant':
    return None
  value = re.match(r'\s*(-?\d+)\)', inst.rest)
  return int(value.group(1)) if value else None


def _tuple_index(computation: list[Instruction], name: str) -> int | None:
  """``k`` if ``name`` is ``get-tuple-element(parameter, index=k)`` (through copies)."""
  inst = _source(computation, name, ('copy', 'convert', 'bitcast'))
  if inst is None or inst.opcode != 'get-tuple-element':
    return None
  index = re.search(r'index=(\d+)', inst.rest)
  return int(index.group(1)) if index else None


def trip_count(computations: dict[str, list[Instruction]], caller: str,
               loop: Instruction) -> int | None:
  """Iterations of the ``while`` instruction ``loop`` (in computation ``caller``), or None."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.rest)
  if known:
    return int(known.group(1))
  condition = computations.get((_attribute(loop.rest, 'condition') or '').lstrip('%'))
  body = computations.get((_attribute(loop.rest, 'body') or '').lstrip('%'))
  if not condition or not body:
    return None
  root = next((i for i in condition if i.root), None)
  if root is None or root.opcode != 'compare':
    return None
  direction = re.search(r'direction=(\w+)', root.rest)
  left, right = _OPERANDS.findall(root.rest.split(')')[0])[:2]
  flip = {'LT': 'GT', 'GT': 'LT', 'LE': 'GE', 'GE': 'LE', 'NE': 'NE'}
  index, bound, op = _tuple_index(condition, left), _constant(condition, right), direction.group(1)
  if index is None or bound is None:
    index, bound, op = _tuple_index(condition, right), _constant(condition, left), flip.get(op)
  if index is None or bound is None or op is None:
    return None
  # the initial value: element ``index`` of the tuple the loop starts from
  operand = _OPERANDS.findall(loop.rest.split(')')[0])
  start = next((i for i in computations[caller] if operand and i.name == operand[0]), None)
  if start is None or start.opcode != 'tuple':
    return None
  elements = _OPERANDS.findall(start.rest.split(')')[0])
  init = _constant(computations[caller], elements[index]) if index < len(elements) else None
  if init is None:
    return None
  # the step: the body's new element ``index`` is ``add(element, constant)``
  step = None
  body_root = next((i for i in body if i.root), None)
  if body_root is not None and body_root.opcode == 'tuple':
    elements = _OPERANDS.findall(body_root.rest.split(')')[0])
    if index < len(elements):
      update = next((i for i in body if i.name == elements[index]), None)
      if update is not None and update.opcode == 'add':
        for operand_name in _OPERANDS.findall(update.rest.split(')')[0]):
          step = _constant(body, operand_name) if step is None else step
  if not step or step < 0:
    return None
  if op == 'LT':
    return max(0, -(-(bound - init) // step))
  if op == 'LE':
    return max(0, -(-(bound - init + 1) // step))
  if op == 'NE' and (bound - init) % step == 0:
    return max(0, (bound - init) // step)
  return None


def execution_counts(computations: dict[str, list[Instruction]], entry: str
                     ) -> tuple[dict[str, int], list[str]]:
  """Times each computation runs per program run, and the loops whose trip count is
  unknown (counted once)."""
  callers = collections.defaultdict(list)  # callee -> [(caller, times per caller run)]
  unknown = []
  for caller, instructions in computations.items():
    for inst in instructions:
      trips = None
      if inst.opcode == 'while':
        trips = trip_count(computations, caller, inst)
        if trips is None:
          unknown.append(inst.name)
      for key, value in _CALLEES.findall(inst.rest):
        if key == 'to_apply':
          continue  # reduction computations: scalar arithmetic
        for callee in _OPERANDS.findall(value) or [value.lstrip('%')]:
          times = 1
          if key == 'body':
            times = 1 if trips is None else trips
          elif key == 'condition':
            times = 1 if trips is None else trips + 1
          callers[callee].append((caller, times))
  counts: dict[str, int] = {}

  def count(name: str, depth: int = 0) -> int:
    if name == entry:
      return 1
    if name not in counts:
      if depth > 1000:
        raise ValueError(f'Cyclic call graph at {name}')
      counts[name] = sum(count(c, depth + 1) * t for c, t in callers.get(name, ()))
    return counts[name]

  return {name: count(name) for name in computations}, unknown


def collectives(hlo: str) -> list[Collective]:
  """Every collective of the module's text, with its per-device bytes and execution count."""
  computations, entry, partitions = parse_module(hlo)
  counts, unknown = execution_counts(computations, entry)
  if unknown:
    raise ValueError(f'Unknown trip count of the while loops {unknown}: their collectives '
                     f'cannot be counted')
  found: list[Collective] = []
  chains: dict[tuple, list[tuple[bool, Collective]]] = collections.defaultdict(list)
  for computation, instructions in computations.items():
    root = next((i for i in instructions if i.root), None)
    async_root = (re.search(r'custom_call_target="(AsyncCollective\w+)"', root.rest)
                  if root is not None and root.opcode == 'custom-call' else None)
    for inst in instructions:
      kind = _OPCODES.get(inst.opcode)
      if kind is None or counts[computation] == 0:
        continue
      size = group_size(inst.rest, partitions)
      shapes = array_shapes(inst.shape)
      if inst.opcode.endswith('-start') and len(shapes) > 1 and kind != 'all-reduce':
        shapes = shapes[1:2]  # (operand, result, contexts...) of an async start
      nbytes = sum(DTYPE_BYTES[d] * math.prod(s) for d, s in shapes)
      if kind == 'reduce-scatter':
        nbytes *= size  # the result is the scattered shard
      if kind == 'all-reduce' and computation.startswith('all-reduce-scatter'):
        kind = 'reduce-scatter'  # TPU: all-reduce + dynamic slice in one fusion
      item = Collective(kind, inst.name, computation, nbytes, size, counts[computation])
      if async_root is None and 'async_collective_fusion_config' not in inst.rest:
        found.append(item)
        continue
      # one copy of an async collective: its start, a compute fusion it overlaps, its done
      channel = re.search(r'channel_id=(\d+)', inst.rest)
      key = (channel and channel.group(1), kind, inst.shape.split('{')[0], size)
      is_start = async_root is not None and async_root.group(1) == 'AsyncCollectiveStart'
      chains[key].append((is_start, item))
  for copies in chains.values():
    starts = [item for is_start, item in copies if is_start]
    found.extend(starts or [max((item for _, item in copies), key=lambda c: c.executions)])
  return sorted(found, key=lambda c: (c.kind, c.computation, c.name))


def summarize(items: Iterable[Collective]) -> dict[str, dict[str, float]]:
  """Per kind (and ``total``): ``count`` (executions), ``bytes`` and ``wire_bytes``."""
  summary = {kind: dict(count=0, bytes=0.0, wire_bytes=0.0) for kind in KINDS + ('total',)}
  for c in items:
    for key in (c.kind, 'total'):
      summary[key]['count'] += c.executions
      summary[key]['bytes'] += c.bytes * c.executions
      summary[key]['wire_bytes'] += c.wire_bytes * c.executions
  return summary


def collective_bytes(hlo: str) -> dict[str, dict[str, float]]:
  """``summarize(collectives(hlo))``: per-device collective traffic of one program run."""
  return summarize(collectives(hlo))
