"""The wide FFMA tile (gdsl_gemm_tile_wide): float32 GEMM tiles whose threads hold register tiles of 4 x 4 or
more, read from shared memory with 16-byte loads, k split among groups of threads whose partial sums meet in
shared memory. Which tiles take it (gemm.wide_tile), that the CPU emulator of the generated C computes what the
interpreter computes for matmuls and convolutions with ragged edges, and that NVRTC compiles it."""
import re

import numpy as np
import pytest
from strategies import BACKEND_TOLERANCE, assert_trees_close, needs_cxx, needs_nvrtc

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import gemm
from gdsl.backends.cfamily.emulator import emulate
from gdsl.backends.cfamily.gemm import wide_tile
from gdsl.backends.cuda import toolchain as cuda_toolchain

WIDE_CALL = "gdsl_gemm_tile_wide<"
rng = np.random.default_rng(5)


def _f32(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def matmul_tanh(a, b):
    return gnp.tanh(a @ b)


def batched(a, b):
    return gnp.matmul(a, b) + 1.0


def conv_relu(x, w):
    return gdsl.nn.relu(gdsl.nn.conv2d(x, w, stride=1, padding=1))


def transposed_b(a, b):
    return a @ gnp.transpose(gnp.tanh(b))


def shifted(x, w):
    """A left operand one element into a buffer: its rows are not 16-byte aligned (four-element loads off)."""
    return gnp.reshape(gnp.reshape(gnp.tanh(x), (-1,))[1:1 + 100 * 72], (100, 72)) @ w


CASES = {    # ragged: no dimension a multiple of the tile
    "matmul": (matmul_tanh, (_f32(100, 70, scale=0.2), _f32(70, 130, scale=0.2))),
    "batched": (batched, (_f32(3, 40, 33), _f32(3, 33, 72))),
    "conv": (conv_relu, (_f32(2, 5, 9, 9), _f32(24, 5, 3, 3, scale=0.3))),
    # rows a multiple of 4 long: four-element loads (along n for B, along k for a transposed B)
    "vector": (matmul_tanh, (_f32(100, 72, scale=0.2), _f32(72, 132, scale=0.2))),
    "vector_transposed": (transposed_b, (_f32(100, 72, scale=0.2), _f32(132, 72, scale=0.2))),
    "vector_unaligned": (shifted, (_f32(101, 72, scale=0.2), _f32(72, 132, scale=0.2))),
}
VECTOR = {"vector", "vector_transposed", "vector_unaligned"}    # (the last checks alignment at run time)


def test_wide_tile_shapes(monkeypatch):
    assert wide_tile(64, 64, 256) == (4, 4, 1)       # 4 x 4 registers a thread by default
    assert wide_tile(16, 32, 256) == (4, 4, 8)       # 32 threads a group, eight groups split k
    assert wide_tile(16, 16, 256) == (4, 4, 16)      # 16 threads a group, sixteen groups
    assert wide_tile(8, 8, 256) is None              # 4 threads a group: more groups than allowed
    assert wide_tile(12, 64, 256) is None            # rows not a multiple of 4
    monkeypatch.setattr(gemm, "WIDE_MAX_REGISTERS", 64)
    assert wide_tile(64, 64, 256) == (8, 8, 4)       # 64 threads a group, four groups split k
    assert wide_tile(64, 128, 256) == (8, 8, 2)
    for tm, tn in ((64, 64), (16, 16), (16, 32), (32, 32), (32, 64), (128, 128)):
        rm, rn, groups = wide_tile(tm, tn, 256)
        assert (tm // rm) * (tn // rn) * groups == 256
        assert groups <= gemm.WIDE_MAX_GROUPS and gemm.GEMM_BK % groups == 0


def _source(fn, args, **options):
    return gdsl.jit(fn, backend="cuda", **options).lower(*args).source


def _wide_calls(source: str) -> list[tuple]:
    """The template arguments (TM, TN, BK, NT, RM, RN, KS, VEC) of each wide tile call."""
    calls = re.findall(r"gdsl_gemm_tile_wide<([^>]*)>", source.split("-- ops")[-1])
    return [tuple(int(x) for x in c.split(", ")[:7]) + (c.split(", ")[7] == "true",) for c in calls]


@pytest.mark.parametrize("case", list(CASES))
def test_float32_tiles_take_the_wide_tile(case):
    fn, args = CASES[case]       # (on a grid of 3 vEUs the tiles are 64 x 64; the batched product's 72 columns
    (call,) = _wide_calls(_source(fn, args, grid=3))    # one 64 x 80 tile each: one round, utasks.ODD_GEMM_TILES;
    # the conv's 24 channels 64 x 32 tiles, utasks.TALL_GEMM_TILES, two k groups of 128 threads)
    shape, registers = {"batched": ((64, 80), (4, 5, 1)), "conv": ((64, 32), (4, 4, 2))}.get(
        case, ((64, 64), (4, 4, 1)))
    assert call[:2] == shape and call[4:7] == registers
    assert call[7] == (case in VECTOR)               # four-element loads where the rows allow them


def test_integer_tiles_keep_the_exact_tile():
    a = rng.integers(-3, 4, (100, 70)).astype(np.int32)
    b = rng.integers(-3, 4, (70, 130)).astype(np.int32)
    ops = _source(lambda a, b: a @ b, (a, b), grid=3).split("-- ops")[-1]
    assert WIDE_CALL not in ops and "gdsl_gemm_tile<" in ops


@needs_nvrtc
@pytest.mark.parametrize("case", list(CASES))
def test_wide_tile_compiles(case):
    fn, args = CASES[case]
    assert cuda_toolchain.compile_cuda(_source(fn, args, grid=3), "sm_90")[:4] == b"\x7fELF"


# (registers, four-element loads): the default; eight by eight registers with four k groups; scalar loads only
CONFIGS = [(16, True), (64, True), (16, False)]


@needs_cxx
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("case", list(CASES))
def test_emulator_matches_the_interpreter(case, config, monkeypatch):
    """The zero fill past the edges, both load paths and the k groups' sums, on the emulator."""
    monkeypatch.setattr(gemm, "WIDE_MAX_REGISTERS", config[0])
    monkeypatch.setattr(gemm, "WIDE_VECTOR_LOADS", config[1])
    fn, args = CASES[case]
    expected = gdsl.jit(fn, backend="interpret")(*args)
    for grid, block in ((1, 256), (3, 256)):
        assert [call[7] for call in _wide_calls(_source(fn, args, grid=grid, block=block))] == \
            [config[1] and case in VECTOR]     # (the emulator's plan is the CUDA dialect's)
        assert_trees_close(emulate(fn, *args, grid=grid, block=block), expected, tolerance=BACKEND_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_wide_tile_is_float32_accurate(case):
    """Against float64: within float32 rounding of the k-term sums, on a grid of 3 (64 x 64 tiles, four k
    groups) and the default grid."""
    import cupy as cp
    fn, args = CASES[case]
    expected = gdsl.jit(fn, backend="interpret")(*(a.astype(np.float64) for a in args))
    for grid in (3, None):
        jitted = gdsl.jit(fn, backend="cuda", grid=grid)
        if grid == 3:
            assert WIDE_CALL in jitted.lower(*args).source
        got = cp.asnumpy(jitted(*(cp.asarray(a) for a in args)))
        np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-5, atol=2e-5)
