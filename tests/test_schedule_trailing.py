"""Trailing reductions (gdsl/schedule/trailing.py): a reduction over the last two axes or more reduces the last
axis of a reshape; the program typechecks and computes what it computed; in the plan a global average pool is
one row-chain op (its sum and its division together) where it was two ops; other reductions stay."""
import numpy as np
import pytest
from test_schedule import check_plan

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily.emulator import EmulatorDialect
from gdsl.core.ir import walk_eqns
from gdsl.core.typecheck import typecheck_program
from gdsl.interpreter import run_program
from gdsl.schedule.plan import ROWS, Wave
from gdsl.schedule.trailing import flatten_trailing_reductions

rng = np.random.default_rng(7)
CHAIN = EmulatorDialect().lowering_chain           # the C-family backends' rules: they have ROWS's
X = rng.standard_normal((2, 6, 5, 4)).astype(np.float32)


def pool(x):
    return gdsl.nn.global_avg_pool(x) * 2.0


def pool_max(x):
    return gnp.max(x, axis=(1, 2, 3))


def middle(x):
    return gnp.sum(x, axis=(1, 2))


def everything(x):
    return gnp.sum(x)


def last(x):
    return gnp.sum(x, axis=3)


def _reductions(program):
    return [(e.inputs[0].aval.shape, tuple(e.params["axes"])) for e in walk_eqns(program.jaxpr)
            if e.primitive.name in ("reduce_sum", "reduce_max")]


@pytest.mark.parametrize("fn, want", [(pool, [((2, 6, 20), (2,))]), (pool_max, [((2, 120), (1,))])])
def test_trailing_axes_become_one(fn, want):
    program = gdsl.make_ir(fn)(X)
    flat = flatten_trailing_reductions(program)
    typecheck_program(flat)
    assert _reductions(flat) == want
    np.testing.assert_allclose(run_program(flat, [X])[0], run_program(program, [X])[0], rtol=1e-6)


@pytest.mark.parametrize("fn", [middle, everything, last])
def test_other_reductions_stay(fn):
    program = gdsl.make_ir(fn)(X)
    assert flatten_trailing_reductions(program) is program


def test_pool_is_one_row_chain():
    """For a backend with a ROWS lowering (the C family's rules), simulated against the interpreter."""
    plan = check_plan(pool, X, rows=CHAIN)
    assert plan.stats["row_chains"] == 1
    ops = [t.op for s in plan.kernels[0].body if isinstance(s, Wave) for t in s.tasks]
    assert [op.kind for op in ops] == [ROWS.name]
