"""Wavefront (gdsl/schedule/wavefront.py): a counted loop whose body is a chain of recurrences is skewed so
that stage s runs step k - s; the skewed program typechecks and computes exactly what the original computes
(interpreter, plan simulator, cpu, the C-family emulator), loops that are not such a chain stay as they are,
and the plan of a stacked recurrence has fewer waves and grid barriers per iteration."""
import numpy as np
import pytest
from strategies import BACKEND_TOLERANCE, assert_trees_close, emulated, interpreted, needs_cxx, simulated
from test_schedule import check_plan

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import emulator
from gdsl.core.ir import walk_eqns
from gdsl.core.typecheck import typecheck_program
from gdsl.interpreter import run_program
from gdsl.primitives.control import while_p
from gdsl.schedule import schedule
from gdsl.schedule.licm import hoist_program
from gdsl.schedule.plan import Loop, Sync, Wave
from gdsl.schedule.wavefront import loop_iteration_ns, skew_program

rng = np.random.default_rng(5)
H = 8


def _w(*shape, scale=0.4):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def stacked(xs, W, U):
    """Three stacked tanh recurrences over the steps of xs: layer l reads layer l-1's new state."""
    def step(t, hs):
        inp, new = xs[t], []
        for layer, h in enumerate(hs):
            h = gnp.tanh(inp @ W[layer] + h @ U[layer])
            new.append(h)
            inp = h
        return tuple(new)
    zeros = tuple(gnp.zeros((xs.shape[1], U.shape[-1]), dtype=gdsl.float32) for _ in range(3))
    return gdsl.fori_loop(0, xs.shape[0], step, zeros)


def late_reads(xs, W, U):
    """Stage 2 reads stage 0's state (two iterations late) and xs[t] directly; a carried edge crosses
    from the recurrence `a` into the recurrence `c`, which reads the previous `a` as well."""
    def step(t, carry):
        a, b, c = carry
        a_new = gnp.tanh(xs[t] @ W[0] + a @ U[0])
        b_new = gnp.tanh(a_new @ W[1] + b @ U[1])
        c_new = gnp.tanh(b_new @ W[2] + c @ U[2] + a_new * 0.5 + a * 0.25 + xs[t])
        return a_new, b_new, c_new
    zeros = tuple(gnp.zeros((1, H), dtype=gdsl.float32) for _ in range(3))
    return gdsl.fori_loop(2, 2 + xs.shape[0] - 2, step, zeros)


def counter_out(x, W):
    """A counted while_loop whose final counter is a result; a state passed through unchanged."""
    def body(c):
        i, h, g, keep = c
        h = gnp.tanh(h @ W[0])
        return i + 1, h, gnp.tanh(g @ W[1] + h), keep
    i, h, g, keep = gdsl.while_loop(lambda c: c[0] < 5, body, (0, x, x, x * 2.0))
    return i, g, keep


def single_recurrence(x, W):
    return gdsl.fori_loop(0, 6, lambda i, h: gnp.tanh(h @ W[0]) * gnp.tanh(h @ W[1]), x)


def data_dependent_exit(x, W):
    def body(c):
        h, g = c
        h = gnp.tanh(h @ W[0])
        return h, gnp.tanh(g @ W[1] + h)
    return gdsl.while_loop(lambda c: c[0].sum() < 100.0, body, (x, x))


def inner_loop(x, W):
    def step(i, c):
        h, g = c
        h = gdsl.fori_loop(0, 2, lambda j, v: gnp.tanh(v @ W[0]), h)
        return h, gnp.tanh(g @ W[1] + h)
    return gdsl.fori_loop(0, 4, step, (x, x))


XS = _w(6, 1, H, scale=1.0)
ARGS = {
    stacked: (XS, _w(3, H, H), _w(3, H, H)),
    late_reads: (XS, _w(3, H, H), _w(3, H, H)),
    counter_out: (_w(1, H, scale=1.0), _w(2, H, H)),
}


def _loops(program):
    return [e for e in walk_eqns(program.jaxpr) if e.primitive is while_p]


def _skewed(fn, *args):
    program = hoist_program(gdsl.make_ir(fn)(*args))
    skewed, _ = skew_program(program)
    typecheck_program(skewed)
    flat = [np.asarray(a) for a in args]
    for got, want in zip(run_program(skewed, flat), run_program(program, flat)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    return program, skewed


def _trip(loop):
    (test,) = loop.params["cond_jaxpr"].eqns
    return int(test.inputs[1].val)


@pytest.mark.parametrize("fn", list(ARGS), ids=lambda f: f.__name__)
def test_skewed_program_computes_the_same(fn):
    _, skewed = _skewed(fn, *ARGS[fn])
    assert len(_loops(skewed)) == 1


def test_stacked_recurrence_runs_s_minus_one_extra_steps():
    program, skewed = _skewed(stacked, *ARGS[stacked])
    (before,), (after,) = _loops(program), _loops(skewed)
    assert _trip(before) == 6 and _trip(after) == 6 + 2       # three stages
    # layer l+1 reads layer l's state carry: no register carries were needed
    assert len(after.params["body_jaxpr"].outs) == len(before.params["body_jaxpr"].outs)


def test_late_reads_go_through_register_carries():
    program, skewed = _skewed(late_reads, *ARGS[late_reads])
    (before,), (after,) = _loops(program), _loops(skewed)
    assert len(after.params["body_jaxpr"].outs) > len(before.params["body_jaxpr"].outs)


@pytest.mark.parametrize("fn", [single_recurrence, data_dependent_exit, inner_loop], ids=lambda f: f.__name__)
def test_loops_that_are_not_a_chain_stay(fn):
    program = hoist_program(gdsl.make_ir(fn)(_w(1, H, scale=1.0), _w(2, H, H)))
    assert skew_program(program) == (program, 1.0)


def test_unrolled_loops_stay():
    unrolled = hoist_program(gdsl.jit(stacked, unroll=2).lower(*ARGS[stacked]).program)
    assert skew_program(unrolled)[0] is unrolled


def test_one_step_is_stretched_to_three():
    args = (XS[:1],) + ARGS[stacked][1:]
    program, skewed = _skewed(stacked, *args)
    assert skew_program(program)[1] == 3.0


def _loop_counts(plan):
    (loop,) = [s for s in plan.kernels[0].body if isinstance(s, Loop)]
    waves = sum(isinstance(s, Wave) for s in loop.body)
    grid_barriers = sum(isinstance(s, Sync) and s.scope == "grid" for s in loop.body)
    return waves, grid_barriers


def test_plan_of_a_stacked_recurrence_has_fewer_waves_per_step():
    program = gdsl.make_ir(stacked)(*ARGS[stacked])
    plain = _loop_counts(schedule(program, grid=32, wavefront=False))
    skewed = _loop_counts(schedule(program, grid=32, wavefront=True))
    assert skewed[0] < plain[0], (plain, skewed)


def test_default_keeps_the_plan_estimated_faster():
    """Tiny cells fit one vEU: the plain plan runs the chain with vEU-local syncs, the skewed one spreads
    the stages over vEUs behind grid barriers, so the default keeps the plain plan here; with wide cells
    (the grid's width of uTasks per matmul) the skewed plan wins."""
    program = gdsl.make_ir(stacked)(*ARGS[stacked])
    plans = {wf: schedule(program, grid=32, wavefront=wf) for wf in (None, True, False)}
    costs = {wf: loop_iteration_ns(p) for wf, p in plans.items()}
    assert costs[None] == min(costs[False], costs[True] * 8 / 6)
    wide = (_w(6, 64, 256, scale=1.0), _w(3, 256, 256, scale=0.05), _w(3, 256, 256, scale=0.05))
    program = gdsl.make_ir(stacked)(*wide)
    assert _loop_counts(schedule(program, grid=132))[1] < _loop_counts(schedule(program, grid=132, wavefront=False))[1]


@pytest.mark.parametrize("fn", list(ARGS), ids=lambda f: f.__name__)
def test_plans_simulate_and_run_on_cpu(fn):
    check_plan(fn, *ARGS[fn], grids=(1, 5))
    want = gdsl.jit(fn, backend="cpu", wavefront=False)(*ARGS[fn])
    got = gdsl.jit(fn, backend="cpu", wavefront=True)(*ARGS[fn])
    for g, w in zip(gdsl.tree_flatten(got)[0], gdsl.tree_flatten(want)[0]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(emulator.cxx() is None, reason="the CPU emulator needs g++ (C++20)")
@pytest.mark.parametrize("control", ["device", "host"])
def test_emulated_skewed_loop(control):
    fn, args = late_reads, ARGS[late_reads]
    want = emulator.emulate(fn, *args, control=control, grid=3, block=64, wavefront=False)
    got = emulator.emulate(fn, *args, control=control, grid=3, block=64, wavefront=True)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_option_is_checked():
    with pytest.raises(ValueError, match="wavefront"):
        gdsl.jit(stacked, wavefront="yes")


def next_counter_as_carry(x, W):
    """The counter's increment is also the new value of another carry (the step after the last one)."""
    def body(c):
        i, after, h, g = c
        h = gnp.tanh(h @ W[0])
        return i + 1, i + 1, h, gnp.tanh(g @ W[1] + h)
    return gdsl.while_loop(lambda c: c[0] < 4, body, (0, 0, x, x))


def test_counter_increment_read_as_a_carry():
    args = (_w(1, H, scale=1.0), _w(2, H, H))
    _, skewed = _skewed(next_counter_as_carry, *args)
    assert len(_loops(skewed)) == 1


def loop_in_a_branch(x, W):
    """A loop inside a cond of the body: a stage running on stale values must not reach it."""
    def step(i, c):
        h, g = c
        h = gdsl.cond(h.sum() > 0.0, lambda v: gdsl.fori_loop(0, 2, lambda j, u: gnp.tanh(u @ W[0]), v),
                      lambda v: gnp.tanh(v @ W[0]), h)
        return h, gnp.tanh(g @ W[1] + h)
    return gdsl.fori_loop(0, 4, step, (x, x))


def test_loop_in_a_branch_stays():
    program = hoist_program(gdsl.make_ir(loop_in_a_branch)(_w(1, H, scale=1.0), _w(2, H, H)))
    assert skew_program(program) == (program, 1.0)


def _random_chain(seed):
    """A counted loop of a random chain of recurrences: each state reads its own previous value, the new
    value of one earlier state (or the input row), and sometimes an older state's previous value or the
    counter, so that stages, carried edges across stages and late reads all occur."""
    r = np.random.default_rng(seed)
    n, lo = int(r.integers(2, 5)), int(r.integers(0, 3))
    steps = int(r.integers(1, 6))
    links = [int(r.integers(-1, k)) for k in range(n)]          # -1: the input row
    extra = [int(r.integers(-1, n)) if r.random() < 0.5 else None for _ in range(n)]
    use_counter = [bool(r.random() < 0.3) for _ in range(n)]

    def fn(xs, W):
        def step(t, hs):
            new = []
            for k, h in enumerate(hs):
                src = xs[t - lo] if links[k] < 0 else new[links[k]]
                v = h @ W[k] + src * 0.5
                if extra[k] is not None and extra[k] >= 0:
                    v = v + hs[extra[k]] * 0.25
                if use_counter[k]:
                    v = v + gnp.asarray(t, gdsl.float32) * 0.01
                new.append(gnp.tanh(v))
            return tuple(new)
        zeros = tuple(gnp.zeros((1, H), dtype=gdsl.float32) for _ in range(n))
        return gdsl.fori_loop(lo, lo + steps, step, zeros)
    args = (_w(steps, 1, H, scale=1.0), _w(n, H, H))
    return fn, args


@pytest.mark.parametrize("seed", range(24))
def test_random_chains_compute_the_same(seed):
    fn, args = _random_chain(seed)
    _skewed(fn, *args)


def test_random_chains_are_mostly_skewed():
    """(so that the test above exercises skewed loops: every chain of two or more states is a candidate)"""
    skewed = 0
    for seed in range(24):
        fn, args = _random_chain(seed)
        program = hoist_program(gdsl.make_ir(fn)(*args))
        skewed += skew_program(program)[0] is not program
    assert skewed >= 18


@pytest.mark.parametrize("seed", [1, 3, 5, 17])
def test_random_chains_on_the_backends(seed):
    """The skewed plans of random chains run on the cpu backend and the C-family emulator as they do
    unskewed (forced both ways, so that the default's choice does not hide either plan)."""
    fn, args = _random_chain(seed)
    want = gdsl.tree_flatten(gdsl.jit(fn, backend="cpu", wavefront=False)(*args))[0]
    got = gdsl.tree_flatten(gdsl.jit(fn, backend="cpu", wavefront=True)(*args))[0]
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
    if emulator.cxx() is not None:
        got = emulator.emulate(fn, *args, grid=3, block=64, wavefront=True)
        for g, w in zip(gdsl.tree_flatten(got)[0], want):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def aliased_carries(xs, W, h0):
    """Two carries take the same new value (`h = c`) from different initial values: the stage reading
    `h` must see h's initial value first, not c's."""
    def step(t, state):
        h, c, g = state
        c = gnp.tanh(xs[t] + h @ W[0])
        h = c
        return h, c, gnp.tanh(h @ W[1] + g)
    return gdsl.fori_loop(0, xs.shape[0], step, (h0, gnp.zeros((1, H)), gnp.zeros((1, H))))


def aliased_carries_concat(xs, W0, W1, h0):
    """The same with the second cell reading [h, g]: skewed by the default at grid 2, 64 threads a vEU."""
    def step(t, state):
        h, c, g = state
        c = gnp.tanh(xs[t] + h @ W0)
        h = c
        return h, c, gnp.tanh(gnp.concatenate([h, g], axis=-1) @ W1)
    return gdsl.fori_loop(0, xs.shape[0], step, (h0, gnp.zeros((1, 29)), gnp.zeros((1, 29))))


ALIASED = [
    (aliased_carries, (XS[:3], _w(2, H, H), _w(1, H, scale=1.0)), {"wavefront": True}),
    (aliased_carries_concat, (_w(3, 1, 29, scale=1.0), _w(29, 29, scale=0.18), _w(58, 29, scale=0.13),
                              _w(1, 29, scale=1.0)), {}),
]


@pytest.mark.parametrize("fn, args, options", ALIASED, ids=[fn.__name__ for fn, _, _ in ALIASED])
def test_carries_sharing_a_new_value_are_skewed_right(fn, args, options):
    program, skewed = _skewed(fn, *args)
    assert len(_loops(skewed)) == 1
    plan = schedule(program, grid=2, block=64, **options)
    plain = schedule(program, grid=2, block=64, wavefront=False)
    assert _loop_counts(plan)[0] < _loop_counts(plain)[0]         # (the plan is skewed)
    assert_trees_close(simulated(plan, args), interpreted(program, args), tolerance=BACKEND_TOLERANCE)


@needs_cxx
@pytest.mark.parametrize("fn, args, options", ALIASED, ids=[fn.__name__ for fn, _, _ in ALIASED])
def test_emulated_carries_sharing_a_new_value(fn, args, options):
    want = interpreted(gdsl.make_ir(fn)(*args), args)
    got = emulated(fn, args, grid=2, block=64, **options)
    assert_trees_close(got, want, tolerance=BACKEND_TOLERANCE)
