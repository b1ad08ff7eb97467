"""Tall GEMM tiles (the module switch utasks.TALL_GEMM_TILES, on by default): 128 x 32, 128 x 16 and 64 x 32 on
the menu (and 256 x 16, up to utasks.GEMM_TALL_MAX_ROWS, 128 by default) for GEMMs of at least that many rows, so
that a convolution of many pixels and few channels computes no columns past N (BlockDrop's batch-64 first stage:
1024 tiles of 64 x 64 in four rounds, three quarters of each past its 16 channels, before). Which tiles the menu
offers, that the wide FFMA tile takes them, the emulated kernel (and the CPU backend) against the interpreter
with ragged edges, NVRTC, and the zoo's plan."""
import re

import numpy as np
import pytest
from strategies import BACKEND_TOLERANCE, assert_trees_close, needs_cxx, needs_nvrtc, zoo_lowered
from test_wide_tile import conv_relu, matmul_tanh

import gdsl
from gdsl.backends.cfamily import gemm
from gdsl.backends.cfamily.emulator import emulate
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.schedule import utasks

rng = np.random.default_rng(17)


def _f32(*shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# (function, arguments, the tile forced, (RM, RN, KS) of the wide call): rows, columns and depth ragged
CASES = {
    "conv_256x16": (conv_relu, (_f32(3, 5, 11, 9), _f32(13, 5, 3, 3)), (256, 16), (4, 4, 1)),
    "conv_128x32": (conv_relu, (_f32(2, 4, 10, 10), _f32(27, 4, 3, 3)), (128, 32), (4, 4, 1)),
    "matmul_128x16": (matmul_tanh, (_f32(300, 70), _f32(70, 40)), (128, 16), (4, 4, 2)),
    "matmul_64x32": (matmul_tanh, (_f32(150, 33), _f32(33, 50)), (64, 32), (4, 4, 2)),
}


def _force(monkeypatch, tile):
    """Only `tile` on the menu (every GEMM of at least its rows takes it)."""
    monkeypatch.setattr(utasks, "GEMM_TILES", ())
    monkeypatch.setattr(utasks, "GEMM_TALL_MAX_ROWS", tile[0])
    monkeypatch.setattr(utasks, "ODD_GEMM_TILES", False)
    monkeypatch.setattr(utasks, "GEMM_TALL_TILES", (tile,))


def _wide_calls(source: str) -> list[tuple]:
    """(TM, TN, RM, RN, KS) of each wide tile call."""
    calls = re.findall(r"gdsl_gemm_tile_wide<([^>]*)>", source.split("-- ops")[-1])
    return [tuple(int(x) for x in c.split(", ")[:2]) + tuple(int(x) for x in c.split(", ")[4:7]) for c in calls]


def test_the_menu_offers_tall_tiles_only_to_tall_gemms(monkeypatch):
    monkeypatch.setattr(utasks, "TALL_GEMM_TILES", True)
    assert {t for t in utasks.GEMM_TALL_TILES if t in utasks.gemm_tile_menu(4096)} == \
        {(128, 32), (128, 16), (64, 32)}      # (GEMM_TALL_MAX_ROWS: 128)
    monkeypatch.setattr(utasks, "GEMM_TALL_MAX_ROWS", 256)
    assert set(utasks.GEMM_TALL_TILES) <= set(utasks.gemm_tile_menu(256))
    assert (256, 16) not in utasks.gemm_tile_menu(255)
    assert set(utasks.gemm_tile_menu(100)) - set(utasks.gemm_tile_menu(None)) == set()
    assert {t for t in utasks.GEMM_TALL_TILES if t in utasks.gemm_tile_menu(100)} == {(64, 32)}
    assert not set(utasks.GEMM_TALL_TILES) & set(utasks.gemm_tile_menu(63))
    for tm, tn in utasks.GEMM_TALL_TILES:         # 4 x 4 registers a thread, the k groups over what is left
        assert gemm.wide_tile(tm, tn, 256)[:2] == (4, 4)
    monkeypatch.setattr(utasks, "TALL_GEMM_TILES", False)
    assert not set(utasks.GEMM_TALL_TILES) & set(utasks.gemm_tile_menu(4096))


def test_a_conv_of_few_channels_takes_tall_tiles():
    """M = 8 x 32 x 32 pixels, N = 16 channels, K = 144 on 40 vEUs: 64 tiles of 128 x 16 in two rounds (the
    menu's 64 x 64 tiles, without the switch: 128 of them, three quarters of each past N, in four)."""
    args = (_f32(8, 16, 32, 32), _f32(16, 16, 3, 3))
    source = gdsl.jit(conv_relu, backend="cuda", grid=40).lower(*args).source
    assert _wide_calls(source) == [(128, 16, 4, 4, 2)]


def test_without_the_switch_the_conv_keeps_wide_tiles(monkeypatch):
    monkeypatch.setattr(utasks, "TALL_GEMM_TILES", False)
    args = (_f32(8, 16, 32, 32), _f32(16, 16, 3, 3))
    (call,) = _wide_calls(gdsl.jit(conv_relu, backend="cuda", grid=40).lower(*args).source)
    assert call[1] >= 32


@needs_cxx
@pytest.mark.parametrize("case", list(CASES))
def test_emulated_tall_tiles_match_the_interpreter(case, monkeypatch):
    fn, args, tile, call = CASES[case]
    _force(monkeypatch, tile)
    expected = gdsl.jit(fn, backend="interpret")(*args)
    for grid in (1, 3):          # several tiles a vEU, one after another, and a few each
        source = gdsl.jit(fn, backend="cuda", grid=grid).lower(*args).source
        assert _wide_calls(source) == [tile + call]
        assert_trees_close(emulate(fn, *args, grid=grid, block=256), expected, tolerance=BACKEND_TOLERANCE)


@pytest.mark.parametrize("case, utasks_", [("conv_256x16", 2), ("matmul_128x16", 9)])
def test_cpu_backend_tall_tiles_match_the_interpreter(case, utasks_, monkeypatch):
    """The CPU backend's tiles follow the same plan (297 positions x 13 channels: two tiles of 256 x 16, whose
    im2col panels are built 64 rows of k at a time, conv.CONV_PANEL_FLOATS; 300 x 40: 3 x 3 tiles of 128 x 16)."""
    fn, args, tile, _ = CASES[case]
    _force(monkeypatch, tile)
    expected = gdsl.jit(fn, backend="interpret")(*args)
    assert f"[{utasks_} uTasks" in gdsl.jit(fn, backend="cpu").lower(*args).plan
    assert_trees_close(gdsl.jit(fn, backend="cpu")(*args), expected, tolerance=BACKEND_TOLERANCE)


@needs_nvrtc
@pytest.mark.parametrize("case", list(CASES))
def test_tall_tiles_compile(case, monkeypatch):
    fn, args, tile, _ = CASES[case]
    _force(monkeypatch, tile)
    source = gdsl.jit(fn, backend="cuda", grid=3).lower(*args).source
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"


def test_blockdrop_batch_64_first_stage_in_two_rounds():
    """The first stage's gated convolutions (M = 65536, N = 16, K = 144) as 512 tiles of 128 x 16 on 264 vEUs, two
    rounds (1024 of 64 x 64 in four before)."""
    lowered = zoo_lowered("blockdrop", 64)
    assert "gdsl_gemm_tile_wide<128, 16, 32, 256, 4, 4, 2," in lowered.source
    stage1 = [line for line in lowered.plan.splitlines() if "_conv2d" in line and "f32[1,16,1,1]" in line]
    assert len(stage1) > 10
    assert all("512 uTasks on vEU 0-263, 2 rounds" in line for line in stage1[1:])
