"""Base cases at the call site (gdsl/schedule/peel.py, the scheduler option `peel`): each call of a recursive
function from its own body becomes the function's branch on the argument, the base branches written out and
the call kept for the others. RAE's leaves cost no call: the caller copies x[leaf] into the frame where the
callee would have left its result, and reads it there as before.

Checked: the IR pass against the interpreter (and its typecheck), the plan's shape (no Call reaches a leaf,
the leaves' copies at the call site in the callee's frame, the grid barriers per node unchanged, the depth
check kept on every backend), the simulator's race checks on random trees, the cpu backend, the emulator,
and what is not eligible."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import needs_cxx
from test_schedule_recursion import (
    CHAIN,
    chain,
    check_simulated,
    encoder,
    encoder_args,
    flat_args,
    height,
    rae_case,
    shapes,
)

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import emulator
from gdsl.core.ir import Jaxpr, Var, walk_eqns
from gdsl.core.typecheck import typecheck_program
from gdsl.interpreter import run_program
from gdsl.primitives.control import cond_p, recurse_call_p
from gdsl.primitives.registry import CONTROL
from gdsl.schedule import peel, schedule
from gdsl.schedule.plan import Branch, Call, Wave, walk


def peeled_conds(program):
    return [e for e in walk_eqns(program.jaxpr) if e.primitive is cond_p and e.params.get("peeled")]


def test_each_call_in_the_body_becomes_a_branch_with_the_leaf_written_out():
    program = gdsl.make_ir(encoder(8))(*encoder_args(((None, None), None)))
    peeled = peel.peel_program(program)
    typecheck_program(peeled)
    conds = peeled_conds(peeled)
    assert len(conds) == 2 and {c.params["peeled"] for c in conds} == {"encode"}
    for cond in conds:
        base, call = cond.params["branches"][1], cond.params["branches"][0]    # (index: the leaf flag)
        assert [e.primitive for e in call.eqns] == [recurse_call_p]
        assert all(e.primitive.family != CONTROL for e in base.eqns)


@settings(max_examples=20, deadline=None)
@given(tree=shapes(), seed=st.integers(0, 2**16))
def test_the_interpreter_gives_the_same_result(tree, seed):
    args = encoder_args(tree, seed)
    program = gdsl.make_ir(encoder(height(tree) + 1))(*args)
    np.testing.assert_array_equal(run_program(peel.peel_program(program), flat_args(args))[0],
                                  run_program(program, flat_args(args))[0])


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_leaf_one_frame_too_deep_still_raises(side):
    """A chain of 5 inner nodes: its leaves are calls at depth 6. With max_depth 5 the call of a leaf from the
    deepest node raises though no frame is pushed for it (the branch's depth check): in the interpreter on
    the peeled IR, the simulator, the cpu backend (both controls)."""
    args = encoder_args(chain(5, side))
    program = gdsl.make_ir(encoder(5))(*args)
    with pytest.raises(gdsl.RecursionDepthError):
        run_program(peel.peel_program(program), flat_args(args))
    check_simulated(encoder(5), args)            # (both controls: the simulator raises where the interpreter does)
    for control in ("device", "host"):
        with pytest.raises(gdsl.RecursionDepthError):
            gdsl.jit(encoder(5), backend="cpu", control=control)(*args)
        got = gdsl.jit(encoder(6), backend="cpu", control=control)(*args)
        expected = run_program(gdsl.make_ir(encoder(6))(*args), flat_args(args))[0]
        np.testing.assert_allclose(gdsl.to_numpy(got), expected, rtol=1e-5, atol=1e-5)


def test_rae_leaves_are_written_at_the_call_site_into_the_callees_frame():
    """RAE at full size: no Call for a leaf; each of the node's two leaf copies writes the result frame of the
    call it stands for (one and two frames deeper) and runs aside, on one vEU; one grid barrier per inner
    node and the root's last, as with the leaves called."""
    from models import floor
    program, flat, _, _ = rae_case()
    plan = schedule(program, grid=132, epilogues=CHAIN)
    (fn,) = plan.functions
    branches = [s for s in walk(fn.body) if isinstance(s, Branch) and s.depth_of == fn.name]
    assert len(branches) == 2
    copies = [s for b in branches for case in b.branches for s in case if isinstance(s, Wave)]
    calls = [s for b in branches for case in b.branches for s in case if isinstance(s, Call)]
    assert [c.step for c in calls] == [1, 2]
    assert [(w.tasks[0].op.outputs[0].storage, w.tasks[0].op.outputs[0].frame_offset) for w in copies] == \
        [(fn.results[0].storage, 1), (fn.results[0].storage, 2)]
    assert len({(w.tasks[0].first, w.tasks[0].count) for w in copies}) == 1 and copies[0].tasks[0].first >= 32
    unpeeled = schedule(program, grid=132, epilogues=CHAIN, peel=False)
    count, before = floor.count_plan(plan, flat), floor.count_plan(unpeeled, flat)
    assert count.grid_barriers == before.grid_barriers == 33
    assert "(a call of encode: its depth checked)" in str(plan)


@settings(max_examples=15, deadline=None)
@given(tree=shapes(), seed=st.integers(0, 2**16))
def test_random_trees_simulated_wide(tree, seed):
    """At a width whose matmul takes several vEUs (grid barriers matter), race checks included."""
    check_simulated(encoder(height(tree) + 1, 64), encoder_args_wide(tree, seed), grids=(3, 16), epilogues=CHAIN)


def encoder_args_wide(tree, seed):
    from test_schedule_recursion import tree_arrays
    rng = np.random.default_rng(seed)
    left, right, is_leaf, root = tree_arrays(tree)
    return (rng.uniform(-1, 1, (len(left), 64)).astype(np.float32),
            (rng.standard_normal((128, 64)) / np.sqrt(128)).astype(np.float32),
            (0.1 * rng.standard_normal(64)).astype(np.float32), left, right, is_leaf, root)


@needs_cxx
def test_emulated():
    args = encoder_args(((None, (None, None)), None))
    expected = run_program(gdsl.make_ir(encoder(8))(*args), flat_args(args))[0]
    np.testing.assert_allclose(emulator.emulate(encoder(8), *args, grid=3, block=32), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(gdsl.RecursionDepthError):
        emulator.emulate(encoder(2), *args, grid=3, block=32)


def not_last(max_depth=8):
    """The body's result is computed after its cond: not eligible."""
    def program(x, k):
        @gdsl.recurse(result=gdsl.ShapeDtype((4,), gdsl.float32), max_depth=max_depth)
        def f(v, n):
            return gdsl.cond(n <= 0, lambda: v, lambda: f(v * 0.5, n - 1)) + 1.0
        return f(x, k)
    return program


def looping_base(max_depth=8):
    """The base branch has a loop: not written out at the call sites."""
    def program(x, k):
        @gdsl.recurse(result=gdsl.ShapeDtype((4,), gdsl.float32), max_depth=max_depth)
        def f(v, n):
            return gdsl.cond(n <= 0, lambda: gdsl.fori_loop(0, 3, lambda i, a: a * 2.0, v),
                             lambda: f(v * 0.5, n - 1) + 1.0)
        return f(x, k)
    return program


@pytest.mark.parametrize("fn", [not_last, looping_base])
def test_not_eligible_stays(fn):
    args = (np.arange(4, dtype=np.float32), np.int32(3))
    program = gdsl.make_ir(fn())(*args)
    assert peel.peel_program(program) is program
    check_simulated(fn(), args)


def test_a_base_case_with_several_equations_and_the_option_off():
    """A base branch of several equations (a leaf `tanh(v) * 2`) is written out; `peel=False` keeps the calls."""
    def fn(x, k):
        @gdsl.recurse(result=gdsl.ShapeDtype((4,), gdsl.float32), max_depth=8)
        def f(v, n):
            return gdsl.cond(n <= 0, lambda: gnp.tanh(v) * 2.0, lambda: f(v * 0.5, n - 1) + v)
        return f(x, k)
    args = (np.linspace(-1, 1, 4, dtype=np.float32), np.int32(4))
    program = gdsl.make_ir(fn)(*args)
    assert len(peeled_conds(peel.peel_program(program))) == 1
    check_simulated(fn, args)
    assert not any(isinstance(s, Branch) and s.depth_of for f in schedule(program, peel=False).functions
                   for s in walk(f.body))


def test_a_function_entered_twice():
    """Two entries of one recursive function from the program (each traced as a function of its own): both
    peeled, and a FunctionDef that two equations share would be peeled once (one object for both)."""
    from gdsl.primitives.control import recurse_p

    def fn(x, y, k):
        @gdsl.recurse(result=gdsl.ShapeDtype((4,), gdsl.float32), max_depth=8)
        def f(v, n):
            return gdsl.cond(n <= 0, lambda: v * 2.0, lambda: f(v * 0.5, n - 1) + v)
        return f(x, k) + f(y, k)
    args = (np.arange(4, dtype=np.float32), np.ones(4, np.float32), np.int32(3))
    program = gdsl.make_ir(fn)(*args)
    peeled = peel.peel_program(program)
    entries = [e for e in walk_eqns(peeled.jaxpr) if e.primitive is recurse_p]
    assert len(entries) == 2 and len(peeled_conds(peeled)) == 2
    shared = next(e for e in program.jaxpr.eqns if e.primitive is recurse_p)
    second = dataclasses.replace(shared, outs=(Var(shared.outs[0].aval),))
    twice = dataclasses.replace(program, jaxpr=Jaxpr(program.jaxpr.in_binders, (shared, second), shared.outs))
    fns = [e.params["fn"] for e in walk_eqns(peel.peel_program(twice).jaxpr) if e.primitive is recurse_p]
    assert len(fns) == 2 and fns[0] is fns[1]
    check_simulated(fn, args)
