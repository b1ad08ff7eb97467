"""Sums of matmuls as one matmul over the concatenated depth (gdsl/schedule/concat.py, the option `concat_k`),
the left operand read in parts in place (plan.K_PARTS, Scheduler._fold_k_parts, the C-family "k_parts" rule),
and owner="auto" (scheduler.pays): one matmul where there were two, the stacked B built once before the loop,
no copy of A in the loop; results equal the interpreter on the plan simulator, the C-family emulator and the
CPU backend; NVRTC compiles the new kernels."""
import numpy as np
import pytest
from strategies import BACKEND_TOLERANCE, assert_trees_close, cuda_lowering, emulated_model_mismatches, needs_nvrtc
from test_schedule import VIEWS, check_plan

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily.emulator import emulate
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.interpreter import run_program
from gdsl.jit import leaf_aval
from gdsl.primitives.control import while_p
from gdsl.primitives.linalg import matmul_p
from gdsl.primitives.structural import concatenate_p
from gdsl.schedule import licm, schedule
from gdsl.schedule.concat import concat_products
from gdsl.schedule.plan import K_PARTS, Loop, Wave, walk
from gdsl.schedule.printer import describe_op
from gdsl.schedule.scheduler import loop_grid_barriers
from gdsl.schedule.steps import hoist_step_products
from gdsl.tracing.pytree import tree_flatten
from models import lstm

rng = np.random.default_rng(7)


def _lstm(bs, layers=3, steps=4, hidden=16):
    cfg = lstm.Config(seq_len=steps, layers=layers, hidden=hidden)
    weights, inputs = lstm.init_weights(cfg), lstm.make_inputs(cfg, bs)

    def forward(w, x):
        return lstm.forward(w, x, cfg)
    return forward, (weights, inputs)


def _flat(args):
    flat, _ = tree_flatten((tuple(args), {}))
    return [np.asarray(x, leaf_aval(x).dtype) for x in flat]


def _body(program):
    (loop,) = [e for e in program.jaxpr.eqns if e.primitive is while_p]
    return loop.params["body_jaxpr"]


def _loop_ops(plan):
    loops = [s for k in plan.kernels for s in k.body if isinstance(s, Loop)]
    return [t.op for loop in loops for s in walk(loop.cond + loop.body) if isinstance(s, Wave) for t in s.tasks]


def _hoisted(program):
    return hoist_step_products(licm.hoist_program(program))


# ------------------------------------------------------------------------------------------------ the IR pass

def test_a_stacked_lstm_layer_is_one_matmul_over_both_inputs():
    forward, args = _lstm(1)
    program = _hoisted(gdsl.make_ir(forward)(*args))
    stacked = licm.hoist_program(concat_products(program))
    before = [e for e in _body(program).eqns if e.primitive is matmul_p]
    after = [e for e in _body(stacked).eqns if e.primitive is matmul_p]
    # layer 0 keeps its recurrent product (its input product left the loop: steps.py); layers 1, 2 had two
    assert (len(before), len(after)) == (5, 3)
    cats = [e for e in _body(stacked).eqns if e.primitive is concatenate_p]
    assert [e.outs[0].aval.shape for e in cats] == [(1, 32), (1, 32)]           # [h_{l-1} | h_l], K = 2H
    outside = [e for e in stacked.jaxpr.eqns if e.primitive is concatenate_p]
    assert [e.outs[0].aval.shape for e in outside] == [(4, 32, 16), (4, 32, 16)]  # [W_ih ; W_hh], once
    flat = _flat(args)
    assert_trees_close(run_program(stacked, flat), run_program(program, flat), tolerance=BACKEND_TOLERANCE)


def sum3(xs, B1, B2, B3):
    """A three-product sum with batched A (gates stacked on a leading axis) in a loop."""
    def step(t, h):
        a2 = gnp.tanh(h)
        return gnp.tanh(gnp.matmul(h, B1) + gnp.matmul(a2, B2) + gnp.matmul(xs[t], B3))
    return gdsl.fori_loop(0, xs.shape[0], step, gnp.zeros((2, 3, 8), dtype=gdsl.float32))


def _sum3_args():
    f = np.float32
    return (rng.standard_normal((3, 2, 3, 5)).astype(f), rng.standard_normal((2, 8, 8)).astype(f) * f(0.3),
            rng.standard_normal((2, 8, 8)).astype(f) * f(0.3), rng.standard_normal((2, 5, 8)).astype(f) * f(0.3))


def test_three_batched_products_stack_into_one():
    args = _sum3_args()
    program = licm.hoist_program(gdsl.make_ir(sum3)(*args))
    stacked = concat_products(program)
    (mm,) = [e for e in _body(stacked).eqns if e.primitive is matmul_p]
    assert mm.inputs[0].aval.shape == (2, 3, 21) and mm.inputs[1].aval.shape == (2, 21, 8)
    flat = _flat(args)
    assert_trees_close(run_program(stacked, flat), run_program(program, flat), tolerance=BACKEND_TOLERANCE)


def not_invariant(x, W):
    def step(t, c):
        h, V = c
        return gnp.matmul(h, W) + gnp.matmul(h, V), V * 0.5      # V changes from step to step
    return gdsl.fori_loop(0, 3, step, (x, W))


def read_twice(x, W, V):
    def step(t, h):
        p = gnp.matmul(h, W)
        return gnp.tanh(p + gnp.matmul(h, V)) + p                 # a product with another reader
    return gdsl.fori_loop(0, 3, step, x)


def outside_loops(x, W, V):
    return gnp.matmul(x, W) + gnp.matmul(x, V)


@pytest.mark.parametrize("fn", [not_invariant, read_twice, outside_loops])
def test_not_stacked(fn):
    f = np.float32
    x, W, V = rng.standard_normal((2, 4)).astype(f), *(rng.standard_normal((2, 4, 4)).astype(f) for _ in range(2))
    args = (x, W[0]) if fn is not_invariant else (x, W[0], V[0])
    program = licm.hoist_program(gdsl.make_ir(fn)(*args))
    assert concat_products(program) is program


# --------------------------------------------------------------------------------------------------- plans

def _stacked_plan_check(plan, control):
    ops = _loop_ops(plan)
    assert not any(op.kind == concatenate_p.name for op in ops)       # A is read in parts: no copy in the loop
    assert any(K_PARTS in op.params for op in ops)


@pytest.mark.parametrize("wavefront", [None, True, False])
@pytest.mark.parametrize("bs", [1, 4])
def test_plans_read_the_parts_in_place(bs, wavefront):
    forward, args = _lstm(bs, steps=3)
    plan = check_plan(forward, *args, controls=("device",), grids=(1, 3, 132), concat_k=True, k_parts=VIEWS,
                      wavefront=wavefront, check=_stacked_plan_check)
    matmuls = [op for op in _loop_ops(plan) if op.kind == matmul_p.name]
    assert len(matmuls) == 3 and sum(K_PARTS in op.params for op in matmuls) == 2
    assert "matmul([" in describe_op(next(op for op in matmuls if K_PARTS in op.params))
    # the stacked weights are built before the loop, once
    loop_at = next(i for i, s in enumerate(plan.kernels[0].body) if isinstance(s, Loop))
    before = [t.op for s in plan.kernels[0].body[:loop_at] if isinstance(s, Wave) for t in s.tasks]
    assert sum(op.kind == concatenate_p.name for op in before) == 2


def test_without_the_rule_the_concatenation_is_a_copy():
    forward, args = _lstm(1, steps=3)
    plan = check_plan(forward, *args, controls=("device", "host"), grids=(3,), concat_k=True)
    assert any(op.kind == concatenate_p.name for op in _loop_ops(plan))
    assert not any(K_PARTS in op.params for op in _loop_ops(plan))


def test_batched_three_part_plans_match_the_interpreter():
    check_plan(sum3, *_sum3_args(), controls=("device",), grids=(1, 3, 132), concat_k=True, k_parts=VIEWS,
               check=_stacked_plan_check)


@pytest.mark.parametrize("grid", [16, 132])
def test_owner_layers_run_one_matmul_per_step(grid):
    forward, args = _lstm(1, steps=5)
    program = gdsl.make_ir(forward)(*args)
    plan = schedule(program, grid=grid, owner=True, views=VIEWS, k_parts=VIEWS)        # concat_k=None: stacked
    plain_owner = schedule(program, grid=grid, owner=True, concat_k=False, views=VIEWS, k_parts=VIEWS)
    assert loop_grid_barriers(plan) == loop_grid_barriers(plain_owner) == 1
    matmuls = [op for op in _loop_ops(plan) if op.kind == matmul_p.name]
    assert len(matmuls) == 2 * 3 < len([op for op in _loop_ops(plain_owner) if op.kind == matmul_p.name])
    # each layer's vEUs run one matmul per step
    for stmt in (s for loop in [s for s in plan.kernels[0].body if isinstance(s, Loop)] for s in loop.body):
        if isinstance(stmt, Wave) and any(t.op.kind == matmul_p.name for t in stmt.tasks):
            ranges = [(t.first, t.count) for t in stmt.tasks if t.op.kind == matmul_p.name]
            assert len(set(ranges)) == len(ranges)
    from gdsl.schedule.simulate import simulate
    flat = _flat(args)
    assert_trees_close(simulate(plan, flat, seed=grid), run_program(program, flat), tolerance=BACKEND_TOLERANCE)


@pytest.mark.parametrize("owner", ["auto", None])
def test_owner_auto_keeps_the_owner_plan_only_where_it_pays(owner):
    """Full size at 264 vEUs (the H200's two per SM), owner="auto" or the default: the LSTM's owner plans, with
    two GEMVs one after the other per layer or with the layer's products stacked, ten chains (both measured
    slower), are not kept; NASRNN's one chain is. owner=False: never."""
    from models import common, load

    def owned(name, batch=1, **options):
        model = load(name)
        problem = common.build_problem(model, batch)
        fn = model.make_forward(problem.cfg, backend="cuda", grid=264, **options)
        return "owner_chains" in fn.lower(problem.weights, problem.batches[0]).lowering.plan.stats
    assert not owned("lstm", owner=owner, concat_k=False)
    assert not owned("lstm", owner=owner)
    assert owned("nasrnn", owner=owner)
    assert not owned("nasrnn", 64, owner=owner)
    assert not owned("nasrnn", owner=False)


# ------------------------------------------------------------------------------------------------ backends

@pytest.mark.parametrize("bs", [1, 4, 64])
@pytest.mark.parametrize("options", [{"concat_k": True}, {"owner": True}, {"owner": True, "concat_k": True}])
def test_emulator_matches_the_reference(bs, options):
    assert emulated_model_mismatches("lstm", bs, grid=8, **options) == []


@pytest.mark.parametrize("name,options", [("nasrnn", {"concat_k": True}), ("nasrnn", {"owner": "auto"}),
                                          ("seq2seq", {"concat_k": True})])
def test_emulated_models_match_the_reference(name, options):
    """Seq2seq's decoder cell stacks its two products in a loop with a data-dependent exit."""
    for bs in (1, 64):
        assert emulated_model_mismatches(name, bs, grid=8, **options) == []


def test_emulated_batched_parts_match_the_interpreter():
    args = _sum3_args()
    expected = run_program(gdsl.make_ir(sum3)(*args), _flat(args))
    assert_trees_close([np.asarray(emulate(sum3, *args, grid=4, concat_k=True))], expected,
                       tolerance=BACKEND_TOLERANCE)


@pytest.mark.parametrize("bs", [1, 4])
def test_cpu_backend_matches_the_interpreter(bs):
    forward, args = _lstm(bs)
    expected = run_program(gdsl.make_ir(forward)(*args), _flat(args))
    for backend in ("cpu", "interpret"):
        got = gdsl.jit(forward, backend=backend, concat_k=True, owner=True)(*args)
        assert_trees_close([np.asarray(got)], expected, tolerance=BACKEND_TOLERANCE)


def test_options_are_checked():
    with pytest.raises(ValueError):
        gdsl.jit(outside_loops, concat_k="yes")
    with pytest.raises(ValueError):
        gdsl.jit(outside_loops, owner="always")
    with pytest.raises(ValueError):
        schedule(gdsl.make_ir(outside_loops)(*(np.ones((2, 2), np.float32),) * 3), concat_k=1.5)


@needs_nvrtc
@pytest.mark.parametrize("bs", [1, 4, 64])
def test_nvrtc_compiles_the_parts(bs):
    """GEMV (batch 1, the whole A staged at once), GEMM tiles (batch 4 and 64, the wide tile) reading A in parts."""
    forward, args = _lstm(bs, hidden=32)
    assert not any(K_PARTS in op.params for op in _loop_ops(cuda_lowering(forward, args).plan))   # off by default
    from gdsl.backends.cfamily.lower import check_options, lower_with_grid
    from gdsl.backends.cuda.dialect import CUDADialect
    dialect = CUDADialect()
    opts = check_options({"control": "device", "block": 256, "barrier": "atomic", "concat_k": True}, dialect)
    lowered = lower_with_grid(gdsl.make_ir(forward)(*args), opts, 132, dialect)
    assert any(K_PARTS in op.params for op in _loop_ops(lowered.plan))
    assert "if (k < 32) return" in lowered.rendered.source
    assert cuda_toolchain.compile_cuda(lowered.rendered.source, "sm_90")[:4] == b"\x7fELF"


@needs_nvrtc
def test_nvrtc_compiles_the_full_size_owner_lstm():
    from models import common, load
    model = load("lstm")
    problem = common.build_problem(model, 1)
    lowered = model.make_forward(problem.cfg, backend="cuda", grid=264, owner=True).lower(
        problem.weights, problem.batches[0])
    ops = _loop_ops(lowered.lowering.plan)
    assert sum(op.kind == matmul_p.name for op in ops) == 20                  # 10 layers x 2 steps
    assert all(dict(op.params).get(K_PARTS) == (256, 256) for op in ops
               if op.kind == matmul_p.name and op.inputs[1].aval.shape[-2] == 512)
    assert "gdsl_gemv_tile<1, 40, 256, 512," in lowered.source                 # A staged whole: one round trip
    assert cuda_toolchain.compile_cuda(lowered.source, "sm_90")[:4] == b"\x7fELF"
