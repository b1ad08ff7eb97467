"""Programs at the edges of what the scheduler must take (issue 14, items 11-13): blocks with no work
(only reshapes), arrays with no elements, and programs thousands of operations long. Each runs on the CPU
backend against the interpreter, lowers to CUDA and HIP source, and its plan simulates to the same values."""
import numpy as np
import pytest

import gdsl
import gdsl.nn
import gdsl.numpy as gnp
from gdsl.schedule import schedule
from gdsl.schedule.plan import Expr, Wave, fold_expr, plan_statements
from gdsl.schedule.scheduler import MAX_FUSED_DEPTH
from gdsl.schedule.simulate import evaluate_expr, simulate

f32 = np.float32


def _interpret(fn, *args):
    return gdsl.jit(fn, backend="interpret")(*args)


def _check_everywhere(fn, *args, grids=(1, 16)):
    """fn(*args) on cpu and in simulated plans equals the interpreter; CUDA and HIP source renders."""
    expected = _interpret(fn, *args)
    got = gdsl.jit(fn, backend="cpu")(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)
    assert np.shape(got) == np.shape(expected)
    program = gdsl.make_ir(fn)(*args)
    for control in ("device", "host"):
        for grid in grids:
            (out,) = simulate(schedule(program, control=control, grid=grid), [np.asarray(a) for a in args])
            np.testing.assert_allclose(out, np.asarray(expected), rtol=1e-5, atol=1e-6)
    for backend in ("cuda", "hip"):
        assert "gdsl" in gdsl.jit(fn, backend=backend).lower(*args).source
    return got


# ------------------------------------------------------------------------------ blocks of reshapes only
# Each form changes only the shape: a block made of them has no work at all.
RESHAPES = {
    "reshape": lambda v: v.reshape(2, 2),
    "expand_dims": lambda v: gnp.expand_dims(v, 0),
    "squeeze": lambda v: gnp.squeeze(v),
    "none_index": lambda v: v[None],
}


@pytest.mark.parametrize("form", RESHAPES)
def test_top_level_block_of_reshapes_only(form):
    x = np.arange(4.0, dtype=f32).reshape(1, 4)
    got = _check_everywhere(RESHAPES[form], x)
    assert got.shape == RESHAPES[form](x).shape


def test_reshape_of_an_argument_issue_example():
    got = gdsl.jit(lambda x: x.reshape(2, 2), backend="cpu")(np.arange(4.0))
    np.testing.assert_array_equal(got, np.arange(4.0).reshape(2, 2))


@pytest.mark.parametrize("form", RESHAPES)
def test_cond_branches_of_reshapes_only(form):
    reshape = RESHAPES[form]

    def fn(x, p):
        return gdsl.cond(p > 0, lambda v: reshape(v), lambda v: reshape(v * 2.0), x)
    x = np.arange(4.0, dtype=f32).reshape(1, 4)
    _check_everywhere(fn, x, f32(1.0))
    _check_everywhere(fn, x, f32(-1.0))


@pytest.mark.parametrize("form", RESHAPES)
def test_loop_body_of_reshapes_only(form):
    reshape = RESHAPES[form]

    def fn(x, limit):           # (a fori_loop body would also count: a while_loop body can be only this)
        return gdsl.while_loop(lambda v: gnp.sum(v) > limit, lambda v: reshape(v).reshape(v.shape), x)
    _check_everywhere(fn, np.arange(4.0, dtype=f32).reshape(1, 4), f32(100.0))


# ------------------------------------------------------------------------------ arrays with no elements
EMPTY = np.zeros((0, 3), f32)
SIZE_ZERO = {
    "matmul_no_rows": (lambda a, b: a @ b, (np.ones((0, 3), f32), np.ones((3, 4), f32))),
    "matmul_no_rows_tiled": (lambda a, b: a @ b, (np.ones((0, 30), f32), np.ones((30, 40), f32))),
    "matmul_no_columns": (lambda a, b: a @ b, (np.ones((2, 3), f32), np.ones((3, 0), f32))),
    "matmul_no_depth": (lambda a, b: a @ b, (np.ones((2, 0), f32), np.ones((0, 4), f32))),
    "matmul_no_batch": (lambda a, b: a @ b, (np.ones((0, 2, 3), f32), np.ones((3, 4), f32))),
    "elementwise": (lambda x: gnp.tanh(x) * 2.0 + x, (EMPTY,)),
    "sum_all": (lambda x: gnp.sum(x), (EMPTY,)),
    "sum_empty_axis": (lambda x: gnp.sum(x, axis=0), (EMPTY,)),
    "sum_to_empty": (lambda x: gnp.sum(x, axis=1), (EMPTY,)),
    "max_to_empty": (lambda x: gnp.max(x, axis=1), (EMPTY,)),
    "argmax_to_empty": (lambda x: gnp.argmax(x, axis=1), (EMPTY,)),
    "transpose": (lambda x: x.T, (EMPTY,)),
    "concatenate": (lambda x, y: gnp.concatenate([x, y], axis=0), (EMPTY, np.ones((2, 3), f32))),
    "empty_slice": (lambda x: x[2:2], (np.ones((4, 3), f32),)),
    "broadcast": (lambda x, y: x + y, (np.zeros((0, 1), f32), np.ones((1, 3), f32))),
    "take_no_indices": (lambda x, i: gnp.take(x, i, axis=0), (np.ones((4, 3), f32), np.zeros((0,), np.int32))),
    "conv_no_images": (lambda x, w: gdsl.nn.conv2d(x, w), (np.ones((0, 2, 5, 5), f32), np.ones((3, 2, 3, 3), f32))),
    "max_pool_no_images": (lambda x: gdsl.nn.max_pool2d(x, 2), (np.ones((0, 2, 4, 4), f32),)),
    "loop_carry": (lambda x: gdsl.fori_loop(0, 3, lambda i, v: v * 2.0, x), (EMPTY,)),
}


@pytest.mark.parametrize("name", SIZE_ZERO)
def test_size_zero_arrays_work_as_in_numpy(name):
    fn, args = SIZE_ZERO[name]
    got = _check_everywhere(fn, *args)
    assert got.shape == np.shape(fn(*[np.asarray(a) for a in args]))


def test_empty_matmul_issue_example():
    got = gdsl.jit(lambda a, b: a @ b, backend="cpu")(np.ones((0, 5), f32), np.ones((5, 7), f32))
    assert got.shape == (0, 7)


# ------------------------------------------------------------------------------ long programs

def _chain(x, length=3000):
    for k in range(length):
        x = gnp.tanh(x) if k % 2 else x * 0.999 + 0.5
    return x


def test_three_thousand_chained_elementwise_ops():
    x = np.linspace(-1, 1, 300).astype(f32)
    got = gdsl.jit(_chain, backend="cpu")(x)
    np.testing.assert_allclose(got, _interpret(_chain, x), rtol=1e-5, atol=1e-6)
    plan = schedule(gdsl.make_ir(_chain)(x), grid=16)
    (out,) = simulate(plan, [x])
    np.testing.assert_allclose(out, got, rtol=1e-5, atol=1e-6)
    assert "wave" in str(plan)
    depths = [fold_expr(t.op.expr, lambda node, below: 1 + max(below, default=0))
              for s in plan_statements(plan) if isinstance(s, Wave) for t in s.tasks if t.op.expr is not None]
    assert max(depths) <= MAX_FUSED_DEPTH + 1       # (+1: the input leaves)
    assert len(depths) >= 3000 // MAX_FUSED_DEPTH    # the chain was cut, not dropped
    for backend in ("cuda", "hip"):
        assert "gdsl" in gdsl.jit(_chain, backend=backend).lower(x).source


def test_unrolled_loop_of_two_thousand_steps():
    def fn(n, v):
        return gdsl.fori_loop(0, n, lambda i, c: c * 0.999 + 1.0, v)
    x = np.linspace(-1, 1, 40).astype(f32)
    got = gdsl.jit(fn, backend="cpu", unroll=2000)(np.int32(4001), x)
    np.testing.assert_allclose(got, _interpret(fn, np.int32(4001), x), rtol=1e-4)


def test_three_thousand_chained_matmuls_schedule():
    def fn(x, w):
        for _ in range(3000):
            x = x @ w
        return x
    x, w = np.ones((2, 4), f32), np.eye(4, dtype=f32)
    plan = schedule(gdsl.make_ir(fn)(x, w), grid=16)
    assert sum(isinstance(s, Wave) for s in plan_statements(plan)) == 3000
    (out,) = simulate(plan, [x, w])
    np.testing.assert_array_equal(out, x)


def test_deep_expressions_need_no_python_stack():
    """Printing and evaluating a fused expression walk it with an explicit stack, however deep it is."""
    x = np.array([1.0, -2.0, 3.0], f32)
    (eqn,) = gdsl.make_ir(lambda v: -v)(x).jaxpr.eqns
    negate, aval = eqn.primitive.name, eqn.outs[0].aval
    node = Expr("input", (), {"index": 0}, aval)
    for _ in range(20000):
        node = Expr(negate, (node,), {}, aval)
    np.testing.assert_array_equal(evaluate_expr(node, [x], aval), x)   # an even number of negations
    text = repr(node)
    assert text == f"{negate}(" * 20000 + "in0" + ")" * 20000
