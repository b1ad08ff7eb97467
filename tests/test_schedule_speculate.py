"""Speculation (gdsl/schedule/speculate.py): small work on the program's inputs leaves its branches, in
front of the cond (and out of a loop around it, by LICM after it); work on values the program computes, and
large work, stays; the program still typechecks and computes what it computed; in the plan, the branch no
longer starts with a wave of its own."""
import numpy as np
import pytest
from test_schedule import check_plan

import gdsl
import gdsl.numpy as gnp
from gdsl.core.ir import Var, walk_eqns
from gdsl.core.typecheck import typecheck_program
from gdsl.interpreter import run_program
from gdsl.primitives.control import cond_p, while_p
from gdsl.schedule import schedule, speculate
from gdsl.schedule.licm import hoist_program
from gdsl.schedule.plan import Branch, Wave

rng = np.random.default_rng(5)


def gated_block(x, gamma, var, W, gate):
    """A gated residual block: the batch norm's scale folded into the weights reads only inputs; the matmul
    reads x."""
    def run(x):
        scale = gamma / gnp.sqrt(var + 1e-5)
        return gnp.maximum(x @ (W * scale), 0.0) + x
    x = gnp.tanh(x)                        # (the stem: the kernel's first wave, which the scale joins)
    return gdsl.cond(gate.sum() > 0, run, lambda x: x, x)


def no_first_wave(x, gamma, var, W, gate):
    """The same block with nothing before the cond: the scale would be a wave of its own on both paths."""
    def run(x):
        return gnp.maximum(x @ (W * (gamma / gnp.sqrt(var + 1e-5))), 0.0) + x
    return gdsl.cond(gate.sum() > 0, run, lambda x: x, x)


def returned(x, gamma, gate):
    """`gamma * 2` is a result of its branch: moved out, the branch would copy it where it computed it."""
    x = gnp.tanh(x)
    return gdsl.cond(gate.sum() > 0, lambda x, g: (x, g * 2.0), lambda x, g: (x + 1.0, g), x, gamma)


def computed_operand(x, gamma, W, gate):
    """`gamma * s` reads `s`, which the program computes from x: it stays in the branch."""
    x = gnp.tanh(x)
    s = x.sum()

    def run(x):
        return x @ W * (gamma * s)
    return gdsl.cond(gate.sum() > 0, run, lambda x: x, x)


def large(x, big, gate):
    """`big * 2` has more elements than speculate.MAX_ELEMENTS: it stays in the branch."""
    x = gnp.tanh(x)
    return gdsl.cond(gate.sum() > 0, lambda x: x + (big * 2.0).sum(), lambda x: x, x)


def reads_a_result(h, m, W):
    """`sigmoid(h * 2) - 0.5` is a branch result and stays; so does what reads it (found by hypothesis: the
    reader was moved out, reading a variable of the branch); `h * 2` and its sigmoid move."""
    m = gnp.tanh(m @ W)

    def second(h, m):
        h = gdsl.nn.sigmoid(h * 2.0) - 0.5
        return h, gnp.tanh(m + gnp.expand_dims(h, 0) * 0.5)
    return gdsl.cond(h.sum() > 0, lambda h, m: (gnp.tanh(h), m), second, h, m)


def in_loop(x, gamma, var, W, gates):
    """A gated block in a loop: its scale leaves the cond, then the loop."""
    def step(i, h):
        def run(h):
            return gnp.tanh(h @ W * (gamma / gnp.sqrt(var + 1e-5)))
        return gdsl.cond(gates[i] > 0, run, lambda h: h, h)
    return gdsl.fori_loop(0, 4, step, x)


def nested(x, gamma, W, gates):
    """The inner branch's scale leaves both conds."""
    def outer(x):
        return gdsl.cond(gates[1] > 0, lambda x: x @ W * (gamma * 3.0), lambda x: x - 1.0, x)
    return gdsl.cond(gates[0] > 0, outer, lambda x: x, gnp.tanh(x))


def _f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


ARGS = {
    gated_block: (_f32(2, 8), _f32(8), np.abs(_f32(8)), _f32(8, 8) * 0.3, np.ones(3, np.float32)),
    computed_operand: (_f32(2, 8), _f32(8), _f32(8, 8) * 0.3, np.ones(3, np.float32)),
    large: (_f32(2, 8), _f32(speculate.MAX_ELEMENTS + 1), np.ones(3, np.float32)),
    reads_a_result: (np.array([-0.5], np.float32), _f32(2, 1), _f32(1, 1)),
    no_first_wave: (_f32(2, 8), _f32(8), np.abs(_f32(8)), _f32(8, 8) * 0.3, np.ones(3, np.float32)),
    returned: (_f32(2, 8), _f32(8), np.ones(3, np.float32)),
    in_loop: (_f32(1, 8), _f32(8), np.abs(_f32(8)), _f32(8, 8) * 0.3, np.array([1, 0, 1, 1], np.float32)),
    nested: (_f32(2, 8), _f32(8), _f32(8, 8) * 0.3, np.ones(2, np.float32)),
}


def _speculated(fn):
    program = gdsl.make_ir(fn)(*ARGS[fn])
    moved = speculate.hoist_branches(program)
    typecheck_program(moved)
    flat = [np.asarray(a) for a in ARGS[fn]]
    for got, want in zip(run_program(moved, flat), run_program(program, flat)):
        np.testing.assert_array_equal(got, want)
    return program, moved


def _branch_prims(program):
    """The primitive names of every branch's own equations (not nested deeper), per cond, outermost first."""
    conds = [e for e in walk_eqns(program.jaxpr) if e.primitive is cond_p]
    return [[sorted(e.primitive.name for e in b.eqns) for b in c.params["branches"]] for c in conds]


def test_static_work_leaves_the_branch():
    program, moved = _speculated(gated_block)
    (before,), (after,) = _branch_prims(program), _branch_prims(moved)
    assert "sqrt" in before[1] and "sqrt" not in after[1] and "div" not in after[1]
    assert "matmul" in after[1]
    top = [e.primitive.name for e in moved.jaxpr.eqns]
    assert top.index("sqrt") < top.index("cond")
    cond = next(e for e in moved.jaxpr.eqns if e.primitive is cond_p)
    assert len(cond.inputs) > len(next(e for e in program.jaxpr.eqns if e.primitive is cond_p).inputs)


def test_a_branch_result_and_its_readers_stay():
    program, moved = _speculated(reads_a_result)
    (second, _), = _branch_prims(moved)        # (branch 0: the false one)
    assert "logistic" not in second and "sub" in second and "reshape" in second and "tanh" in second


@pytest.mark.parametrize("fn", [computed_operand, large, no_first_wave, returned])
def test_computed_or_large_work_stays(fn):
    program, moved = _speculated(fn)
    assert moved is program


def test_static_work_leaves_the_loop_too():
    program, moved = _speculated(in_loop)
    hoisted = hoist_program(moved)
    typecheck_program(hoisted)
    (loop,) = [e for e in walk_eqns(hoisted.jaxpr) if e.primitive is while_p]
    inside = [e.primitive.name for e in walk_eqns(loop.params["body_jaxpr"])]
    assert "sqrt" not in inside and "matmul" in inside
    flat = [np.asarray(a) for a in ARGS[in_loop]]
    np.testing.assert_allclose(run_program(hoisted, flat)[0], run_program(program, flat)[0], rtol=1e-6)


def test_nested_branches_give_up_their_static_work():
    program, moved = _speculated(nested)
    assert ["mul"] != _branch_prims(moved)[1][1]
    for branches in _branch_prims(moved):
        for prims in branches:
            assert prims.count("mul") <= 1     # x @ W * scale: the scale itself (gamma * 3) left both conds
    top = [e for e in moved.jaxpr.eqns if e.primitive.name == "mul"]
    assert top and all(isinstance(a, Var) or np.ndim(a.val) == 0 for a in top[0].inputs)


def _walk(stmts):
    for s in stmts:
        yield s
        if isinstance(s, Branch):
            for b in s.branches:
                yield from _walk(b)


def test_the_branch_starts_with_its_own_work():
    """The plan (simulated against the interpreter): the batch norm's scale runs before the branch; the
    taken branch's first wave is the matmul, with no wave and barrier of its own for the scale."""
    plan = check_plan(gated_block, *ARGS[gated_block])
    body = plan.kernels[0].body
    (branch,) = [s for s in _walk(body) if isinstance(s, Branch)]
    waves = [s for s in branch.branches[1] if isinstance(s, Wave)]
    assert "matmul" in waves[0].tasks[0].op.kind
    assert not any("sqrt" in str(t.op.expr) for w in waves for t in w.tasks)
    before = [s for s in body[:body.index(branch)] if isinstance(s, Wave)]
    assert any("sqrt" in str(t.op.expr) for w in before for t in w.tasks)
    program = gdsl.make_ir(gated_block)(*ARGS[gated_block])
    off = schedule(program, control="device", grid=132, hoist=False)
    (kept,) = [s for s in _walk(off.kernels[0].body) if isinstance(s, Branch)]
    assert len([s for s in kept.branches[1] if isinstance(s, Wave)]) == len(waves) + 1
