"""Row chains (gdsl/schedule/rows.py): reductions over the last axis and the elementwise steps on the same rows
that read them, fused into one ROWS op for the backends with its lowering (the C-family ones). Which chains
fuse and which must not, what the plan says, and that the plan simulator (with its race checks), the CPU
emulator of the generated C, the CPU backend and the interpreter agree; the CUDA source compiles with NVRTC."""
import re

import numpy as np
import pytest
from strategies import (
    BACKEND_TOLERANCE,
    as_list,
    assert_trees_close,
    emulated,
    interpreted,
    needs_cxx,
    needs_nvrtc,
    plan_ops,
    simulated,
)

import gdsl
import gdsl.nn
import gdsl.numpy as gnp
from gdsl.backends.cfamily import emulator, reductions
from gdsl.backends.cfamily.emulator import EmulatorDialect
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.backends.hip.emulated import EmulatedHIPDialect
from gdsl.primitives.linalg import matmul_p
from gdsl.primitives.reductions import reduce_max_p, reduce_sum_p
from gdsl.schedule import schedule
from gdsl.schedule.plan import ROW_SHAPE, ROWS, STEP_OUTPUTS, STEPS, Loop, plan_statements

rng = np.random.default_rng(0)
CHAIN = EmulatorDialect().lowering_chain           # the C-family backends' rules: they have ROWS's


def _f32(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ------------------------------------------------------------------------------------------- programs
def layer_norm(x):
    mean = gnp.mean(x, axis=-1, keepdims=True)
    d = x - mean
    var = gnp.mean(d * d, axis=-1, keepdims=True)
    return d / gnp.sqrt(var + 1e-5)


def softmax_of_scaled(x):
    """The scaling is a row step of its own whose only reader is the chain: it joins it (backward)."""
    return gdsl.nn.softmax(x * 0.5 + 1.0)


def softmax_and_exponentials(x):
    """The exponentials, an intermediate of the chain, are also a result: the op stores them too."""
    e = gnp.exp(x - gnp.max(x, axis=-1, keepdims=True))
    return e / gnp.sum(e, axis=-1, keepdims=True), e


def softmax_and_its_max(x):
    """A per-row intermediate read outside the chain (after it)."""
    m = gnp.max(x, axis=-1, keepdims=True)
    e = gnp.exp(x - m)
    return e / gnp.sum(e, axis=-1, keepdims=True), m * 2.0


def softmax_with_bias(x, b):
    """A row operand from memory (b, broadcast over the rows) beside the on-chip steps."""
    return gdsl.nn.softmax(x + b)


FUSING = {
    "softmax_1d": (gdsl.nn.softmax, lambda: (_f32(37),)),
    "softmax_2d_short_rows": (gdsl.nn.softmax, lambda: (_f32(5, 3),)),
    "softmax_2d_long_rows": (gdsl.nn.softmax, lambda: (_f32(3, 700),)),      # longer than the block
    "softmax_4d": (gdsl.nn.softmax, lambda: (_f32(2, 3, 4, 50),)),
    "log_softmax": (gdsl.nn.log_softmax, lambda: (_f32(6, 40),)),
    "layer_norm": (layer_norm, lambda: (_f32(4, 6, 100),)),
    "softmax_of_scaled": (softmax_of_scaled, lambda: (_f32(9, 33),)),
    "softmax_and_exponentials": (softmax_and_exponentials, lambda: (_f32(7, 20),)),
    "softmax_and_its_max": (softmax_and_its_max, lambda: (_f32(7, 20),)),
    "softmax_with_bias": (softmax_with_bias, lambda: (_f32(5, 64), _f32(64))),
}


# ------------------------------------------------------------------------------------ what must not fuse
def softmax_first_axis(x):
    return gdsl.nn.softmax(x, axis=0)


def matmul_between(x, w):
    """A matmul reads the max and feeds the chain's next step: one op could not run before and after it."""
    m = gnp.max(x, axis=-1, keepdims=True)
    return x - (m * gnp.ones((1, x.shape[1]), dtype=gdsl.float32)) @ w


def full_reduction(x):
    return x - gnp.sum(x)


def max_feeds_a_uniform(x):
    """The max is read by a scalar op every vEU computes, which the chain's last step reads: not fused from
    the max (one op cannot run before and after that scalar op); the rest still is."""
    m = gnp.max(x, axis=-1, keepdims=True)
    e = gnp.exp(x - m)
    return e / gnp.sum(e, axis=-1, keepdims=True) + 0.0 * gnp.sum(m)


NOT_FUSING = {
    "softmax_first_axis": (softmax_first_axis, lambda: (_f32(30, 5),)),
    "full_reduction": (full_reduction, lambda: (_f32(6, 24),)),
    "too_long_rows": (gdsl.nn.softmax, lambda: (_f32(2, 256 * 8 + 1),)),
}


# --------------------------------------------------------------------------------------- in loops
def softmax_steps(h):
    """A carry normalised every step: each row is independent (a partitioned loop: rows stay on their vEU)."""
    def step(i, h):
        return gdsl.nn.softmax(h * 3.0 + 0.25)
    return gdsl.fori_loop(0, 3, step, h)


def layer_norm_steps(h, w):
    def step(i, h):
        return layer_norm(gnp.tanh(h @ w))
    return gdsl.fori_loop(0, 3, step, h)


LOOPS = {
    "softmax_steps": (softmax_steps, lambda: (_f32(8, 1, 32),)),
    "layer_norm_steps": (layer_norm_steps, lambda: (_f32(4, 48), _f32(48, 48, scale=0.2))),
}
def range_of_rows(x):
    """Two reductions of the same rows combined per row: the chain from the min reads the max, one value per row,
    in its per-row step (not broadcast along the row, as a row step's operands are)."""
    return gnp.max(x, axis=-1) - gnp.min(x, axis=-1)


def scaled_range(x, s):
    """A per-row operand from memory (s, one value per row) read by a per-row step, and by a row step too."""
    return gnp.max(x, axis=-1) * s - gnp.min(x, axis=-1) + gnp.sum(x * s, axis=-1)


PARTIAL = {"max_feeds_a_uniform": (max_feeds_a_uniform, lambda: (_f32(7, 20),)),
           "matmul_between": (matmul_between, lambda: (_f32(6, 24), _f32(24, 24))),
           "range_of_rows": (range_of_rows, lambda: (_f32(2, 3),)),
           "range_of_square_rows": (range_of_rows, lambda: (_f32(3, 3),)),
           "scaled_range": (scaled_range, lambda: (_f32(4, 4), _f32(4)))}
PER_ROW = ["range_of_rows", "range_of_square_rows", "scaled_range"]
ALL = {**FUSING, **NOT_FUSING, **LOOPS, **PARTIAL}


# ------------------------------------------------------------------------------------------ helpers

def _rows_ops(plan):
    return [op for op in plan_ops(plan) if op.kind == ROWS.name]


def _program(name):
    fn, make_args = ALL[name]
    args = make_args()
    return gdsl.make_ir(fn)(*args), args





# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", sorted(FUSING))
def test_chain_fuses_into_one_rows_op(name):
    program, args = _program(name)
    plan = schedule(program, grid=8, rows=CHAIN)
    plain = schedule(program, grid=8)
    (op,) = _rows_ops(plan)
    reductions = [s for s in op.params[STEPS] if s.reduce is not None]
    assert len(reductions) >= 1 and len(op.params[STEPS]) >= 2
    assert len(op.outputs) == len(op.params[STEP_OUTPUTS])
    assert plan.stats["row_chains"] == 1
    assert plan.stats["waves"] < plain.stats["waves"]
    assert_trees_close(simulated(plan, args), interpreted(program, args), tolerance=BACKEND_TOLERANCE)


def test_softmax_is_one_wave_of_one_op():
    program, args = _program("softmax_4d")
    plan = schedule(program, grid=8, rows=CHAIN)
    assert plan.stats["waves"] == 1 and plan.stats["ops"] == 1
    (op,) = _rows_ops(plan)
    assert op.outputs[0].storage.kind == "output" and op.inputs[0].storage.kind == "input"
    assert [s.reduce for s in op.params[STEPS]] == [reduce_max_p.name, None, reduce_sum_p.name, None]
    text = str(plan)
    assert "out0 = op0_row_chain_reduce_max_reduce_sum(in0) with steps " in text
    assert "s2 = reduce_sum(s1)" in text and "1 row chains" in text


def test_intermediate_read_outside_is_stored():
    program, args = _program("softmax_and_exponentials")
    (op,) = _rows_ops(schedule(program, grid=8, rows=CHAIN))
    assert len(op.outputs) == 2
    assert {v.aval.shape for v in op.outputs} == {(7, 20)}
    program, args = _program("softmax_and_its_max")
    (op,) = _rows_ops(schedule(program, grid=8, rows=CHAIN))
    assert sorted(v.aval.size for v in op.outputs) == [7, 140]      # the max per row, and the result


@pytest.mark.parametrize("name", sorted(NOT_FUSING))
def test_chain_that_must_not_fuse(name):
    program, args = _program(name)
    plan = schedule(program, grid=8, rows=CHAIN)
    assert not _rows_ops(plan) and plan.stats["row_chains"] == 0
    assert_trees_close(simulated(plan, args), interpreted(program, args), tolerance=BACKEND_TOLERANCE)


def test_a_chain_around_an_outside_reader_is_cut():
    program, args = _program("max_feeds_a_uniform")
    plan = schedule(program, grid=8, rows=CHAIN)
    (op,) = _rows_ops(plan)
    assert [s.reduce for s in op.params[STEPS]] == [None, reduce_sum_p.name, None]
    assert reduce_max_p.name in {o.kind for o in plan_ops(plan)}
    assert_trees_close(simulated(plan, args), interpreted(program, args), tolerance=BACKEND_TOLERANCE)


def test_a_chain_stops_at_a_matmul_between_its_steps():
    """The steps before the matmul fuse; the subtraction after it, which reads the chain's row again, is an
    op of its own after the matmul."""
    program, args = _program("matmul_between")
    plan = schedule(program, grid=8, rows=CHAIN)
    (op,) = _rows_ops(plan)
    (matmul,) = [o for o in plan_ops(plan) if o.kind == matmul_p.name]
    assert matmul.inputs[0].storage is op.outputs[0].storage
    assert plan_ops(plan)[-1].kind not in (ROWS.name, matmul_p.name)
    assert_trees_close(simulated(plan, args), interpreted(program, args), tolerance=BACKEND_TOLERANCE)


def cached_softmax(x, W, K):
    """A loop that stores each step's softmax row into a cache at the step, then uses the row again."""
    def step(g, c):
        x, K = c
        h = gdsl.nn.softmax(gnp.matmul(x, W), axis=-1)
        K = K.at[:, :, g].set(h[:, :, 0])           # (traced before the row's other use)
        return gnp.tanh(h) + x * 0.25, K
    return gdsl.fori_loop(0, 2, step, (x, K))


def test_a_reader_of_an_earlier_member_waits_for_the_fused_op():
    """A row chain fused into one op stands where its last member stood; a reader of an earlier member that comes
    between them in program order (the cache store of the softmax row, before the row's other use) is levelled
    after the fused op (found by a randomized sweep on the emulator: the store read the row of the step before)."""
    args = (_f32(3, 2, 1, 12), _f32(2, 12, 12, scale=0.3), np.zeros((3, 2, 2, 12), np.float32))
    program = gdsl.make_ir(cached_softmax)(*args)
    for grid, partition in ((1, False), (3, True)):
        plan = schedule(program, grid=grid, rows=CHAIN, partition=partition)
        assert _rows_ops(plan)
        assert_trees_close(simulated(plan, args), interpreted(program, args), tolerance=BACKEND_TOLERANCE)


@needs_cxx
def test_emulated_cache_store_of_a_fused_row():
    args = (_f32(3, 2, 1, 12), _f32(2, 12, 12, scale=0.3), np.zeros((3, 2, 2, 12), np.float32))
    expected = gdsl.jit(cached_softmax, backend="interpret")(*args)
    for grid, partition in ((1, False), (3, True), (8, True)):
        got = emulator.emulate(cached_softmax, *args, grid=grid, block=64, partition=partition)
        assert_trees_close(got, expected, tolerance=BACKEND_TOLERANCE)


def stored_cell_with_epilogue(x, W, K):
    """A cell chain after a matmul epilogue, its last value stored into a cache; the carry another product."""
    def step(t, c):
        x, K = c
        a = gnp.tanh(x) + gnp.matmul(x, W) * 0.5
        h = gdsl.nn.sigmoid(a) * gnp.tanh(x) + 0.25
        return a * 0.5, K.at[:, t].set(gnp.tanh(h) * 0.5 + h)
    return gdsl.fori_loop(0, 4, step, (x, K))


def stored_chain_input(x, K):
    """A row chain's input, with the cache's old row added, stored into the cache; the chain's softmax the carry."""
    def step(t, c):
        x, K = c
        a = x * 1.5 + 0.25
        return gdsl.nn.softmax(a, axis=-1), K.at[:, t].set(a + K[:, t])
    return gdsl.fori_loop(0, 4, step, (x, K))


PRELOADED_ROWS = {   # (program, args, emulate options): were wrong on the C-family emulator, right on the CPU backend
    "cell chain after an epilogue, stored": (stored_cell_with_epilogue, lambda rng: (
        rng.standard_normal((5, 6)).astype(np.float32), (rng.standard_normal((6, 6)) * 0.3).astype(np.float32),
        np.zeros((5, 4, 6), np.float32)), {"grid": 1, "partition": False}),
    "row chain input stored, not partitioned": (stored_chain_input, lambda rng: (
        rng.standard_normal((2, 6)).astype(np.float32), rng.standard_normal((2, 4, 6)).astype(np.float32)),
        {"grid": 1, "partition": False}),
}


@needs_cxx
@pytest.mark.parametrize("name", sorted(PRELOADED_ROWS))
def test_a_cell_chain_of_short_rows_is_not_preloaded(name):
    """A cell chain of rows 6 long runs on groups of 8 lanes, so its thread t does not compute element t: a step
    preload of element t for it (preload.py) fed it another element's value (the cache off by up to 2.4; found by a
    randomized sweep, session 33). Such a chain is not preloaded now (preload._thread_per_element)."""
    fn, make_args, options = PRELOADED_ROWS[name]
    args = make_args(np.random.default_rng(6))
    expected = gdsl.jit(fn, backend="interpret")(*args)
    assert_trees_close(gdsl.jit(fn, backend="cpu")(*args), expected, tolerance=BACKEND_TOLERANCE)
    assert_trees_close(emulator.emulate(fn, *args, block=64, **options), expected, tolerance=BACKEND_TOLERANCE)


def test_no_fusion_without_the_backends_rule():
    program, _ = _program("softmax_4d")
    assert not _rows_ops(schedule(program, grid=8))
    assert not _rows_ops(schedule(program, grid=8, rows=("no-such-backend",)))


@pytest.mark.parametrize("name", sorted(LOOPS))
@pytest.mark.parametrize("control", ["device", "host"])
def test_rows_in_loops_are_race_free(name, control):
    program, args = _program(name)
    for partition in (None, True, False):
        plan = schedule(program, grid=8, control=control, partition=partition, rows=CHAIN)
        assert _rows_ops(plan)
        assert_trees_close(simulated(plan, args), interpreted(program, args), tolerance=BACKEND_TOLERANCE)


def test_partitioned_rows_stay_on_their_veu():
    """In a partitioned loop each partition's rows are one uTask on its own vEU: block syncs only."""
    program, _ = _program("softmax_steps")
    plan = schedule(program, grid=8, partition=True, rows=CHAIN)
    (loop,) = [s for s in plan_statements(plan) if isinstance(s, Loop)]
    assert loop.parts == 8
    (op,) = _rows_ops(plan)
    assert op.n_utasks == 8 and op.params["rows"] == 1


@pytest.mark.parametrize("name", PER_ROW)
def test_per_row_reads_are_the_rows_own(name):
    """A per-row step reads element r of a per-row operand for row r: the scheduler's hazards and the simulator's
    race checks read it so (they broadcast it along the row, right-aligned, and crashed or, on square rows, saw
    the wrong elements); the plan computes what the interpreter does at every grid."""
    program, args = _program(name)
    expected = interpreted(program, args)
    for grid in (1, 2, 3, 5):
        plan = schedule(program, grid=grid, rows=CHAIN)
        assert _rows_ops(plan)
        assert_trees_close(simulated(plan, args), expected, tolerance=BACKEND_TOLERANCE)


@needs_cxx
@pytest.mark.parametrize("name", sorted(ALL))
def test_emulated_results_with_and_without_rows(name):
    fn, make_args = ALL[name]
    args = make_args()
    expected = interpreted(gdsl.make_ir(fn)(*args), args)
    for rows in (None, False):
        for block in (64, 256):
            got = emulated(fn, args, grid=4, block=block, rows=rows)
            assert_trees_close(got, expected, tolerance=BACKEND_TOLERANCE)


@needs_cxx
@pytest.mark.parametrize("name", sorted(ALL))
def test_emulated_results_with_preloaded_leaves(name, monkeypatch):
    """reductions.PRELOAD_ROW_LEAVES: every element a lane reads at its row elements loaded first, the steps
    computed from registers (where it fits: with a budget of no registers, no chain preloads); on CUDA the
    loads are followed by the dialect's issue fence (FENCE_ROW_LEAVES: a warp barrier, so ptxas issues them
    there), which the emulator's dialect has none of."""
    fn, make_args = ALL[name]
    args = make_args()
    expected = interpreted(gdsl.make_ir(fn)(*args), args)
    for budget, preloads in ((32, True), (0, False)):
        monkeypatch.setattr(reductions, "PRELOAD_ROW_LEAVES", budget)
        source = gdsl.jit(fn, backend="cuda", grid=4, block=64).lower(*args).source
        assert ("l0[k] = " in source) == (preloads and "_row_chain_" in source)
        fenced = re.search(r"l0\[k\] = [^\n]*\n\s*__syncwarp\(\);", source) is not None
        assert fenced == (preloads and "_row_chain_" in source)
        for block in (64, 256):
            got = emulated(fn, args, grid=4, block=block)
            assert_trees_close(got, expected, tolerance=BACKEND_TOLERANCE)


@needs_cxx
@pytest.mark.parametrize("name", ["softmax_2d_short_rows", "softmax_4d", "layer_norm", "softmax_and_its_max",
                                  "softmax_steps"])
def test_emulated_hip_wave64(name):
    """HIP's 64-lane wavefronts: the groups of lanes per row go up to 64."""
    fn, make_args = ALL[name]
    args = make_args()
    expected = interpreted(gdsl.make_ir(fn)(*args), args)
    got = emulated(fn, args, grid=4, block=128, dialect=EmulatedHIPDialect(64))
    assert_trees_close(got, expected, tolerance=BACKEND_TOLERANCE)


@needs_cxx
@pytest.mark.parametrize("name", sorted(LOOPS))
def test_emulated_partitioned_loops(name):
    fn, make_args = LOOPS[name]
    args = make_args()
    expected = interpreted(gdsl.make_ir(fn)(*args), args)
    for control in ("device", "host"):
        got = emulated(fn, args, grid=4, control=control, partition=True)
        assert_trees_close(got, expected, tolerance=BACKEND_TOLERANCE)


@pytest.mark.parametrize("name", sorted(FUSING) + sorted(LOOPS))
def test_cpu_and_interpret_results(name):
    """The CPU backend (llvmlite) has no ROWS rule: it keeps the chain's ops, with the same results."""
    fn, make_args = ALL[name]
    args = make_args()
    expected = interpreted(gdsl.make_ir(fn)(*args), args)
    assert not _rows_ops(gdsl.jit(fn, backend="cpu", grid=4).lower(*args).lowering.plan)
    for backend in ("cpu", "interpret"):
        got = gdsl.jit(fn, backend=backend, grid=4)(*args)
        assert_trees_close(as_list(got), expected, tolerance=BACKEND_TOLERANCE)


def test_option_turns_rows_off():
    fn, make_args = FUSING["layer_norm"]
    args = make_args()
    on = gdsl.jit(fn, backend="cuda", grid=8).lower(*args)
    off = gdsl.jit(fn, backend="cuda", grid=8, rows=False).lower(*args)
    assert _rows_ops(on.lowering.plan) and not _rows_ops(off.lowering.plan)


@needs_nvrtc
@pytest.mark.parametrize("name", ["softmax_2d_short_rows", "softmax_2d_long_rows", "layer_norm",
                                  "softmax_and_its_max", "softmax_steps"])
@pytest.mark.parametrize("preload", [None, 32])
def test_cuda_kernel_with_rows_compiles(name, preload, monkeypatch):
    monkeypatch.setattr(reductions, "PRELOAD_ROW_LEAVES", preload)
    fn, make_args = ALL[name]
    lowering = gdsl.jit(fn, backend="cuda", grid=132).lower(*make_args())
    assert _rows_ops(lowering.lowering.plan)
    assert cuda_toolchain.compile_cuda(lowering.source, "sm_90")[:4] == b"\x7fELF"


def test_a_row_utask_is_priced_by_its_block_passes(monkeypatch):
    """utasks.row_split_options prices a ROWS uTask by the passes of its block (rows.row_group, the layout the
    C-family renderer draws): short rows take a lane group each, eight rows of 196 one pass as one row does,
    so eight rows a uTask is offered and costs what one row costs; a row longer than a group holds takes the
    whole block, row after row. With ROW_PASSES off every row was a pass (SkipNet's traced ungated pools:
    1024 one-row uTasks in 103 rounds, docs/performance.md, session 19)."""
    from gdsl.core.ir import ShapedArray
    from gdsl.schedule import utasks
    from gdsl.schedule.rows import row_group

    def options(shape):
        rows_in = ShapedArray(shape, np.float32)
        rows_out = ShapedArray(shape[:-1], np.float32)
        return {p["rows"]: (n, cost) for n, p, cost in utasks.row_split_options([rows_in], [rows_out],
                                                                             {ROW_SHAPE: shape}, 256)}
    assert row_group(196, True, 256, 32) == 32 and row_group(3136, True, 256, 32) is None
    short = options((1, 1024, 196))
    assert sorted(short) == [1, 2, 5, 8]                      # row_split's five, halved, and one pass's eight
    assert short[8] == (128, short[1][1]) and short[1][1] == utasks.ROUND_TRIP_NS
    long = options((1, 256, 3136))                             # the whole block on each row, 13 passes a row
    assert long[1][1] == 13 * utasks.ROUND_TRIP_NS and max(long) == 1
    monkeypatch.setattr(utasks, "ROW_PASSES", False)
    assert sorted(options((1, 1024, 196))) == [1, 2, 5]
    assert options((1, 1024, 196))[5][1] == 5 * utasks.ROUND_TRIP_NS



def test_a_row_utask_takes_at_most_the_ops_rows(monkeypatch):
    """A row chain (or a reduction) of fewer rows than a uTask's default (four elements a thread: 102 rows of
    10) takes only the rows it has: a recurrent gate's cell of one row of 10 otherwise rendered a grouped row
    loop of seven passes, six of them empty (SkipNet's gate cell: docs/performance.md, session 22)."""
    from gdsl.core.ir import ShapedArray
    from gdsl.primitives.reductions import reduce_sum_p
    from gdsl.schedule import utasks

    cell, row = {ROW_SHAPE: (1, 10)}, [ShapedArray((1, 10), np.float32)]
    assert utasks.row_split(row, row, cell, 256)[:2] == (1, {"rows": 1})
    assert [p["rows"] for _, p, _ in utasks.row_split_options(row, row, cell, 256)] == [1]
    sums = utasks.split(reduce_sum_p.name, [ShapedArray((3, 10), np.float32)], [ShapedArray((3,), np.float32)],
                        {"axes": (1,)}, 132, 256)
    assert sums[:2] == (1, {"rows": 3})
    monkeypatch.setattr(utasks, "CLAMP_ROWS", False)
    assert utasks.row_split(row, row, cell, 256)[1] == {"rows": 102}
