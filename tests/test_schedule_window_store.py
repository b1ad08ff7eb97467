"""A contraction storing straight into a dynamic_update_slice's window (plan.StoreWindow,
Scheduler._fold_window_stores): `x.at[..., t, ...].set(u)` in place, `u` computed by a matmul (with or without
an epilogue) and read by nothing else, becomes the matmul's store into x's window at the uniform start; the
update runs no op, no wave and no barrier. Checked against the interpreter on the plan simulator (with its race
checks) for several grids and partitionings, on the g++ emulator with the fold on and off, on the CPU backend
(which keeps the update as an op) and compiled with NVRTC."""
import numpy as np
import pytest
from strategies import (
    BACKEND_TOLERANCE,
    assert_trees_close,
    check_backend,
    cuda_lowering,
    needs_cxx,
    needs_nvrtc,
    plan_ops,
)
from test_schedule import _flat_args, check_plan

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import emulator
from gdsl.interpreter import run_program
from gdsl.primitives.linalg import matmul_p
from gdsl.primitives.nn import conv2d_p
from gdsl.primitives.registry import REGISTRY
from gdsl.primitives.structural import dynamic_update_slice_p
from gdsl.schedule import schedule
from gdsl.schedule.plan import Loop, Sync, Wave, walk
from gdsl.schedule.simulate import simulate
from gdsl.tracing.pytree import tree_unflatten
from gdsl.tracing.trace import bind1

CHAIN = ("cfamily",)       # the C-family rules: epilogues, views, row chains and window stores
rng = np.random.default_rng(7)


def _update(x, u, *starts, mode):
    return bind1(REGISTRY[dynamic_update_slice_p.name], x, u, *starts, mode=mode)


def cache_rows(cache, h, W, U):
    """Row t of a carried cache written with h @ W at the loop index, the whole cache read after the write."""
    def step(t, carry):
        cache, h = carry
        cache = cache.at[t].set((h @ W)[0])
        return cache, gnp.tanh(h @ U + cache.sum(axis=0, keepdims=True) * 0.1)
    return gdsl.fori_loop(0, cache.shape[0], step, (cache, h))


def cache_columns(cache, v, A, first, mode="clip"):
    """A strided 2-d window (two columns) of a carried cache at a dynamic column that runs out of range at
    both ends (`first`, first + 2, ...: clamped, or dropped with mode="drop")."""
    def step(t, carry):
        cache, v = carry
        start = first + 2 * t
        cache = _update(cache, A @ v, np.int32(0), start, mode=mode)
        return cache, gnp.tanh(v * 0.5 + cache[:, :2] * 0.1)
    return gdsl.fori_loop(0, 5, step, (cache, v))


def cache_columns_dropped(cache, v, A, first):
    return cache_columns(cache, v, A, first, mode="drop")


def read_before_and_after(cache, h, W):
    """The cache read in the same step before the write (feeding the matmul that writes it) and after."""
    def step(t, carry):
        cache, h = carry
        before = cache.sum(axis=0, keepdims=True)
        cache = cache.at[t].set((gnp.tanh(h + before * 0.1) @ W)[0])
        return cache, gnp.tanh(h * 0.5 + cache.max(axis=0, keepdims=True) * 0.1)
    return gdsl.fori_loop(0, cache.shape[0], step, (cache, h))


def read_beside_the_write(cache, h, W):
    """The old cache read in the wave of the matmul that computes the update: the matmul may not overwrite it
    there (the update stays an op, a wave later)."""
    def step(t, carry):
        cache, h = carry
        before = cache.sum(axis=0, keepdims=True)
        cache = cache.at[t].set((h @ W)[0])
        return cache, gnp.tanh(h * 0.5 + before * 0.1 + cache.max(axis=0, keepdims=True) * 0.1)
    return gdsl.fori_loop(0, cache.shape[0], step, (cache, h))


def scalar_after_write(cache, h, W):
    """One element of the new row read by every vEU (a uniform op) right after the write."""
    def step(t, carry):
        cache, h = carry
        cache = cache.at[t].set((h @ W)[0])
        return cache, gnp.tanh(h * cache[t, 1])
    return gdsl.fori_loop(0, cache.shape[0], step, (cache, h))


def kv_epilogue(q, K, W, b):
    """A batched matmul with an epilogue (tanh(q W + b)) stored into K[:, t] (a window strided by the batch),
    then K read transposed and as is (attention's cache)."""
    def step(t, carry):
        q, K = carry
        K = K.at[:, t].set(gnp.tanh(q @ W + b)[:, 0])
        s = gnp.matmul(q, gnp.transpose(K, (0, 2, 1))) * 0.25
        p = gnp.exp(s - s.max(axis=-1, keepdims=True))
        return gnp.tanh((p / p.sum(axis=-1, keepdims=True)) @ K), K
    return gdsl.fori_loop(0, K.shape[1], step, (q, K))


def conv_frames(frames, x, w, b):
    """A conv2d with a bias epilogue stored as frame t of a carried stack of feature maps (a window
    strided by the frames' channels), its input the frame before."""
    def step(t, carry):
        frames, x = carry
        y = gdsl.nn.conv2d(x, w, b, padding=1)                # [1, 2, 4, 4]
        frames = frames.at[:, t].set(y)                       # frames [1, 3, 2, 4, 4]: window [1, 1, 2, 4, 4]
        return frames, gnp.tanh(x * 0.5 + frames[:, 0] * 0.1)
    return gdsl.fori_loop(0, frames.shape[1], step, (frames, x))


def writes_from_itself(xs, W):
    """The matmul reads the carry it would store into (xs[t] @ W into xs[t]): the update stays an op."""
    def step(t, xs):
        return xs.at[t].set(xs[t] @ W)
    return gdsl.fori_loop(0, xs.shape[0], step, xs)


def _small(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


ARGS = {
    cache_rows: (_small(5, 8), _small(1, 8), _small(8, 8, scale=0.3), _small(8, 8, scale=0.3)),
    cache_columns: (_small(6, 6), _small(6, 2), _small(6, 6, scale=0.3), np.int32(-1)),
    cache_columns_dropped: (_small(6, 6), _small(6, 2), _small(6, 6, scale=0.3), np.int32(-1)),
    read_before_and_after: (_small(5, 8), _small(1, 8), _small(8, 8, scale=0.3)),
    read_beside_the_write: (_small(5, 8), _small(1, 8), _small(8, 8, scale=0.3)),
    scalar_after_write: (_small(5, 8), _small(1, 8), _small(8, 8, scale=0.3)),
    kv_epilogue: (_small(3, 1, 8), np.zeros((3, 4, 8), np.float32), _small(8, 8, scale=0.3), _small(8)),
    conv_frames: (np.zeros((1, 3, 2, 4, 4), np.float32), _small(1, 2, 4, 4), _small(2, 2, 3, 3, scale=0.3),
                  _small(2)),
    writes_from_itself: (_small(3, 1, 8), _small(8, 8, scale=0.3)),
}
FOLDED = {cache_rows, cache_columns, cache_columns_dropped, read_before_and_after, scalar_after_write, kv_epilogue,
          conv_frames}


def _plan(fn, window_stores=CHAIN, **options):
    program = gdsl.make_ir(fn)(*ARGS[fn])
    return schedule(program, epilogues=CHAIN, views=CHAIN, rows=CHAIN, window_stores=window_stores, **options)


def _stored(plan) -> list:
    """The ops that store into a window."""
    return [op for op in plan_ops(plan) if any(v.window is not None for v in op.outputs)]


def _loop_counts(plan) -> tuple[int, int]:
    """(waves, barriers) per step of the plan's loop."""
    loop = next(s for k in plan.kernels for s in walk(k.body) if isinstance(s, Loop))
    return (sum(isinstance(s, Wave) for s in walk(loop.body)), sum(isinstance(s, Sync) for s in walk(loop.body)))


@pytest.mark.parametrize("fn", list(ARGS), ids=lambda f: f.__name__)
def test_simulated_plans_compute_what_the_interpreter_does(fn):
    def stored_where_folded(plan, control):
        assert bool(_stored(plan)) == (fn in FOLDED and control == "device"), control
    check_plan(fn, *ARGS[fn], seeds=(0, 1), check=stored_where_folded, epilogues=CHAIN, views=CHAIN, rows=CHAIN,
               window_stores=CHAIN)


@pytest.mark.parametrize("fn", sorted(FOLDED, key=lambda f: f.__name__), ids=lambda f: f.__name__)
def test_the_update_runs_no_op_and_saves_a_wave_and_a_barrier(fn):
    plan, unfolded = _plan(fn, grid=132), _plan(fn, window_stores=(), grid=132)
    kinds = [op.kind for op in plan_ops(plan)]
    assert dynamic_update_slice_p.name not in kinds and dynamic_update_slice_p.name in [
        op.kind for op in plan_ops(unfolded)]
    (op,) = _stored(plan)
    assert op.kind == (conv2d_p if fn is conv_frames else matmul_p).name and plan.stats["window_stores"] == 1
    (out,) = op.outputs
    cache = 1 if fn is kv_epilogue else 0                      # (the result that is the cache)
    assert out.storage is plan.outputs[cache].storage          # the carried cache, written in place
    waves, barriers = _loop_counts(plan)
    assert (waves, barriers) == (_loop_counts(unfolded)[0] - 1, _loop_counts(unfolded)[1] - 1)
    assert "window at" in str(plan)


def test_the_window_is_the_update_s_place_in_the_cache():
    plan = _plan(kv_epilogue, grid=132)
    (op,) = _stored(plan)
    out = op.outputs[0]
    assert out.window.shape == (3, 1, 8) and out.window.array_shape == (3, 4, 8) and out.window.drop
    assert [term.stride for term in out.terms] == [8] and [term.high for term in out.terms] == [3]
    assert op.params.get("epilogue") is not None               # tanh(result + b), as it is stored
    assert list(out.window.elements(np.arange(24)))[8:10] == [32, 33]   # batch 1 starts one cache further


def test_a_start_known_to_be_dropped_keeps_the_update():
    def dropped(cache, h, W):
        return _update(cache, h @ W, np.int32(7), np.int32(0), mode="drop")
    program = gdsl.make_ir(dropped)(*ARGS[cache_rows][:3])
    plan = schedule(program, epilogues=CHAIN, views=CHAIN, window_stores=CHAIN)
    assert not _stored(plan)
    assert_trees_close(simulate(plan, _flat_args(ARGS[cache_rows][:3])),
                       run_program(program, _flat_args(ARGS[cache_rows][:3])), tolerance=BACKEND_TOLERANCE)


@needs_cxx
@pytest.mark.parametrize("fn", list(ARGS), ids=lambda f: f.__name__)
@pytest.mark.parametrize("window_store", [None, False])
def test_emulated_window_stores_match_the_interpreter(fn, window_store):
    args = ARGS[fn]
    program = gdsl.make_ir(fn)(*args)
    expected = tree_unflatten(program.out_tree, run_program(program, _flat_args(args)))
    for grid in (1, 3):
        got = emulator.emulate(fn, *args, grid=grid, block=64, window_store=window_store)
        assert_trees_close(got, expected, tolerance=BACKEND_TOLERANCE)


@pytest.mark.parametrize("fn", [cache_rows, cache_columns_dropped, kv_epilogue], ids=lambda f: f.__name__)
@pytest.mark.parametrize("backend", ["cpu", "interpret"])
def test_other_backends_keep_the_update_and_agree(fn, backend):
    check_backend(fn, ARGS[fn], backend)


@needs_nvrtc
@pytest.mark.parametrize("fn", sorted(FOLDED, key=lambda f: f.__name__), ids=lambda f: f.__name__)
def test_window_stores_compile_with_nvrtc(fn):
    from gdsl.backends.cuda import toolchain as cuda_toolchain
    lowering = cuda_lowering(fn, ARGS[fn])
    assert _stored(lowering.plan)
    assert cuda_toolchain.compile_cuda(lowering.source, "sm_90")[:4] == b"\x7fELF"
