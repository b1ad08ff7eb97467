"""A matmul whose left operand is a window at a run-time offset of a program input (`xs[t] @ W` in a loop)
prefetches the next window into L2 (cfamily/views.py, PREFETCH_NEXT_WINDOW): which ops take it, what the
generated code passes and does, that the emulator still computes what the interpreter computes, and that NVRTC
compiles it."""
import numpy as np
import pytest
from strategies import (
    BACKEND_TOLERANCE,
    assert_trees_close,
    cuda_lowering,
    emulated,
    interpreted,
    needs_cxx,
    needs_nvrtc,
    plan_ops,
)

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import views
from gdsl.backends.cuda import toolchain as cuda_toolchain

rng = np.random.default_rng(0)


def streamed(xs, h0, W, U):
    """A recurrence reading one row of its input each step: `xs[t] @ W` stays in the loop (hoist=False)."""
    def step(t, h):
        return gnp.tanh(xs[t] @ W + h @ U)
    return gdsl.fori_loop(0, xs.shape[0], step, h0)


def _args(steps=6, rows=2, k=32):
    return ((rng.standard_normal((steps, rows, k)) * 0.5).astype(np.float32),
            np.zeros((rows, k), np.float32),
            (rng.standard_normal((k, k)) * 0.2).astype(np.float32),
            (rng.standard_normal((k, k)) * 0.2).astype(np.float32))


def test_only_the_streamed_window_is_prefetched():
    """`xs[t] @ W` (a window of an input at the loop's index) takes the next window, clamped as the view is;
    `h @ U` (a carry) does not."""
    lowering = cuda_lowering(streamed, _args(), grid=4, hoist=False)
    takers = [op for op in plan_ops(lowering.plan) if views.prefetches_next_window(op)]
    assert [op.inputs[0].buffer.kind for op in takers] == ["input"]
    source = lowering.rendered.source
    assert source.count("i0_next + l_ *") == 1 and 'prefetch.global.L2 [%0];" :: "l"(i0_next + l_ * 32)' in source
    assert "+ 1) > 5 ? 5LL :" in source           # the next index, clamped into the 6 steps


def test_switch_off_leaves_no_prefetch(monkeypatch):
    monkeypatch.setattr(views, "PREFETCH_NEXT_WINDOW", False)
    lowering = cuda_lowering(streamed, _args(), grid=4, hoist=False)
    source = lowering.rendered.source
    assert "i0_next" not in source


@needs_cxx
@pytest.mark.parametrize("grid", [1, 3])
def test_emulated_matches_the_interpreter(grid):
    args = _args()
    expected = interpreted(gdsl.make_ir(streamed)(*args), args)
    assert_trees_close(emulated(streamed, args, grid=grid, hoist=False), expected, tolerance=BACKEND_TOLERANCE)


@needs_nvrtc
def test_nvrtc_compiles_the_prefetch():
    lowering = cuda_lowering(streamed, _args(), grid=4, hoist=False)
    source = lowering.rendered.source
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"
