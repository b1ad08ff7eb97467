"""A reduction storing straight into a dynamic_update_slice's window (plan.StoreWindow,
Scheduler._fold_window_stores): `x.at[..., t, ...].set(argmax(...))` in place becomes the reduction's store into
x's window at the uniform start; the update runs no op, no wave and no barrier. A result that other readers
still read (greedy decoding: the token is the next step's carry and written into the sequence of tokens) is
stored twice, into its own output and into the window (plan.WINDOW_COPY). Checked against the interpreter on
the plan simulator (with its race checks) for several grids and partitionings, on the g++ emulator with the
fold on and off (Seq2seq's small model too), on the CPU backend (which keeps the update as an op) and compiled
with NVRTC."""
import numpy as np
import pytest
from strategies import (
    BACKEND_TOLERANCE,
    assert_trees_close,
    check_backend,
    cuda_lowering,
    emulated_model_mismatches,
    needs_cxx,
    needs_nvrtc,
    plan_ops,
    zoo_lowered,
)
from test_schedule import _flat_args, check_plan

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import emulator
from gdsl.interpreter import run_program
from gdsl.primitives.registry import REDUCE, REGISTRY, family_of
from gdsl.primitives.structural import dynamic_update_slice_p
from gdsl.schedule import schedule, scheduler
from gdsl.schedule.plan import WINDOW_COPY, Loop, Sync, Wave, walk
from gdsl.tracing.pytree import tree_unflatten
from gdsl.tracing.trace import bind1

CHAIN = ("cfamily",)       # the C-family rules: epilogues, views, row chains and window stores
rng = np.random.default_rng(11)


def greedy_tokens(tokens, h, W, emb):
    """Greedy decoding at batch 1: the token is the next step's carry (read by every vEU: a uniform) and is
    written into row t of the carried tokens."""
    def step(t, carry):
        tokens, tok, h = carry
        tok = gnp.argmax(h @ W, axis=1).astype(gdsl.int32)
        h = gnp.tanh(h * 0.5 + gnp.take(emb, tok, axis=0))
        return tokens.at[t].set(tok), tok, h
    return gdsl.fori_loop(0, tokens.shape[0], step, (tokens, gnp.zeros((h.shape[0],), dtype=gdsl.int32), h))


def greedy_batch(tokens, h, W, emb):
    """Greedy decoding at batch 3: the tokens are an array carry, read by a gather and a reduction of the next
    step, and written into row t of the carried tokens."""
    return greedy_tokens(tokens, h, W, emb)


def decode_until_end(tokens, h, W, emb):
    """A data-dependent loop (Seq2seq's): it stops once every token is 0 or after as many steps as rows."""
    def keep_going(carry):
        step, tok, _, _ = carry
        return (gnp.max(tok) > 0) & (step < tokens.shape[0])

    def body(carry):
        step, tok, h, tokens = carry
        tok = gnp.argmax(h @ W, axis=1).astype(gdsl.int32)
        h = gnp.tanh(h * 0.5 + gnp.take(emb, tok, axis=0))
        return step + 1, tok, h, tokens.at[step].set(tok)
    init = (gnp.zeros((), dtype=gdsl.int32), gnp.ones((h.shape[0],), dtype=gdsl.int32), h, tokens)
    return gdsl.while_loop(keep_going, body, init)


def row_sums_only(sums, x):
    """A reduce_sum read by nothing but the update (the reduction stores into the window alone), its
    operand the carry of the loop."""
    def step(t, carry):
        sums, x = carry
        sums = sums.at[t].set(gnp.sum(x, axis=1))
        return sums, gnp.tanh(x * 1.1 + 0.1)
    return gdsl.fori_loop(0, sums.shape[0], step, (sums, x))


def column_maxima(cols, x):
    """A strided window (column t + 2 of a carried [rows, steps] array) that the row maxima fill, the start
    running out of range at the end (mode="drop": the last steps store nothing)."""
    def step(t, carry):
        cols, x = carry
        m = gnp.max(x, axis=1, keepdims=True)                  # [rows, 1]
        cols = bind1(REGISTRY[dynamic_update_slice_p.name], cols, m, np.int32(0), t + 2, mode="drop")
        return cols, gnp.tanh(x * 1.1 - 0.2)
    return gdsl.fori_loop(0, cols.shape[1], step, (cols, x))


def read_beside_the_write(tokens, h):
    """The old tokens read in the wave of the argmax that computes the update: the argmax may not overwrite
    them there (the update stays an op, a wave later)."""
    def step(t, carry):
        tokens, h = carry
        before = gnp.sum(tokens.astype(gdsl.float32))
        tokens = tokens.at[t].set(gnp.argmax(h, axis=1).astype(gdsl.int32))
        return tokens, gnp.tanh(h @ gnp.ones((8, 8), dtype=gdsl.float32) * 0.1 + before * 0.01)
    return gdsl.fori_loop(0, tokens.shape[0], step, (tokens, h))


def _small(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


ARGS = {
    greedy_tokens: (np.zeros((5, 1), np.int32), _small(1, 8), _small(8, 40), _small(40, 8)),
    greedy_batch: (np.zeros((5, 3), np.int32), _small(3, 8), _small(8, 40), _small(40, 8)),
    decode_until_end: (np.zeros((6, 2), np.int32), _small(2, 8), _small(8, 40), _small(40, 8)),
    row_sums_only: (np.zeros((4, 3), np.float32), _small(3, 40)),
    column_maxima: (np.zeros((3, 5), np.float32), _small(3, 40)),
    read_beside_the_write: (np.zeros((4, 2), np.int32), _small(2, 8)),
}
FOLDED = {greedy_tokens, greedy_batch, decode_until_end, row_sums_only, column_maxima}
COPIED = {greedy_tokens, greedy_batch, decode_until_end}      # the result is read beside the update


def _plan(fn, window_stores=CHAIN, **options):
    program = gdsl.make_ir(fn)(*ARGS[fn])
    return schedule(program, epilogues=CHAIN, views=CHAIN, rows=CHAIN, window_stores=window_stores, **options)


def _stored(plan) -> list:
    """The reductions that store into a window."""
    return [op for op in plan_ops(plan) if family_of(op.kind) == REDUCE and
            any(v.window is not None for v in op.outputs)]


def _loop_counts(plan) -> tuple[int, int]:
    """(waves, syncs) per step of the plan's loop (its condition included)."""
    loop = next(s for k in plan.kernels for s in walk(k.body) if isinstance(s, Loop))
    body = list(walk(loop.cond)) + list(walk(loop.body))
    return sum(isinstance(s, Wave) for s in body), sum(isinstance(s, Sync) for s in body)


@pytest.mark.parametrize("fn", list(ARGS), ids=lambda f: f.__name__)
def test_simulated_plans_compute_what_the_interpreter_does(fn):
    def stored_where_folded(plan, control):
        assert bool(_stored(plan)) == (fn in FOLDED and control == "device"), control
    check_plan(fn, *ARGS[fn], seeds=(0, 1), check=stored_where_folded, epilogues=CHAIN, views=CHAIN, rows=CHAIN,
               window_stores=CHAIN)


@pytest.mark.parametrize("fn", sorted(FOLDED, key=lambda f: f.__name__), ids=lambda f: f.__name__)
def test_the_update_runs_no_op(fn):
    """The update's op goes; its wave too where it ran alone (here it may share a later wave)."""
    plan, unfolded = _plan(fn, grid=132), _plan(fn, window_stores=(), grid=132)
    assert dynamic_update_slice_p.name not in [op.kind for op in plan_ops(plan)]
    assert dynamic_update_slice_p.name in [op.kind for op in plan_ops(unfolded)]
    (op,) = _stored(plan)
    assert plan.stats["window_stores"] == 1
    window = op.outputs[-1]
    assert window.window is not None and window.storage in {v.storage for v in plan.outputs}
    if fn in COPIED:          # its own result too, read by the next step (a carry)
        assert op.params[WINDOW_COPY] and len(op.outputs) == 2 and op.outputs[0].window is None
    else:
        assert WINDOW_COPY not in op.params and len(op.outputs) == 1
    assert len(plan_ops(plan)) == len(plan_ops(unfolded)) - 1
    assert all(a <= b for a, b in zip(_loop_counts(plan), _loop_counts(unfolded)))
    assert "window at" in str(plan)


@pytest.mark.parametrize("batch", [1, 64])
def test_seq2seq_decoding_step_loses_the_token_store_s_wave(batch, monkeypatch):
    """Seq2seq at full size (rendered for CUDA, no GPU needed): the token's store was a wave of its own after
    the argmax, behind a block sync (batch 1) or a grid barrier (batch 64); the argmax now stores it. (At batch
    1 the argmax is a uniform under the default UNIFORM_REDUCTION_MAX_INPUT, and a uniform stores nothing: the
    op's store is checked under the bound of 64, where it is an op.)"""
    monkeypatch.setattr(scheduler, "UNIFORM_REDUCTION_MAX_INPUT", 64)
    counts = [_loop_counts(zoo_lowered("seq2seq", batch, window_store=window_store).lowering.plan)
              for window_store in (False, None)]
    (waves_off, syncs_off), (waves_on, syncs_on) = counts
    assert (waves_on, syncs_on) == (waves_off - 1, syncs_off - 1)


def test_the_token_is_stored_beside_its_carry():
    plan = _plan(greedy_batch, grid=132)
    (op,) = _stored(plan)
    own, window = op.outputs
    assert own.aval.shape == (3,) and window.window.shape == (1, 3) and window.window.array_shape == (5, 3)
    assert [term.stride for term in window.terms] == [3] and [term.high for term in window.terms] == [4]
    assert "window at 3*clamp(" in str(plan)


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


@needs_cxx
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("window_store", [None, False])
def test_emulated_seq2seq_matches_its_reference(batch, window_store):
    """The small Seq2seq decoder, its token stored by the argmax (window_store on), against float64."""
    assert emulated_model_mismatches("seq2seq", batch, grid=8, block=64, window_store=window_store) == []


@pytest.mark.parametrize("fn", [greedy_batch, row_sums_only, column_maxima], ids=lambda f: f.__name__)
@pytest.mark.parametrize("backend", ["cpu", "interpret"])
def test_other_backends_keep_the_update_and_agree(fn, backend):
    check_backend(fn, ARGS[fn], backend)


@needs_nvrtc
@pytest.mark.parametrize("fn", sorted(FOLDED, key=lambda f: f.__name__), ids=lambda f: f.__name__)
def test_reduction_window_stores_compile_with_nvrtc(fn):
    from gdsl.backends.cuda import toolchain as cuda_toolchain
    lowering = cuda_lowering(fn, ARGS[fn], uniform_reductions=False)   # (else greedy_tokens' argmax over 40
    assert _stored(lowering.plan)                                         # is a uniform op, stored by no op)
    assert cuda_toolchain.compile_cuda(lowering.source, "sm_90")[:4] == b"\x7fELF"
