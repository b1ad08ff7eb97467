"""The scheduler and the plan simulator: plans compute what the interpreter computes (both placements,
several grid sizes), barriers are where dependencies need them and only there, plans print as golden text."""
import os
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from strategies import BACKEND_TOLERANCE, assert_trees_close, programs

import gdsl
import gdsl.backends.cfamily  # noqa: F401  (registers the C-family "view" rules that VIEWS names)
import gdsl.numpy as gnp
from gdsl.interpreter import run_program
from gdsl.jit import leaf_aval
from gdsl.schedule import schedule
from gdsl.schedule.plan import Sync, Wave, plan_statements, walk
from gdsl.schedule.simulate import BarrierError, simulate
from gdsl.tracing.pytree import tree_flatten, tree_unflatten

GOLDEN = pathlib.Path(__file__).parent / "golden"
# The lowering chain whose "view" rules device plans are scheduled with, as the C-family backends do: dynamic
# windows read in place at a run-time offset (plan.Value.terms).
VIEWS = ("cfamily",)
rng = np.random.default_rng(0)


def _flat_args(args):
    flat, _ = tree_flatten((tuple(args), {}))
    return [np.asarray(x, leaf_aval(x).dtype) for x in flat]


def check_plan(fn, *args, controls=("device", "host"), grids=(1, 3, 132), seeds=None, check=None, **options):
    """simulate(plan) == interpreter for every placement and grid, and with device control for partitioned
    loops by the cost estimate, forced and off; returns the device plan at grid 132. `options`: schedule's
    (views=VIEWS unless given); `seeds`: the simulator's interleavings of each plan (its grid by default);
    `check(plan, control)`: what else to assert of each plan."""
    options = {"views": VIEWS, **options}
    program = gdsl.make_ir(fn)(*args)
    flat = _flat_args(args)
    try:
        expected = run_program(program, flat)
    except gdsl.RecursionDepthError:
        expected = None
    runs = [(control, grid, partition) for control in controls for grid in grids
            for partition in ((None, True, False) if control == "device" else (None,))]
    for control, grid, partition in runs:
        plan = schedule(program, control=control, grid=grid, partition=partition, **options)
        if check is not None:
            check(plan, control)
        for seed in seeds or (grid,):
            if expected is None:
                with pytest.raises(gdsl.RecursionDepthError):
                    simulate(plan, flat, seed=seed)
                continue
            assert_trees_close(simulate(plan, flat, seed=seed), expected, tolerance=BACKEND_TOLERANCE)
    return schedule(program, control="device", grid=132, **options)


def check_emulated(fn, *args, grids=(1, 3), block=64, **options):
    """The g++ emulator of the generated C (`options`: emulator.emulate's) == interpreter at each grid."""
    from gdsl.backends.cfamily import emulator
    program = gdsl.make_ir(fn)(*args)
    expected = tree_unflatten(program.out_tree, run_program(program, _flat_args(args)))
    for grid in grids:
        got = emulator.emulate(fn, *args, grid=grid, block=block, **options)
        assert_trees_close(got, expected, tolerance=BACKEND_TOLERANCE)


# ------------------------------------------------------------------------------------------- programs

def lstm(xs, W, U, b):
    def step(t, hc):
        h, c = hc
        g = xs[t] @ W + h @ U + b
        i, f, gg, o = gnp.split(g, 4, axis=-1)
        c = gdsl.nn.sigmoid(f) * c + gdsl.nn.sigmoid(i) * gnp.tanh(gg)
        return gdsl.nn.sigmoid(o) * gnp.tanh(c), c
    state = (xs.shape[1], U.shape[0])
    return gdsl.fori_loop(0, xs.shape[0], step, (gnp.zeros(state), gnp.zeros(state)))[0]


LSTM_ARGS = (rng.standard_normal((5, 2, 32)).astype(np.float32),
             (rng.standard_normal((32, 128)) * 0.2).astype(np.float32),
             (rng.standard_normal((32, 128)) * 0.2).astype(np.float32), rng.standard_normal(128).astype(np.float32))


def tree_encoder(x, W, b, left, right, is_leaf, root):
    @gdsl.recurse(result=gdsl.ShapeDtype((8,), gdsl.float32), max_depth=6)
    def encode(node):
        return gdsl.cond(is_leaf[node], lambda: x[node],
                         lambda: gnp.tanh(gnp.concatenate([encode(left[node]), encode(right[node])]) @ W + b))
    return encode(root)


def _tree_args(depth_chain=False):
    # nodes 0-3 leaves; 4 = (0, 1), 5 = (2, 4), 6 = (5, 3)
    left = np.array([0, 0, 0, 0, 0, 2, 5])
    right = np.array([0, 0, 0, 0, 1, 4, 3])
    is_leaf = np.array([1, 1, 1, 1, 0, 0, 0], bool)
    return (rng.standard_normal((7, 8)).astype(np.float32), (rng.standard_normal((16, 8)) * 0.3).astype(np.float32),
            rng.standard_normal(8).astype(np.float32), left, right, is_leaf, 6)


def kv_cache(K, x, Wk):
    def step(g, c):
        K, x = c
        K = K.at[:, g].set((x @ Wk)[0])
        a = gdsl.nn.softmax(x @ K, axis=-1)
        return K, gnp.tanh(a @ K.T + x)
    return gdsl.fori_loop(2, 6, step, (K, x))


def heads(K, x, Wk, Wo):
    """Attention over a KV cache, per head (K [heads, slots, dim], x [heads, 1, dim]): independent pipelines."""
    def step(g, c):
        K, x = c
        K = K.at[:, g].set((x @ Wk)[:, 0])
        a = gdsl.nn.softmax(x @ gnp.swapaxes(K, 1, 2), axis=-1)
        return K, gnp.tanh((a @ K) @ Wo)
    return gdsl.fori_loop(2, 6, step, (K, x))


def data_dependent(x):
    def body(c):
        bonus = gdsl.cond(c[0] % 2 == 0, lambda: 1.0, lambda: 2.0)
        return c[0] + 1, c[1] * 2 + bonus
    return gdsl.while_loop(lambda c: c[1].sum() < 1000, body, (0, x))


def swap(a, b):
    return gdsl.fori_loop(0, 3, lambda i, c: (c[1], c[0] + 1.0, c[0]), (a, b, a))


def loops_in_recursion(x, n):
    @gdsl.recurse(result=gdsl.ShapeDtype((4,), gdsl.float32), max_depth=5)
    def f(k):
        inner = gdsl.fori_loop(0, k, lambda i, h: gnp.tanh(h + x), x * 0.0)
        return gdsl.cond(k > 0, lambda: f(k - 1) + inner, lambda: inner)
    return gdsl.fori_loop(0, 2, lambda i, acc: acc + f(n), gnp.zeros(4))


CASES = {
    "lstm": (lstm, LSTM_ARGS),
    "tree": (tree_encoder, _tree_args()),
    "kv_cache": (kv_cache, (rng.standard_normal((8, 8)).astype(np.float32),
                            rng.standard_normal((1, 8)).astype(np.float32),
                            rng.standard_normal((8, 8)).astype(np.float32))),
    "heads": (heads, (rng.standard_normal((3, 8, 8)).astype(np.float32),
                      rng.standard_normal((3, 1, 8)).astype(np.float32),
                      rng.standard_normal((3, 8, 8)).astype(np.float32),
                      rng.standard_normal((3, 8, 8)).astype(np.float32))),
    "data_dependent": (data_dependent, (np.ones(40, np.float32),)),
    "swap": (swap, (np.ones(3, np.float32), np.zeros(3, np.float32))),
    "loops_in_recursion": (loops_in_recursion, (rng.standard_normal(4).astype(np.float32), 3)),
    "recursion_too_deep": (loops_in_recursion, (rng.standard_normal(4).astype(np.float32), 7)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_plan_matches_interpreter(name):
    fn, args = CASES[name]
    check_plan(fn, *args)


@settings(max_examples=15)
@given(programs())
def test_random_programs_plan_matches_interpreter(prog):
    check_plan(prog.fn, *prog.args, grids=(2, 132))


# ------------------------------------------------------------------------------------------- barriers

def _remove_sync(block, which):
    """The block with its `which`-th grid Sync (in walking order) removed, and how many there were."""
    from gdsl.schedule.plan import Branch, Loop
    count = [0]

    def strip(stmts):
        out = []
        for s in stmts:
            if isinstance(s, Sync) and s.scope == "grid":
                count[0] += 1
                if count[0] - 1 == which:
                    continue
            if isinstance(s, Loop):
                s = Loop(strip(s.cond), s.pred, strip(s.body))
            elif isinstance(s, Branch):
                s = Branch(s.index, tuple(strip(b) for b in s.branches))
            out.append(s)
        return tuple(out)
    return strip(block), count


def test_removed_barrier_is_caught():
    import dataclasses
    program = gdsl.make_ir(lstm)(*LSTM_ARGS)
    plan = schedule(program, grid=132)
    flat = _flat_args(LSTM_ARGS)
    simulate(plan, flat)  # the real plan is clean
    kernel = plan.kernels[0]
    _, count = _remove_sync(kernel.body, -1)
    caught = 0
    for k in range(count[0]):
        body, _ = _remove_sync(kernel.body, k)
        broken = dataclasses.replace(plan, kernels=(dataclasses.replace(kernel, body=body),))
        try:
            simulate(broken, flat)
        except BarrierError:
            caught += 1
    # Every grid barrier in this plan guards a real cross-vEU dependency.
    assert caught == count[0] > 0


def test_fused_elementwise_chain_has_no_barrier():
    program = gdsl.make_ir(lambda x, y: gnp.tanh(x * 2.0 + y) * gdsl.nn.sigmoid(x))(
        np.ones((64, 64), np.float32), np.ones(64, np.float32))
    plan = schedule(program, grid=132)
    stmts = list(plan_statements(plan))
    waves = [s for s in stmts if isinstance(s, Wave)]
    assert len(waves) == 1 and len(waves[0].tasks) == 1
    assert waves[0].tasks[0].op.kind == "fused"
    assert not any(isinstance(s, Sync) for s in stmts)


def test_independent_ops_share_a_wave():
    program = gdsl.make_ir(lambda a, b, w: (a @ w, b @ w))(
        np.ones((1, 64), np.float32), np.ones((1, 64), np.float32), np.ones((64, 256), np.float32))
    plan = schedule(program, grid=132)
    waves = [s for s in plan_statements(plan) if isinstance(s, Wave)]
    assert len(waves) == 1 and len(waves[0].tasks) == 2
    t0, t1 = waves[0].tasks
    assert t0.first + t0.count <= t1.first  # disjoint vEU ranges


def test_loop_carry_updated_in_place():
    from gdsl.schedule.plan import Loop
    plan = schedule(gdsl.make_ir(lstm)(*LSTM_ARGS), grid=132)
    (loop,) = [s for s in plan.kernels[0].body if isinstance(s, Loop)]
    in_loop = [t.op for s in walk(loop.body) if isinstance(s, Wave) for t in s.tasks]
    # h and c are written in place by their producers: the loop body copies nothing.
    assert in_loop and not [op for op in in_loop if op.kind == "copy"]
    assert any(op.outputs[0].storage is plan.outputs[0].storage for op in in_loop)


def test_control_flow_runs_in_one_kernel_on_device_and_splits_on_host():
    program = gdsl.make_ir(data_dependent)(np.ones(40, np.float32))
    assert len(schedule(program, control="device").kernels) == 1
    host = schedule(program, control="host")
    assert len(host.kernels) > 1 and host.host is not None


# ------------------------------------------------------------------------------------------- golden text

# ------------------------------------------------------------------------------------------- partitioned loops

def _loop(plan):
    from gdsl.schedule.plan import Loop
    (loop,) = [s for s in plan.kernels[0].body if isinstance(s, Loop)]
    return loop


def test_partitioned_loop_has_no_grid_barrier_inside():
    fn, args = CASES["heads"]
    program = gdsl.make_ir(fn)(*args)
    loop = _loop(schedule(program, grid=132))
    assert loop.parts == 3
    assert all(s.scope == "block" for s in walk(loop.body) if isinstance(s, Sync))
    ordinary = _loop(schedule(program, grid=132, partition=False))
    assert ordinary.parts == 0 and any(s.scope == "grid" for s in ordinary.body if isinstance(s, Sync))


def test_partitioned_op_on_the_wrong_veu_is_caught():
    """Moving one op of a partitioned loop off its partition's vEU makes it read another vEU's writes."""
    import dataclasses

    from gdsl.schedule.plan import Loop
    fn, args = CASES["heads"]
    plan = schedule(gdsl.make_ir(fn)(*args), grid=132)
    flat = _flat_args(args)
    simulate(plan, flat)
    kernel = plan.kernels[0]
    loop = _loop(plan)
    caught = 0
    waves = [k for k, s in enumerate(loop.body) if isinstance(s, Wave)]
    for k in waves[1:]:       # shift each later wave's first op by one vEU
        wave = loop.body[k]
        task = wave.tasks[0]
        moved = Wave((dataclasses.replace(task, first=1),) + wave.tasks[1:])
        body = loop.body[:k] + (moved,) + loop.body[k + 1:]
        stmts = tuple(dataclasses.replace(loop, body=body) if s is loop else s for s in kernel.body)
        try:
            simulate(dataclasses.replace(plan, kernels=(dataclasses.replace(kernel, body=stmts),)), flat)
        except BarrierError:
            caught += 1
    assert caught >= 1 and isinstance(loop, Loop)


def test_loop_mixing_partitions_is_not_partitioned():
    def mix(x):                    # row i reads every row: no independent pipelines
        return gdsl.fori_loop(0, 4, lambda i, v: gnp.tanh(v + v.sum(axis=0)), x)

    def rows(x):                   # each row on its own
        return gdsl.fori_loop(0, 4, lambda i, v: gnp.tanh(v + v.sum(axis=1, keepdims=True)), x)
    x = rng.standard_normal((4, 16)).astype(np.float32)
    assert _loop(schedule(gdsl.make_ir(mix)(x), grid=8, partition=True)).parts == 0
    assert _loop(schedule(gdsl.make_ir(rows)(x), grid=8, partition=True)).parts == 4
    check_plan(mix, x)
    check_plan(rows, x)


def test_partition_option_is_checked():
    with pytest.raises(ValueError, match="partition"):
        schedule(gdsl.make_ir(lambda x: x + 1.0)(np.ones(2, np.float32)), partition="yes")


@pytest.mark.parametrize("name", ["lstm", "tree", "data_dependent", "heads"])
def test_plan_golden(name):
    fn, args = CASES[name]
    text = str(schedule(gdsl.make_ir(fn)(*args), grid=16, views=VIEWS)) + "\n"
    path = GOLDEN / f"plan_{name}.txt"
    if os.environ.get("GDSL_UPDATE_GOLDEN") or not path.exists():
        path.write_text(text)
    assert text == path.read_text()


# ------------------------------------------------------------------------------------------- rule tables

def test_every_control_primitive_has_a_scheduler_rule():
    from gdsl.primitives.registry import CONTROL, REGISTRY
    from gdsl.schedule.scheduler import CONTROL_RULES
    control = {p for p in REGISTRY.values() if p.family == CONTROL}
    assert control and set(CONTROL_RULES) == control


def test_every_statement_type_has_a_simulator_rule():
    import dataclasses

    from gdsl.schedule import plan
    from gdsl.schedule.simulate import STATEMENT_RULES
    statements = {plan.Wave, plan.Sync, plan.Uniforms, plan.Assign, plan.Loop, plan.Branch, plan.Call, plan.Launch,
                  plan.Fork}
    assert set(STATEMENT_RULES) == statements
    assert all(dataclasses.is_dataclass(t) for t in statements)


def test_no_primitive_name_is_spelled_as_a_string_in_the_scheduler():
    """Sets of kinds come from the registry's families and flags, tables are keyed by primitive objects."""
    import ast

    from gdsl.primitives.registry import OP_KINDS
    folder = pathlib.Path(gdsl.__file__).parent / "schedule"
    found = []
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text())
        allowed = {id(node.body[0].value) for node in ast.walk(tree)          # docstrings
                   if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                   and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        allowed |= {id(node.args[0]) for node in ast.walk(tree)                  # FUSED, COPY: definitions
                    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "op_kind"}
        found += [f"{path.name}:{node.lineno} {node.value!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in OP_KINDS
                  and id(node) not in allowed]
    assert found == []
