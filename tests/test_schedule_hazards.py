"""Barriers chosen from the uTasks' reads and writes (gdsl/schedule/hazards.py): a vEU-local sync where each
vEU of the next wave touches only what it wrote itself since the last grid barrier, a grid barrier where a
vEU reads what another wrote or overwrites what another read. Every plan here also runs in the simulator,
whose race checks fail on a missing grid barrier."""
import numpy as np
import pytest
from test_schedule import check_plan

import gdsl
import gdsl.numpy as gnp
from gdsl.core.ir import ShapedArray
from gdsl.primitives.structural import slice_p
from gdsl.schedule import schedule
from gdsl.schedule.hazards import Hazards
from gdsl.schedule.plan import COPY, Buffer, Loop, Op, Sync, Task, Value, Wave, walk

rng = np.random.default_rng(0)
F32 = np.dtype(np.float32)


def _loop_scopes(plan) -> list[str]:
    (loop,) = [s for s in plan.kernels[0].body if isinstance(s, Loop)]
    return [s.scope for s in walk(loop.body) if isinstance(s, Sync)]


def chain(v):
    """Two elementwise ops over the same elements, the first read twice (so not fused into the second)."""
    def step(i, v):
        a = v * 0.5 + 1.0
        return gnp.tanh(a) * a
    return gdsl.fori_loop(0, 3, step, v)


def flipped(v):
    """The reversal reads the first op's result at other vEUs' elements; the last op reads the reversal's
    result and the first op's, each at its own elements."""
    def step(i, v):
        a = v * 0.5 + 1.0
        return gnp.tanh(a[::-1]) * a
    return gdsl.fori_loop(0, 3, step, v)


def test_elementwise_chain_runs_behind_a_local_sync():
    v = rng.standard_normal(4096).astype(np.float32)      # 4 uTasks of 1024 elements
    plan = check_plan(chain, v)
    assert _loop_scopes(plan) == ["block", "grid"]


def test_reading_other_elements_keeps_the_grid_barrier():
    v = rng.standard_normal(4096).astype(np.float32)
    plan = check_plan(flipped, v)
    assert _loop_scopes(plan) == ["grid", "block", "grid"]      # before the reversal, after it, at the end


def test_one_utask_chain_is_local():
    v = rng.standard_normal(64).astype(np.float32)        # one uTask per op
    check_plan(chain, v)
    plan = schedule(gdsl.make_ir(chain)(v), grid=132, partition=False)    # (else a partitioned loop)
    assert _loop_scopes(plan) == ["block", "grid"]


# ------------------------------------------------------------------------------------- Hazards itself

def _copy(name, src: Buffer, dst: Buffer, first: int) -> Wave:
    """A copy src -> dst in 2 uTasks of 4 elements on vEUs first, first + 1."""
    op = Op(name, COPY.name, (Value(src, src.aval),), (Value(dst, dst.aval),), {"chunk": 4}, 2, 1.0)
    return Wave((Task(op, first, 2),))


@pytest.fixture
def buffers():
    aval = ShapedArray((8,), F32)
    return [Buffer(name, aval, "temp") for name in ("x", "y", "z", "w")]


@pytest.mark.parametrize("first, local", [(0, True), (1, False)])
def test_read_after_write_on_another_veu(buffers, first, local):
    x, y, z, w = buffers
    written = _copy("a", x, y, 0)           # y[0:4] on vEU 0, y[4:8] on vEU 1
    reads = _copy("b", y, z, first)
    hazards = Hazards()
    hazards.start([written, reads])
    hazards.record(written)
    assert hazards.local(reads) is local


@pytest.mark.parametrize("first, local", [(0, True), (1, False)])
def test_overwrite_after_read_on_another_veu(buffers, first, local):
    x, y, z, w = buffers
    reads = _copy("a", x, y, 0)             # reads x[0:4] on vEU 0, x[4:8] on vEU 1
    overwrites = _copy("b", z, x, first)
    hazards = Hazards()
    hazards.start([reads, overwrites])
    hazards.record(reads)
    assert hazards.local(overwrites) is local


def test_possible_view_counts_as_a_read_of_its_source(buffers):
    """A slice a backend renders as a pointer reads its source wherever its result is read."""
    x, y, z, w = buffers
    written = _copy("a", x, y, 1)           # y written by vEUs 1, 2
    view = Op("v", slice_p.name, (Value(y, y.aval),), (Value(z, z.aval),),
              {"start": (0,), "limit": (8,), "step": (1,), "chunk": 8}, 1, 1.0)
    viewed = Wave((Task(view, 0, 1),))
    reader = Op("r", COPY.name, (Value(z, z.aval),), (Value(w, w.aval),), {"chunk": 8}, 1, 1.0)
    hazards = Hazards()
    hazards.start([written, viewed])
    hazards.record(written)
    hazards.record(viewed)
    assert not hazards.local(Wave((Task(reader, 0, 1),)))


def test_uniform_reads_of_written_elements(buffers):
    x, y, z, w = buffers
    written = _copy("a", x, y, 0)
    hazards = Hazards()
    hazards.start([written])
    hazards.record(written)
    assert hazards.written([Value(y, y.aval)])
    assert not hazards.written([Value(z, z.aval)])
    hazards.clear()
    assert not hazards.written([Value(y, y.aval)])


# ---- the element maps, against their per-element definitions (numpy's unravel / ravel, the tile formula)

def _broadcast_reference(out_shape, in_shape, flat):
    idx = np.unravel_index(flat, out_shape)
    offset = len(out_shape) - len(in_shape)
    return np.ravel_multi_index(tuple(np.zeros_like(flat) if d == 1 else idx[offset + a]
                                      for a, d in enumerate(in_shape)), in_shape)


def test_broadcast_source_matches_unravel_and_ravel():
    """shares.broadcast_source (stride arithmetic on the broadcast axes) picks the input elements numpy's
    broadcasting reads, for every output element (also as flat=None) and for scattered ones, whatever the axes
    of size 1."""
    from gdsl.schedule.shares import broadcast_source
    shapes = rng.integers(1, 5, size=(400, 4))
    for row in shapes:
        out_shape = tuple(int(d) for d in row[:rng.integers(1, 5)])
        kept = rng.integers(1, len(out_shape) + 1)
        in_shape = tuple(d if rng.random() < 0.5 else 1 for d in out_shape[len(out_shape) - kept:])
        size = int(np.prod(out_shape))
        for flat in (np.arange(size), rng.integers(0, size, 7)):
            got, want = broadcast_source(out_shape, in_shape, flat), _broadcast_reference(out_shape, in_shape, flat)
            assert got.dtype == want.dtype and np.array_equal(got, want), (out_shape, in_shape, flat)
        whole = broadcast_source(out_shape, in_shape, None)
        assert whole.flags.writeable and np.array_equal(whole, _broadcast_reference(out_shape, in_shape,
                                                                                    np.arange(size)))


def _gemm_utask_reference(op):
    from gdsl.primitives.linalg import matmul_p
    from gdsl.schedule import utasks
    out = op.outputs[0].aval
    e = np.arange(out.size)
    _, m, n, _ = utasks.gemm_dims(op.kind, [v.aval for v in op.inputs], out, op.params)
    tm, tn = op.params["tile_m"], op.params["tile_n"]
    tiles_m, tiles_n = -(-m // tm), -(-n // tn)
    if op.kind == matmul_p.name:
        b, rest = np.divmod(e, m * n)
        i, j = np.divmod(rest, n)
    else:
        _, o, ho, wo = out.shape
        img, rest = np.divmod(e, o * ho * wo)
        j, yx = np.divmod(rest, ho * wo)
        b, i = 0, img * ho * wo + yx
    if utasks.gathers_batch(op.params):
        b = 0
    return (b * tiles_m + i // tm) * tiles_n + j // tn


@pytest.mark.parametrize("grid", [4, 132])
def test_gemm_utask_of_every_output_element(grid):
    """hazards._gemm_utask (row and column tiles broadcast over the output) gives each element of a conv2d's
    and a batched matmul's output the uTask the per-element tile formula gives (utasks.py's tile order), also
    with the batch gathered into one uTask per tile (owner=True's column layout)."""
    import dataclasses

    import gdsl.nn as gnn
    from gdsl.schedule import utasks
    from gdsl.schedule.hazards import _gemm_utask

    def program(x, w, a, b):
        return gnn.conv2d(x, w, stride=2, padding=1) * 2.0, gnp.matmul(a, b) + 1.0

    args = (rng.standard_normal((2, 3, 17, 13)).astype(np.float32),
            rng.standard_normal((40, 3, 3, 3)).astype(np.float32),
            rng.standard_normal((3, 70, 24)).astype(np.float32), rng.standard_normal((3, 24, 50)).astype(np.float32))
    plan = schedule(gdsl.make_ir(program)(*args), grid=grid)
    ops = [t.op for k in plan.kernels for s in walk(k.body) if isinstance(s, Wave) for t in s.tasks
           if t.op.kind in utasks.GEMM_KINDS]
    assert {op.kind for op in ops} == set(utasks.GEMM_KINDS)
    ops += [dataclasses.replace(op, params={**op.params, utasks.GATHER_BATCH: True}) for op in ops
            if op.kind == "matmul"]
    for op in ops:
        assert np.array_equal(_gemm_utask(op), _gemm_utask_reference(op)), op.kind
