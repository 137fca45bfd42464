"""xpo_jax.hlo: the collectives of compiled programs whose traffic we know by hand (8 simulated
CPU devices, set by conftest), loop trip counts multiplied out, and the weight check of issue 17
on a hand-written module."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xpo_jax import hlo

N_DEV = 8
W_SHAPE, X_ROWS = (64, 32), 4  # weight [64, 32] split over 8 devices by rows: shards [8, 32]
OUTER, INNER = 3, 5


@pytest.fixture(scope="module")
def looped():
    """outer fori_loop(3) { inner fori_loop(5) { all_gather(w * i) ; x @ w ; psum } } plus one
    all_gather outside the loops, under shard_map over 8 devices. The gathered operand depends
    on the loop index, so XLA cannot hoist it out of the loops."""
    if jax.device_count() < N_DEV:
        pytest.skip(f"needs {N_DEV} devices")
    mesh = Mesh(np.asarray(jax.devices()[:N_DEV]), ("x",))

    def per_device(w, x):  # w [8, 32] (this device's rows), x [4, 64] replicated
        def inner(i, x):
            full = jax.lax.all_gather(w * (i + 1).astype(w.dtype), "x", tiled=True)  # [64, 32]
            y = jax.lax.psum(jnp.tanh(x @ full), "x")                                 # [4, 32]
            return x + jnp.tile(y, (1, 2))

        def outer(j, x):
            return jax.lax.fori_loop(0, INNER, inner, x + j)

        x = jax.lax.fori_loop(0, OUTER, outer, x)
        once = jax.lax.all_gather(w, "x", tiled=True)  # outside the loops
        return x.sum() + once.sum()

    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("x"), P()), out_specs=P(),
                                check_vma=False))
    w = jax.ShapeDtypeStruct(W_SHAPE, jnp.float32, sharding=NamedSharding(mesh, P("x")))
    x = jax.ShapeDtypeStruct((X_ROWS, W_SHAPE[0]), jnp.float32, sharding=NamedSharding(mesh, P()))
    compiled = f.lower(w, x).compile()
    return compiled, w


def test_collectives_and_loops(looped):
    compiled, _ = looped
    where = lambda c: "loop" if c.loops else "outside"
    t = hlo.traffic(compiled.as_text(), phase=where, phase_class={"loop": "loop", "outside": "outside"})
    gathers = [c for c in t.collectives if c.kind == "all-gather"]
    reduces = [c for c in t.collectives if c.kind == "all-reduce"]
    w_bytes = W_SHAPE[0] * W_SHAPE[1] * 4
    # One all-gather in the inner loop (3 x 5 runs), one outside; the psum inside the loop.
    in_loop = [c for c in gathers if c.loops]
    assert len(in_loop) == 1 and len([c for c in gathers if not c.loops]) == 1, [c.describe() for c in gathers]
    g = in_loop[0]
    assert [l.trip for l in g.loops] == [OUTER, INNER] and g.count == OUTER * INNER
    assert g.group_size == N_DEV
    assert [str(a) for a in g.operands] == ["f32[8,32]"] and [str(a) for a in g.results] == ["f32[64,32]"]
    assert g.bytes == w_bytes  # result bytes
    assert g.wire_bytes == pytest.approx(w_bytes * (N_DEV - 1) / N_DEV)
    r, = [c for c in reduces if c.loops]
    assert r.bytes == X_ROWS * W_SHAPE[1] * 4 and r.count == OUTER * INNER  # operand bytes
    assert r.wire_bytes == pytest.approx(2 * r.bytes * (N_DEV - 1) / N_DEV)
    # Totals: every collective times its loops' trip counts.
    assert t.bytes_by_class["loop"] == OUTER * INNER * (w_bytes + r.bytes)
    assert t.bytes_by_class["outside"] == w_bytes + sum(c.bytes for c in reduces if not c.loops)
    assert t.collective_bytes == sum(c.total_bytes for c in t.collectives)
    # FLOPs: the one dot [4, 64] x [64, 32] per inner iteration, 2 per multiply-add.
    assert t.dot_flops == OUTER * INNER * 2 * X_ROWS * W_SHAPE[0] * W_SHAPE[1]


def test_matches_xla_cost_analysis_with_loops_once(looped):
    """XLA's cost analysis counts each loop body once: our count with every loop run once is the
    same program, FLOPs and bytes accessed."""
    compiled, _ = looped
    xla = compiled.cost_analysis()
    once = hlo.traffic(compiled.as_text(), trip_count=hlo.once)
    assert once.xla_flops == pytest.approx(xla["flops"], rel=0.02)
    assert once.hbm_bytes == pytest.approx(xla["bytes accessed"], rel=0.05)
    # And with the loops multiplied out, the loop body's dot is counted 15 times.
    full = hlo.traffic(compiled.as_text())
    assert full.dot_flops == OUTER * INNER * once.dot_flops


def test_weight_shapes_and_moves_weight(looped):
    compiled, w = looped
    shapes = hlo.weight_shapes({"w": w})
    assert shapes == {(64, 32)}
    assert hlo.is_tile((8, 32), (64, 32), 8) and hlo.is_tile((64, 32), (64, 32), 8)
    assert not hlo.is_tile((4, 32), (64, 32), 8) and not hlo.is_tile((8, 32, 1), (64, 32), 8)
    t = hlo.traffic(compiled.as_text())
    moved = [c for c in t.collectives if hlo.moves_weight(c, shapes)]
    assert {c.kind for c in moved} == {"all-gather"} and len(moved) == 2
    # Stacked layers (scan_layers): a per-layer slice of a [L, ...] weight counts as the weight.
    stacked = {"layers": {"k": jax.ShapeDtypeStruct((4, 64, 32), jnp.float32)}}
    assert {(4, 64, 32), (64, 32)} <= hlo.weight_shapes(stacked)


def test_unknown_trip_count_is_an_error():
    f = jax.jit(lambda x: jax.lax.while_loop(lambda c: c[0] < c[1], lambda c: (c[0] + 1, c[1]), (0, x))[0])
    text = f.lower(jax.ShapeDtypeStruct((), jnp.int32)).compile().as_text()
    with pytest.raises(ValueError, match="no known trip count"):
        hlo.traffic(text)
    assert hlo.traffic(text, trip_count=lambda loop: 7).flops > 0


# A hand-written per-device module: the sampler's decode loop (no known trip count; named as
# jax names it) around a layer loop of 2, with one weight all-gather (async form), one activation
# all-reduce, and a weight all-gather before the loop (the decode layout move).
SYNTHETIC = """HloModule jit_round_fn, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%layer_body (p: (s32[], f32[2,64], f32[8,64])) -> (s32[], f32[2,64], f32[8,64]) {
  %p = (s32[], f32[2,64], f32[8,64]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[2,64] get-tuple-element(%p), index=1
  %w = f32[8,64] get-tuple-element(%p), index=2
  %ags = (f32[8,64], f32[64,64]) all-gather-start(%w), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true, metadata={op_name="jit(round_fn)/jit(_sample_jit)/while/body/layers/q_proj/dot_general"}
  %full = f32[64,64] all-gather-done(%ags)
  %y = f32[2,64] dot(%x, %full), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %r = f32[2,64] all-reduce(%y), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add, metadata={op_name="jit(round_fn)/jit(_sample_jit)/while/body/layers/o_proj/dot_general"}
  %one = s32[] constant(1)
  %i2 = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[2,64], f32[8,64]) tuple(%i2, %r, %w)
}

%layer_cond (p: (s32[], f32[2,64], f32[8,64])) -> pred[] {
  %p = (s32[], f32[2,64], f32[8,64]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %two = s32[] constant(2)
  ROOT %lt = pred[] compare(%i, %two), direction=LT
}

%decode_body (q: (s32[], f32[2,64], f32[8,64])) -> (s32[], f32[2,64], f32[8,64]) {
  %q = (s32[], f32[2,64], f32[8,64]) parameter(0)
  %zero = s32[] constant(0)
  %x = f32[2,64] get-tuple-element(%q), index=1
  %w = f32[8,64] get-tuple-element(%q), index=2
  %init = (s32[], f32[2,64], f32[8,64]) tuple(%zero, %x, %w)
  ROOT %layers = (s32[], f32[2,64], f32[8,64]) while(%init), condition=%layer_cond, body=%layer_body, metadata={op_name="jit(round_fn)/jit(_sample_jit)/while/body/model._run_layers/while"}, backend_config={"known_trip_count":{"n":"2"}}
}

%decode_cond (q: (s32[], f32[2,64], f32[8,64])) -> pred[] {
  %q = (s32[], f32[2,64], f32[8,64]) parameter(0)
  %s = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(9)
  ROOT %lt = pred[] compare(%s, %n), direction=LT
}

ENTRY %main (w0: f32[8,64], x0: f32[2,64]) -> f32[2,64] {
  %w0 = f32[8,64] parameter(0)
  %x0 = f32[2,64] parameter(1)
  %moved = f32[64,64] all-gather(%w0), channel_id=3, replica_groups=mesh['axis_0'=8] {'axis_0'}, dimensions={0}, metadata={op_name="jit(round_fn)/jit(_sample_jit)/relayout"}
  %zero = s32[] constant(0)
  %init = (s32[], f32[2,64], f32[8,64]) tuple(%zero, %x0, %w0)
  %loop = (s32[], f32[2,64], f32[8,64]) while(%init), condition=%decode_cond, body=%decode_body, metadata={op_name="jit(round_fn)/jit(_sample_jit)/while"}
  ROOT %out = f32[2,64] get-tuple-element(%loop), index=1
}
"""


def test_weight_gathers_in_sampling_loops_synthetic():
    module = hlo.parse(SYNTHETIC)
    weights = {(64, 64)}
    found = hlo.weight_gathers_in_sampling_loops(module, weights, max_new_tokens=10)
    assert [(c.opcode, str(c.operands[0]), c.count) for c in found] == [("all-gather-start", "f32[8,64]", 9 * 2)]
    assert found[0].bytes == 64 * 64 * 4 and found[0].group_size == 8
    t = hlo.traffic(module, trip_count=hlo.round_trip_counts(10))
    (ag,) = [c for c in t.collectives if c.opcode == "all-gather-start"]
    (ar,) = [c for c in t.collectives if c.kind == "all-reduce"]
    (moved,) = [c for c in t.collectives if c.name == "moved"]
    assert ag.in_sampling_loop and ar.in_sampling_loop and not moved.in_sampling_loop
    assert [l.trip for l in ag.loops] == [9, 2] and ag.loops[0].sampling and not ag.loops[1].sampling
    assert ar.group_size == 8 and moved.group_size == 8
    assert ag.phase == "sampling loop" and moved.phase == "sampling, outside the loops"
    assert t.bytes_by_class["sampling_loops"] == 18 * (64 * 64 * 4 + 2 * 64 * 4)
    assert t.bytes_by_class["other"] == 64 * 64 * 4
    # The convention, the decode loop counted max_new_tokens times.
    t10 = hlo.traffic(module, trip_count=hlo.round_trip_counts(10, sampling_trips=10))
    assert t10.bytes_by_class["sampling_loops"] == 20 * (64 * 64 * 4 + 2 * 64 * 4)
    # Against other weights, the same collectives are activations.
    assert hlo.weight_gathers_in_sampling_loops(module, {(4096, 4096)}) == []
    # An activation whose result has a weight block's shape but whose operand is no block of it:
    # not a weight (the [1, 4096] -> [64, 4096] hidden-state gather at 64 devices).
    act = dataclasses.replace(ag, opcode="all-gather", operands=[hlo.Array("f32", (1, 64))],
                              results=[hlo.Array("f32", (8, 64))])
    assert not hlo.moves_weight(act, weights) and hlo.moves_weight(ag, weights)


# The GPU backend's forms: an asynchronous dynamic-slice fusion (fusion-start / fusion-done, the
# scan's per-layer weight slice prefetched) and a cuBLAS matmul whose result tuple ends in a
# workspace. Written as XLA 0.11's GPU compile of bench_round's shape prints them.
GPU_SYNTHETIC = """
HloModule gpu_forms, entry_computation_layout={(bf16[24,64,32]{2,1,0}, s32[], bf16[16,64]{1,0})->bf16[16,32]{1,0}}

%fused_slice (p0: bf16[24,64,32], p1: s32[]) -> bf16[1,64,32] {
  %p0 = bf16[24,64,32]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = bf16[1,64,32]{2,1,0} dynamic-slice(%p0, %p1, %z, %z), dynamic_slice_sizes={1,64,32}
}

ENTRY %main (w: bf16[24,64,32], i: s32[], x: bf16[16,64]) -> bf16[16,32] {
  %w = bf16[24,64,32]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %x = bf16[16,64]{1,0} parameter(2)
  %fs = ((bf16[24,64,32]{2,1,0}, s32[]), bf16[1,64,32]{2,1,0}, u32[]) fusion-start(%w, %i), kind=kLoop, calls=%fused_slice
  %fd = bf16[1,64,32]{2,1,0} fusion-done(%fs)
  %k = bf16[64,32]{1,0} bitcast(%fd)
  %mm = (bf16[16,32]{1,0}, s8[33554432]{0}) custom-call(%x, %k), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_batch_dimensions":[],"lhs_contracting_dimensions":["1"],"rhs_batch_dimensions":[],"rhs_contracting_dimensions":["0"]}}}
  ROOT %y = bf16[16,32]{1,0} get-tuple-element(%mm), index=0
}
"""


def test_gpu_async_fusion_and_cublas_matmul_costs():
    t = hlo.traffic(hlo.parse(GPU_SYNTHETIC), trip_count=hlo.once)
    layer = 64 * 32 * 2
    # The slice: its layer read and written (not the whole [24, ...] stack, not twice) and its
    # s32 index read; the matmul: x and the layer read, the result written (not its workspace).
    assert t.hbm_bytes == 2 * layer + 4 + (16 * 64 * 2 + layer + 16 * 32 * 2)
    assert t.flops == t.dot_flops == 2 * 16 * 32 * 64
