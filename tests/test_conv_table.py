"""A convolution's im2col table (cfamily/gemm.py, IM2COL_TABLE, on by default): the uTask fills a table of its
depth's (offset, kh, kw) in shared memory and its implicit-GEMM loader reads it instead of dividing k, where its
tile has at least IM2COL_TABLE_MIN_ROWS rows. The emulated kernel against the interpreter with padding, strides
and ragged tiles, with the table and without it (a table over IM2COL_TABLE_BYTES keeps the divisions), and
NVRTC."""
import numpy as np
import pytest
from strategies import BACKEND_TOLERANCE, assert_trees_close, needs_cxx, needs_nvrtc

import gdsl
from gdsl.backends.cfamily import gemm
from gdsl.backends.cfamily.emulator import emulate
from gdsl.backends.cuda import toolchain as cuda_toolchain

rng = np.random.default_rng(23)


def _f32(*shape):
    return (rng.standard_normal(shape) * 0.3).astype(np.float32)


def conv(stride, padding):
    def f(x, w):
        return gdsl.nn.relu(gdsl.nn.conv2d(x, w, stride=stride, padding=padding))
    return f


CASES = {   # (stride, padding, x, w): K = C * KH * KW of 45, 100 and 27
    "pad1": (1, 1, _f32(2, 5, 9, 11), _f32(24, 5, 3, 3)),
    "stride2_pad2_5x5": (2, 2, _f32(3, 4, 13, 10), _f32(7, 4, 5, 5)),
    "no_pad_rect": (1, 0, _f32(1, 3, 6, 17), _f32(40, 3, 3, 3)),
}


def _source(fn, args, grid):
    return gdsl.jit(fn, backend="cuda", grid=grid).lower(*args).source


@pytest.fixture
def any_tile(monkeypatch):
    """Every conv tile takes the table (these convolutions are small: their tiles have few rows)."""
    monkeypatch.setattr(gemm, "IM2COL_TABLE_MIN_ROWS", 1)


@needs_cxx
@pytest.mark.parametrize("table", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_emulated_conv_matches_the_interpreter(case, table, any_tile, monkeypatch):
    stride, padding, x, w = CASES[case]
    if not table:         # (a budget below the table's 8 bytes an entry: the divisions)
        monkeypatch.setattr(gemm, "IM2COL_TABLE_BYTES", 8)
    fn = conv(stride, padding)
    assert ("kt_ + 2 * k" in _source(fn, (x, w), 3)) == table
    expected = gdsl.jit(fn, backend="interpret")(x, w)
    for grid in (1, 3):
        assert_trees_close(emulate(fn, x, w, grid=grid, block=256), expected, tolerance=BACKEND_TOLERANCE)


def test_switch_off_keeps_the_divisions(any_tile, monkeypatch):
    monkeypatch.setattr(gemm, "IM2COL_TABLE", False)
    stride, padding, x, w = CASES["pad1"]
    assert "kt_" not in _source(conv(stride, padding), (x, w), 3)


def test_only_tiles_of_many_rows_take_the_table():
    """128 x 32 tiles (198 pixels, 24 channels, on 3 vEUs) take it; 16-row tiles (on 40 vEUs) keep the divisions."""
    stride, padding, x, w = CASES["pad1"]
    fn = conv(stride, padding)
    assert "gdsl_gemm_tile_wide<128, 32," in _source(fn, (x, w), 3) and "kt_ + 2 * k" in _source(fn, (x, w), 3)
    assert "gdsl_gemm_tile_wide<16, " in _source(fn, (x, w), 40) and "kt_" not in _source(fn, (x, w), 40)


@needs_nvrtc
@pytest.mark.parametrize("case", list(CASES))
def test_conv_table_compiles(case, any_tile):
    stride, padding, x, w = CASES[case]
    source = _source(conv(stride, padding), (x, w), 3)
    assert "int* kt_" in source
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"


# ------------------------------------------------------------------- scratch over the static shared-memory limit

@pytest.fixture
def low_static_limit(monkeypatch):
    """A static shared-memory limit under these kernels' scratch (48 KB on CUDA; BlockDrop's 256 x 16 conv tiles
    once needed more): every dialect the tests render for declares it dynamically then."""
    from gdsl.backends.cfamily.dialect import Dialect
    monkeypatch.setattr(Dialect, "static_smem_limit", 1024)


@needs_cxx
def test_more_shared_memory_than_a_static_declaration_is_declared_dynamically(monkeypatch):
    """A kernel whose uTask scratch is over the dialect's static limit declares its shared memory dynamically
    (sized at launch, as for resident tiles); the emulated kernel still matches."""
    from gdsl.backends.cfamily.dialect import Dialect
    stride, padding, x, w = CASES["pad1"]
    fn = conv(stride, padding)
    assert "extern __shared__" not in _source(fn, (x, w), 3)       # (under the real limit: static)
    monkeypatch.setattr(Dialect, "static_smem_limit", 1024)
    source = _source(fn, (x, w), 3)
    assert "extern __shared__" in source and int(source.split("#define GDSL_SMEM_BYTES ")[1].split()[0]) > 1024
    expected = gdsl.jit(fn, backend="interpret")(x, w)
    assert_trees_close(emulate(fn, x, w, grid=3, block=256), expected, tolerance=BACKEND_TOLERANCE)


@needs_nvrtc
def test_dynamic_shared_memory_compiles(low_static_limit):
    stride, padding, x, w = CASES["pad1"]
    assert cuda_toolchain.compile_cuda(_source(conv(stride, padding), (x, w), 3), "sm_90")[:4] == b"\x7fELF"


@pytest.mark.gpu
def test_gpu_dynamic_shared_memory_matches_the_interpreter(low_static_limit):
    import cupy as cp
    stride, padding, x, w = CASES["pad1"]
    fn = conv(stride, padding)
    got = cp.asnumpy(gdsl.jit(fn, backend="cuda", grid=3)(cp.asarray(x), cp.asarray(w)))
    assert_trees_close(got, gdsl.jit(fn, backend="interpret")(x, w), tolerance=BACKEND_TOLERANCE)
