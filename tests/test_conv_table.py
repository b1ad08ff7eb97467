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
from gdsl.schedule import utasks

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


# ------------------------------------------------------------------- A staged by asynchronous copies (off by default)

@pytest.fixture
def async_a(monkeypatch):
    monkeypatch.setattr(gemm, "ASYNC_IM2COL", True)


@needs_cxx
@pytest.mark.parametrize("table", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_emulated_async_staging_matches_the_interpreter(case, table, async_a, monkeypatch):
    """The emulator runs gdsl_cp_async4's fallback (a load and a store) through the tile's two A buffers: a wrong
    buffer, a stage read before its copies or a padding element not zeroed shows here."""
    monkeypatch.setattr(gemm, "IM2COL_TABLE_MIN_ROWS", 1 if table else 1 << 30)
    stride, padding, x, w = CASES[case]
    fn = conv(stride, padding)
    source = _source(fn, (x, w), 3)
    assert ", float, true>(" in source and "auto pa = [&](int m, int k) -> const float*" in source
    expected = gdsl.jit(fn, backend="interpret")(x, w)
    for grid in (1, 3):
        assert_trees_close(emulate(fn, x, w, grid=grid, block=256), expected, tolerance=BACKEND_TOLERANCE)


def test_async_staging_only_with_the_switch():
    stride, padding, x, w = CASES["pad1"]
    assert ", float, true>(" not in _source(conv(stride, padding), (x, w), 3)


@needs_nvrtc
@pytest.mark.parametrize("case", list(CASES))
def test_async_staging_compiles(case, async_a):
    """NVRTC compiles cp.async (CUDA's gdsl_cp_async4); test_gpu_async_staging runs it."""
    stride, padding, x, w = CASES[case]
    source = _source(conv(stride, padding), (x, w), 3)
    assert "cp.async.ca.shared.global" in source and ", float, true>(" in source
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"


def _tall_256(monkeypatch):
    """Only 256 x 16 tiles on the menu (their two A buffers: 70 KB of shared memory with the table)."""
    monkeypatch.setattr(utasks, "GEMM_TILES", ())
    monkeypatch.setattr(utasks, "ODD_GEMM_TILES", False)
    monkeypatch.setattr(utasks, "GEMM_TALL_TILES", ((256, 16),))
    monkeypatch.setattr(utasks, "GEMM_TALL_MAX_ROWS", 256)


BIG = (_f32(3, 16, 16, 16), _f32(16, 16, 3, 3))      # 768 pixels: three tiles of 256 x 16


@needs_cxx
def test_more_shared_memory_than_a_static_declaration_is_declared_dynamically(async_a, monkeypatch):
    """A kernel whose uTask scratch is over the dialect's static limit (48 KB) declares its shared memory
    dynamically (sized at launch, as for resident tiles); the emulated kernel still matches."""
    fn = conv(1, 1)
    assert "extern __shared__" not in _source(fn, BIG, 3)       # (its default tiles: a static declaration)
    _tall_256(monkeypatch)
    source = _source(fn, BIG, 3)
    assert "gdsl_gemm_tile_wide<256, 16," in source and "extern __shared__" in source
    assert int(source.split("#define GDSL_SMEM_BYTES ")[1].split()[0]) > 48 * 1024
    expected = gdsl.jit(fn, backend="interpret")(*BIG)
    assert_trees_close(emulate(fn, *BIG, grid=3, block=256), expected, tolerance=BACKEND_TOLERANCE)


@needs_nvrtc
def test_dynamic_shared_memory_compiles(async_a, monkeypatch):
    _tall_256(monkeypatch)
    assert cuda_toolchain.compile_cuda(_source(conv(1, 1), BIG, 3), "sm_90")[:4] == b"\x7fELF"


@pytest.mark.gpu
def test_gpu_dynamic_shared_memory_matches_the_interpreter(async_a, monkeypatch):
    import cupy as cp
    _tall_256(monkeypatch)
    fn = conv(1, 1)
    got = cp.asnumpy(gdsl.jit(fn, backend="cuda", grid=3)(*(cp.asarray(a) for a in BIG)))
    assert_trees_close(got, gdsl.jit(fn, backend="interpret")(*BIG), tolerance=BACKEND_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.parametrize("table", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_async_staging_matches_the_interpreter(case, table, async_a, monkeypatch):
    """cp.async itself (zero-filled padding, the two buffers, the wait before each stage) on the GPU."""
    import cupy as cp
    monkeypatch.setattr(gemm, "IM2COL_TABLE_MIN_ROWS", 1 if table else 1 << 30)
    stride, padding, x, w = CASES[case]
    fn = conv(stride, padding)
    expected = gdsl.jit(fn, backend="interpret")(x, w)
    for grid in (1, 3):
        jitted = gdsl.jit(fn, backend="cuda", grid=grid)
        assert ", float, true>(" in jitted.lower(x, w).source
        got = cp.asnumpy(jitted(cp.asarray(x), cp.asarray(w)))
        assert_trees_close(got, expected, tolerance=BACKEND_TOLERANCE)
