"""Loop-invariant code motion (gdsl/schedule/licm.py): what reads only loop invariants leaves the loop, level by
level in nested loops; the program still typechecks and computes what it computed; the plan shows no op inside a
loop that reads only invariants."""
import numpy as np
from test_schedule import check_plan

import gdsl
import gdsl.numpy as gnp
from gdsl.core.ir import walk_eqns
from gdsl.core.typecheck import typecheck_program
from gdsl.interpreter import run_program
from gdsl.primitives.control import while_p
from gdsl.schedule import schedule
from gdsl.schedule.licm import hoist_program
from gdsl.schedule.plan import Loop, Wave

rng = np.random.default_rng(3)


def _loops(program):
    return [e for e in walk_eqns(program.jaxpr) if e.primitive is while_p]


def _body_eqn_names(loop_eqn):
    return [e.primitive.name for e in loop_eqn.params["body_jaxpr"].eqns]


def weights_in_loop(x, W, b):
    """The weight slices, their transpose and the bias sum read only invariants; `h @ Wt` does not."""
    def step(i, h):
        Wt = W[1].T
        bias = b[0] + b[1]
        return gnp.tanh(h @ Wt + bias)
    return gdsl.fori_loop(0, 4, step, x)


def nested(x, W):
    """`W * 2` is invariant in both loops, `tanh(W * 2 + t)` only in the inner one (t: the outer counter)."""
    def outer(t, h):
        tf = gnp.asarray(t, gdsl.float32)
        def inner(i, g):
            return g @ gnp.tanh(W * 2.0 + tf) * 0.5
        return gdsl.fori_loop(0, 3, inner, h)
    return gdsl.fori_loop(0, 2, outer, x)


def in_condition(x, limit):
    return gdsl.while_loop(lambda c: c.sum() < (limit * 2.0).sum(), lambda c: c + 1.0, x)


ARGS = {
    weights_in_loop: (rng.standard_normal((1, 8)).astype(np.float32),
                      (rng.standard_normal((2, 8, 8)) * 0.3).astype(np.float32),
                      rng.standard_normal((2, 8)).astype(np.float32)),
    nested: (rng.standard_normal((1, 4)).astype(np.float32), (rng.standard_normal((4, 4)) * 0.3).astype(np.float32)),
    in_condition: (np.zeros(3, np.float32), np.full(3, 4.0, np.float32)),
}


def _hoisted(fn):
    program = gdsl.make_ir(fn)(*ARGS[fn])
    hoisted = hoist_program(program)
    typecheck_program(hoisted)
    flat = [np.asarray(a) for a in ARGS[fn]]
    for got, want in zip(run_program(hoisted, flat), run_program(program, flat)):
        np.testing.assert_array_equal(got, want)
    return program, hoisted


def test_invariants_leave_the_loop():
    program, hoisted = _hoisted(weights_in_loop)
    (before,), (after,) = _loops(program), _loops(hoisted)
    assert len(after.params["body_jaxpr"].eqns) < len(before.params["body_jaxpr"].eqns)
    body = after.params["body_jaxpr"]
    consts = set(body.in_binders[:after.params["body_nconsts"]])
    for eqn in body.eqns:      # nothing left in the body reads only consts and literals
        assert any(isinstance(a, gdsl.core.ir.Var) and a not in consts for a in eqn.inputs), eqn.primitive.name
    assert "matmul" in _body_eqn_names(after) and "transpose" not in _body_eqn_names(after)


def test_nested_loops_hoist_level_by_level():
    program, hoisted = _hoisted(nested)
    outer, inner = _loops(hoisted)
    assert "mul" not in _body_eqn_names(outer)                    # W * 2: out of both loops
    assert _body_eqn_names(inner).count("mul") == 1              # (what stays: the carry's `* 0.5`)
    assert "tanh" in _body_eqn_names(outer) and "tanh" not in _body_eqn_names(inner)   # out of the inner only
    assert any(e.primitive.name == "mul" for e in hoisted.jaxpr.eqns)


def test_condition_invariants_leave_the_loop():
    _, hoisted = _hoisted(in_condition)
    (loop,) = _loops(hoisted)
    assert "mul" not in [e.primitive.name for e in loop.params["cond_jaxpr"].eqns]


def test_nothing_to_hoist_keeps_the_program():
    program = gdsl.make_ir(lambda x: gdsl.fori_loop(0, 3, lambda i, h: h * 2.0, x))(np.ones(2, np.float32))
    assert hoist_program(program) is program


def _ops_in_loops(stmts, inside=False):
    for s in stmts:
        if isinstance(s, Wave) and inside:
            yield from (t.op for t in s.tasks)
        elif isinstance(s, Loop):
            yield from _ops_in_loops(s.cond + s.body, True)


def test_plans_compute_the_same_and_show_no_invariant_op_in_the_loop():
    for fn, args in ARGS.items():
        check_plan(fn, *args)
    plan = schedule(gdsl.make_ir(weights_in_loop)(*ARGS[weights_in_loop]), grid=16)
    kinds = [op.kind for op in _ops_in_loops(plan.kernels[0].body)]
    assert "matmul" in kinds and not {"slice", "transpose"} & set(kinds)
