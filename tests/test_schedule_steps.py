"""Hoisting across iterations (gdsl/schedule/steps.py): `xs[i] @ W` in a counted loop becomes one GEMM over all
row blocks before the loop and a window of it inside; the program typechecks and computes the same, the
loop's plan has no matmul reading xs, and loops where it would not pay or not apply are left alone."""
import numpy as np
import pytest
from test_schedule import VIEWS, check_plan

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import emulator
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.core.ir import walk_eqns
from gdsl.core.typecheck import typecheck_program
from gdsl.interpreter import run_program
from gdsl.primitives.control import while_p
from gdsl.schedule import schedule, steps, utasks
from gdsl.schedule.licm import hoist_program
from gdsl.schedule.plan import Loop, Wave, walk
from gdsl.schedule.steps import hoist_step_products

rng = np.random.default_rng(11)


def _w(*shape, scale=0.4):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def rnn(xs, W, U):
    """A batched-gate recurrence: xs[t] @ W[4] is a step product, h @ U[4] is not."""
    def step(t, h):
        g = xs[t] @ W + h @ U
        return gnp.tanh(g[0]) * gdsl.nn.sigmoid(g[1]) + g[2] * g[3] * 0.1
    return gdsl.fori_loop(0, xs.shape[0], step, gnp.zeros((xs.shape[1], U.shape[-1]), dtype=gdsl.float32))


def reversed_rows(xs, W):
    """Negative indices count from the end, as in numpy; the hoisted window reads the same rows."""
    def step(t, h):
        return gnp.tanh(xs[-1 - t] @ W + h)
    return gdsl.fori_loop(0, xs.shape[0], step, gnp.zeros((xs.shape[1], W.shape[-1]), dtype=gdsl.float32))


def fewer_steps_than_rows(xs, W):
    return gdsl.fori_loop(0, 2, lambda t, h: gnp.tanh(xs[t] @ W + h),
                          gnp.zeros((xs.shape[1], W.shape[-1]), dtype=gdsl.float32))


def varying_matrix(xs, W):
    """W changes every step: nothing to hoist."""
    def step(t, c):
        h, w = c
        return gnp.tanh(xs[t] @ w + h), w * 0.9
    return gdsl.fori_loop(0, xs.shape[0], step, (gnp.zeros((xs.shape[1], W.shape[-1]), dtype=gdsl.float32), W))


ARGS = {
    rnn: (_w(5, 3, 8, scale=1.0), _w(4, 8, 8), _w(4, 8, 8)),
    reversed_rows: (_w(4, 2, 8, scale=1.0), _w(8, 6)),
}
WIDE = (_w(5, steps.BY_GATE_MAX_ROWS + 1, 8, scale=1.0), _w(4, 8, 8), _w(4, 8, 8))   # steps wider than a GEMV


def _loop_eqns(program):
    (loop,) = [e for e in walk_eqns(program.jaxpr) if e.primitive is while_p]
    return [e.primitive.name for e in loop.params["body_jaxpr"].eqns]


def _hoisted(fn, *args):
    program = hoist_program(gdsl.make_ir(fn)(*args))
    hoisted = hoist_step_products(program)
    typecheck_program(hoisted)
    flat = [np.asarray(a) for a in args]
    for got, want in zip(run_program(hoisted, flat), run_program(program, flat)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    return program, hoisted


@pytest.mark.parametrize("fn", list(ARGS), ids=lambda f: f.__name__)
def test_step_product_leaves_the_loop(fn):
    program, hoisted = _hoisted(fn, *ARGS[fn])
    assert _loop_eqns(hoisted).count("matmul") == _loop_eqns(program).count("matmul") - 1
    assert "dynamic_slice" in _loop_eqns(hoisted)
    assert any(e.primitive.name == "matmul" for e in hoisted.jaxpr.eqns)     # the GEMM over all steps


@pytest.mark.parametrize("fn", [fewer_steps_than_rows, varying_matrix], ids=lambda f: f.__name__)
def test_left_alone(fn):
    program = hoist_program(gdsl.make_ir(fn)(_w(4, 2, 8, scale=1.0), _w(8, 8)))
    assert hoist_step_products(program) is program


def test_products_larger_than_the_cache_stay_in_the_loop(monkeypatch):
    """A product over HOIST_MAX_BYTES would go to DRAM and come back window by window: not hoisted."""
    program = hoist_program(gdsl.make_ir(rnn)(*ARGS[rnn]))
    product_bytes = 5 * 4 * 3 * 8 * 4                     # [steps, gates, rows, n] float32
    monkeypatch.setattr(steps, "HOIST_MAX_BYTES", product_bytes - 1)
    assert hoist_step_products(program) is program
    monkeypatch.setattr(steps, "HOIST_MAX_BYTES", product_bytes)
    assert hoist_step_products(program) is not program


@pytest.mark.parametrize("fn", list(ARGS), ids=lambda f: f.__name__)
def test_plans_compute_the_same(fn):
    check_plan(fn, *ARGS[fn], grids=(1, 4))
    plan = schedule(gdsl.make_ir(fn)(*ARGS[fn]), grid=8)
    (loop,) = [s for s in plan.kernels[0].body if isinstance(s, Loop)]
    xs = [v.storage for v in plan.inputs if v.aval.shape == ARGS[fn][0].shape]
    matmuls = [t.op for s in loop.body if isinstance(s, Wave) for t in s.tasks if t.op.kind == "matmul"]
    assert xs
    assert not [op for op in matmuls if any(v.storage in xs for v in op.inputs)]


def test_off_switch_and_cpu_backend():
    fn, args = rnn, ARGS[rnn]
    want = np.asarray(gdsl.jit(fn, backend="cpu", hoist=False)(*args))
    np.testing.assert_allclose(np.asarray(gdsl.jit(fn, backend="cpu")(*args)), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="hoist"):
        gdsl.jit(fn, hoist="no")


@pytest.mark.skipif(emulator.cxx() is None, reason="the CPU emulator needs g++ (C++20)")
@pytest.mark.parametrize("args", [ARGS[rnn], WIDE], ids=["gemv-steps", "wide-steps"])
def test_emulated(args):
    """Hoisted or not, the same: GEMV-shaped steps' product computed gate by gate and transposed (a copy
    before the loop: read as a permuted view, the loop's windows of it would read the wrong elements,
    cfamily/views.py) and the wide steps' batched product."""
    fn = rnn
    want = emulator.emulate(fn, *args, grid=3, block=64, hoist=False)
    got = emulator.emulate(fn, *args, grid=3, block=64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def vector_weights(xs, w):
    """xs[t] @ w with a vector w: gdsl.numpy makes w a column first, so the product is hoisted too."""
    return gdsl.fori_loop(0, xs.shape[0], lambda t, h: gnp.tanh(xs[t] @ w + h),
                          gnp.zeros((xs.shape[1],), dtype=gdsl.float32))


def test_vector_right_operand():
    program, hoisted = _hoisted(vector_weights, _w(4, 2, 8, scale=1.0), _w(8))
    assert _loop_eqns(hoisted).count("matmul") == 0


@pytest.mark.parametrize("args", [ARGS[rnn], WIDE], ids=["gemv-steps", "wide-steps"])
def test_batched_product_is_laid_out_step_by_step(args):
    """With W stacked ([4, K, n]: gates), the product before the loop is laid out [steps, 4, rows, n], so a
    step's window is one contiguous run: under device control on the C-family backends it is a plan view at
    a run-time offset (no op, no share of the wave's vEUs: the loop's matmul gets the whole grid). Steps of
    GEMV-shaped row blocks (rows <= BY_GATE_MAX_ROWS) are computed gate by gate, one GEMM over all steps' rows per
    gate, and transposed into that layout; wider ones as a batched GEMM of every step with every gate."""
    xs, W, U = args
    steps_, rows, n = xs.shape[0], xs.shape[1], W.shape[-1]
    program, hoisted = _hoisted(rnn, xs, W, U)
    (gemm,) = [e for e in hoisted.jaxpr.eqns if e.primitive.name == "matmul"]
    transposes = [e for e in hoisted.jaxpr.eqns if e.primitive.name == "transpose"]
    if rows <= steps.BY_GATE_MAX_ROWS:
        assert gemm.inputs[0].aval.shape == (steps_ * rows, xs.shape[2])
        assert gemm.outs[0].aval.shape == (4, steps_ * rows, n)
        (transpose,) = transposes
        assert transpose.outs[0].aval.shape == (steps_, 4, rows, n)
    else:
        assert gemm.outs[0].aval.shape == (steps_, 4, rows, n) and not transposes
    (window,) = [e for e in walk_eqns(hoisted.jaxpr) if e.primitive.name == "dynamic_slice"]
    assert window.inputs[0].aval.shape == (steps_, 4, rows, n)
    assert utasks.contiguous_window(window.inputs[0].aval.shape, window.params["sizes"])

    plan = schedule(gdsl.make_ir(rnn)(xs, W, U), grid=8, views=VIEWS)
    (loop,) = [s for s in plan.kernels[0].body if isinstance(s, Loop)]
    tasks = [t for s in loop.body if isinstance(s, Wave) for t in s.tasks]
    assert not [t for t in tasks if t.op.kind == "dynamic_slice"]
    (matmul,) = [t for t in tasks if t.op.kind == "matmul"]
    assert matmul.count == min(matmul.op.n_utasks, 8)
    fused = [t.op for t in tasks if t.op.kind == "fused"]
    assert any(v.dynamic and v.storage is not None for op in fused for v in op.inputs)   # reads the step's window
    # Host control runs the window as a copy: there it gets vEUs of its own.
    host = schedule(gdsl.make_ir(rnn)(xs, W, U), grid=8, control="host", views=VIEWS)
    waves = [s for k in host.kernels for s in walk(k.body) if isinstance(s, Wave)]
    (wave,) = [w for w in waves if any(t.op.kind == "dynamic_slice" for t in w.tasks)]
    ranges = sorted((t.first, t.first + t.count) for t in wave.tasks)
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))


@pytest.mark.skipif(cuda_toolchain.nvrtc_available() is not None, reason="needs NVRTC")
def test_step_window_is_a_pointer_in_cuda():
    xs, W, U = ARGS[rnn]
    source = gdsl.jit(rnn, backend="cuda", grid=8).lower(xs, W, U).source
    kernel = source.split("-- kernels")[-1]
    loop = kernel[kernel.index("while (true)"):]          # (the product's transpose runs before the loop)
    assert "_dynamic_slice(" not in kernel and "_transpose(" not in loop
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"
