"""The option uniform_reductions=True: a reduction to one element of up to UNIFORM_REDUCTION_MAX_INPUT elements
is a uniform op (every vEU computes it: no op, no wave, no grid barrier) instead of only up to UNIFORM_MAX_INPUT.
Seq2seq's exit test at batch 64 (the maximum of 64 tokens) then runs no wave. Checked against the interpreter on
the plan simulator (its race checks see a uniform op read before every vEU may read, or a write before every
vEU has read), on the g++ emulator, and compiled with NVRTC."""
import numpy as np
import pytest
from strategies import (
    BACKEND_TOLERANCE,
    assert_trees_close,
    emulated_model_mismatches,
    first_loop,
    needs_cxx,
    needs_nvrtc,
    zoo_lowered,
)
from test_schedule import _flat_args, check_emulated, check_plan

import gdsl
import gdsl.numpy as gnp
from gdsl.interpreter import run_program
from gdsl.schedule import schedule
from gdsl.schedule.plan import Loop, Sync, Uniforms, Wave, walk
from gdsl.schedule.scheduler import UNIFORM_MAX_INPUT, UNIFORM_REDUCTION_MAX_INPUT

rng = np.random.default_rng(5)


def doubling_until_large(x):
    """The exit test reduces the carry (40 elements: an op by default, a uniform op with the option)."""
    return gdsl.while_loop(lambda v: gnp.max(v) < 1000.0, lambda v: v * 2.0 + 1.0, x)


def tokens_until_end(tokens, W):
    """Seq2seq's shape: the exit test reads the maximum of the tokens that the previous step's argmax wrote."""
    def keep_going(carry):
        step, tok, _ = carry
        return (gnp.max(tok) > 0) & (step < tokens.shape[0])

    def body(carry):
        step, tok, tokens = carry
        tok = gnp.argmax(gnp.take(W, tok, axis=0), axis=1).astype(gdsl.int32)
        return step + 1, tok, tokens.at[step].set(tok)
    return gdsl.while_loop(keep_going, body, (gnp.zeros((), dtype=gdsl.int32),
                                              gnp.ones((tokens.shape[1],), dtype=gdsl.int32), tokens))


def too_wide(x):
    """More elements than UNIFORM_REDUCTION_MAX_INPUT: the reduction stays an op."""
    return gdsl.while_loop(lambda v: gnp.sum(v) < 1000.0, lambda v: v * 2.0 + 1.0, x)


ARGS = {doubling_until_large: (rng.random(40).astype(np.float32),),
        tokens_until_end: (np.zeros((6, 48), np.int32), rng.standard_normal((30, 30)).astype(np.float32)),
        too_wide: (rng.random(UNIFORM_REDUCTION_MAX_INPUT + 1).astype(np.float32),)}


def _condition_waves(plan) -> int:
    loop = next(s for k in plan.kernels for s in walk(k.body) if isinstance(s, Loop))
    return sum(isinstance(s, Wave) for s in walk(loop.cond))


@pytest.mark.parametrize("fn", list(ARGS), ids=lambda f: f.__name__)
def test_simulated_plans_compute_what_the_interpreter_does(fn):
    check_plan(fn, *ARGS[fn], controls=("device",), seeds=(0, 1), views=(), uniform_reductions=True)


@pytest.mark.parametrize("fn", list(ARGS), ids=lambda f: f.__name__)
def test_the_exit_test_runs_no_wave_with_the_option(fn):
    program = gdsl.make_ir(fn)(*ARGS[fn])
    plain, wide = schedule(program, grid=16), schedule(program, grid=16, uniform_reductions=True)
    assert _condition_waves(plain) == 1
    assert _condition_waves(wide) == (1 if fn is too_wide else 0)
    assert 16 == UNIFORM_MAX_INPUT < UNIFORM_REDUCTION_MAX_INPUT


def test_seq2seq_batch_64_exit_test_is_uniform():
    """At full size (rendered for CUDA, no GPU needed): the condition's wave and its grid barrier go."""
    counts = []
    for option in (False, None):                  # (on by default)
        loop = first_loop(zoo_lowered("seq2seq", 64, uniform_reductions=option).lowering.plan)
        counts.append((sum(isinstance(s, Wave) for s in loop.cond), sum(isinstance(s, Sync) for s in loop.cond),
                       sum(isinstance(s, Uniforms) for s in loop.cond)))
    assert counts[0][:2] == (1, 1) and counts[1][:2] == (0, 0)


@needs_cxx
@pytest.mark.parametrize("fn", list(ARGS), ids=lambda f: f.__name__)
def test_emulated_plans_match_the_interpreter(fn):
    check_emulated(fn, *ARGS[fn], uniform_reductions=True)


@needs_cxx
@pytest.mark.parametrize("batch", [5])
def test_emulated_seq2seq_matches_its_reference(batch):
    assert emulated_model_mismatches("seq2seq", batch, grid=8, block=64, uniform_reductions=True) == []


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
def test_other_backends_accept_the_option(backend):
    fn = gdsl.jit(doubling_until_large, backend=backend, uniform_reductions=True)
    expected = run_program(gdsl.make_ir(doubling_until_large)(*ARGS[doubling_until_large]),
                           _flat_args(ARGS[doubling_until_large]))
    assert_trees_close([np.asarray(fn(*ARGS[doubling_until_large]))], expected, tolerance=BACKEND_TOLERANCE)


@needs_nvrtc
def test_uniform_reductions_compile_with_nvrtc():
    from gdsl.backends.cfamily.lower import check_options, lower_with_grid
    from gdsl.backends.cuda import toolchain as cuda_toolchain
    from gdsl.backends.cuda.dialect import CUDADialect
    dialect = CUDADialect()
    opts = check_options({"control": "device", "block": 256, "barrier": "atomic", "uniform_reductions": True},
                         dialect)
    lowering = lower_with_grid(gdsl.make_ir(tokens_until_end)(*ARGS[tokens_until_end]), opts, 132, dialect)
    assert _condition_waves(lowering.plan) == 0
    assert cuda_toolchain.compile_cuda(lowering.source, "sm_90")[:4] == b"\x7fELF"
