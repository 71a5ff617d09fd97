"""Collective traffic read from HLO text: a hand-written module with known sizes, and a
program compiled for a small TPU slice (v5e:2x2) whose loop, scanned or unrolled, moves the
same bytes."""

import importlib.util

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nested_decode.tools import collectives

pytestmark = pytest.mark.usefixtures('tpu_compiler')

# Two nested loops (5 x 3 iterations); the inner body all-gathers bf16[4,256] in groups of 2, the
# outer body reduce-scatters f32[64,64] (TPU style: an all-reduce fused with its slice) over 4;
# the entry holds an async all-gather (start, an overlapped fusion and done copy it), a tuple
# all-reduce over all 4 devices and a collective-permute.
MODULE = """HloModule jit_step, is_scheduled=true, num_partitions=4

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%inner_body (p: (s32[], bf16[2,256])) -> (s32[], bf16[2,256]) {
  %p = (s32[], bf16[2,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %shard = bf16[2,256]{1,0:T(8,128)(2,1)} get-tuple-element(%p), index=1
  %gathered = bf16[4,256]{1,0:T(8,128)(2,1)} all-gather(%shard), channel_id=1, replica_groups=[2,2]<=[4], dimensions={0}, use_global_device_ids=true
  %half = bf16[2,256]{1,0} slice(%gathered), slice={[0:2], [0:256]}
  ROOT %t = (s32[], bf16[2,256]{1,0}) tuple(%next, %half)
}

%inner_cond (p: (s32[], bf16[2,256])) -> pred[] {
  %p = (s32[], bf16[2,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%all-reduce-scatter.1 (input: f32[64,64]) -> f32[16,64] {
  %input = f32[64,64]{1,0} parameter(0)
  %reduced = f32[64,64]{1,0} all-reduce(%input), channel_id=2, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%add
  %zero = u32[] constant(0)
  ROOT %mine = f32[16,64]{1,0} dynamic-slice(%reduced, %zero, %zero), dynamic_slice_sizes={16,64}
}

%outer_body (q: (s32[], bf16[2,256], f32[64,64])) -> (s32[], bf16[2,256], f32[64,64]) {
  %q = (s32[], bf16[2,256]{1,0}, f32[64,64]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %step = s32[] constant(1)
  %j1 = s32[] add(%j, %step)
  %x = bf16[2,256]{1,0} get-tuple-element(%q), index=1
  %zero = s32[] constant(0)
  %start = (s32[], bf16[2,256]{1,0}) tuple(%zero, %x)
  %loop = (s32[], bf16[2,256]{1,0}) while(%start), condition=%inner_cond, body=%inner_body
  %y = bf16[2,256]{1,0} get-tuple-element(%loop), index=1
  %g = f32[64,64]{1,0} get-tuple-element(%q), index=2
  %scattered = f32[16,64]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.1
  %padded = f32[64,64]{1,0} pad(%scattered, %zero), padding=0_48x0_0
  ROOT %r = (s32[], bf16[2,256]{1,0}, f32[64,64]{1,0}) tuple(%j1, %y, %padded)
}

%outer_cond (q: (s32[], bf16[2,256], f32[64,64])) -> pred[] {
  %q = (s32[], bf16[2,256]{1,0}, f32[64,64]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(7)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

%gather_start (a: f32[4,128]) -> (f32[4,128], f32[16,128], u32[]) {
  %a = f32[4,128]{1,0} parameter(0)
  %ag = f32[16,128]{1,0} all-gather(%a), channel_id=3, replica_groups=mesh['x'=2,'y'=2] {'x','y'}, dimensions={0}, backend_config={"async_collective_fusion_config":{"flag_start":"-1"}}
  ROOT %s = (f32[4,128]{1,0}, f32[16,128]{1,0}, u32[]) custom-call(%ag), custom_call_target="AsyncCollectiveStart"
}

%async_collective_fusion.1 (a: f32[4,128], b: f32[8,8]) -> (f32[16,128], f32[8,8]) {
  %a = f32[4,128]{1,0} parameter(0)
  %b = f32[8,8]{1,0} parameter(1)
  %ag = f32[16,128]{1,0} all-gather(%a), channel_id=3, replica_groups=mesh['x'=2,'y'=2] {'x','y'}, dimensions={0}, backend_config={"async_collective_fusion_config":{"flag_start":"2"}}
  %bb = f32[8,8]{1,0} multiply(%b, %b)
  ROOT %t = (f32[16,128]{1,0}, f32[8,8]{1,0}) tuple(%ag, %bb)
}

%gather_done (a: f32[4,128], c: f32[16,128]) -> f32[16,128] {
  %a = f32[4,128]{1,0} parameter(0)
  %c = f32[16,128]{1,0} parameter(1)
  %ag = f32[16,128]{1,0} all-gather(%a), channel_id=3, replica_groups=mesh['x'=2,'y'=2] {'x','y'}, dimensions={0}, backend_config={"async_collective_fusion_config":{"flag_start":"2"}}
  ROOT %d = f32[16,128]{1,0} custom-call(%a, %c, %ag), custom_call_target="AsyncCollectiveDone"
}

ENTRY %main (x: bf16[2,256], g: f32[64,64], a: f32[4,128], v: f32[8], w: bf16[8]) -> f32[16,128] {
  %x = bf16[2,256]{1,0} parameter(0)
  %g = f32[64,64]{1,0} parameter(1)
  %a = f32[4,128]{1,0} parameter(2)
  %v = f32[8]{0} parameter(3)
  %w = bf16[8]{0} parameter(4)
  %two = s32[] constant(2)
  %init = s32[] copy(%two)
  %start = (s32[], bf16[2,256]{1,0}, f32[64,64]{1,0}) tuple(%init, %x, %g)
  %loop = (s32[], bf16[2,256]{1,0}, f32[64,64]{1,0}) while(%start), condition=%outer_cond, body=%outer_body
  %sums = (f32[8]{0}, bf16[8]{0}) all-reduce(%v, %w), channel_id=4, to_apply=%add
  %shifted = f32[4,128]{1,0} collective-permute(%a), channel_id=5, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %s = (f32[4,128]{1,0}, f32[16,128]{1,0}, u32[]) fusion(%shifted), kind=kCustom, calls=%gather_start
  %s0 = f32[4,128]{1,0} get-tuple-element(%s), index=0
  %s1 = f32[16,128]{1,0} get-tuple-element(%s), index=1
  %m = (f32[16,128]{1,0}, f32[8,8]{1,0}) fusion(%s0, %s1), kind=kCustom, calls=%async_collective_fusion.1
  %m0 = f32[16,128]{1,0} get-tuple-element(%m), index=0
  ROOT %done = f32[16,128]{1,0} fusion(%s0, %m0), kind=kCustom, calls=%gather_done
}
"""


def test_bytes_per_kind_of_a_hand_written_module():
  summary = collectives.collective_bytes(MODULE)
  # the outer loop runs from 2 to 7: 5 times; the inner 3 times per outer iteration
  assert summary['all-gather']['count'] == 5 * 3 + 1
  assert summary['all-gather']['bytes'] == 5 * 3 * 4 * 256 * 2 + 16 * 128 * 4
  assert summary['all-gather']['wire_bytes'] == 5 * 3 * 4 * 256 * 2 / 2 + 16 * 128 * 4 * 3 / 4
  assert summary['reduce-scatter'] == dict(count=5, bytes=5 * 64 * 64 * 4,
                                           wire_bytes=5 * 64 * 64 * 4 * 3 / 4)
  assert summary['all-reduce'] == dict(count=1, bytes=8 * 4 + 8 * 2,
                                       wire_bytes=(8 * 4 + 8 * 2) * 2 * 3 / 4)
  assert summary['collective-permute'] == dict(count=1, bytes=4 * 128 * 4,
                                               wire_bytes=4 * 128 * 4)
  assert summary['all-to-all']['count'] == 0
  assert summary['total']['bytes'] == sum(summary[k]['bytes'] for k in collectives.KINDS)


def test_trip_counts_from_the_loop_or_from_xla():
  computations, entry, partitions = collectives.parse_module(MODULE)
  counts, unknown = collectives.execution_counts(computations, entry)
  assert partitions == 4 and not unknown
  assert counts['outer_body'] == 5 and counts['inner_body'] == 15
  assert counts['all-reduce-scatter.1'] == 5 and counts['gather_done'] == 1
  annotated = MODULE.replace('body=%inner_body',
                             'body=%inner_body, backend_config={"known_trip_count":{"n":"11"}}')
  counts, _ = collectives.execution_counts(*collectives.parse_module(annotated)[:2])
  assert counts['inner_body'] == 5 * 11


def test_a_loop_of_unknown_length_is_an_error():
  unknown = MODULE.replace('%n = s32[] constant(3)\n', '%n = s32[] get-tuple-element(%p), index=0\n')
  with pytest.raises(ValueError, match=r'Unknown trip count of the while loops \[.loop.\]'):
    collectives.collectives(unknown)


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='needs libtpu')
def test_a_scanned_loop_moves_what_the_unrolled_one_does_on_a_tpu_slice():
  from nested_decode.tools import tpu_fit
  mesh = jax.make_mesh((4,), ('x',), devices=tpu_fit.topology_devices('v5e:2x2'),
                       axis_types=(jax.sharding.AxisType.Explicit,))

  def step(x):  # x: f32[8, 128] on each device
    gathered = jax.lax.all_gather(x, 'x', tiled=True)  # 16 KiB per device
    summed = jax.lax.psum(jnp.sin(x), 'x')  # 4 KiB
    scattered = jax.lax.psum_scatter(jnp.cos(gathered), 'x', tiled=True)  # 16 KiB operand
    return jnp.tanh(x + gathered[:8] * summed + scattered)

  def hlo(scan: bool) -> str:
    def body(x):
      if scan:
        return jax.lax.fori_loop(0, 5, lambda i, x: step(x), x)
      for _ in range(5):
        x = step(x)
      return x
    program = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P('x'), out_specs=P('x')))
    x = jax.ShapeDtypeStruct((32, 128), jnp.float32, sharding=NamedSharding(mesh, P('x')))
    return program.lower(x).compile().as_text()

  scanned, unrolled = hlo(True), hlo(False)
  assert ' while(' in scanned and ' while(' not in unrolled
  scanned, unrolled = collectives.collective_bytes(scanned), collectives.collective_bytes(unrolled)
  assert scanned['total']['bytes'] == unrolled['total']['bytes'] == 5 * (16 + 4 + 16) * 1024
  assert scanned['all-gather']['bytes'] == unrolled['all-gather']['bytes'] == 5 * 16 * 1024
