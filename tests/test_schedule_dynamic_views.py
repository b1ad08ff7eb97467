"""Views at a run-time offset in the plan (plan.Value.terms): a dynamic window that is one contiguous run of its
source (`x[t]`), or one row taken at a uniform index (an embedding lookup), is read in place by its readers
under device control on a backend with "view" rules (the C-family ones). It is no op: its readers take the
level of its own sources, so no wave and no barrier separates them from it. Checked against the interpreter
on the plan simulator (with its race checks), on the g++ emulator, and compiled with NVRTC."""
import numpy as np
import pytest
from strategies import BACKEND_TOLERANCE, assert_trees_close, cuda_lowering, needs_cxx, needs_nvrtc, plan_ops
from test_schedule import VIEWS, _flat_args, check_plan

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import emulator
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.interpreter import run_program
from gdsl.primitives.linalg import matmul_p
from gdsl.primitives.structural import dynamic_slice_p, take_p, transpose_p
from gdsl.schedule import schedule
from gdsl.schedule.plan import Loop, Sync, Wave, walk
from gdsl.schedule.simulate import simulate
from gdsl.tracing.pytree import tree_unflatten

rng = np.random.default_rng(11)


def embed_step(table, W, U, h, tokens):
    """Seq2seq's decoder step: the row of the current token (a uniform index) times W, beside h @ U."""
    def step(i, carry):
        h, token = carry
        x = gnp.take(table, token, axis=0).reshape((1, -1))
        h = gnp.tanh(x @ W + h @ U)
        return h, gnp.argmax(h[0]).astype(np.int32) % table.shape[0]
    return gdsl.fori_loop(0, 4, step, (h, tokens[0]))


def window_then_overwrite(xs, W):
    """A window of a carry read at step t, the carry written at the same place afterwards in the body."""
    def step(t, xs):
        y = gnp.tanh(xs[t] @ W)
        return xs.at[t].set(y)
    return gdsl.fori_loop(0, xs.shape[0], step, xs)


def index_reassigned(table, xs):
    """The index of a window is a loop carry that the body reassigns (after the window's readers ran)."""
    def cond(carry):
        i, acc, n = carry
        return n < 5

    def body(carry):
        i, acc, n = carry
        row = gnp.take(table, i, axis=0)
        acc = acc + row * xs[n]
        return (gnp.argmax(row).astype(np.int32), acc, n + 1)
    return gdsl.while_loop(cond, body, (np.int32(2), gnp.zeros(table.shape[1]), np.int32(0)))


def read_after_control(xs, W):
    """A window read after a nested loop (another segment): it stays an op."""
    def step(t, h):
        x = xs[t]
        h = gdsl.fori_loop(0, 2, lambda k, h: gnp.tanh(h @ W), h)
        return h + x
    return gdsl.fori_loop(0, xs.shape[0], step, gnp.zeros((1, W.shape[0]), np.float32))


ARGS = {
    embed_step: (rng.standard_normal((11, 8)).astype(np.float32),
                 (rng.standard_normal((8, 8)) * 0.3).astype(np.float32),
                 (rng.standard_normal((8, 8)) * 0.3).astype(np.float32),
                 rng.standard_normal((1, 8)).astype(np.float32), np.array([3, 1], np.int32)),
    window_then_overwrite: (rng.standard_normal((3, 1, 8)).astype(np.float32),
                            (rng.standard_normal((8, 8)) * 0.3).astype(np.float32)),
    index_reassigned: (rng.standard_normal((6, 8)).astype(np.float32), rng.standard_normal((5, 8)).astype(np.float32)),
    read_after_control: (rng.standard_normal((3, 1, 8)).astype(np.float32),
                         (rng.standard_normal((8, 8)) * 0.3).astype(np.float32)),
}



def _loop(plan):
    return next(s for k in plan.kernels for s in walk(k.body) if isinstance(s, Loop))


@pytest.mark.parametrize("fn", list(ARGS), ids=lambda f: f.__name__)
def test_plans_with_dynamic_views_compute_what_the_interpreter_does(fn):
    check_plan(fn, *ARGS[fn])


def test_a_row_taken_at_a_uniform_index_is_read_in_place_beside_the_other_matmul():
    plan = check_plan(embed_step, *ARGS[embed_step])
    assert take_p.name not in {op.kind for op in plan_ops(plan)}
    loop = _loop(plan)
    waves = [s for s in loop.body if isinstance(s, Wave)]
    first = [t.op for t in waves[0].tasks]
    assert [op.kind for op in first] == [matmul_p.name, matmul_p.name]     # x @ W beside h @ U, in wave 0
    (viewed,) = [v for op in first for v in op.inputs if v.dynamic]
    assert viewed.storage is plan.inputs[0].storage                       # the table, read in place
    assert "clamp(" in str(plan)


def test_without_view_rules_or_under_host_control_the_window_stays_an_op():
    program = gdsl.make_ir(embed_step)(*ARGS[embed_step])
    for plan in (schedule(program, grid=8), schedule(program, grid=8, control="host", views=VIEWS)):
        assert take_p.name in {op.kind for op in plan_ops(plan)}
        assert not any(v.dynamic for op in plan_ops(plan) for v in op.inputs)


def test_a_window_of_a_carry_is_read_before_the_carry_is_overwritten():
    plan = check_plan(window_then_overwrite, *ARGS[window_then_overwrite])
    loop = _loop(plan)
    readers = [t.op for s in loop.body if isinstance(s, Wave) for t in s.tasks if any(v.dynamic for v in t.op.inputs)]
    assert readers and dynamic_slice_p.name not in {op.kind for op in plan_ops(plan)}
    # the update in place runs in a later wave, behind a barrier, than the reader of the window
    body = list(loop.body)
    reader_at = next(i for i, s in enumerate(body) if isinstance(s, Wave) and any(t.op in readers for t in s.tasks))
    writer_at = next(i for i, s in enumerate(body) if isinstance(s, Wave) and
                     any(v.storage is readers[0].inputs[0].storage for t in s.tasks for v in t.op.outputs))
    assert reader_at < writer_at and any(isinstance(s, Sync) for s in body[reader_at:writer_at])


def test_a_reassigned_index_does_not_move_a_window_already_read():
    plan = check_plan(index_reassigned, *ARGS[index_reassigned])
    assert take_p.name not in {op.kind for op in plan_ops(plan)}


def test_a_window_read_after_nested_control_flow_stays_an_op():
    plan = check_plan(read_after_control, *ARGS[read_after_control])
    assert dynamic_slice_p.name in {op.kind for op in plan_ops(plan)}


@needs_cxx
@pytest.mark.parametrize("fn", list(ARGS), ids=lambda f: f.__name__)
@pytest.mark.parametrize("grid", [1, 3])
def test_emulated_dynamic_views_match_the_interpreter(fn, grid):
    args = ARGS[fn]
    program = gdsl.make_ir(fn)(*args)
    expected = tree_unflatten(program.out_tree, run_program(program, _flat_args(args)))
    got = emulator.emulate(fn, *args, grid=grid, block=64)
    assert_trees_close(got, expected, tolerance=BACKEND_TOLERANCE)


@needs_cxx
@pytest.mark.parametrize("name,batch", [("seq2seq", 1), ("seq2seq", 3), ("attention", 2), ("lstm", 2), ("nasrnn", 3)])
def test_emulated_small_models_match_their_references(name, batch):
    from models import common, load
    prob = common.build_problem(load(name), batch, small=True, seed=0)
    model, cfg = prob.model, prob.cfg
    got = emulator.emulate(lambda w, x: model.forward(w, x, cfg), prob.weights, prob.batches[0], grid=4, block=64)
    assert common.compare(got, prob.references()[0]) == []


@needs_nvrtc
@pytest.mark.parametrize("fn", list(ARGS), ids=lambda f: f.__name__)
def test_dynamic_views_compile_with_nvrtc(fn):
    from gdsl.backends.cuda import toolchain as cuda_toolchain
    lowering = cuda_lowering(fn, ARGS[fn])
    assert any(v.dynamic for op in plan_ops(lowering.plan) for v in op.inputs) == (fn is not read_after_control)
    assert cuda_toolchain.compile_cuda(lowering.source, "sm_90")[:4] == b"\x7fELF"


def test_simulated_reads_use_the_offset_where_the_reader_runs():
    """The simulator resolves a view's offset from the uniforms as they are when its reader runs."""
    fn = index_reassigned
    program = gdsl.make_ir(fn)(*ARGS[fn])
    plan = schedule(program, grid=3, views=VIEWS)
    assert any(v.dynamic for op in plan_ops(plan) for v in op.inputs)
    assert_trees_close(simulate(plan, _flat_args(ARGS[fn]), seed=1), run_program(program, _flat_args(ARGS[fn])),
                       tolerance=BACKEND_TOLERANCE)


# ------------------------------------------------------------------------------------------- permuted views

def kv_cache(q, K, W):
    """Attention's decoder step: the cache K is updated in place at step t, then read transposed (q @ K^T)."""
    def step(t, carry):
        q, K = carry
        K = K.at[:, t].set((q @ W)[:, 0])
        s = gnp.matmul(q, gnp.transpose(K, (0, 2, 1))) * 0.25
        p = gnp.exp(s - s.max(axis=-1, keepdims=True))
        return gnp.tanh((p / p.sum(axis=-1, keepdims=True)) @ K), K
    return gdsl.fori_loop(0, K.shape[1], step, (q, K))


def transposed_then_overwritten(x, W):
    """A transposed carry read by an op, the carry then overwritten in place by a later op of the body."""
    def step(i, x):
        y = gnp.tanh(gnp.transpose(x) @ W)
        return x * 0.5 + gnp.transpose(y)
    return gdsl.fori_loop(0, 3, step, x)


PERMUTED_ARGS = {
    kv_cache: (rng.standard_normal((2, 1, 8)).astype(np.float32), np.zeros((2, 4, 8), np.float32),
               (rng.standard_normal((8, 8)) * 0.3).astype(np.float32)),
    transposed_then_overwritten: (rng.standard_normal((8, 4)).astype(np.float32),
                                  (rng.standard_normal((8, 8)) * 0.3).astype(np.float32)),
}


@pytest.mark.parametrize("fn", list(PERMUTED_ARGS), ids=lambda f: f.__name__)
def test_transposes_are_permuted_views_with_no_op(fn):
    plan = check_plan(fn, *PERMUTED_ARGS[fn])
    assert transpose_p.name not in {op.kind for op in plan_ops(plan)}
    permuted = [v for op in plan_ops(plan) for v in op.inputs if v.perm is not None]
    assert permuted and ".T(" in str(plan)


def test_the_transposed_cache_is_read_after_its_update_in_the_same_step():
    plan = check_plan(kv_cache, *PERMUTED_ARGS[kv_cache])
    body = list(_loop(plan).body)
    update = next(i for i, s in enumerate(body) if isinstance(s, Wave) and
                  any(t.op.kind == "dynamic_update_slice" for t in s.tasks))
    scores = next(i for i, s in enumerate(body) if isinstance(s, Wave) and
                  any(v.perm is not None for t in s.tasks for v in t.op.inputs))
    assert update < scores and any(isinstance(s, Sync) for s in body[update:scores])


@needs_cxx
@pytest.mark.parametrize("fn", list(PERMUTED_ARGS), ids=lambda f: f.__name__)
@pytest.mark.parametrize("grid", [1, 3])
def test_emulated_permuted_views_match_the_interpreter(fn, grid):
    args = PERMUTED_ARGS[fn]
    program = gdsl.make_ir(fn)(*args)
    expected = tree_unflatten(program.out_tree, run_program(program, _flat_args(args)))
    got = emulator.emulate(fn, *args, grid=grid, block=64)
    assert_trees_close(got, expected, tolerance=BACKEND_TOLERANCE)


@pytest.mark.parametrize("name,batch", [("seq2seq", 1), ("attention", 2)])
def test_the_floor_counter_reads_plan_views_as_the_simulator_does(name, batch):
    """models/floor.py's counter reads buffers its own way: through run-time offsets and permutations too."""
    from gdsl.schedule.simulate import Simulator
    from models import common, floor, load
    prob = common.build_problem(load(name), batch, small=True, seed=0)
    lowered = prob.model.make_forward(prob.cfg, backend="cuda").lower(prob.weights, prob.batches[0])
    plan = floor.plan_of(lowered)
    assert any(v.dynamic or v.perm is not None for op in plan_ops(plan) for v in op.inputs)
    flat = floor.flat_arguments(prob.weights, prob.batches[0])
    expected = Simulator(plan, check=False).run(flat)
    for got, want in zip(floor._Counter(plan).run(flat), expected):     # (numpy sums a transposed view in
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)      # another order than its copy)
    assert common.compare(tree_unflatten(lowered.lowering.program.out_tree, expected), prob.references()[0]) == []


def transposed_before_the_loop(x, W):
    """A loop-invariant weight transposed before the loop: the plan keeps the transpose as an op (its readers are
    in another segment), the C-family renderer reads it in place (cfamily/views.py)."""
    Wt = gnp.transpose(W)
    return gdsl.fori_loop(0, 3, lambda i, h: gnp.tanh(h @ Wt), x)


def test_the_plan_text_says_which_ops_run_no_code():
    """What the plan prints is what runs: an op the backend reads in place is marked so (Lowered.plan)."""
    args = (rng.standard_normal((2, 8)).astype(np.float32), (rng.standard_normal((8, 8)) * 0.3).astype(np.float32))
    lowered = gdsl.jit(transposed_before_the_loop, backend="cuda", grid=4, resident=False).lower(*args)
    (line,) = [line for line in lowered.plan.splitlines() if "_transpose(" in line]
    assert line.endswith("; its readers read the input in place: no code runs]")
    assert "_transpose(" not in lowered.source.split("-- ops")[-1]       # (no function for it: no code)
    assert "no code runs" not in str(lowered.lowering.plan)            # (the plan alone does not know it)


@needs_nvrtc
def test_a_transposed_weight_kept_resident_is_an_array():
    """Where the loop's matmul keeps the transposed weight resident (its tiles copied into shared memory from the
    array before the loop), the transpose runs as an op: the array must exist (before session 30 the kernel named
    an array no code made, and NVRTC rejected it)."""
    args = (rng.standard_normal((2, 8)).astype(np.float32), (rng.standard_normal((8, 8)) * 0.3).astype(np.float32))
    lowered = gdsl.jit(transposed_before_the_loop, backend="cuda", grid=4).lower(*args)
    (line,) = [line for line in lowered.plan.splitlines() if "_transpose(" in line]
    assert "no code runs" not in line and "B resident in shared memory" in lowered.plan
    cuda_toolchain.compile_cuda(lowered.source, "sm_90")
