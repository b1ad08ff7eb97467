"""Loop-invariant matmul weights kept in shared memory across a loop (gdsl/schedule/resident.py): which
ops get them, how their regions are packed, what the plan prints, and that the emulated kernel computes the
same results with and without them."""
import numpy as np
import pytest
from strategies import BACKEND_TOLERANCE, assert_trees_close, needs_nvrtc

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily.emulator import emulate
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.interpreter import run_program
from gdsl.schedule import resident, schedule
from gdsl.schedule.plan import Wave, plan_statements
from gdsl.schedule.resident import RESIDENT, region_bytes, tile_bytes

rng = np.random.default_rng(0)


def rnn(xs, W, U):
    """h = tanh(x[t] W + h U): U (and W, unless hoisted) is read every step and never written."""
    def step(t, h):
        return gnp.tanh(xs[t] @ W + h @ U)
    return gdsl.fori_loop(0, xs.shape[0], step, gnp.zeros((1, U.shape[0]), dtype=gdsl.float32))


def decaying(xs, U):
    """The weights change every step: nothing can stay resident."""
    def step(t, carry):
        h, u = carry
        return gnp.tanh(xs[t] + h @ u), u * 0.5
    return gdsl.fori_loop(0, xs.shape[0], step, (gnp.zeros((1, U.shape[0]), dtype=gdsl.float32), U))


def _args(steps=6, n=32, m=64):
    return (rng.standard_normal((steps, 1, n)).astype(np.float32),
            (rng.standard_normal((n, m)) * 0.2).astype(np.float32),
            (rng.standard_normal((m, m)) * 0.2).astype(np.float32))


def _resident_tasks(plan):
    return [t for s in plan_statements(plan) if isinstance(s, Wave) for t in s.tasks if RESIDENT in t.op.params]


def test_loop_matmul_keeps_its_weights_when_the_budget_allows():
    program = gdsl.make_ir(rnn)(*_args())
    plan = schedule(program, grid=4, resident_bytes=1 << 16)
    (task,) = _resident_tasks(plan)
    assert task.op.inputs[1].storage.kind in ("const", "input")
    assert "B resident in shared memory at +0" in str(plan)
    rounds = -(-task.op.n_utasks // task.count)
    assert region_bytes(plan) == rounds * tile_bytes(task.op)
    for budget in (0, region_bytes(plan) - 1):           # none offered, or too little
        assert not _resident_tasks(schedule(program, grid=4, resident_bytes=budget))
    assert not _resident_tasks(schedule(program, grid=4, control="host", resident_bytes=1 << 16))


def test_weights_written_in_the_loop_stay_in_memory():
    xs, _, U = _args(n=64)
    plan = schedule(gdsl.make_ir(decaying)(xs, U), grid=4, resident_bytes=1 << 16)
    assert not _resident_tasks(plan)


def test_regions_are_packed_per_veu():
    """Two matmuls on disjoint vEUs share offset 0; on the same vEUs they are stacked."""
    def two(xs, U, V):
        def step(t, carry):
            h, g = carry
            return gnp.tanh(h @ U), gnp.tanh(g @ V)
        z = gnp.zeros((1, 64), dtype=gdsl.float32)
        return gdsl.fori_loop(0, xs.shape[0], step, (z + 1.0, z + 2.0))
    xs, _, U = _args()
    program = gdsl.make_ir(two)(xs, U, U * 0.5)
    wide = _resident_tasks(schedule(program, grid=64, resident_bytes=1 << 16))
    assert len(wide) == 2 and {t.op.params[RESIDENT][0] for t in wide} == {0}
    narrow = _resident_tasks(schedule(program, grid=1, resident_bytes=1 << 20))
    offsets = sorted(t.op.params[RESIDENT][0] for t in narrow)
    assert len(narrow) == 2 and offsets[1] == -(-narrow[0].op.n_utasks // narrow[0].count) * tile_bytes(narrow[0].op)


@pytest.mark.parametrize("grid", [1, 3, 4])
def test_emulated_kernel_with_resident_weights_matches_the_interpreter(grid):
    args = _args()
    expected = run_program(gdsl.make_ir(rnn)(*args), list(args))
    for option in (None, False):
        got = emulate(rnn, *args, grid=grid, resident=option)
        assert_trees_close([np.asarray(got)], expected, tolerance=BACKEND_TOLERANCE)


def test_cuda_source_stages_the_tiles_before_the_loop():
    source = gdsl.jit(rnn, backend="cuda", grid=4).lower(*_args()).source
    assert "extern __shared__" in source and "gdsl_stage_columns(" in source
    assert source.index("gdsl_stage_columns(in") < source.index("while (true)")
    plain = gdsl.jit(rnn, backend="cuda", grid=4, resident=False).lower(*_args()).source
    assert "gdsl_stage_columns(in" not in plain and "extern __shared__" not in plain


def _rows_args(steps=4, rows=64, n=32, m=64):
    """rnn's arguments with `rows` rows a step: GEMM-shaped tiles (tile_m < rows), not GEMVs."""
    return (rng.standard_normal((steps, rows, n)).astype(np.float32),
            (rng.standard_normal((n, m)) * 0.2).astype(np.float32),
            (rng.standard_normal((m, m)) * 0.2).astype(np.float32))


def _rnn_rows(xs, W, U):
    def step(t, h):
        return gnp.tanh(xs[t] @ W + h @ U)
    return gdsl.fori_loop(0, xs.shape[0], step, gnp.zeros((xs.shape[1], U.shape[0]), dtype=gdsl.float32))


def test_gemm_tiles_stay_resident_where_they_fit(monkeypatch):
    program = gdsl.make_ir(_rnn_rows)(*_rows_args())
    tasks = _resident_tasks(schedule(program, grid=8, resident_bytes=1 << 20))
    assert tasks and all(t.op.params["tile_m"] < 64 for t in tasks)
    assert all(t.op.params[RESIDENT][0] % resident.ALIGN == 0 for t in tasks)
    assert not _resident_tasks(schedule(program, grid=8, resident_bytes=1024))      # too little
    monkeypatch.setattr(resident, "GEMM_TILES", False)
    assert not _resident_tasks(schedule(program, grid=8, resident_bytes=1 << 20))


@pytest.mark.parametrize("grid", [2, 8])
def test_emulated_resident_gemm_tiles_match_the_interpreter(grid):
    """The wide tile reading B in place from its resident tile (gemm.Gemm.resident_b: only A staged), over
    uTasks of several rounds on a vEU (grid 2) and one each (grid 8)."""
    args = _rows_args(n=64)
    source = gdsl.jit(_rnn_rows, backend="cuda", grid=grid).lower(*args).source
    assert ", true, true, true, false, float>" in source       # VEC, BRES, A along k, B along n
    expected = run_program(gdsl.make_ir(_rnn_rows)(*args), list(args))
    got = emulate(_rnn_rows, *args, grid=grid)
    assert_trees_close([np.asarray(got)], expected, tolerance=BACKEND_TOLERANCE)


@needs_nvrtc
def test_resident_gemm_tiles_compile():
    source = gdsl.jit(_rnn_rows, backend="cuda", grid=8).lower(*_rows_args()).source
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"


@pytest.mark.gpu
def test_gpu_resident_gemm_tiles_match_the_interpreter():
    import cupy as cp
    args = _rows_args(rows=64, n=256, m=256)
    expected = run_program(gdsl.make_ir(_rnn_rows)(*args), list(args))
    fn = gdsl.jit(_rnn_rows, backend="cuda")
    assert ", true, true, true, false, float>" in fn.lower(*args).source
    got = cp.asnumpy(fn(*(cp.asarray(a) for a in args)))
    assert_trees_close([got], expected, tolerance=BACKEND_TOLERANCE)


def nested(xs, W1, W2):
    """An outer step's `h @ W1` and an inner loop's `z @ W2`, both weights loop-invariant: both resident."""
    def step(t, h):
        h = gnp.tanh(xs[t] + h @ W1)
        return gdsl.fori_loop(0, 2, lambda j, z: gnp.tanh(z @ W2 + 0.1 * z), h)
    return gdsl.fori_loop(0, xs.shape[0], step, gnp.zeros((xs.shape[1], W1.shape[0]), dtype=gdsl.float32))


@pytest.mark.parametrize("grid", [1, 3])
def test_a_nested_loops_tiles_do_not_overlap_the_outer_loops(grid):
    """The outer loop's tiles must hold through the inner loop, which stages its own every outer step: they lie
    past the inner loop's region. Both had offset 0, so the inner loop's W2 overwrote the outer loop's W1 (an error
    of 1.1 on the emulator at every grid; found by a randomized sweep)."""
    xs = rng.standard_normal((2, 4, 26)).astype(np.float32)
    w1, w2 = (rng.standard_normal((2, 26, 26)) * 0.2).astype(np.float32)
    program = gdsl.make_ir(nested)(xs, w1, w2)
    regions = sorted((t.op.params[RESIDENT][0], t.op.params[RESIDENT][0] + t.op.params[RESIDENT][2] * tile_bytes(t.op))
                     for s in plan_statements(schedule(program, grid=grid, resident_bytes=64 * 1024))
                     if isinstance(s, Wave) for t in s.tasks if RESIDENT in t.op.params)
    assert len(regions) == 2 and regions[0][1] <= regions[1][0]      # (both resident, one after the other)
    expected = run_program(program, [xs, w1, w2])
    assert_trees_close([emulate(nested, xs, w1, w2, grid=grid, block=64)], expected, tolerance=BACKEND_TOLERANCE)
