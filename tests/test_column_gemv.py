"""The column GEMV (gdsl/backends/cfamily/gemm.py's switch COLUMN_GEMV_DEPTH, off by default until it is timed on the
GPU; prelude.h's gdsl_gemv_cols): a GEMV-shaped matmul of a shallow k with B along n runs one thread per output
column over the whole k. Off, the code is unchanged; on, shallow GEMVs (rows 1-3, k 3-64, odd widths, batched,
int32, a B read through a transposed view, a window-store epilogue through Attention) match the interpreter on
the emulator, deeper GEMVs keep gdsl_gemv_tile, and NVRTC compiles Attention bs1 with it."""
import re

import numpy as np
import pytest
from strategies import (
    assert_trees_close,
    cuda_lowering,
    emulated,
    emulated_model_mismatches,
    interpreted,
    needs_cxx,
    needs_nvrtc,
    zoo_lowered,
)

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import gemm
from gdsl.backends.cuda import toolchain as cuda_toolchain

TILES = re.compile(r"gdsl_gemv_(?:cols|tile)<[^>]*>")


@pytest.fixture
def columns(monkeypatch):
    monkeypatch.setattr(gemm, "COLUMN_GEMV_DEPTH", 64)


def _matmul(a, b):
    return gnp.matmul(a, b)


def _transposed(a, b):
    return gnp.matmul(a, gnp.swapaxes(b, -1, -2))


def _args(shape_a, shape_b, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == np.int32:
        return rng.integers(-9, 9, shape_a).astype(dtype), rng.integers(-9, 9, shape_b).astype(dtype)
    return rng.standard_normal(shape_a).astype(dtype), rng.standard_normal(shape_b).astype(dtype)


def test_off_by_default():
    assert gemm.COLUMN_GEMV_DEPTH is None
    assert not any("cols" in tile for tile in TILES.findall(zoo_lowered("attention", 1).source))


def test_which_gemvs_take_it(columns):
    """Attention bs1: its four k = 64 GEMVs take it (the three projections, q·Kᵀ, whose B is read through a
    transposed view, and a·V); a k = 256 GEMV keeps gdsl_gemv_tile."""
    tiles = TILES.findall(zoo_lowered("attention", 1).source)
    assert tiles == ["gdsl_gemv_cols<1, 192, 256, 64, float>", "gdsl_gemv_cols<1, 64, 256, 64, float>",
                     "gdsl_gemv_cols<1, 64, 256, 64, float>", "gdsl_gemv_cols<1, 64, 256, 64, float>"]
    deep = TILES.findall(cuda_lowering(_matmul, _args((1, 256), (256, 512))).source)
    assert deep and all(tile.startswith("gdsl_gemv_tile<") for tile in deep)


@needs_cxx
@pytest.mark.parametrize("fn,shape_a,shape_b,dtype", [
    (_matmul, (1, 64), (64, 192), np.float32),
    (_matmul, (3, 5), (5, 7), np.float32),
    (_matmul, (1, 3), (3, 130), np.float32),
    (_matmul, (4, 1, 16), (4, 16, 16), np.float32),
    (_matmul, (2, 33), (33, 70), np.int32),
    (_transposed, (1, 32), (48, 32), np.float32),
])
def test_emulated_matches_the_interpreter(columns, fn, shape_a, shape_b, dtype):
    args = _args(shape_a, shape_b, dtype)
    program = gdsl.make_ir(fn)(*args)
    expected = interpreted(program, list(args))
    got = emulated(fn, args)
    assert_trees_close(got, expected, exact=dtype == np.int32)


@needs_cxx
@pytest.mark.parametrize("name,bs", [("attention", 1), ("attention", 4), ("lstm", 1), ("seq2seq", 1), ("rae", 1)])
def test_emulated_zoo_matches_the_reference(columns, name, bs):
    assert emulated_model_mismatches(name, bs) == []


@needs_nvrtc
def test_attention_compiles(columns):
    assert cuda_toolchain.compile_cuda(zoo_lowered("attention", 1).source, "sm_90")[:4] == b"\x7fELF"


@needs_cxx
@pytest.mark.parametrize("name", ["lstm", "nasrnn", "seq2seq", "rae"])
def test_every_depth_emulated(monkeypatch, name):
    """With no depth limit (the switch at 1024) every GEMV of the batch-1 recurrences and RAE takes it (at full
    size k = 256 with B resident in shared memory, and RAE's k = 1024); their small configurations still match
    the references."""
    monkeypatch.setattr(gemm, "COLUMN_GEMV_DEPTH", 1024)
    assert emulated_model_mismatches(name, 1) == []
