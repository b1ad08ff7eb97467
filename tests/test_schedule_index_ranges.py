"""The option index_ranges=True (gdsl/schedule/ranges.py): `where(i < 0, i + n, i)`, the wrap of negative
indices that `gnp.take` adds, goes when `i` is never negative (an argmax, carried through a loop). Checked: the
equations left, the simplified program against the original on the interpreter, plans on the simulator, the
g++ emulator (Seq2seq's small model against its float64 reference) and Seq2seq's full-size plan at batch 64."""
import numpy as np
import pytest
from strategies import (
    BACKEND_TOLERANCE,
    assert_trees_close,
    emulated_model_mismatches,
    first_loop,
    needs_cxx,
    zoo_lowered,
)
from test_schedule import _flat_args, check_plan

import gdsl
import gdsl.numpy as gnp
from gdsl.core.ir import walk_eqns
from gdsl.interpreter import run_program
from gdsl.primitives.elementwise import select_p
from gdsl.schedule.plan import Wave
from gdsl.schedule.ranges import drop_index_wraps

rng = np.random.default_rng(9)


def greedy(h, W, emb):
    """The token: an argmax carried to the next step's embedding gather (never negative)."""
    def step(t, carry):
        tok, h = carry
        h = gnp.tanh(h * 0.5 + gnp.take(emb, tok, axis=0))
        return gnp.argmax(h @ W, axis=1).astype(gdsl.int32), h
    return gdsl.fori_loop(0, 4, step, (gnp.full((h.shape[0],), 2, dtype=gdsl.int32), h))


def shifted(h, W, emb):
    """The carry is an argmax minus one: it may be negative (the wrap stays)."""
    def step(t, carry):
        tok, h = carry
        h = gnp.tanh(h * 0.5 + gnp.take(emb, tok, axis=0))
        return gnp.argmax(h @ W, axis=1).astype(gdsl.int32) - 1, h
    return gdsl.fori_loop(0, 4, step, (gnp.full((h.shape[0],), 2, dtype=gdsl.int32), h))


def starts_negative(h, W, emb):
    """The carry starts at -1 (the last row): the wrap stays."""
    def step(t, carry):
        tok, h = carry
        h = gnp.tanh(h * 0.5 + gnp.take(emb, tok, axis=0))
        return gnp.argmax(h @ W, axis=1).astype(gdsl.int32), h
    return gdsl.fori_loop(0, 4, step, (gnp.full((h.shape[0],), -1, dtype=gdsl.int32), h))


def given_index(emb, idx):
    """An index given by the caller: nothing is known, the wrap stays."""
    return gnp.take(emb, idx, axis=0)


ARGS = {greedy: (rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((8, 30)).astype(np.float32),
                 rng.standard_normal((30, 8)).astype(np.float32))}
ARGS[shifted] = ARGS[starts_negative] = ARGS[greedy]
ARGS[given_index] = (rng.standard_normal((30, 8)).astype(np.float32), np.array([3, -2, 29], np.int32))
DROPPED = {greedy}


def _selects(program) -> int:
    return sum(1 for eqn in walk_eqns(program.jaxpr) if eqn.primitive is select_p)


@pytest.mark.parametrize("fn", list(ARGS), ids=lambda f: f.__name__)
def test_the_wrap_goes_only_where_the_index_is_never_negative(fn):
    program = gdsl.make_ir(fn)(*ARGS[fn])
    simplified = drop_index_wraps(program)
    if fn in DROPPED:
        assert _selects(simplified) == _selects(program) - 1
    else:
        assert simplified is program
    flat = _flat_args(ARGS[fn])
    for got, expected in zip(run_program(simplified, flat), run_program(program, flat), strict=True):
        assert np.array_equal(got, expected)          # (the same arithmetic: bit for bit)


@pytest.mark.parametrize("fn", list(ARGS), ids=lambda f: f.__name__)
def test_simulated_plans_compute_what_the_interpreter_does(fn):
    check_plan(fn, *ARGS[fn], views=(), index_ranges=True)


def test_seq2seq_batch_64_gathers_its_embedding_a_wave_earlier():
    """At full size (rendered for CUDA, no GPU needed): the wrap was a wave of its own before the gather."""
    waves = []
    for option in (False, None):                  # (on by default)
        loop = first_loop(zoo_lowered("seq2seq", 64, index_ranges=option).lowering.plan)
        waves.append(sum(isinstance(s, Wave) for s in loop.body))
    assert waves[1] == waves[0] - 1


@needs_cxx
@pytest.mark.parametrize("batch", [1, 5])
def test_emulated_seq2seq_matches_its_reference(batch):
    assert emulated_model_mismatches("seq2seq", batch, grid=8, block=64, index_ranges=True) == []


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
def test_other_backends_accept_the_option(backend):
    fn = gdsl.jit(greedy, backend=backend, index_ranges=True)
    expected = run_program(gdsl.make_ir(greedy)(*ARGS[greedy]), _flat_args(ARGS[greedy]))
    assert_trees_close(list(fn(*ARGS[greedy])), expected, tolerance=BACKEND_TOLERANCE)
