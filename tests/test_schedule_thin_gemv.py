"""Thin GEMV tiles (the scheduler option `thin_gemv`, utasks.THIN_GEMV_COLUMNS and thin_gemv_params): a
GEMV-shaped matmul whose 16-column tiles leave vEUs idle takes tiles of 8 columns on twice the vEUs, and a
GEMV tile stages its whole k at once (split param K_CHUNK, gdsl_gemv_tile's KC) where a thread's B values
fit in registers: RAE's node GEMV (1 x 1024 by 1024 x 512) on 64 vEUs in one round trip to L2 instead of 32
vEUs in four.

Checked: the splits and the plans (RAE's, and the same counts of barriers), the plan simulator against the
interpreter (recursion and loops, both controls), the C-family CPU emulator (a k chunk past the default 256),
the cpu backend (accepts the option, no effect), NVRTC, and on the GPU RAE's bench trees."""
import re

import numpy as np
import pytest
from strategies import emulated_model_mismatches, needs_cxx, needs_nvrtc
from test_schedule import check_plan, lstm
from test_schedule_fork import TREES, cpu_encoder_mismatch, wide_args
from test_schedule_recursion import CHAIN, check_rae_trees, encoder, flat_args, height, rae_case

import gdsl
from gdsl.backends.cfamily import emulator
from gdsl.backends.cfamily.lower import check_options, lower_with_grid
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.backends.hip import toolchain as hip_toolchain
from gdsl.interpreter import run_program
from gdsl.primitives.linalg import matmul_p
from gdsl.schedule import schedule, utasks
from gdsl.schedule.plan import Wave, plan_statements
from gdsl.schedule.simulate import simulate

F32 = np.dtype(np.float32)


class _Aval:
    def __init__(self, shape):
        self.shape, self.dtype, self.size = shape, F32, int(np.prod(shape))


def gemv_split(m, k, n, grid=132, block=256, thin=True):
    return utasks.split(matmul_p.name, [_Aval((m, k)), _Aval((k, n))], [_Aval((m, n))], {}, grid, block, thin)


def matmuls(plan):
    return [t for s in plan_statements(plan) if isinstance(s, Wave) for t in s.tasks if t.op.kind == matmul_p.name]


# ------------------------------------------------------------------------------------------ the split

def test_raes_node_gemv_spreads_over_twice_the_veus_in_one_chunk():
    count, params, cost = gemv_split(1, 1024, 512, thin=False)
    assert (count, params) == (32, {"tile_m": 1, "tile_n": 16})
    thin_count, thin_params, thin_cost = gemv_split(1, 1024, 512)
    assert (thin_count, thin_params) == (64, {"tile_m": 1, "tile_n": 8, utasks.K_CHUNK: 1024})
    assert thin_cost < cost


def test_wide_gemvs_keep_their_tiles():
    """A GEMV whose tiles of 16 columns or more give every vEU work keeps them; its k is one chunk only
    where it is deeper than GEMV_KC and a thread's B values fit in THIN_GEMV_REGISTERS (k x tile_n / 256
    threads <= 64) and A in THIN_GEMV_A_BYTES."""
    assert gemv_split(1, 256, 4096) == gemv_split(1, 256, 4096, thin=False)              # (k of one chunk)
    assert gemv_split(1, 512, 4096)[:2] == (256, {"tile_m": 1, "tile_n": 16, utasks.K_CHUNK: 512})
    assert gemv_split(1, 1024, 4096)[:2] == (256, {"tile_m": 1, "tile_n": 16, utasks.K_CHUNK: 1024})
    assert gemv_split(1, 2048, 4096)[:2] == (256, {"tile_m": 1, "tile_n": 16})    # (128 B values a thread)
    assert gemv_split(1, 8192, 512)[:2] == (32, {"tile_m": 1, "tile_n": 16})      # (k too deep: no thin tile)
    assert gemv_split(1, 256, 512)[:2] == (32, {"tile_m": 1, "tile_n": 16})       # (k one chunk already)


@pytest.mark.parametrize("n", [10, 16])
def test_one_vEUs_gemv_stays_one_uTask(n):
    """A GEMV of one 16-column tile stays one uTask (one vEU's work: the barriers around it may be block
    syncs), its k in one chunk (SkipNet's gates: k = 1024, one round trip where four chunks took ~4 µs on
    the H200, session 20); two tiles of 16 become four of 8."""
    assert gemv_split(1, 512, n)[:2] == (1, {"tile_m": 1, "tile_n": 16, utasks.K_CHUNK: 512})
    assert gemv_split(1, 1024, n)[:2] == (1, {"tile_m": 1, "tile_n": 16, utasks.K_CHUNK: 1024})
    assert gemv_split(1, 512, 32)[:2] == (4, {"tile_m": 1, "tile_n": 8, utasks.K_CHUNK: 512})


def test_balanced_waves_may_take_thin_tiles():
    offered = utasks.split_options(matmul_p.name, [_Aval((1, 1024)), _Aval((1024, 512))], [_Aval((1, 512))], {},
                                   256, thin=True)
    assert [p["tile_n"] for _, p, _ in offered][-2:] == [16, 8]
    assert all(p.get(utasks.K_CHUNK) in (None, 1024) for _, p, _ in offered)
    plain = utasks.split_options(matmul_p.name, [_Aval((1, 1024)), _Aval((1024, 512))], [_Aval((1, 512))], {}, 256)
    assert [p["tile_n"] for _, p, _ in plain][-1] == 16


# ------------------------------------------------------------------------------------------ plans

def test_rae_plan():
    """RAE at full size: the node's matmul on vEUs 0-63 (8 columns, k in one chunk of 1024), the leaves (a node's
    two at their call sites, the function's own for a root that is a leaf) and the output copy aside on vEU 64;
    the barriers executed on the fixed tree are those without the option."""
    from models import floor, rae
    program, flat, weights, inputs = rae_case()
    plain = schedule(program, grid=132, epilogues=CHAIN, thin_gemv=False)
    thin = schedule(program, grid=132, epilogues=CHAIN, thin_gemv=True)
    (task,) = [t for f in thin.functions for t in matmuls_in(f.body)]
    assert (task.op.n_utasks, task.first, task.count) == (64, 0, 64)
    assert task.op.params["tile_n"] == 8 and task.op.params[utasks.K_CHUNK] == 1024
    small = sorted(t.first for s in plan_statements(thin) if isinstance(s, Wave) for t in s.tasks
                   if t.op.n_utasks == 1)
    assert small == [64, 64, 64, 64]
    assert floor.count_plan(thin, flat).plan_grid_barriers == floor.count_plan(plain, flat).plan_grid_barriers == 33
    np.testing.assert_allclose(simulate(thin, flat)[0], rae.reference(weights, inputs, rae.Config()),
                               rtol=1e-4, atol=1e-5)


def matmuls_in(body):
    from gdsl.schedule.plan import walk
    return [t for s in walk(body) if isinstance(s, Wave) for t in s.tasks if t.op.kind == matmul_p.name]


def test_option_checked():
    program = gdsl.make_ir(encoder(3, 8))(*wide_args(TREES["depth 1"], 8))
    with pytest.raises(ValueError, match="thin_gemv"):
        schedule(program, thin_gemv="yes")
    with pytest.raises(ValueError, match="thin_gemv"):
        gdsl.jit(lambda x: x, thin_gemv=1)


# ------------------------------------------------------------------------------------------ simulated

@pytest.mark.parametrize("name", ["balanced", "unbalanced", "leaf"])
def test_recursion_simulated(name):
    tree = TREES[name]

    def thin_tiles(plan, control):          # (the node GEMV's k = 320: thin tiles stage it at once)
        if plan.grid == 132:
            assert {t.op.params["tile_n"] for t in matmuls(plan)} == {8}
    check_plan(encoder(height(tree) + 2, 160), *wide_args(tree, 160), grids=(1, 3, 132), epilogues=CHAIN,
               thin_gemv=True, check=thin_tiles)


def test_loop_simulated():
    """An LSTM at batch 1 (GEMVs in a loop, waves balanced with thin tiles on offer)."""
    rng = np.random.default_rng(0)
    T, H = 4, 64
    xs = rng.standard_normal((T, 1, H)).astype(np.float32)
    W, U = (rng.standard_normal((H, 4 * H)).astype(np.float32) / 8 for _ in range(2))
    b = rng.standard_normal(4 * H).astype(np.float32)
    check_plan(lstm, xs, W, U, b, grids=(3, 132), epilogues=CHAIN, thin_gemv=True)


# ------------------------------------------------------------------------------------------ backends

@needs_cxx
@pytest.mark.parametrize("columns", [(8,), (8, 4)])
@pytest.mark.parametrize("name", ["balanced", "unbalanced"])
def test_emulated_k_chunk_past_the_default(name, columns, monkeypatch):
    """hidden 160: K = 320 in one chunk (past GEMV_KC = 256), thin tiles at grid 32 (20 of 8 columns; with
    THIN_GEMV_COLUMNS (8, 4) 40 of 4 for the grid, which the wave's balancing may take back to 8)."""
    monkeypatch.setattr(utasks, "THIN_GEMV_COLUMNS", columns)
    tree = TREES[name]
    args = wide_args(tree, 160)
    fn = encoder(height(tree) + 2, 160)
    program = gdsl.make_ir(fn)(*args)
    dialect = emulator.EmulatorDialect()
    lowering = lower_with_grid(program, check_options({"block": 128, "thin_gemv": True}, dialect), 32, dialect)
    (tn,) = re.findall(r"gdsl_gemv_tile<1, (\d+), 128, 320, float, false>\(160, 320,", lowering.rendered.source)
    assert int(tn) in columns
    expected = run_program(program, flat_args(args))[0]
    got = emulator.emulate(fn, *args, grid=32, block=128, thin_gemv=True)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@needs_cxx
@pytest.mark.parametrize("options", [{"resident_calls": True}, {"control": "host"}])
def test_emulated_with_resident_weights_and_host_control(options):
    tree = TREES["unbalanced"]
    args = wide_args(tree, 160)
    fn = encoder(height(tree) + 2, 160)
    expected = run_program(gdsl.make_ir(fn)(*args), flat_args(args))[0]
    got = emulator.emulate(fn, *args, grid=32, block=128, thin_gemv=True, **options)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@needs_cxx
def test_emulated_lstm():
    """GEMVs in a loop and before it (256 columns at grid 48: the hoisted xs @ W, k = 320, in 32 tiles of 8
    that stage k at once; the loop's h @ U, k = 64, in 16 tiles of 16)."""
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((3, 1, 320)).astype(np.float32)
    W, U = ((rng.standard_normal((k, 256)) / 8).astype(np.float32) for k in (320, 64))
    b = rng.standard_normal(256).astype(np.float32)
    program = gdsl.make_ir(lstm)(xs, W, U, b)
    assert [t.op.params["tile_n"] for t in matmuls(schedule(program, grid=48, thin_gemv=True))] == [8, 16]
    expected = run_program(program, flat_args((xs, W, U, b)))[0]
    got = emulator.emulate(lstm, xs, W, U, b, grid=48, block=64, thin_gemv=True)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@needs_cxx
@pytest.mark.parametrize("tree", ["fixed", "random"])
def test_emulated_rae_small(tree):
    assert emulated_model_mismatches("rae", 1, {"tree": tree}, grid=8, block=32, thin_gemv=True) == []


@needs_cxx
@pytest.mark.parametrize("name", ["nasrnn", "seq2seq", "skipnet"])
def test_emulated_zoo(name):
    """The zoo's small models whose plans at grid 16 take thin tiles, against their float64 references."""
    assert emulated_model_mismatches(name, 1, grid=16, block=64, thin_gemv=True) == []


def test_cpu_backend_accepts_the_option():
    assert cpu_encoder_mismatch(thin_gemv=True) < 1e-5


@needs_nvrtc
def test_rae_cuda_compiles():
    from models import rae
    cfg = rae.Config()
    weights, inputs = rae.init_weights(cfg), rae.make_inputs(cfg, tree="fixed")
    source = rae.make_forward(cfg, backend="cuda", thin_gemv=True).lower(weights, inputs).source
    assert "gdsl_gemv_tile<1, 8, 256, 1024, float, false>(512, 1024," in source
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"
    traced = rae.make_forward(rae.overhead_test(cfg).programs["trace"], backend="cuda", thin_gemv=True)
    assert cuda_toolchain.compile_cuda(traced.lower(weights, inputs).source, "sm_90")[:4] == b"\x7fELF"


def gate(x, w, b):
    """A gate's GEMV: a pooled row against a weight read transposed (B contiguous along k), plus a bias."""
    return x @ w.T + b


GATE_ARGS = [np.random.default_rng(3).standard_normal(shape).astype(np.float32)
             for shape in ((1, 1024), (10, 1024), (10,))]


@needs_cxx
def test_emulated_one_chunk_prefetching_past_the_default():
    """k = 1024 at 16 columns in one chunk: each of 256 threads prefetches 64 B values, past the tile's default
    of 32 (gemm.GEMV_PREFETCH), which the call passes as its PF."""
    call = "gdsl_gemv_tile<1, 16, 256, 1024, float, true, 64>(10, 1024,"
    source = gdsl.jit(gate, backend="cuda").lower(*GATE_ARGS).source
    assert call in source
    dialect = emulator.EmulatorDialect()
    lowering = lower_with_grid(gdsl.make_ir(gate)(*GATE_ARGS), check_options({"block": 256}, dialect), 4, dialect)
    assert call in lowering.rendered.source
    got = emulator.emulate(gate, *GATE_ARGS, block=256)
    np.testing.assert_allclose(got, gate(*(a.astype(np.float64) for a in GATE_ARGS)), rtol=1e-4, atol=1e-4)
    if cuda_toolchain.nvrtc_available() is None:
        assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"


@needs_nvrtc
def test_lstm_cuda_compiles():
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((4, 1, 256)).astype(np.float32)
    W, U = (rng.standard_normal((256, 1024)).astype(np.float32) for _ in range(2))
    b = rng.standard_normal(1024).astype(np.float32)
    source = gdsl.jit(lstm, backend="cuda", thin_gemv=True).lower(xs, W, U, b).source
    assert "gdsl_gemv_tile" in source
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"


@pytest.mark.skipif(hip_toolchain.hiprtc_available() is not None, reason=str(hip_toolchain.hiprtc_available()))
def test_hip_source_compiles():
    args = wide_args(TREES["unbalanced"], 512)
    source = gdsl.jit(encoder(8, 512), backend="hip", thin_gemv=True).lower(*args).source
    assert "gdsl_gemv_tile<1, 8, 256, 1024, float, false>(512, 1024," in source
    assert hip_toolchain.compile_hip(source, "gfx90a")[:4] == b"\x7fELF"


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{"thin_gemv": True}, {"thin_gemv": True, "resident_calls": True}])
def test_cuda_rae_bench_trees(options):
    """On the GPU: RAE's bench size on the fixed tree, random trees and the traced tree against the numpy
    reference."""
    from models import rae
    _, cfg, weights = check_rae_trees(**options)
    traced_cfg = rae.overhead_test(cfg).programs["trace"]
    traced = gdsl.jit(lambda w, t: rae.forward(w, t, traced_cfg), backend="cuda", **options)
    inputs = rae.make_inputs(cfg, tree="fixed")
    np.testing.assert_allclose(gdsl.to_numpy(traced(weights, inputs)), rae.reference(weights, inputs, cfg),
                               rtol=1e-3, atol=1e-4)
