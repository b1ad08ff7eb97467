"""A matmul whose right operand is a transposed view (q @ K^T: cfamily/views.py reads K through permuted
strides) reads it along k, where it is contiguous: the GEMV tile then puts a warp's lanes on consecutive k
(gdsl_gemv_tile's KMAJOR), the GEMM tile loads k-contiguous B. What the C-family renderer emits for it, and
that the CPU emulator of that C computes what the interpreter computes; the CUDA source compiles with NVRTC."""
import numpy as np
import pytest
from strategies import BACKEND_TOLERANCE, assert_trees_close, needs_cxx, needs_nvrtc

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily.emulator import emulate
from gdsl.backends.cuda import toolchain as cuda_toolchain

rng = np.random.default_rng(3)


def _f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def scores(q, k):
    """Attention's scores: K is computed in the kernel (a temp), then read transposed."""
    keys = gnp.tanh(k)
    return q @ gnp.swapaxes(keys, -1, -2) * 0.125


CASES = {
    "gemv": (_f32(1, 64), _f32(48, 64)),                  # 1 x 64 @ 64 x 48
    "gemv_two_rows": (_f32(2, 40), _f32(24, 40)),
    "gemv_heads": (_f32(12, 1, 64), _f32(12, 64, 64)),    # one query row per head
    "gemm": (_f32(32, 64), _f32(64, 64)),                 # a GEMM tile reading B along k
}


def _source(q, k, backend="cuda"):
    return gdsl.jit(scores, backend=backend).lower(q, k).source


@pytest.mark.parametrize("case", ["gemv", "gemv_two_rows", "gemv_heads"])
def test_gemv_of_a_transposed_view_reads_along_k(case):
    source = _source(*CASES[case]).split("-- ops")[-1]
    assert "gdsl_gemv_tile<" in source
    assert ", float, true>(" in source                     # KMAJOR
    assert "/ 4096) % 12" not in source                    # no permuted index arithmetic left


def test_gemm_of_a_transposed_view_loads_k_contiguous_b():
    source = _source(*CASES["gemm"]).split("-- ops")[-1]
    assert "gdsl_gemm_tile" in source and ", true, true" in source     # AK, BKC


@needs_cxx
@pytest.mark.parametrize("case", list(CASES))
def test_emulator_matches_the_interpreter(case):
    q, k = CASES[case]
    expected = gdsl.jit(scores, backend="interpret")(q, k)
    for grid in (1, 3):
        assert_trees_close(emulate(scores, q, k, grid=grid, block=64), expected, tolerance=BACKEND_TOLERANCE)
        assert_trees_close(emulate(scores, q, k, grid=grid, block=128), expected, tolerance=BACKEND_TOLERANCE)


@needs_nvrtc
def test_cuda_source_compiles():
    for q, k in CASES.values():
        assert cuda_toolchain.compile_cuda(_source(q, k), "sm_90")[:4] == b"\x7fELF"


# ------------------------------------------------------------------------------- a transposed left operand
def left_transposed(a, w):
    return gnp.matmul(a.T, w)


LEFT = {                                                   # (M, K, N, grid, block)
    "gemv rows": (16, 64, 4, 1, 64),                       # (a segfault: vector loads from a's misaligned columns)
    "gemm": (22, 560, 4, 4, 256),                          # (an error of 73 on values up to 61)
    "small": (12, 32, 8, 1, 32),
}


@needs_cxx
@pytest.mark.parametrize("case", list(LEFT))
def test_a_transposed_left_operand_is_read_element_by_element(case):
    """`A.T @ W` (A [K, M]): the left operand's k are M apart, so it is no k-contiguous A (the tiles' vector loads
    and copies assume consecutive k) and they stage it through its loader. Found by a randomized sweep: before, the
    emulator crashed or was wrong while the CPU backend was right."""
    m, k, n, grid, block = LEFT[case]
    a, w = _f32(k, m), _f32(k, n)
    expected = a.T.astype(np.float64) @ w.astype(np.float64)
    got = emulate(left_transposed, a, w, grid=grid, block=block)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.sqrt(k))


@needs_nvrtc
def test_a_transposed_left_operand_compiles():
    m, k, n, _, _ = LEFT["gemm"]
    source = gdsl.jit(left_transposed, backend="cuda").lower(_f32(k, m), _f32(k, n)).source
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"
