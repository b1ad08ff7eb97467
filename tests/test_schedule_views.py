"""Views in the plan: a static slice that is one contiguous window of its operand is read in place (plan.Value
.offset), costs no op, no wave and no barrier, and every backend reads through it."""
import numpy as np
import pytest
from strategies import plan_ops
from test_schedule import check_plan

import gdsl
import gdsl.numpy as gnp
from gdsl.interpreter import run_program
from gdsl.schedule import schedule
from gdsl.schedule.scheduler import view_offset
from gdsl.tracing.pytree import tree_flatten

rng = np.random.default_rng(5)


def gates(x, W, h):
    """An LSTM-like step: the four gates are contiguous windows of one matmul's result."""
    def step(i, hc):
        h, c = hc
        g = (x @ W + h @ W).reshape((4, 1, 8))
        c = gdsl.nn.sigmoid(g[1]) * c + gdsl.nn.sigmoid(g[0]) * gnp.tanh(g[2])
        return gdsl.nn.sigmoid(g[3]) * gnp.tanh(c), c
    return gdsl.fori_loop(0, 3, step, (h, h))


def gates_bias(x, W, b):
    """Batched gates [4, batch, n] + a bias broadcast over the batch: the gate windows read the bias's
    windows (b[k]), so the add is recomputed inside both cell ops and runs no op of its own."""
    def step(i, hc):
        h, c = hc
        g = x @ W + h @ W + b
        c = gdsl.nn.sigmoid(g[1]) * c + gdsl.nn.sigmoid(g[0]) * gnp.tanh(g[2])
        return gdsl.nn.sigmoid(g[3]) * gnp.tanh(c), c
    h = gnp.zeros((x.shape[0], W.shape[-1]))
    return gdsl.fori_loop(0, 3, step, (h, h))


def carry_view(h):
    """The body reads a window of the carry it overwrites: the write cannot go in place."""
    return gdsl.fori_loop(0, 3, lambda i, h: h * 0.5 + h[1], h)


def strided(x):
    """Windows that are not contiguous (a column, a stepped slice) stay copies."""
    return x[:, 1] + x[::2, 0].sum()


ARGS = {
    gates: (rng.standard_normal((1, 8)).astype(np.float32), (rng.standard_normal((8, 32)) * 0.3).astype(np.float32),
            rng.standard_normal((1, 8)).astype(np.float32)),
    gates_bias: (rng.standard_normal((3, 8)).astype(np.float32),
                 (rng.standard_normal((4, 8, 8)) * 0.3).astype(np.float32),
                 rng.standard_normal((4, 1, 8)).astype(np.float32)),
    carry_view: (rng.standard_normal((2, 4)).astype(np.float32),),
    strided: (rng.standard_normal((4, 3)).astype(np.float32),),
}



def test_contiguous_slices_are_views():
    plan = check_plan(gates, *ARGS[gates])
    assert "slice" not in {op.kind for op in plan_ops(plan)}
    assert any(v.offset for op in plan_ops(plan) for v in op.inputs)
    assert "[8:16]<f32[1,8]>" in str(plan)         # printed as a window of its storage


def test_small_expressions_read_through_views_are_recomputed_in_their_readers():
    plan = check_plan(gates_bias, *ARGS[gates_bias])
    kinds = [op.kind for op in plan_ops(plan)]
    assert kinds.count("matmul") == 2 and "slice" not in kinds
    fused = [op for op in plan_ops(plan) if op.kind == "fused" and op.inputs]   # (not the zeros)
    assert len(fused) == 2        # the cell's c and h; the add of the gates lives inside both
    bias = plan.inputs[2].storage
    assert {v.offset for op in fused for v in op.inputs if v.storage is bias} == {0, 8, 16, 24}


def test_windows_that_are_not_contiguous_stay_copies():
    program = gdsl.make_ir(strided)(*ARGS[strided])
    assert all(view_offset(e) is None for e in program.jaxpr.eqns)
    check_plan(strided, *ARGS[strided])


def test_a_view_of_a_carry_blocks_the_in_place_update():
    plan = check_plan(carry_view, *ARGS[carry_view])
    (loop_op,) = [op for op in plan_ops(plan) if op.kind == "fused"]
    assert any(v.offset for v in loop_op.inputs)
    assert all(v.storage is not o.storage for v in loop_op.inputs for o in loop_op.outputs)


@pytest.mark.parametrize("fn", list(ARGS), ids=lambda f: f.__name__)
def test_cpu_backend_reads_through_views(fn):
    args = ARGS[fn]
    program = gdsl.make_ir(fn)(*args)
    flat, _ = tree_flatten((tuple(args), {}))
    expected = run_program(program, [np.asarray(a) for a in flat])
    got = gdsl.jit(fn, backend="cpu")(*args)
    got_flat, _ = tree_flatten(got)
    for g, e in zip(got_flat, expected):
        np.testing.assert_allclose(np.asarray(g), e, rtol=1e-5, atol=1e-5)
    assert schedule(program, grid=4)
