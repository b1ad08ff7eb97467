"""The pipelined tensor-core GEMM tile (cfamily/gemm.py TC_PIPELINE, cuda/tensor_cores.h gdsl_gemm_tile_tcp: 3xTF32
fed by cp.async stages), off by default: which tiles take it, run on the CPU emulator with the CUDA dialect's
tensor-core code (emulator.EmulatedTensorCores: mma.sync from the PTX fragment layouts) against float64, whole
tiles (the cp.async path), tiles past the matrix's edges (the loaders' path), a batch, a split depth and a loop's
resident B read in place; the zoo's batch-64 kernels with it through NVRTC, and on a GPU against the references."""
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import cuda_lowering, needs_cxx, needs_nvrtc, zoo_lowered

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import emulator, gemm
from gdsl.backends.cfamily.lower import check_options, lower_with_grid, resident_budget
from gdsl.backends.cuda.dialect import CUDADialect
from gdsl.schedule.plan import Wave, walk
from gdsl.schedule.resident import RESIDENT, RESIDENT_PITCH

BLOCK = 128


@pytest.fixture
def pipelined(monkeypatch):
    monkeypatch.setattr(gemm, "TC_PIPELINE", True)


class RoomyTensorCores(emulator.EmulatedTensorCores):
    """Room for resident weights beside the pipelined tile's stages."""
    resident_smem_per_sm = 256 * 1024


def tiles(fn, *args, dialect, grid=4, **options) -> list[str]:
    opts = check_options({"control": "device", "block": BLOCK, **options}, dialect)
    source = lower_with_grid(gdsl.make_ir(fn)(*args), opts, grid, dialect).rendered.source
    return sorted(set(re.findall(r"gdsl_gemm_tile\w*<\d[^>]*>", source)))


def rng_pair(m, k, n, batch=()):
    rng = np.random.default_rng(m * k + n)
    a = rng.standard_normal((*batch, m, k)).astype(np.float32)
    return a, (rng.standard_normal((*batch, k, n)) / np.sqrt(k)).astype(np.float32)


def tanh_loop(h, W):
    """Three steps of h = tanh(h @ W): a loop whose W may stay resident."""
    return gdsl.fori_loop(0, 3, lambda i, h: gnp.tanh(h @ W), h)


def tanh_loop_reference(h0, W):
    h = h0.astype(np.float64)
    for _ in range(3):
        h = np.tanh(h @ W)
    return h


CASES = {                                      # name: (m, k, n, batch, options, the tile taken)
    "whole tiles": (64, 256, 128, (), {}, "gdsl_gemm_tile_tcp<32, 64, 32, 3, 128, 1, 4, false, 64>"),
    "edges": (50, 72, 40, (), {}, "gdsl_gemm_tile_tcp<32, 32, 32, 3, 128, 2, 2, false, 32>"),
    "batch": (64, 64, 64, (3,), {}, "gdsl_gemm_tile_tcp<64, 64, 32, 3, 128, 2, 2, false, 64>"),
    "split depth": (64, 4096, 64, (), {"split_k": True}, "gdsl_gemm_tile_tcp<64, 64, 32, 3, 128, 2, 2, false, 64>"),
}


@needs_cxx
@pytest.mark.parametrize("name", list(CASES))
def test_emulated_matmul(name, pipelined):
    m, k, n, batch, options, tile = CASES[name]
    a, b = rng_pair(m, k, n, batch)
    fn = lambda a, b: gnp.matmul(a, b)  # noqa: E731
    assert tile in tiles(fn, a, b, dialect=emulator.EmulatedTensorCores(), **options)
    got = emulator.emulate(fn, a, b, grid=4, block=BLOCK, dialect=emulator.EmulatedTensorCores(), **options)
    expected = a.astype(np.float64) @ b.astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5 * np.sqrt(k))


@needs_cxx
def test_emulated_resident_weights_of_no_whole_stages_are_read_in_place(pipelined):
    """A resident B whose depth is no whole number of the tile's stages (72 rows: 2.25 stages of 32) is read in place
    up to its depth, the last stage's rows past it as zeros (A's too: through the loaders). (Before, such a tile
    took no B loader at all, a compile error found by a randomized sweep on the emulator.)"""
    rng = np.random.default_rng(2)
    h0 = rng.standard_normal((79, 72)).astype(np.float32)
    W = (rng.standard_normal((72, 72)) / 9).astype(np.float32)
    dialect = RoomyTensorCores()
    assert tiles(tanh_loop, h0, W, dialect=dialect) == ["gdsl_gemm_tile_tcp<64, 64, 32, 3, 128, 2, 2, true, 72>"]
    got = emulator.emulate(tanh_loop, h0, W, grid=4, block=BLOCK, dialect=dialect)
    np.testing.assert_allclose(got, tanh_loop_reference(h0, W), rtol=1e-5, atol=1e-5)


@needs_cxx
@pytest.mark.parametrize("tc", [True, False], ids=["pipelined", "wide FFMA"])
def test_emulated_gathered_rows_are_copied_by_address(tc, monkeypatch):
    """Gathered rows (the option row_views: `take(E, idx) @ W` reads row m at E[clamp(idx[m])]) have addresses, the
    table's rows K apart: the pipelined tile copies them with cp.async, the wide FFMA tile loads them as vectors
    (its VEC), indices out of range clamped as take clamps them."""
    monkeypatch.setattr(gemm, "TC_PIPELINE", tc)
    rng = np.random.default_rng(5)
    E = rng.standard_normal((100, 64)).astype(np.float32)
    W = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    idx = rng.integers(-5, 105, size=64).astype(np.int32)
    fn = lambda E, idx, W: gnp.take(E, idx, axis=0) @ W  # noqa: E731
    dialect = emulator.EmulatedTensorCores()
    tile = "gdsl_gemm_tile_tcp<32, 32, 32, 3, 128, 2, 2, false, 32>" if tc else \
        "gdsl_gemm_tile_wide<32, 32, 32, 128, 4, 4, 2, true, false, true, false, float>"
    assert tiles(fn, E, idx, W, dialect=dialect, row_views=True) == [tile]
    got = emulator.emulate(fn, E, idx, W, grid=4, block=BLOCK, dialect=dialect, row_views=True)
    rows = np.clip(np.where(idx < 0, idx + 100, idx), 0, 99)
    np.testing.assert_allclose(got, E[rows].astype(np.float64) @ W, rtol=1e-5, atol=1e-5)


def _random_gemm(data):
    """A drawn GEMM program: (fn, args, float64 expected, depth): a plain product, one with an epilogue, one with B
    transposed, gathered rows, or a loop `h = tanh(h @ W)` whose W may be resident; any sizes, edges included."""
    kind = data.draw(st.sampled_from(["plain", "epilogue", "transposed", "gathered", "loop"]))
    m, k = data.draw(st.integers(1, 130)), data.draw(st.integers(1, 300))
    n = k if kind == "loop" else data.draw(st.integers(1, 200))
    rng = np.random.default_rng(m * 1000 + k * 10 + n)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if kind == "epilogue":
        c = rng.standard_normal(n).astype(np.float32)
        return (lambda a, b, c: gnp.tanh(a @ b + c)), (a, b, c), np.tanh(a64 @ b64 + c), k
    if kind == "transposed":
        bt = np.ascontiguousarray(b.T)
        return (lambda a, bt: a @ bt.T), (a, bt), a64 @ b64, k
    if kind == "gathered":
        idx = rng.integers(-3, m + 3, size=data.draw(st.integers(1, 100))).astype(np.int32)
        rows = np.clip(np.where(idx < 0, idx + m, idx), 0, m - 1)
        return (lambda a, idx, b: gnp.take(a, idx, axis=0) @ b), (a, idx, b), a64[rows] @ b64, k
    if kind == "loop":
        return tanh_loop, (a, b), tanh_loop_reference(a, b64), k
    return (lambda a, b: a @ b), (a, b), a64 @ b64, k


@needs_cxx
@settings(max_examples=max(4, settings.default.max_examples // 4))
@given(data=st.data())
def test_emulated_random_gemms(data):
    """Drawn GEMMs (_random_gemm) on the emulator with the tile switched on, any grid and block, against float64;
    the sweep that found a resident B the tile could not read (above) and checked gathered rows, in the suite."""
    fn, args, expected, k = _random_gemm(data)
    grid, block = data.draw(st.sampled_from([1, 2, 3, 4, 7])), data.draw(st.sampled_from([64, 128, 256]))
    saved = gemm.TC_PIPELINE
    gemm.TC_PIPELINE = True
    try:
        got = emulator.emulate(fn, *args, grid=grid, block=block, dialect=RoomyTensorCores(), row_views=True)
    finally:
        gemm.TC_PIPELINE = saved
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5 * np.sqrt(k))


@needs_cxx
def test_emulated_loop_gathers_rows_at_indices_it_computes(pipelined):
    """A decoder-like loop with the tile: each step's rows of E gathered at the indices the step before computed
    (an argmax pushed out of range both ways: clamped), B of both products resident, read in place."""
    rng = np.random.default_rng(7)
    E, h0 = rng.standard_normal((100, 64)).astype(np.float32), rng.standard_normal((64, 64)).astype(np.float32)
    W, U = ((rng.standard_normal((2, 64, 64)) / 8).astype(np.float32))
    idx = rng.integers(0, 100, size=64).astype(np.int32)

    def decoder(E, idx, W, U, h):
        def step(t, c):
            h, tok = c
            h = gnp.tanh(gnp.take(E, tok, axis=0) @ W + h @ U)
            return h, gnp.argmax(h, axis=1).astype(gdsl.int32) * 7 - 30
        return gdsl.fori_loop(0, 3, step, (h, idx))
    dialect = RoomyTensorCores()
    assert "gdsl_gemm_tile_tcp<32, 32, 32, 3, 128, 2, 2, true, 40>" in tiles(decoder, E, idx, W, U, h0,
                                                                              dialect=dialect, row_views=True)
    got_h, got_tok = emulator.emulate(decoder, E, idx, W, U, h0, grid=4, block=BLOCK, dialect=dialect, row_views=True)
    h, tok = h0.astype(np.float64), idx
    for _ in range(3):
        h = np.tanh(E[np.clip(np.where(tok < 0, tok + 100, tok), 0, 99)].astype(np.float64) @ W + h @ U)
        tok = np.argmax(h, axis=1).astype(np.int32) * 7 - 30
    np.testing.assert_allclose(got_h, h, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got_tok, tok)


@needs_cxx
@pytest.mark.parametrize("m,k,n", [(9, 1, 1), (64, 1, 64)])
def test_emulated_one_element_operands(m, k, n, pipelined):
    """An operand of one element may be a scalar (a uniform's register), which has no address to copy from: such a
    tile loads it through its loader (found by test_emulated_random_gemms: B transposed, 1 x 1, a compile error)."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    bt = np.ascontiguousarray(b.T)
    got = emulator.emulate(lambda a, bt: a @ bt.T, a, bt, grid=1, block=64, dialect=RoomyTensorCores())
    np.testing.assert_allclose(got, a.astype(np.float64) @ b, rtol=1e-5, atol=1e-6)


# What the emulator's cp.async (copies that land only when a wait needs them, emu.h) catches: the tile's source with
# one of its syncs taken out, each a wrong answer there (on a GPU: a race that may or may not show).
MUTATIONS = {
    "no wait for the stage": "    gdsl_copy_wait<S - 2>();           // stage kt's copies by this thread",
    "no block barrier after the waits": "    __syncthreads();                   // ... and every thread's; every warp",
}


@needs_cxx
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_emulated_tile_without_a_sync_is_wrong(mutation, pipelined):
    line = MUTATIONS[mutation]
    assert line in emulator.CUDA_TENSOR_CORES

    class Mutated(emulator.EmulatedTensorCores):
        device_library = emulator.CUDA_TENSOR_CORES.replace(line, "//")
    m, k, n, *_ = CASES["whole tiles"]
    a, b = rng_pair(m, k, n)
    got = emulator.emulate(lambda a, b: gnp.matmul(a, b), a, b, grid=4, block=BLOCK, dialect=Mutated())
    assert not np.allclose(got, a.astype(np.float64) @ b.astype(np.float64), rtol=1e-3, atol=1e-3)


@needs_cxx
def test_emulated_loop_reads_its_resident_weights_in_place(pipelined):
    rng = np.random.default_rng(0)
    h0 = rng.standard_normal((64, 128)).astype(np.float32)
    W = (rng.standard_normal((128, 128)) / 12).astype(np.float32)
    # (its resident rows padded to 72 floats: gemm.TC_RESIDENT_PAD)
    tile = "gdsl_gemm_tile_tcp<32, 64, 32, 3, 128, 1, 4, true, 72>"
    assert tile in tiles(tanh_loop, h0, W, dialect=RoomyTensorCores())
    got = emulator.emulate(tanh_loop, h0, W, grid=4, block=BLOCK, dialect=RoomyTensorCores())
    np.testing.assert_allclose(got, tanh_loop_reference(h0, W), rtol=1e-5, atol=1e-5)


@needs_cxx
@pytest.mark.parametrize("name", ["lstm", "nasrnn", "seq2seq"])
def test_emulated_small_models_at_batch_64(name, pipelined):
    """The recurrent models (small configurations) at batch 64 with the tile, against their float64 references (their
    depths, 16, less than one stage: resident B read in place up to it)."""
    from models import common, load
    model = load(name)
    cfg = model.small()
    weights, inputs = model.init_weights(cfg), model.make_inputs(cfg, 64)
    fn = lambda w, i: model.forward(w, i, cfg)  # noqa: E731
    assert any("tcp" in t for t in tiles(fn, weights, inputs, dialect=emulator.EmulatedTensorCores()))
    got = emulator.emulate(fn, weights, inputs, grid=4, block=BLOCK, dialect=emulator.EmulatedTensorCores())
    assert not common.compare(got, model.reference(weights, inputs, cfg))


@needs_cxx
def test_emulated_padded_resident_rows_on_the_ffma_tile(pipelined, monkeypatch):
    """A program that takes the tile pads its resident GEMM rows (resident.RESIDENT_PITCH); a tile that then goes to
    the wide FFMA tile instead (here: taller than TC_MAX_ROWS) reads them in place at that pitch (its template's
    RBP)."""
    monkeypatch.setattr(gemm, "TC_MAX_ROWS", 16)
    rng = np.random.default_rng(1)
    h0 = rng.standard_normal((64, 128)).astype(np.float32)
    W = (rng.standard_normal((128, 128)) / 12).astype(np.float32)
    dialect = RoomyTensorCores()
    opts = check_options({"control": "device", "block": BLOCK}, dialect)
    lowering = lower_with_grid(gdsl.make_ir(tanh_loop)(h0, W), opts, 4, dialect)
    pitches = {t.op.params.get(RESIDENT_PITCH) for s in walk(lowering.plan.kernels[0].body) if isinstance(s, Wave)
               for t in s.tasks if RESIDENT in t.op.params}
    assert pitches == {72} and "B resident in shared memory at +0 (rows 72 apart)" in str(lowering.plan)
    wide = "gdsl_gemm_tile_wide<32, 64, 32, 128, 4, 4, 1, true, true, true, false, float, 72>"
    assert wide in lowering.rendered.source
    got = emulator.emulate(tanh_loop, h0, W, grid=4, block=BLOCK, dialect=RoomyTensorCores())
    np.testing.assert_allclose(got, tanh_loop_reference(h0, W), rtol=1e-5, atol=1e-5)


def test_off_by_default_and_where_it_does_not_apply(pipelined, monkeypatch):
    """Off: the FFMA tiles. On: not without tensor cores (the dialect's or the option's), nor for a tile taller than
    TC_MAX_ROWS, nor for B contiguous along k (a transposed view)."""
    a, b = rng_pair(64, 256, 128)
    on = emulator.EmulatedTensorCores()
    assert any("tcp" in t for t in tiles(lambda a, b: a @ b, a, b, dialect=on))
    assert not any("tcp" in t for t in tiles(lambda a, b: a @ b, a, b, dialect=on, tensor_cores=False))
    assert not any("tcp" in t for t in tiles(lambda a, b: a @ b, a, b, dialect=emulator.EmulatorDialect()))
    assert not any("tcp" in t for t in tiles(lambda a, b: a @ b.T, a, b.T.copy(), dialect=on))
    monkeypatch.setattr(gemm, "TC_MAX_ROWS", 16)
    assert not any("tcp" in t for t in tiles(lambda a, b: a @ b, a, b, dialect=on))
    monkeypatch.setattr(gemm, "TC_PIPELINE", False)
    assert not any("tcp" in t for t in tiles(lambda a, b: a @ b, a, b, dialect=on))


def test_which_programs_take_it_and_the_budget_it_leaves(pipelined, monkeypatch):
    """A program takes the tile where a GEMM-shaped matmul runs in a loop, or where it has no loop; then each vEU's
    budget for resident weights shrinks by the largest stages the tile takes (64 x 96: three stages of 64 x 36 and
    32 x 104 floats). A program whose loops run only GEMVs (a hoisted GEMM before them, as the LSTM's at batch 1)
    keeps the FFMA tiles and its whole budget."""
    cuda = CUDADialect()
    stages = 3 * (64 * 36 + 32 * 104) * 4
    h, W = rng_pair(64, 64, 64)
    x = h + 1

    def recurrence(rows):
        return gdsl.make_ir(lambda h, W: gdsl.fori_loop(0, 2, lambda i, h: gnp.tanh(h @ W), h))(h[:rows], W)
    hoisted = gdsl.make_ir(lambda x, h, W: gdsl.fori_loop(0, 2, lambda i, h: gnp.tanh(h @ W), (x @ W)[:1]))(x, h, W)
    plain = gdsl.make_ir(lambda a, b: a @ b)(x, W)
    assert [gemm.pipelined_program(cuda, p) for p in (recurrence(64), plain, recurrence(1), hoisted)] == \
        [True, True, False, False]
    assert not gemm.pipelined_program(emulator.EmulatorDialect(), recurrence(64))
    opts = {"control": "device"}
    for program, scratch in ((recurrence(64), stages), (hoisted, 0)):
        cuda.pipelined_tiles = gemm.pipelined_program(cuda, program)
        assert gemm.pipelined_scratch(cuda) == scratch
        assert resident_budget(opts, 264, 132, cuda) == cuda.resident_smem_per_sm // 2 - scratch
        a_stages = 3 * 64 * 36 * 4 if scratch else 0               # (B read in place from its resident tile)
        assert resident_budget(opts, 264, 132, cuda, staged_b=False) == cuda.resident_smem_per_sm // 2 - a_stages
    monkeypatch.setattr(gemm, "TC_PIPELINE", False)
    assert not gemm.pipelined_program(cuda, recurrence(64))


def test_seq2seq_batch64_keeps_every_weight_resident_with_it(pipelined):
    """Seq2seq's three products at batch 64 (full size, CUDA's budget at 132 vEUs) keep their B resident with the tile
    as without it: the weights get the budget the stages of A alone leave, and the kernel (165.5 KiB of shared memory)
    fits the share (192 KiB); with the budget of B staged the logits' 120 tiles of W_out did not fit."""
    plan = zoo_lowered("seq2seq", 64).lowering.plan
    matmuls = [t for s in walk(plan.kernels[0].body) if isinstance(s, Wave) for t in s.tasks if "matmul" in t.op.kind]
    assert len(matmuls) == 3 and all(RESIDENT in t.op.params for t in matmuls)


def test_wide_tc_tiles_join_the_menu_under_their_switch(monkeypatch):
    from gdsl.schedule import utasks
    assert (64, 128) not in utasks.gemm_tile_menu()
    monkeypatch.setattr(utasks, "WIDE_TC_TILES", True)
    assert (64, 128) in utasks.gemm_tile_menu()


@needs_nvrtc
@pytest.mark.parametrize("name,options", [("lstm", {}), ("nasrnn", {}), ("seq2seq", {}),
                                          ("seq2seq", {"row_views": False})], ids=["lstm", "nasrnn", "seq2seq",
                                                                                   "seq2seq without gathered rows"])
def test_zoo_batch64_kernels_compile_with_it(name, options, pipelined):
    """The recurrent models' batch-64 kernels at full size take the tile and compile for sm_90 (Seq2seq's with its
    embedding rows gathered in place, copied by the tile, and without)."""
    from gdsl.backends.cuda import toolchain
    from models import load
    model = load(name)
    cfg = model.Config()
    source = model.make_forward(cfg, backend="cuda", control="device", **options).lower(
        model.init_weights(cfg), model.make_inputs(cfg, 64)).source
    gathered = name == "seq2seq" and options.get("row_views") is not False
    assert ("const float* { long long r = " in source) == gathered          # (the gathered rows' addresses)
    assert "gdsl_gemm_tile_tcp<" in source.split("pipelined tensor-core tile shape")[-1]
    assert toolchain.compile_cuda(source, "sm_90")


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_takes_the_emulated_tiles(name, pipelined):
    """What test_gpu_matmul asserts on the GPU, checked without one: CUDA's dialect at the emulated grid and block
    gives each case the emulated tile."""
    m, k, n, batch, options, tile = CASES[name]
    a, b = rng_pair(m, k, n, batch)
    assert tile in cuda_lowering(lambda a, b: gnp.matmul(a, b), (a, b), grid=4, block=BLOCK, **options).source


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_matmul(name, pipelined):
    """The emulated cases' tiles on the GPU: their grid and block (the card's own grid would split these small
    GEMMs into 16 x 16 tiles, which the tile's warp grid of a 256-thread block does not divide)."""
    import cupy as cp
    m, k, n, batch, options, tile = CASES[name]
    a, b = rng_pair(m, k, n, batch)
    fn = gdsl.jit(lambda a, b: gnp.matmul(a, b), backend="cuda", grid=4, block=BLOCK, **options)
    got = cp.asnumpy(fn(cp.asarray(a), cp.asarray(b)))
    assert tile in fn.lower(a, b).source
    np.testing.assert_allclose(got, a.astype(np.float64) @ b.astype(np.float64), rtol=1e-5, atol=2e-5 * np.sqrt(k))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["lstm", "nasrnn", "seq2seq"])
def test_gpu_zoo_batch64_matches_the_reference(name, pipelined):
    """The full-size batch-64 models with the tile, against their float64 references (the bench's tolerance)."""
    from models import common, load
    model = load(name)
    cfg = model.Config()
    weights, inputs = model.init_weights(cfg), model.make_inputs(cfg, 64)
    got = common.to_numpy(model.make_forward(cfg, backend="cuda")(weights, inputs))
    assert not common.compare(got, model.reference(weights, inputs, cfg))
