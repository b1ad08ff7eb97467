"""Split-K (gdsl/schedule/splitk.py): a GEMM with too few output tiles and a deep k runs as partial products over
ranges of k and a fused sum op. The cost rule picks it where it should and only there; forced on small programs
(matmul and conv2d, with epilogues) the plan simulator, the CPU emulator of the generated C and the CPU backend
compute what the interpreter computes; the sum's order is fixed; NVRTC compiles the split tiles; the shares say
what each uTask touches; the zoo models split so still match their references."""
import os
import pathlib

import numpy as np
import pytest
from strategies import (
    BACKEND_TOLERANCE,
    assert_trees_close,
    cuda_lowering,
    emulated_model_mismatches,
    interpreted,
    needs_cxx,
    needs_nvrtc,
    plan_ops,
    simulated,
)

import gdsl
import gdsl.nn
import gdsl.numpy as gnp
from gdsl.backends.cfamily.emulator import EmulatorDialect, emulate
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.core.ir import ShapedArray
from gdsl.schedule import schedule, splitk, utasks
from gdsl.schedule.plan import FUSED, K_SPLITS, RESULT, Expr, Loop, Sync, Wave, k_chunk, k_range, walk
from gdsl.schedule.shares import read_share, write_share

rng = np.random.default_rng(0)
GOLDEN = pathlib.Path(__file__).parent / "golden"
CHAIN = EmulatorDialect().lowering_chain           # the C-family rules: epilogues fold into the GEMMs
F32 = np.dtype(np.float32)


def _f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.fixture
def force_splits(monkeypatch):
    """utasks.FORCE_K_SPLITS set for one test (as many ranges as the depth allows, at most the given S)."""
    def force(splits):
        monkeypatch.setattr(utasks, "FORCE_K_SPLITS", splits)
    return force


# ------------------------------------------------------------------------------------------- programs
def conv_bn_residual_relu(x, w, scale, shift):
    y = gdsl.nn.conv2d(x, w, padding=1)
    return gdsl.nn.relu(x + y * gnp.reshape(scale, (1, -1, 1, 1)) + gnp.reshape(shift, (1, -1, 1, 1)))


def dense_relu_residual(x, w, b, r):
    return gdsl.nn.relu(x @ w + b) + r


def plain_matmul(x, w):
    return x @ w


def batched_matmul(x, w):
    return x @ w                   # (2, M, K) @ (K, N): A's batch, B broadcast


PROGRAMS = {
    "conv_bn_residual_relu": (conv_bn_residual_relu, lambda: (_f32(1, 8, 6, 6), _f32(8, 8, 3, 3), _f32(8), _f32(8))),
    "dense_relu_residual": (dense_relu_residual, lambda: (_f32(24, 200), _f32(200, 40), _f32(40), _f32(24, 40))),
    "plain_matmul": (plain_matmul, lambda: (_f32(20, 130), _f32(130, 24))),
    "batched_matmul": (batched_matmul, lambda: (_f32(2, 12, 96), _f32(96, 20))),
}


def _split_ops(plan) -> list:
    return [op for op in plan_ops(plan) if K_SPLITS in op.params]


# ------------------------------------------------------------------------------------------- the rule
def test_rule_splits_the_skipnet_conv():
    """ResNet-101's 3x3 conv at 14 x 14 (M=196, N=256, K=2304) on the H200's 264 vEUs: 208 thin tiles of 72
    stages each in one round; split, many more short tiles at once and a sum."""
    x, w = ShapedArray((1, 256, 14, 14), F32), ShapedArray((256, 256, 3, 3), F32)
    out = ShapedArray((1, 256, 14, 14), F32)
    splits = utasks.k_splits("conv2d", [x, w], out, {}, 264, 256)
    assert splits > 1 and utasks.k_splits_allowed(2304, splits)
    split = utasks.k_split_time("conv2d", [x, w], out, {}, 264, 256, splits)
    assert split < utasks.K_SPLIT_GAIN * utasks.k_split_time("conv2d", [x, w], out, {}, 264, 256, 1)


@pytest.mark.parametrize("m, n, k", [(4096, 512, 512), (1, 1024, 4096), (8, 512, 4096), (196, 256, 64)])
def test_rule_keeps_large_gemms_gemvs_and_shallow_ones_whole(m, n, k):
    a, b, out = ShapedArray((m, k), F32), ShapedArray((k, n), F32), ShapedArray((m, n), F32)
    assert utasks.k_splits("matmul", [a, b], out, {}, 264, 256) == 1


def test_rule_skips_non_float32_outputs():
    f16 = np.dtype(np.float16)
    a, b, out = ShapedArray((196, 2304), f16), ShapedArray((2304, 256), f16), ShapedArray((196, 256), f16)
    assert utasks.k_splits("matmul", [a, b], out, {}, 264, 256) == 1


def test_ranges_are_whole_stages_and_never_empty():
    for k in (72, 100, 576, 2304, 4608):
        for splits in range(1, 17):
            if not utasks.k_splits_allowed(k, splits):
                continue
            ranges = [k_range(k, splits, s) for s in range(splits)]
            assert ranges[0][0] == 0 and ranges[-1][1] == k
            assert all(lo < hi and lo % 32 == 0 for lo, hi in ranges)
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


# ------------------------------------------------------------------------------------------- the plan
def test_plan_shape(force_splits):
    """The partial op (k_splits, a temp of (S, *out)), a grid barrier, the sum op in the next wave writing
    the output, the sum the epilogue over P[0] + P[1] + ... added left to right."""
    force_splits(4)
    fn, make_args = PROGRAMS["dense_relu_residual"]
    plan = schedule(gdsl.make_ir(fn)(*make_args()), grid=3, epilogues=CHAIN, views=CHAIN)
    body = plan.kernels[0].body
    waves = [s for s in body if isinstance(s, Wave)]
    (partial,) = [t.op for t in waves[0].tasks]
    (total,) = [t.op for t in waves[1].tasks]
    assert partial.params[K_SPLITS] == 4                  # (K = 200: 64, 64, 64 and 8)
    assert partial.outputs[0].aval.shape == (4, 24, 40) and partial.outputs[0].buffer.kind == "temp"
    assert "epilogue" not in partial.params
    assert isinstance(body[body.index(waves[0]) + 1], Sync) and body[body.index(waves[0]) + 1].scope == "grid"
    assert total.kind == FUSED.name and total.outputs[0].buffer.kind == "output"
    assert [v.offset for v in total.inputs[:4]] == [0, 960, 1920, 2880]
    assert "add(add(add(in0, in1), in2), in3)" in repr(total.expr)
    assert "k in 4 ranges of 64" in str(plan)


def test_sum_expr_replaces_the_result_leaf():
    aval = ShapedArray((4, 5), F32)
    result_plus_bias = Expr("add", (Expr(RESULT, (), {}, aval), Expr("input", (), {"index": 2}, aval)), {}, aval)
    epilogue = Expr("tanh", (result_plus_bias,), {}, aval)
    expr = splitk.sum_expr(epilogue, 3, 2, aval)
    assert repr(expr) == "tanh(add(add(add(in0, in1), in2), in3))"
    assert repr(splitk.sum_expr(None, 2, 2, aval)) == "add(in0, in1)"


def test_option_false_and_validation(force_splits):
    force_splits(4)
    fn, make_args = PROGRAMS["plain_matmul"]
    program = gdsl.make_ir(fn)(*make_args())
    assert _split_ops(schedule(program, grid=3))
    assert not _split_ops(schedule(program, grid=3, split_k=False))
    with pytest.raises(ValueError, match="split_k"):
        schedule(program, split_k="yes")
    with pytest.raises(ValueError):
        gdsl.jit(fn, backend="cuda", split_k="yes")


@pytest.mark.parametrize("name", sorted(PROGRAMS))
@pytest.mark.parametrize("splits", [2, 4])
def test_simulated_plans_match_the_interpreter(name, splits, force_splits):
    """With the simulator's race checks: the sum reads P only behind a barrier."""
    force_splits(splits)
    fn, make_args = PROGRAMS[name]
    args = make_args()
    program = gdsl.make_ir(fn)(*args)
    expected = interpreted(program, args)
    for grid in (1, 3, 132):
        for control in ("device", "host"):
            plan = schedule(program, control=control, grid=grid, epilogues=CHAIN, views=CHAIN)
            assert _split_ops(plan)
            assert_trees_close(simulated(plan, args), expected, tolerance=BACKEND_TOLERANCE)


def test_shares_of_a_split_matmul(force_splits):
    """uTask (s, tile) writes its tile of P[s] (every element of P once over all uTasks) and reads A's rows and
    B's columns of its tile at its slice's range of k only."""
    force_splits(4)
    fn, make_args = PROGRAMS["plain_matmul"]
    (op,) = _split_ops(schedule(gdsl.make_ir(fn)(*make_args()), grid=3))
    splits, size = op.params[K_SPLITS], op.outputs[0].aval.size
    written = np.concatenate([write_share(op, t) for t in range(op.n_utasks)])
    assert np.array_equal(np.sort(written), np.arange(size))
    tiles = op.n_utasks // splits
    for t in (0, op.n_utasks - 1):
        s = t // tiles
        lo, hi = k_range(130, splits, s)
        assert set(write_share(op, t) // (size // splits)) == {s}
        a_cols = np.unique(read_share(op, 0, t) % 130)
        b_rows = np.unique(read_share(op, 1, t) // 24)
        assert a_cols.tolist() == list(range(lo, hi)) and b_rows.tolist() == list(range(lo, hi))


def test_balance_keeps_the_split(force_splits):
    """A wave's balancing re-chooses tiles (balance.py) at the ranges' depth, keeping k_splits."""
    force_splits(4)
    fn, make_args = PROGRAMS["conv_bn_residual_relu"]
    for grid in (2, 5, 132):
        plan = schedule(gdsl.make_ir(fn)(*make_args()), grid=grid, epilogues=CHAIN, views=CHAIN)
        (op,) = _split_ops(plan)
        assert op.params[K_SPLITS] == 3 and op.outputs[0].aval.shape[0] == 3     # (K = 72: 32, 32 and 8)


# ------------------------------------------------------------------------------------------- backends
@needs_cxx
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_emulator_matches_and_sums_in_a_fixed_order(name, force_splits):
    """The C of the split tiles on the emulator: the interpreter's values, and the same bits on 1 and 3 vEUs
    (each slice is one uTask's sum over its range, the slices added in a fixed order)."""
    force_splits(4)
    fn, make_args = PROGRAMS[name]
    args = make_args()
    expected = interpreted(gdsl.make_ir(fn)(*args), args)
    runs = [np.asarray(emulate(fn, *args, grid=grid, block=64)) for grid in (1, 3, 3)]
    assert_trees_close([runs[0]], expected, tolerance=BACKEND_TOLERANCE)
    assert all(np.array_equal(run.view(np.uint32), runs[0].view(np.uint32)) for run in runs[1:])


@needs_cxx
@pytest.mark.parametrize("name", ["conv_bn_residual_relu", "dense_relu_residual"])
def test_hip_emulated_matches(name, force_splits):
    """The HIP dialect's C of the split tiles (its own warp size and tile choices) on the emulator."""
    from gdsl.backends.hip.emulated import EmulatedHIPDialect
    force_splits(4)
    fn, make_args = PROGRAMS[name]
    args = make_args()
    expected = interpreted(gdsl.make_ir(fn)(*args), args)
    got = emulate(fn, *args, grid=3, block=64, dialect=EmulatedHIPDialect())
    assert_trees_close([np.asarray(got)], expected, tolerance=BACKEND_TOLERANCE)


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_cpu_backend_matches(name, force_splits):
    force_splits(4)
    fn, make_args = PROGRAMS[name]
    args = make_args()
    expected = interpreted(gdsl.make_ir(fn)(*args), args)
    jitted = gdsl.jit(fn, backend="cpu", grid=3)
    assert _split_ops(jitted.lower(*args).lowering.plan)
    assert_trees_close([np.asarray(jitted(*args))], expected, tolerance=BACKEND_TOLERANCE)


@needs_nvrtc
@pytest.mark.parametrize("name", ["conv_bn_residual_relu", "dense_relu_residual"])
def test_cuda_source_of_split_tiles_compiles(name, force_splits):
    force_splits(4)
    fn, make_args = PROGRAMS[name]
    lowering = cuda_lowering(fn, make_args(), grid=132)
    assert _split_ops(lowering.plan)
    assert "k += k0_; " in lowering.source and "kd_" in lowering.source
    assert cuda_toolchain.compile_cuda(lowering.source, "sm_90")[:4] == b"\x7fELF"


def test_unsplit_source_unchanged():
    """Without a split the GEMM's C is what it was: no k range."""
    fn, make_args = PROGRAMS["dense_relu_residual"]
    lowering = cuda_lowering(fn, make_args(), grid=132, split_k=False)
    assert not _split_ops(lowering.plan) and "k0_" not in lowering.source


# ------------------------------------------------------------------------------------------- zoo
@needs_cxx
@pytest.mark.parametrize("name, batch", [("skipnet", 1), ("blockdrop", 1), ("blockdrop", 64)])
def test_zoo_models_split_match_their_references(name, batch, force_splits):
    force_splits(4)
    assert emulated_model_mismatches(name, batch, split_k=True) == []


def test_zoo_skipnet_splits_its_deep_convs():
    """SkipNet at batch 1 (264 vEUs): the 3x3 convs at 14 x 14 split, each followed by its sum; with
    split_k=False none is."""
    from strategies import zoo_lowered
    plan = zoo_lowered("skipnet", 1).lowering.plan
    split = _split_ops(plan)
    deep = [op for op in split if op.inputs[1].aval.shape[1:] == (256, 3, 3)]
    assert len(deep) == 23 and all(op.params[K_SPLITS] > 1 for op in deep)
    assert not _split_ops(zoo_lowered("skipnet", 1, split_k=False).lowering.plan)
    assert k_chunk(2304, deep[0].params[K_SPLITS]) % 32 == 0
    assert all(any(isinstance(s, Wave) for s in walk(k.body)) for k in plan.kernels)


def window_rows(cache, h, W):
    """Row t of a carried cache written with h @ W in place: the matmul stores into the update's window."""
    def step(t, carry):
        cache, h = carry
        return cache.at[t].set(h @ W), gnp.tanh(h * 0.5)
    return gdsl.fori_loop(0, cache.shape[0], step, (cache, h))


def test_gemm_storing_into_a_window_is_not_split(force_splits):
    """The sum op, a fused op, has no rule to store into a window (plan.StoreWindow): such a GEMM stays whole."""
    force_splits(4)
    args = (_f32(3, 16, 20), _f32(16, 128), _f32(128, 20))
    program = gdsl.make_ir(window_rows)(*args)
    plan = schedule(program, grid=3, epilogues=CHAIN, views=CHAIN, window_stores=CHAIN)
    assert plan.stats["window_stores"] == 1 and not _split_ops(plan)
    assert_trees_close(simulated(plan, args), interpreted(program, args), tolerance=BACKEND_TOLERANCE)
    assert _split_ops(schedule(program, grid=3, epilogues=CHAIN, views=CHAIN))      # (no window store: split)


def test_split_plan_golden(force_splits):
    """What the plan of a split conv with an epilogue prints (tests/golden/plan_splitk_conv.txt)."""
    force_splits(4)
    fn, make_args = PROGRAMS["conv_bn_residual_relu"]
    text = str(schedule(gdsl.make_ir(fn)(*make_args()), grid=8, epilogues=CHAIN, views=CHAIN)) + "\n"
    path = GOLDEN / "plan_splitk_conv.txt"
    if os.environ.get("GDSL_UPDATE_GOLDEN") or not path.exists():
        path.write_text(text)
    assert text == path.read_text()


@needs_cxx
def test_split_in_a_loop_body(force_splits):
    """A recurrent step's h @ U (16 rows) split inside the loop: its P and its sum are rewritten every step;
    the simulator (race checks, every placement) and the emulator (with flag syncs asked for) agree."""
    from test_schedule import check_plan, lstm
    force_splits(2)
    args = (_f32(3, 16, 128) * 0.3, _f32(128, 256) * 0.3, _f32(64, 256) * 0.3, _f32(256) * 0.3)
    plan = check_plan(lstm, *args, epilogues=CHAIN, views=CHAIN)
    loop_ops = [t.op for s in walk(plan.kernels[0].body) if isinstance(s, Loop) for w in walk(s.body)
                if isinstance(w, Wave) for t in w.tasks]
    assert any(K_SPLITS in op.params for op in loop_ops)
    expected = interpreted(gdsl.make_ir(lstm)(*args), args)
    for options in ({}, {"owner": False, "flags": True}):
        got = emulate(lstm, *args, grid=4, block=64, **options)
        assert_trees_close([np.asarray(got)], expected, tolerance=BACKEND_TOLERANCE)
