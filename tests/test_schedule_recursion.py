"""Recursive calls whose results the caller reads in the callee's frame (no copy, no barrier): the plan
steps later calls past the frames those results hold (plan.Call.step), and every backend follows it.

Checked against the interpreter on the plan simulator (its race checks included), the cpu backend and the
C-family CPU emulator; the depth limit stays exact however far the frames step."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import BACKEND_TOLERANCE, assert_trees_close, needs_cxx

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import emulator
from gdsl.backends.cfamily.emulator import EmulatorDialect
from gdsl.interpreter import run_program
from gdsl.jit import leaf_aval
from gdsl.primitives.structural import concatenate_p
from gdsl.schedule import schedule
from gdsl.schedule.plan import COPY, Branch, Call, Sync, Wave, plan_statements, walk
from gdsl.schedule.simulate import simulate
from gdsl.tracing.pytree import tree_flatten

D = 4
CHAIN = EmulatorDialect().lowering_chain           # the C-family backends' rules: they apply epilogues


def tree_arrays(shape, n_slots=None):
    """Post-order node arrays (left, right, is_leaf) of a nested-pair tree (leaves None) and its root."""
    order = []

    def visit(t):
        order.append(None if t is None else (visit(t[0]), visit(t[1])))
        return len(order) - 1
    visit(shape)
    n = n_slots or len(order)
    left, right, is_leaf = np.zeros(n, np.int32), np.zeros(n, np.int32), np.ones(n, bool)
    for k, children in enumerate(order):
        if children is not None:
            left[k], right[k] = children
            is_leaf[k] = False
    return left, right, is_leaf, np.int32(len(order) - 1)


def chain(height, side):
    """A tree of `height` inner nodes, each with a leaf on one side and the rest of the chain on `side`."""
    tree = None
    for _ in range(height):
        tree = (tree, None) if side == "left" else (None, tree)
    return tree


@st.composite
def shapes(draw, max_leaves=8):
    n = draw(st.integers(1, max_leaves))

    def split(k):
        if k == 1:
            return None
        m = draw(st.integers(1, k - 1))
        return (split(m), split(k - m))
    return split(n)


def height(tree):
    return 0 if tree is None else 1 + max(height(tree[0]), height(tree[1]))


def encoder(max_depth, hidden=D):
    """RAE's encoder: two calls per inner node whose results meet in one matmul. At a larger `hidden` the
    node's matmul spreads over several vEUs, so the barrier before it (after the second call) and after it
    are grid barriers, the leaf's and the tanh's are not."""
    def program(x, W, b, left, right, is_leaf, root):
        @gdsl.recurse(result=gdsl.ShapeDtype((hidden,), gdsl.float32), max_depth=max_depth)
        def encode(node):
            return gdsl.cond(is_leaf[node], lambda: x[node],
                             lambda: gnp.tanh(gnp.concatenate([encode(left[node]), encode(right[node])]) @ W + b))
        return encode(root)
    return program


def encoder_args(tree, seed=0):
    rng = np.random.default_rng(seed)
    left, right, is_leaf, root = tree_arrays(tree)
    x = rng.uniform(-1, 1, (len(left), D)).astype(np.float32)
    W = (rng.standard_normal((2 * D, D)) / np.sqrt(2 * D)).astype(np.float32)
    b = (0.1 * rng.standard_normal(D)).astype(np.float32)
    return x, W, b, left, right, is_leaf, root


def flat_args(args):
    flat, _ = tree_flatten((tuple(args), {}))
    return [np.asarray(a, leaf_aval(a).dtype) for a in flat]


def rae_case(cfg=None, tree="fixed"):
    """RAE (models/rae.py) at `cfg` (full size by default) on one tree: (program, flat arguments, weights,
    inputs)."""
    from models import floor, rae
    cfg = cfg or rae.Config()
    weights, inputs = rae.init_weights(cfg), rae.make_inputs(cfg, tree=tree)
    program = gdsl.make_ir(lambda w, t: rae.forward(w, t, cfg))(weights, inputs)
    return program, floor.flat_arguments(weights, inputs), weights, inputs


def check_rae_trees(backend="cuda", **options):
    """RAE at the bench size with jit `options` on the fixed tree and five random trees against the numpy
    reference; (the jitted forward, cfg, weights)."""
    from models import rae
    cfg = rae.Config()
    weights = rae.init_weights(cfg)
    forward = gdsl.jit(lambda w, t: rae.forward(w, t, cfg), backend=backend, **options)
    for inputs in [rae.make_inputs(cfg, tree="fixed")] + [rae.make_inputs(cfg, seed=s) for s in range(5)]:
        got = gdsl.to_numpy(forward(weights, inputs))
        np.testing.assert_allclose(got, rae.reference(weights, inputs, cfg), rtol=1e-3, atol=1e-4)
    return forward, cfg, weights


def check_rae_overflow(backend="cuda", **options):
    """RAE with max_depth 3 on the fixed tree: the launch raises RecursionDepthError, and the next launch (a lone
    leaf) is right."""
    import dataclasses

    from models import rae
    cfg = rae.Config()
    weights, inputs = rae.init_weights(cfg), rae.make_inputs(cfg, tree="fixed")
    shallow = dataclasses.replace(cfg, max_depth=3)
    too_deep = gdsl.jit(lambda w, t: rae.forward(w, t, shallow), backend=backend, **options)
    with pytest.raises(gdsl.RecursionDepthError):
        too_deep(weights, inputs)
    leaf = {**inputs, "root": np.asarray(np.flatnonzero(inputs["is_leaf"])[0], inputs["root"].dtype)}
    np.testing.assert_allclose(gdsl.to_numpy(too_deep(weights, leaf)), rae.reference(weights, leaf, shallow),
                               rtol=1e-3, atol=1e-4)


def check_simulated(fn, args, grids=(1, 3, 16), epilogues=(), **options):
    """simulate(plan) == interpreter (or both overflow) on both controls and several grids; the device
    plan at the last grid. `epilogues`: the lowering chain whose epilogue rules the scheduler may use;
    `options`: schedule's."""
    program = gdsl.make_ir(fn)(*args)
    flat = flat_args(args)
    try:
        expected = run_program(program, flat)
    except gdsl.RecursionDepthError:
        expected = None
    for control in ("device", "host"):
        for grid in grids:
            plan = schedule(program, control=control, grid=grid, epilogues=epilogues, **options)
            if expected is None:
                with pytest.raises(gdsl.RecursionDepthError):
                    simulate(plan, flat, seed=grid)
            else:
                assert_trees_close(simulate(plan, flat, seed=grid), expected, tolerance=BACKEND_TOLERANCE)
    return schedule(program, control="device", grid=grids[-1], epilogues=epilogues, **options)


def calls(plan):
    return [s for f in plan.functions for s in walk(f.body) if isinstance(s, Call)]


def copies_in_functions(plan):
    return [t.op for f in plan.functions for s in walk(f.body) if isinstance(s, Wave) for t in s.tasks
            if t.op.kind == COPY.name]


# ------------------------------------------------------------------------------------------ the plan

def test_call_results_are_read_in_the_callees_frames():
    """Both children's results stay where the callee wrote them: the second call goes two frames deeper,
    past the first one's result, and the inner node copies neither; their concatenation is the window of
    both frames that the matmul reads in place (no op); the leaf slices x[node] straight into the result
    (through the reshape after the slice)."""
    args = encoder_args(((None, None), None))
    plan = schedule(gdsl.make_ir(encoder(4))(*args), grid=16, peel=False)     # (leaves as calls)
    assert sorted(c.step for c in calls(plan)) == [1, 2]
    (fn,) = plan.functions
    assert fn.max_step == 2 and fn.frames == (4 + 1) * 2 + 1
    reading_frames = [t.op for s in walk(fn.body) if isinstance(s, Wave) for t in s.tasks
                      if any(v.frame_offset for v in t.op.inputs)]
    (matmul,) = reading_frames
    (children,) = [v for v in matmul.inputs if v.frame_offset]
    assert (children.frame_offset, children.offset, children.aval.shape) == (1, 0, (1, 2 * D))
    assert children.storage is fn.results[0].storage
    assert "t1'[0:8]<f32[1,8]>" in str(plan)
    kinds = [t.op.kind for s in walk(fn.body) if isinstance(s, Wave) for t in s.tasks]
    assert len(kinds) == 3 and concatenate_p.name not in kinds and COPY.name not in kinds
    host = schedule(gdsl.make_ir(encoder(4))(*args), control="host", grid=16, peel=False)
    assert all(c.step == 1 for c in calls(host))


@settings(max_examples=25, deadline=None)
@given(tree=shapes(), seed=st.integers(0, 2**16))
def test_random_trees_simulated(tree, seed):
    check_simulated(encoder(height(tree) + 1), encoder_args(tree, seed))


@pytest.mark.parametrize("side", ["left", "right"])
def test_depth_limit_stays_exact_with_stepped_frames(side):
    """A chain of h inner nodes needs h + 1 frames whichever side it grows on, though a right child's
    call steps two frames: max_depth = h + 1 runs, h raises (simulator, cpu backend, emulator)."""
    args = encoder_args(chain(5, side))
    check_simulated(encoder(6), args)
    check_simulated(encoder(5), args)
    expected = run_program(gdsl.make_ir(encoder(6))(*args), flat_args(args))[0]
    np.testing.assert_allclose(gdsl.to_numpy(gdsl.jit(encoder(6), backend="cpu")(*args)), expected,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(gdsl.RecursionDepthError):
        gdsl.jit(encoder(5), backend="cpu")(*args)


@needs_cxx
@pytest.mark.parametrize("side", ["left", "right"])
def test_emulated_stepped_frames(side):
    args = encoder_args((chain(3, side), (None, None)))
    expected = run_program(gdsl.make_ir(encoder(8))(*args), flat_args(args))[0]
    got = emulator.emulate(encoder(8), *args, grid=3, block=32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(gdsl.RecursionDepthError):
        emulator.emulate(encoder(4), *args, grid=3, block=32)


@pytest.mark.parametrize("grid", [None, 3])
def test_cpu_backend_random_trees(grid):
    rng = np.random.default_rng(5)
    for _ in range(4):
        n = int(rng.integers(2, 9))

        def split(k):
            if k == 1:
                return None
            m = int(rng.integers(1, k))
            return (split(m), split(k - m))
        tree = split(n)
        args = encoder_args(tree, int(rng.integers(1000)))
        options = {} if grid is None else {"grid": grid, "block": 1}
        got = gdsl.to_numpy(gdsl.jit(encoder(height(tree) + 1), backend="cpu", **options)(*args))
        expected = run_program(gdsl.make_ir(encoder(height(tree) + 1))(*args), flat_args(args))[0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ where copies stay

def test_a_body_calling_another_recursive_function_copies_results():
    """A call of another recursive function could reach the callee's frames again: results are copied,
    every call steps one frame."""
    def program(x, n):
        @gdsl.recurse(result=gdsl.ShapeDtype((3,), gdsl.float32), max_depth=8)
        def outer(k):
            @gdsl.recurse(result=gdsl.ShapeDtype((3,), gdsl.float32), max_depth=8)
            def inner(j):
                return gdsl.cond(j <= 0, lambda: x, lambda: inner(j - 1) * 0.5)
            return gdsl.cond(k <= 0, lambda: x, lambda: outer(k - 1) + inner(k) + outer(k - 2))
        return outer(n)
    args = (np.arange(3, dtype=np.float32) + 1, np.int32(4))
    plan = check_simulated(program, args)
    steps = {(c.fn, c.step) for c in calls(plan)}
    assert all(step == 1 for _, step in steps) and {fn for fn, _ in steps} == {"outer", "inner"}
    np.testing.assert_allclose(gdsl.to_numpy(gdsl.jit(program, backend="cpu")(*args)),
                               run_program(gdsl.make_ir(program)(*args), flat_args(args))[0], rtol=1e-6)


def test_results_held_across_three_calls_and_a_loop():
    """Three calls per node (three held frames, steps 1..3) and a loop in the body that reads a held
    result every iteration, after the calls."""
    def program(x, n):
        @gdsl.recurse(result=gdsl.ShapeDtype((3,), gdsl.float32), max_depth=6)
        def f(k):
            def inner():
                a, b, c = f(k - 1), f(k - 2), f(k - 3)
                return gdsl.fori_loop(0, 2, lambda i, acc: acc * 0.5 + a - c, b)
            return gdsl.cond(k <= 0, lambda: x * k.astype(gdsl.float32), inner)
        return f(n)
    args = (np.arange(3, dtype=np.float32) - 1, np.int32(4))
    plan = check_simulated(program, args)
    assert sorted(c.step for c in calls(plan)) == [1, 2, 3]
    np.testing.assert_allclose(gdsl.to_numpy(gdsl.jit(program, backend="cpu")(*args)),
                               run_program(gdsl.make_ir(program)(*args), flat_args(args))[0], rtol=1e-6)


# ------------------------------------------------------------------------ barriers around calls

def wide_leaf_encoder(max_depth, width):
    """Leaves do work spread over many vEUs (a wide elementwise op); inner nodes a one-uTask add: the grid
    barriers around the wide work stay, those between one-vEU ops across calls become block syncs."""
    def program(xs, left, right, is_leaf, root):
        @gdsl.recurse(result=gdsl.ShapeDtype((width,), gdsl.float32), max_depth=max_depth)
        def encode(node):
            return gdsl.cond(is_leaf[node], lambda: gnp.tanh(xs[node] * 2.0) + 1.0,
                             lambda: encode(left[node]) * 0.5 + encode(right[node]))
        return encode(root)
    return program


@pytest.mark.parametrize("width", [4, 3000])
def test_barriers_around_calls_are_kept_where_vEUs_meet(width):
    """The plan simulator's race checks pass with the demoted barriers, whatever the leaves' width."""
    tree = ((None, (None, None)), None)
    left, right, is_leaf, root = tree_arrays(tree)
    xs = np.random.default_rng(1).uniform(-1, 1, (len(left), width)).astype(np.float32)
    plan = check_simulated(wide_leaf_encoder(4, width), (xs, left, right, is_leaf, root), grids=(1, 3, 16, 132))
    syncs = [s for f in plan.functions for s in walk(f.body) if isinstance(s, Sync)]
    if width == 4:
        assert all(s.scope == "block" for s in syncs)
    else:
        assert any(s.scope == "grid" for s in syncs)


def test_rae_executes_two_grid_barriers_per_inner_node():
    """RAE at full size on the fixed 65-node tree (32 inner nodes, 33 leaves): the grid barriers executed
    are the two around each node's matmul (its input concatenated on vEU 0, its output read on vEU 0);
    the leaves and the calls pay none, and nothing is copied (no result out of a callee's frame, no leaf
    vector into the result)."""
    from models import floor
    program, flat, _, _ = rae_case()
    plan = schedule(program, grid=132)
    count = floor.count_plan(plan, flat)
    assert count.plan_grid_barriers == 2 * 32
    assert copies_in_functions(plan) == []


def test_rae_with_the_epilogue_pays_the_barrier_after_a_matmul_only_for_left_children():
    """With the `tanh` in the matmul (the C-family and cpu backends' plans), the barrier at the end of an
    inner node is a grid barrier only when the call returns to site 0 (a left child: its right sibling
    overwrites frames its matmul read) or 2 (the root); for a right child the caller's grid barrier before
    its own matmul follows at once. Fixed tree: 32 inner nodes, 15 of them left children: 32 + 15 + 1."""
    from models import floor
    program, flat, _, inputs = rae_case()
    plan = schedule(program, grid=132, epilogues=CHAIN, spread_frames=False, aside=False)   # (without: spread frames)
    by_site = [s for f in plan.functions for s in walk(f.body) if isinstance(s, Sync) and s.sites is not None]
    assert [sorted(s.sites) for s in by_site] == [[0, 2]]
    assert "barrier (grid when returning to site 0, 2, else block)" in str(plan)
    count = floor.count_plan(plan, flat)
    tree = (inputs["left"], inputs["right"], inputs["is_leaf"], inputs["root"])
    assert count.plan_grid_barriers == expected_grid_barriers_with_epilogue(*tree) == 32 + 15 + 1
    assert copies_in_functions(plan) == []


# ------------------------------------------------------------------ results written through a reshape
# An op whose output is reshaped into a result with a storage of its own (a program output, a branch or
# function result) writes that storage under its own shape: no temporary, no copy (Scheduler._hinted_result).

def row_output(x, i):
    """x[i] with a traced i: a dynamic_slice of shape (1, n) reshaped to (n,), the program's output."""
    return x[i]


def row_in_branch(p, x, i):
    """A branch result that one branch takes as a reshaped dynamic_slice, the other as an elementwise op."""
    y = gdsl.cond(p > 0, lambda: x[i], lambda: x[0] * 2.0)
    return y * 3.0


def two_shapes_of_one_output(x):
    """Two results, each a reshape of one op's output: one storage cannot be both, both are copied."""
    y = gnp.tanh(x) * 2.0
    return y.reshape(-1), y.reshape(x.shape[1], x.shape[0])


def reshaped_carry(x, W):
    """A loop carry whose new value is a reshape of a matmul (reads other elements: not in place) and of an
    elementwise op of a reshape of the carry."""
    def body(k, v):
        v = (v.reshape(1, -1) @ W).reshape(-1)
        return gnp.tanh(v.reshape(1, -1) * 0.5).reshape(-1)
    return gdsl.fori_loop(0, 3, body, x)


RESHAPED_RESULTS = {
    row_output: [(np.arange(12, dtype=np.float32).reshape(3, 4), np.int32(k)) for k in (0, 2, -1)],
    row_in_branch: [(np.float32(p), np.arange(12, dtype=np.float32).reshape(3, 4), np.int32(1)) for p in (1, -1)],
    two_shapes_of_one_output: [(np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),)],
    reshaped_carry: [(np.linspace(-1, 1, 4, dtype=np.float32), np.eye(4, dtype=np.float32)[::-1] * 0.9)],
}
COPIES_LEFT = {row_output: 0, row_in_branch: 0, two_shapes_of_one_output: 2}


def plan_copies(plan):
    return [t.op for s in plan_statements(plan) if isinstance(s, Wave) for t in s.tasks if t.op.kind == COPY.name]


@pytest.mark.parametrize("fn", list(RESHAPED_RESULTS), ids=[f.__name__ for f in RESHAPED_RESULTS])
def test_results_written_through_a_reshape(fn):
    for args in RESHAPED_RESULTS[fn]:
        plan = check_simulated(fn, args)
        if fn in COPIES_LEFT:
            assert len(plan_copies(plan)) == COPIES_LEFT[fn]
        expected = run_program(gdsl.make_ir(fn)(*args), flat_args(args))
        assert_trees_close(list(tree_flatten(gdsl.to_numpy(gdsl.jit(fn, backend="cpu")(*args)))[0]), expected,
                           tolerance=BACKEND_TOLERANCE)
        if emulator.cxx() is not None:
            for control in ("device", "host"):
                got = emulator.emulate(fn, *args, control=control, grid=3, block=32)
                assert_trees_close(list(tree_flatten(got)[0]), expected, tolerance=BACKEND_TOLERANCE)


def test_the_leaf_writes_its_row_into_the_result():
    """RAE's leaf `x[node]` (a dynamic_slice, then a reshape) is one op writing the function's result in its
    frame: one wave, no copy."""
    args = encoder_args((None, None))
    (fn,) = schedule(gdsl.make_ir(encoder(4))(*args), grid=16).functions
    (branch,) = [s for s in fn.body if isinstance(s, Branch)]
    leaf_waves = [s for s in walk(branch.branches[1]) if isinstance(s, Wave)]
    assert len(leaf_waves) == 1
    (task,) = leaf_waves[0].tasks
    assert task.op.outputs[0].storage is fn.results[0].storage


# ----------------------------------------------------------- call results concatenated in place

def concatenated_calls(order, axis=0, rows=1):
    """f(k) = concat of f(k - 1), f(k - 2), ... in `order` (call j is f(k - 1 - j)), then a matmul, as RAE's
    inner node; results of shape (rows, 4) concatenated along `axis` (rows 1, axis 1: one flat run)."""
    def program(x, W, n):
        @gdsl.recurse(result=gdsl.ShapeDtype((rows, 4), gdsl.float32), max_depth=8)
        def f(k):
            def inner():
                results = [f(k - 1 - j) for j in range(len(order))]
                both = gnp.concatenate([results[j] for j in order], axis=axis)
                return gnp.tanh(both.reshape(rows, -1) @ W[:both.size // rows])
            return gdsl.cond(k <= 0, lambda: x * (1.0 - 0.1 * k.astype(gdsl.float32)), inner)
        return f(n)
    return program


def spanning_views(plan):
    return [v for f in plan.functions for s in walk(f.body) if isinstance(s, Wave) for t in s.tasks
            for v in t.op.inputs if v.buffer is not None and v.offset + v.aval.size > v.buffer.aval.size]


@pytest.mark.parametrize("order, axis, rows, in_place", [
    ((0, 1), 0, 1, True),           # RAE: left then right child, adjacent frames
    ((0, 1, 2), 1, 1, True),        # three calls, along the last axis of (1, 4) results
    ((1, 0), 0, 1, False),          # right before left: the frames are not in memory order
    ((0, 1), 1, 2, False),          # (2, 4) results along axis 1: rows interleave, no single run
    ((0, 1), 0, 2, True),           # (2, 4) results along axis 0: one run
])
def test_adjacent_call_results_are_concatenated_in_place(order, axis, rows, in_place):
    """A concatenation of call results lying one after another in the callees' frames is a view across
    them (no op); any other stays an op. Simulated (race checks), cpu backend and emulator."""
    program = concatenated_calls(order, axis, rows)
    rng = np.random.default_rng(len(order) + axis + rows)
    args = (rng.uniform(-1, 1, (rows, 4)).astype(np.float32),
            (rng.standard_normal((12, 4)) / 3).astype(np.float32), np.int32(4))
    plan = check_simulated(program, args)
    kinds = [t.op.kind for f in plan.functions for s in walk(f.body) if isinstance(s, Wave) for t in s.tasks]
    assert (concatenate_p.name not in kinds) == in_place
    assert bool(spanning_views(plan)) == in_place
    expected = run_program(gdsl.make_ir(program)(*args), flat_args(args))[0]
    np.testing.assert_allclose(gdsl.to_numpy(gdsl.jit(program, backend="cpu")(*args)), expected,
                               rtol=1e-5, atol=1e-5)
    if emulator.cxx() is not None:
        np.testing.assert_allclose(emulator.emulate(program, *args, grid=3, block=32), expected,
                                   rtol=1e-5, atol=1e-5)


TREES = {"one leaf": None, "depth 1": (None, None), "children are leaves": ((None, None), (None, None)),
         "left chain": chain(4, "left"), "right chain": chain(4, "right"),
         "unbalanced": (((None, (None, None)), None), (None, ((None, None), None))),
         "inner left, leaf right": (((None, None), None), None), "leaf left, inner right": (None, (None, (None, None)))}


def expected_grid_barriers_with_epilogue(left, right, is_leaf, root) -> int:
    """The grid barriers RAE's plan executes with the `tanh` as its matmul's epilogue: one before each inner
    node's matmul, and one after it only where the node returns to a caller that touches memory before its
    next grid barrier: a left child (its right sibling's subtree reuses the frames its matmul read) or the
    root (the program's output copied on one vEU)."""
    inner = {int(n) for n in range(len(is_leaf)) if not is_leaf[n]}
    reachable, stack = set(), [int(root)]
    while stack:
        n = stack.pop()
        reachable.add(n)
        if n in inner:
            stack += [int(left[n]), int(right[n])]
    inner &= reachable
    left_children = {int(left[n]) for n in inner}
    return len(inner) + len(inner & left_children) + (1 if int(root) in inner else 0)


@pytest.mark.parametrize("name", list(TREES))
def test_wide_encoder_trees(name):
    """Shapes of trees at a width whose matmul takes several vEUs: simulated on both controls and several
    grids (race checks), on the cpu backend and the emulator; executed grid barriers: two per inner node."""
    tree, hidden = TREES[name], 64
    rng = np.random.default_rng(3)
    left, right, is_leaf, root = tree_arrays(tree)
    args = (rng.uniform(-1, 1, (len(left), hidden)).astype(np.float32),
            (rng.standard_normal((2 * hidden, hidden)) / np.sqrt(2 * hidden)).astype(np.float32),
            (0.1 * rng.standard_normal(hidden)).astype(np.float32), left, right, is_leaf, root)
    program = encoder(height(tree) + 1, hidden)
    plan = check_simulated(program, args, grids=(1, 3, 16))
    from models import floor
    inner_nodes = int((~is_leaf).sum())
    assert floor.count_plan(plan, flat_args(args)).plan_grid_barriers == 2 * inner_nodes
    folded = check_simulated(program, args, grids=(1, 3, 16), epilogues=CHAIN,       # the tanh in the matmul
                             spread_frames=False, aside=False)
    assert folded.stats["epilogues"] == 1                  # (the inner case is in the plan whatever the tree)
    assert floor.count_plan(folded, flat_args(args)).plan_grid_barriers == \
        expected_grid_barriers_with_epilogue(left, right, is_leaf, root)
    expected = run_program(gdsl.make_ir(program)(*args), flat_args(args))[0]
    np.testing.assert_allclose(gdsl.to_numpy(gdsl.jit(program, backend="cpu")(*args)), expected,
                               rtol=1e-5, atol=1e-5)
    if emulator.cxx() is not None:
        for control in ("device", "host"):
            np.testing.assert_allclose(emulator.emulate(program, *args, control=control, grid=5, block=32),
                                       expected, rtol=1e-5, atol=1e-5)


def test_race_on_a_view_across_frames_is_caught():
    """The simulator checks a read through a view spanning frames against the writers of every frame it
    covers: with the grid barrier before the node's matmul made a block sync, the matmul's vEUs read the
    children that vEU 0 wrote, and the simulator says so."""
    import dataclasses

    from gdsl.schedule.simulate import BarrierError
    tree, hidden = (None, None), 64
    left, right, is_leaf, root = tree_arrays(tree)
    rng = np.random.default_rng(4)
    args = (rng.uniform(-1, 1, (len(left), hidden)).astype(np.float32),
            rng.standard_normal((2 * hidden, hidden)).astype(np.float32),
            rng.standard_normal(hidden).astype(np.float32), left, right, is_leaf, root)
    plan = schedule(gdsl.make_ir(encoder(2, hidden))(*args), grid=16, spread_frames=False, aside=False, peel=False)
    simulate(plan, flat_args(args))
    (fn,) = plan.functions
    (branch,) = [s for s in fn.body if isinstance(s, Branch)]
    inner = branch.branches[0]
    before_matmul = next(k for k, s in enumerate(inner) if isinstance(s, Sync))
    assert isinstance(inner[before_matmul - 1], Call) and inner[before_matmul].scope == "grid"
    broken = inner[:before_matmul] + (Sync("block"),) + inner[before_matmul + 1:]
    body = tuple(dataclasses.replace(branch, branches=(broken,) + branch.branches[1:]) if s is branch else s
                 for s in fn.body)
    with pytest.raises(BarrierError, match="written by vEU 0"):
        simulate(dataclasses.replace(plan, functions=(dataclasses.replace(fn, body=body),)), flat_args(args))


def test_barrier_by_return_site_is_needed_for_a_left_child():
    """The barrier ending an inner node is a grid one when returning to site 0 (a left child): made a
    block sync there too, the right sibling (a leaf, on vEU 0) overwrites a frame that the left child's
    matmul read on several vEUs, and the simulator says so. Returning to site 1 it is a block sync."""
    import dataclasses

    from gdsl.schedule.simulate import BarrierError
    tree, hidden = ((None, None), None), 64
    left, right, is_leaf, root = tree_arrays(tree)
    rng = np.random.default_rng(5)
    args = (rng.uniform(-1, 1, (len(left), hidden)).astype(np.float32),
            rng.standard_normal((2 * hidden, hidden)).astype(np.float32),
            rng.standard_normal(hidden).astype(np.float32), left, right, is_leaf, root)
    plan = schedule(gdsl.make_ir(encoder(3, hidden))(*args), grid=16, epilogues=CHAIN, spread_frames=False,
                    aside=False)
    simulate(plan, flat_args(args))
    (fn,) = plan.functions
    (by_site,) = [s for s in walk(fn.body) if isinstance(s, Sync) and s.sites is not None]
    assert 0 in by_site.sites and 1 not in by_site.sites

    def with_sites(block, sites):
        out = []
        for s in block:
            if s is by_site:
                s = Sync("grid", sites=sites)
            elif isinstance(s, Branch):
                s = dataclasses.replace(s, branches=tuple(with_sites(b, sites) for b in s.branches))
            out.append(s)
        return tuple(out)
    broken = dataclasses.replace(fn, body=with_sites(fn.body, by_site.sites - {0}))
    with pytest.raises(BarrierError, match="overwrites"):
        simulate(dataclasses.replace(plan, functions=(broken,)), flat_args(args))
