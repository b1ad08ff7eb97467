"""The grid barrier after uniform ops that read a buffer (every vEU reads it: Scheduler._after_uniform_reads)
goes when a grid barrier comes first on every path to the next write of that buffer
(_covered_read_barriers): in a loop's body, and in its condition (Seq2seq at batch 64: the exit test reads the
maximum of the tokens, which only the next condition writes again, after the body's barriers). Checked
against the interpreter on the plan simulator, whose race checks see a write before every vEU has read."""
import numpy as np
import pytest
from strategies import needs_cxx
from test_schedule import check_emulated, check_plan

import gdsl
import gdsl.numpy as gnp
from gdsl.schedule import schedule
from gdsl.schedule.plan import Loop, Sync, Uniforms, walk


def sum_below(x):
    """The condition reads a reduction of the carry (a buffer of its own, written only by the condition)."""
    return gdsl.while_loop(lambda v: gnp.sum(v) < 1000.0, lambda v: v * 2.0 + 1.0, x)


def first_below(x):
    """The condition reads the carry itself, which the body's first wave overwrites: the barrier stays."""
    return gdsl.while_loop(lambda v: v[3] < 1000.0, lambda v: v * 2.0 + 1.0, x)


def nested_sum_below(x):
    """The same condition in an inner loop (what follows the inner loop is not known there: kept)."""
    return gdsl.fori_loop(0, 2, lambda i, v: sum_below(v) * 0.5, x)


ARGS = {sum_below: (np.ones(40, np.float32),), first_below: (np.ones(40, np.float32),),
        nested_sum_below: (np.ones(40, np.float32),)}


def _condition_syncs_after_reads(plan) -> int:
    """The grid barriers that follow a uniform op in the condition of the plan's first loop."""
    loop = next(s for k in plan.kernels for s in walk(k.body) if isinstance(s, Loop))
    cond = list(loop.cond)
    return sum(1 for before, stmt in zip(cond, cond[1:])
               if isinstance(before, Uniforms) and isinstance(stmt, Sync) and stmt.scope == "grid")


@pytest.mark.parametrize("fn", list(ARGS), ids=lambda f: f.__name__)
def test_simulated_plans_compute_what_the_interpreter_does(fn):
    check_plan(fn, *ARGS[fn], controls=("device",), seeds=(0, 1), views=())


def test_a_condition_s_read_of_its_own_reduction_needs_no_barrier_after_it():
    plan = schedule(gdsl.make_ir(sum_below)(*ARGS[sum_below]), grid=16)
    assert _condition_syncs_after_reads(plan) == 0


def test_a_condition_s_read_of_what_the_body_overwrites_keeps_its_barrier():
    plan = schedule(gdsl.make_ir(first_below)(*ARGS[first_below]), grid=16)
    assert _condition_syncs_after_reads(plan) == 1


@needs_cxx
@pytest.mark.parametrize("fn", list(ARGS), ids=lambda f: f.__name__)
def test_emulated_plans_match_the_interpreter(fn):
    check_emulated(fn, *ARGS[fn])
