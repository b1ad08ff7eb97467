"""GEMM tiles of widths that are not powers of two (the module switch utasks.ODD_GEMM_TILES, on by default): the
wide FFMA tile with register tiles of 4 x 5 and 4 x 6 (gemm.WIDE_ODD_COLUMNS: the columns past the 4-column
blocks read with 8- and 4-byte loads), a matrix's last tile narrower than the rest; the emulated kernel against
the interpreter; the LSTM's batch-64 step in one round of 64 x 96 tiles instead of two of 64 x 64, compiled by
NVRTC; with the switch off, the power-of-two tiles in two rounds."""
import re

import numpy as np
import pytest
from strategies import BACKEND_TOLERANCE, assert_trees_close, first_loop, needs_cxx, needs_nvrtc, zoo_lowered
from test_wide_tile import batched, matmul_tanh

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import gemm
from gdsl.backends.cfamily.emulator import EmulatorDialect, emulate
from gdsl.backends.cfamily.lower import check_options, lower_with_grid
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.interpreter import run_program
from gdsl.schedule import utasks
from gdsl.schedule.plan import Wave

rng = np.random.default_rng(11)


def _f32(*shape, scale=0.2):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def rnn_rows(xs, W, U):
    """h = tanh(x[t] W + h U) over rows of h: U stays resident in shared memory (read in place by the tile)."""
    def step(t, h):
        return gnp.tanh(xs[t] @ W + h @ U)
    return gdsl.fori_loop(0, xs.shape[0], step, gnp.zeros((xs.shape[1], U.shape[0]), dtype=gdsl.float32))


# (function, arguments, the tile forced, (RM, RN, KS, VEC) of the wide call)
CASES = {
    # rows and depth ragged, columns 96 + 96 + 64 (a narrower last tile), four-element staging
    "w96_last_64": (matmul_tanh, (_f32(100, 72), _f32(72, 256)), (64, 96), (4, 6, 1, True)),
    # 80 + 80 + 40, depth not a multiple of 4: scalar staging
    "w80_last_40": (matmul_tanh, (_f32(70, 33), _f32(33, 200)), (64, 80), (4, 5, 1, False)),
    # 96 + 34: the last tile's columns end inside a 4-column block of a thread
    "w96_ragged": (matmul_tanh, (_f32(64, 40), _f32(40, 130)), (64, 96), (4, 6, 1, False)),
    "batched_w80": (batched, (_f32(3, 40, 64), _f32(3, 64, 168)), (64, 80), (4, 5, 1, True)),
    # 32 rows: two k groups of 128 threads
    "w96_two_groups": (matmul_tanh, (_f32(32, 64), _f32(64, 200)), (32, 96), (4, 6, 2, True)),
}


@pytest.fixture
def odd(monkeypatch):
    monkeypatch.setattr(utasks, "ODD_GEMM_TILES", True)


def _force(monkeypatch, tile):
    """Only `tile` on the menu (so every GEMM takes it)."""
    monkeypatch.setattr(utasks, "GEMM_TILES", ())
    monkeypatch.setattr(utasks, "GEMM_ODD_TILES", (tile,))


def _wide_calls(source: str) -> list[tuple]:
    """(TM, TN, RM, RN, KS, VEC) of each wide tile call."""
    calls = re.findall(r"gdsl_gemm_tile_wide<([^>]*)>", source.split("-- ops")[-1])
    return [tuple(int(x) for x in c.split(", ")[:2]) + tuple(int(x) for x in c.split(", ")[4:7]) +
            (c.split(", ")[7] == "true",) for c in calls]


def test_odd_register_tiles_only_with_the_switch(odd, monkeypatch):
    monkeypatch.setattr(utasks, "TALL_GEMM_TILES", False)      # (their own test: test_tall_tiles.py)
    assert gemm.wide_tile(64, 96, 256) == (4, 6, 1)
    assert gemm.wide_tile(64, 80, 256) == (4, 5, 1)
    assert gemm.wide_tile(32, 96, 256) == (4, 6, 2)
    for tm, tn in utasks.GEMM_TILES:          # the power-of-two tiles keep their register tiles
        assert gemm.wide_tile(tm, tn, 256)[1] % 4 == 0
    assert utasks.gemm_tile_menu() == utasks.GEMM_TILES + utasks.GEMM_ODD_TILES
    monkeypatch.setattr(utasks, "ODD_GEMM_TILES", False)
    assert gemm.wide_tile(64, 96, 256) is None and gemm.wide_tile(64, 80, 256) is None
    assert utasks.gemm_tile_menu() == utasks.GEMM_TILES


@needs_cxx
@pytest.mark.parametrize("case", list(CASES))
def test_emulated_odd_tiles_match_the_interpreter(case, odd, monkeypatch):
    fn, args, tile, call = CASES[case]
    _force(monkeypatch, tile)
    expected = gdsl.jit(fn, backend="interpret")(*args)
    for grid in (1, 3):          # several tiles a vEU, one after another, and one each
        source = gdsl.jit(fn, backend="cuda", grid=grid).lower(*args).source
        assert _wide_calls(source) == [tile + call]
        assert_trees_close(emulate(fn, *args, grid=grid, block=256), expected, tolerance=BACKEND_TOLERANCE)


@needs_cxx
def test_emulated_resident_odd_tiles_match_the_interpreter(odd, monkeypatch):
    """B read in place from its resident 256 x 96 tiles (the last one's columns past 256 zeros), the LSTM's."""
    _force(monkeypatch, (64, 96))
    # (96 KiB of B a tile: more than the emulator's budget of shared memory for resident tiles)
    monkeypatch.setattr(EmulatorDialect, "resident_smem_per_sm", 1 << 20)
    args = (_f32(4, 64, 32, scale=1.0), _f32(32, 256), _f32(256, 256, scale=0.1))
    emulated = lower_with_grid(gdsl.make_ir(rnn_rows)(*args), check_options(
        {"control": "device", "block": 256}, EmulatorDialect()), 3, EmulatorDialect()).source
    assert "gdsl_gemm_tile_wide<64, 96, 32, 256, 4, 6, 1, true, true, true, false, float>" in emulated
    expected = run_program(gdsl.make_ir(rnn_rows)(*args), list(args))
    got = emulate(rnn_rows, *args, grid=3, block=256)
    assert_trees_close([np.asarray(got)], expected, tolerance=BACKEND_TOLERANCE)


@needs_nvrtc
@pytest.mark.parametrize("case", list(CASES))
def test_odd_tiles_compile(case, odd, monkeypatch):
    fn, args, tile, _ = CASES[case]
    _force(monkeypatch, tile)
    source = gdsl.jit(fn, backend="cuda", grid=3).lower(*args).source
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"


def _step_matmuls(plan):
    """The tasks of the matmuls of the LSTM loop's first wave."""
    wave = next(s for s in first_loop(plan).body if isinstance(s, Wave))
    return [t for t in wave.tasks if t.op.kind == "matmul"]


def test_lstm_batch_64_step_in_one_round(odd):
    """19 matmuls of 4 x 64 x 256 on 264 vEUs: 12 tiles of 64 x 96 on 12 vEUs each (one round, 228 vEUs), their
    B tiles resident, where the default takes 16 tiles of 64 x 64 on 13 vEUs (two rounds)."""
    tasks = _step_matmuls(zoo_lowered("lstm", 64).lowering.plan)
    assert len(tasks) == 19
    for t in tasks:
        assert (t.op.params["tile_m"], t.op.params["tile_n"]) == (64, 96)
        assert t.op.n_utasks == 12 == t.count
        assert "resident" in t.op.params


def test_lstm_batch_64_without_odd_tiles_keeps_two_rounds(monkeypatch):
    """With the switch off the step keeps its power-of-two tiles (on is the default)."""
    monkeypatch.setattr(utasks, "ODD_GEMM_TILES", False)
    tasks = _step_matmuls(zoo_lowered("lstm", 64).lowering.plan)
    assert len(tasks) == 19
    for t in tasks:
        assert (t.op.params["tile_m"], t.op.params["tile_n"]) == (64, 64)
        assert t.op.n_utasks == 16 and -(-t.op.n_utasks // t.count) == 2


@needs_nvrtc
def test_lstm_batch_64_with_odd_tiles_compiles(odd):
    source = zoo_lowered("lstm", 64).source
    assert "gdsl_gemm_tile_wide<64, 96, 32, 256, 4, 6, 1, true, true" in source
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"
