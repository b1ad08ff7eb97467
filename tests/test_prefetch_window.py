"""L2 prefetches of a matmul's left operand (cfamily/views.py): a window at a run-time offset of a program input
(`xs[t] @ W` in a loop) prefetches the next window (PREFETCH_NEXT_WINDOW); rows gathered from a program input
(`E[idx] @ W`) are prefetched by the GEMM tile that reads them as it starts (PREFETCH_GATHERED_ROWS). Which ops take
them, what the generated code does, that the emulator still computes what the interpreter computes, and that NVRTC
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


def gathered(E, idx, W, U):
    """Rows of a table gathered at run-time indices feed a matmul of more rows than a GEMV takes (a GEMM tile), once
    from the input table and once from a table the program computes (no prefetch: the kernel writes it)."""
    return gnp.take(E, idx, axis=0) @ W + gnp.take(gnp.tanh(E), idx[::-1], axis=0) @ U


def _gathered_args(rows=20, k=36):
    idx = rng.integers(-60, 60, rows).astype(np.int32)       # out of range both ways: take wraps, then clamps
    return ((rng.standard_normal((40, k)) * 0.5).astype(np.float32), idx,
            (rng.standard_normal((k, 24)) * 0.2).astype(np.float32),
            (rng.standard_normal((k, 24)) * 0.2).astype(np.float32))


def test_gathered_rows_of_an_input_table_are_prefetched_by_their_gemm_tile():
    lowering = cuda_lowering(gathered, _gathered_args(), grid=4)
    takers = [op for op in plan_ops(lowering.plan) if views.prefetches_gathered_rows(op)]
    assert [op.inputs[0].buffer.kind for op in takers] == ["input"]
    source = lowering.rendered.source
    # each of a tile's rows in 128-byte lines (36 floats: two lines a row), the row clamped into the table
    assert source.count('prefetch.global.L2 [%0];" :: "l"((i0 + (int)r * 36 + l_ % 2 * 32))') == 1
    assert "r > 39 ? 39 : r" in source


def test_a_gemv_of_gathered_rows_takes_no_prefetch():
    lowering = cuda_lowering(gathered, _gathered_args(rows=4), grid=4)
    assert "prefetch.global.L2" not in lowering.rendered.source


def test_gathered_rows_prefetch_switched_off(monkeypatch):
    monkeypatch.setattr(views, "PREFETCH_GATHERED_ROWS", False)
    assert "prefetch.global.L2" not in cuda_lowering(gathered, _gathered_args(), grid=4).rendered.source


@needs_cxx
@pytest.mark.parametrize("grid", [1, 3])
def test_emulated_gathered_rows_match_the_interpreter(grid):
    args = _gathered_args()
    expected = interpreted(gdsl.make_ir(gathered)(*args), args)
    assert_trees_close(emulated(gathered, args, grid=grid, block=64), expected, tolerance=BACKEND_TOLERANCE)


@needs_nvrtc
def test_nvrtc_compiles_the_gathered_rows_prefetch():
    source = cuda_lowering(gathered, _gathered_args(), grid=4).rendered.source
    assert "prefetch.global.L2" in source and cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"
