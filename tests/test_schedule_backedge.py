"""Back-edge barriers (gdsl/schedule/backedge.py): the grid barrier that ends a loop body becomes a block barrier
where nothing around the back edge, or out of the loop, needs it. Seq2seq bs1's shape (a step ends with its token,
a uniform argmax, stored into the output by one vEU) loses it; a recurrence whose next step reads the carry on
other vEUs keeps it; a loop's exit is followed to the next grid barrier after it, and where there is none in its
block (the loop last in a branch) a grid barrier goes after it instead.
Each plan is checked against the interpreter on the simulator (its race checks find a barrier made too weak),
on the g++ emulator, and compiled with NVRTC."""
import numpy as np
import pytest
from strategies import cuda_lowering, needs_cxx, needs_nvrtc
from test_schedule import check_emulated, check_plan

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.schedule import backedge, schedule
from gdsl.schedule.plan import Branch, Loop, Sync, walk

rng = np.random.default_rng(11)


def greedy_decode(tokens, E, W):
    """Each step: the last token's embedding row, a GEMV, the argmax of its 48 logits (a uniform op), the token
    stored into the output."""
    def body(carry):
        step, tok, out = carry
        logits = gnp.tanh(gnp.take(E, tok, axis=0)) @ W
        tok = gnp.argmax(logits).astype(gdsl.int32)
        return step + 1, tok, out.at[step].set(tok)
    zero = gnp.zeros((), dtype=gdsl.int32)
    return gdsl.while_loop(lambda c: c[0] < tokens.shape[0], body, (zero, zero, tokens))


def recurrence(h, W):
    """The next step's matmul reads the carry that the step's last op wrote on other vEUs."""
    return gdsl.fori_loop(0, 5, lambda i, h: gnp.tanh(h @ W), h)


def decode_twice(tokens, E, W):
    """greedy_decode inside another loop whose body has a grid barrier after it: the exit is followed to there."""
    return gdsl.fori_loop(0, 2, lambda i, t: greedy_decode(t, E, W)[2] + 1, tokens)


def decode_if(flag, tokens, E, W):
    """greedy_decode last in a branch: its exit is not followed, a grid barrier goes after it."""
    return gdsl.cond(flag > 0, lambda t: greedy_decode(t, E, W)[2], lambda t: t + 1, tokens)


ARGS = {greedy_decode: (np.zeros(7, np.int32), rng.standard_normal((48, 32)).astype(np.float32),
                        rng.standard_normal((32, 48)).astype(np.float32)),
        recurrence: (rng.standard_normal((1, 64)).astype(np.float32),
                     (rng.standard_normal((64, 64)) / 8).astype(np.float32)),
        decode_twice: (np.zeros(7, np.int32), rng.standard_normal((48, 32)).astype(np.float32),
                       rng.standard_normal((32, 48)).astype(np.float32))}
ARGS[decode_if] = (np.int32(1),) + ARGS[greedy_decode]


def _loops(plan) -> list:
    return [s for s in walk(plan.kernels[0].body) if isinstance(s, Loop)]


def _last_barrier(loop) -> str:
    return [s for s in loop.body if isinstance(s, Sync)][-1].scope


def _plans(fn, monkeypatch):
    """fn's device plan (16 vEUs, uniform reductions) without and with the pass."""
    program = gdsl.make_ir(fn)(*ARGS[fn])
    monkeypatch.setattr(backedge, "DEMOTE_BACK_EDGES", False)
    before = schedule(program, grid=16, uniform_reductions=True)
    monkeypatch.setattr(backedge, "DEMOTE_BACK_EDGES", True)
    return before, schedule(program, grid=16, uniform_reductions=True)


def test_a_step_ending_in_a_window_store_ends_in_a_block_barrier(monkeypatch):
    before, after = _plans(greedy_decode, monkeypatch)
    (loop_before,), (loop_after,) = _loops(before), _loops(after)
    assert _last_barrier(loop_before) == "grid" and _last_barrier(loop_after) == "block"
    assert after.stats["grid_syncs"] == before.stats["grid_syncs"] - 1
    assert after.stats["block_syncs"] == before.stats["block_syncs"] + 1
    assert len(after.kernels[0].body) == len(before.kernels[0].body)      # (its exit needs no barrier)


def test_a_carry_read_by_other_veus_keeps_its_grid_barrier(monkeypatch):
    before, after = _plans(recurrence, monkeypatch)
    assert _last_barrier(_loops(after)[0]) == "grid"
    assert after.stats == before.stats


def test_an_inner_loops_exit_is_followed_to_the_next_grid_barrier(monkeypatch):
    before, after = _plans(decode_twice, monkeypatch)
    outer, inner = _loops(after)
    assert _last_barrier(inner) == "block" and _last_barrier(_loops(before)[1]) == "grid"
    assert _last_barrier(outer) == "grid"     # (its last segment holds the inner loop: not followed)
    assert after.stats["grid_syncs"] == before.stats["grid_syncs"] - 1


def test_a_loop_last_in_a_branch_gets_a_grid_barrier_after_it(monkeypatch):
    before, after = _plans(decode_if, monkeypatch)
    (loop,) = _loops(after)
    assert _last_barrier(loop) == "block"
    case = next(b for b in walk(after.kernels[0].body) if isinstance(b, Branch)).branches[1]
    assert isinstance(case[-1], Sync) and case[-1].always_grid and case[-2] is loop
    assert after.stats["grid_syncs"] == before.stats["grid_syncs"]       # (one a step -> one after the loop)


@pytest.mark.parametrize("fn", list(ARGS), ids=lambda f: f.__name__)
def test_simulated_plans_compute_what_the_interpreter_does(fn):
    check_plan(fn, *ARGS[fn], controls=("device",), grids=(1, 3, 16), seeds=(0, 1, 2), uniform_reductions=True)


@needs_cxx
@pytest.mark.parametrize("fn", [greedy_decode, decode_twice, decode_if], ids=lambda f: f.__name__)
def test_emulated(fn):
    check_emulated(fn, *ARGS[fn], grids=(1, 3))


@needs_nvrtc
def test_cuda_source_compiles():
    lowered = cuda_lowering(greedy_decode, ARGS[greedy_decode], grid=16)
    assert _last_barrier(_loops(lowered.plan)[0]) == "block"
    assert cuda_toolchain.compile_cuda(lowered.source, "sm_90")[:4] == b"\x7fELF"
