"""Spread frames (the scheduler option `spread_frames`, plan.RecFunction.spread): a call's callees put their
frames `spread * step` further than its own frame, so that the subtree of a later call from one body never
touches the frames an earlier call's last op read; the grid barrier at the end of that earlier call is then
a block sync where only such a sibling follows it (RAE: a left child's matmul, then its right sibling's
first leaf). And waves aside (the option `aside`, Scheduler._waves_aside): a small wave that grid barriers
isolate (RAE's leaf, the output copy) runs on the vEUs past the recursive function's widest wave, at the
same time as that wave's uTasks once the barriers between them are block syncs.

Checked against the interpreter on the plan simulator (its race checks included: the same plan with the
frames not spread is a race), the C-family CPU emulator (vEUs as threads), the cpu backend (accepts the
option, its own plan) and NVRTC; on unbalanced trees, depth 1, a lone leaf, nodes of three children, RAE's
small and bench sizes, an argument the callee modifies, a result that is the argument itself, and an
overflow."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from strategies import emulated_model_mismatches, needs_cxx, needs_nvrtc
from test_schedule_fork import TREES, cpu_encoder_mismatch, wide_args
from test_schedule_recursion import (
    CHAIN,
    check_rae_overflow,
    check_rae_trees,
    encoder,
    flat_args,
    height,
    rae_case,
    shapes,
)
from test_schedule_recursion_args import args_of, mixed, modified, passed_on, two_arguments
from test_schedule_resident_calls import rae_lowered

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import emulator
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.backends.hip import toolchain as hip_toolchain
from gdsl.interpreter import run_program
from gdsl.schedule import schedule
from gdsl.schedule.plan import Sync, Wave, walk
from gdsl.schedule.simulate import BarrierError, simulate

GRIDS = (1, 2, 3, 8, 16)


def spread_plan(tree, hidden=64, grid=8, max_depth=None, **options):
    args = wide_args(tree, hidden)
    program = gdsl.make_ir(encoder(max_depth or height(tree) + 2, hidden))(*args)
    options = {"spread_frames": True, **options}
    return program, args, schedule(program, grid=grid, epilogues=CHAIN, **options)


def by_site_syncs(plan):
    return [s for f in plan.functions for s in walk(f.body) if isinstance(s, Sync) and s.sites is not None]


def leaf_chain_encoder(max_depth, hidden):
    """RAE's encoder with a leaf of several ops (slices, a product, a sum on one vEU and the product after
    it with a block sync between: those two are not isolated by grid barriers and stay where they are)."""
    def program(x, W, b, left, right, is_leaf, root):
        @gdsl.recurse(result=gdsl.ShapeDtype((hidden,), gdsl.float32), max_depth=max_depth)
        def encode(node):
            return gdsl.cond(is_leaf[node], lambda: gnp.tanh(x[node]) * gnp.sum(x[node] * x[node]),
                             lambda: gnp.tanh(gnp.concatenate([encode(left[node]), encode(right[node])]) @ W + b))
        return encode(root)
    return program


def function_waves(plan):
    return [s for f in plan.functions for s in walk(f.body) if isinstance(s, Wave)]


def check_simulated(program, args, grids=GRIDS, **options):
    """simulate(plan with spread frames, and `options`) == interpreter (or both overflow), device control,
    every grid."""
    flat = flat_args(args)
    try:
        expected = run_program(program, flat)[0]
    except gdsl.RecursionDepthError:
        expected = None
    for grid in grids:
        plan = schedule(program, grid=grid, epilogues=CHAIN, **{"spread_frames": True, **options})
        for seed in range(2):
            if expected is None:
                with pytest.raises(gdsl.RecursionDepthError):
                    simulate(plan, flat, seed=seed)
            else:
                np.testing.assert_allclose(simulate(plan, flat, seed=seed)[0], expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ the plan

def test_a_left_childs_last_barrier_is_a_block_sync():
    """With spread frames the node's last barrier is a grid barrier only for the root (site 2: the output
    copy on vEU 0 reads it); without the option also for a left child (site 0)."""
    _, _, plan = spread_plan(TREES["balanced"])
    (f,) = plan.functions
    assert f.spread == 1 and f.max_step == 2
    assert [sorted(s.sites) for s in by_site_syncs(plan)] == [[2]]
    assert "callees' frames 1 x step further" in str(plan)
    _, _, plain = spread_plan(TREES["balanced"], spread_frames=False)
    assert plain.functions[0].spread == 0 and [sorted(s.sites) for s in by_site_syncs(plain)] == [[0, 2]]


def test_the_spread_is_what_makes_it_safe():
    """The same plan with the frames not spread (spread 0: the right sibling's leaf writes a frame the left
    child's matmul read) is a race the simulator finds."""
    _, args, plan = spread_plan(TREES["unbalanced"])
    simulate(plan, flat_args(args))
    (f,) = plan.functions
    unspread = dataclasses.replace(plan, functions=(dataclasses.replace(f, spread=0),))
    with pytest.raises(BarrierError):
        simulate(unspread, flat_args(args))


@pytest.mark.parametrize("fn", [mixed, modified, passed_on])
def test_plans_it_cannot_help_are_unchanged(fn):
    """A second call whose argument is a buffer copied into its frame (a wave between the calls), or a body
    with one call: no site gains, so no function is spread and the plan is the one without the option."""
    program = gdsl.make_ir(fn())(*args_of(3))
    plain = schedule(program, grid=8, epilogues=CHAIN, spread_frames=False, aside=False)
    spread = schedule(program, grid=8, epilogues=CHAIN, spread_frames=True, aside=False)
    assert all(f.spread == 0 for f in spread.functions)
    assert str(spread) == str(plain)


def test_not_with_forks():
    _, _, plan = spread_plan(TREES["balanced"], fork=True)
    assert plan.functions[0].spread == 0


def test_rae_executes_one_grid_barrier_per_inner_node():
    """RAE at full size on the fixed tree (32 inner nodes, 15 of them left children): 32 + 1 grid barriers
    executed (the one before each node's matmul, and the root's last) against 32 + 15 + 1 without."""
    from models import floor
    program, flat, _, _ = rae_case()
    plan = schedule(program, grid=132, epilogues=CHAIN, spread_frames=True)
    assert floor.count_plan(plan, flat).plan_grid_barriers == 32 + 1
    plain = schedule(program, grid=132, epilogues=CHAIN, spread_frames=False, aside=False)
    assert floor.count_plan(plain, flat).plan_grid_barriers == 32 + 15 + 1


def test_the_leaf_and_the_output_copy_run_aside():
    """With `aside` RAE's leaf (one uTask) and the output copy leave vEU 0 for vEU 32, past the matmul's 32
    vEUs; the barriers are those of the plan without it. Alone it leaves the cost model's critical path as
    it was (each leaf follows a grid barrier); with spread frames the leaves run beside the matmuls."""
    from models import floor
    program, flat, _, _ = rae_case()
    for spread, barriers in ((False, 32 + 15 + 1), (True, 32 + 1)):      # (leaves as calls: test_schedule_peel.py)
        plan = schedule(program, grid=132, epilogues=CHAIN, spread_frames=spread, aside=True, thin_gemv=False,
                        peel=False)
        firsts = sorted((t.op.n_utasks, t.first) for w in function_waves(plan) for t in w.tasks)
        assert firsts == [(1, 32), (32, 0)] and plan.stats["waves_aside"] == 2
        assert floor.count_plan(plan, flat).plan_grid_barriers == barriers


def test_small_waves_between_the_same_grid_barriers_move_together():
    """A leaf of several ops: the slices and the product (grid barriers around them) move, and so do the sum
    and the product after it (a block sync between them: moved by the same number of vEUs, they keep one
    vEU's order); the matmul (the functions' widest wave) stays."""
    args = wide_args(TREES["unbalanced"], 64)
    program = gdsl.make_ir(leaf_chain_encoder(6, 64))(*args)
    options = dict(grid=8, epilogues=CHAIN, spread_frames=False, peel=False)
    plain = function_waves(schedule(program, aside=False, **options))
    aside = function_waves(schedule(program, aside=True, **options))
    moved = [a.tasks[0].first - p.tasks[0].first for p, a in zip(plain, aside)]
    assert moved == [0, 4, 4, 4, 4]      # (the matmul, the slices, the product, the sum, the product after)


# ------------------------------------------------------------------------------------------ simulated

@pytest.mark.parametrize("hidden", [4, 64])
@pytest.mark.parametrize("name", list(TREES))
def test_simulated(name, hidden):
    tree = TREES[name]
    args = wide_args(tree, hidden)
    check_simulated(gdsl.make_ir(encoder(height(tree) + 2, hidden))(*args), args)


@pytest.mark.parametrize("spread", [None, True])
@pytest.mark.parametrize("name", list(TREES))
def test_aside_simulated(name, spread):
    tree = TREES[name]
    args = wide_args(tree, 64)
    check_simulated(gdsl.make_ir(encoder(height(tree) + 2, 64))(*args), args, aside=True, spread_frames=spread)
    check_simulated(gdsl.make_ir(leaf_chain_encoder(height(tree) + 2, 64))(*args), args, aside=True,
                    spread_frames=spread)


@settings(max_examples=15, deadline=None)
@given(shapes(max_leaves=10))
def test_random_trees_simulated(tree):
    args = wide_args(tree, 64)
    check_simulated(gdsl.make_ir(encoder(height(tree) + 1, 64))(*args), args, grids=(3, 8))


@pytest.mark.parametrize("name", ["left chain", "right chain", "balanced"])
def test_depth_limit_stays_exact(name):
    tree = TREES[name]
    args = wide_args(tree, 64)
    check_simulated(gdsl.make_ir(encoder(height(tree) + 1, 64))(*args), args, grids=(8,))
    check_simulated(gdsl.make_ir(encoder(height(tree), 64))(*args), args, grids=(8,))


def ternary_encoder(max_depth, hidden):
    """Nodes of three children (left, right and `mid`, all read in place: calls of steps 1, 2 and 3)."""
    def program(x, W, b, left, mid, right, is_leaf, root):
        @gdsl.recurse(result=gdsl.ShapeDtype((hidden,), gdsl.float32), max_depth=max_depth)
        def encode(node):
            return gdsl.cond(is_leaf[node], lambda: x[node], lambda: gnp.tanh(gnp.concatenate(
                [encode(left[node]), encode(mid[node]), encode(right[node])]) @ W + b))
        return encode(root)
    return program


def ternary_args(hidden, seed=0):
    """A tree of 3-child nodes: root(leaf, node(leaf, leaf, node(leaf, leaf, leaf)), node(leaf, leaf, leaf))."""
    children = {12: (0, 7, 11), 7: (1, 2, 6), 6: (3, 4, 5), 11: (8, 9, 10)}
    n = 13
    left, mid, right, is_leaf = (np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32),
                                 np.ones(n, bool))
    for node, (a, m, c) in children.items():
        left[node], mid[node], right[node], is_leaf[node] = a, m, c, False
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, hidden)).astype(np.float32)
    W = (rng.standard_normal((3 * hidden, hidden)) / np.sqrt(3 * hidden)).astype(np.float32)
    b = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
    return x, W, b, left, mid, right, is_leaf, np.int32(12)


def test_three_calls_per_node():
    """Steps 1, 2, 3: spread 2 (a call of step s puts its callees 2s further); the first two calls' sites
    leave the barrier out."""
    args = ternary_args(64)
    program = gdsl.make_ir(ternary_encoder(5, 64))(*args)
    plan = schedule(program, grid=8, epilogues=CHAIN, spread_frames=True)
    assert plan.functions[0].spread == 2
    assert [sorted(s.sites) for s in by_site_syncs(plan)] == [[3]]
    check_simulated(program, args)
    check_simulated(gdsl.make_ir(ternary_encoder(2, 64))(*args), args, grids=(8,))     # overflows


@pytest.mark.parametrize("fn", [mixed, modified, passed_on])
@pytest.mark.parametrize("depth", [0, 1, 4])
def test_arguments_simulated(fn, depth):
    """An argument the callee modifies, one passed on, a result that is the argument itself (depth 0)."""
    check_simulated(gdsl.make_ir(fn())(*args_of(depth)), args_of(depth), grids=(1, 3))


@pytest.mark.parametrize("tree", ["fixed", "random"])
@pytest.mark.parametrize("size", ["small", "bench"])
def test_rae_simulated(size, tree):
    from models import rae
    cfg = rae.small() if size == "small" else rae.Config()
    program, flat, weights, inputs = rae_case(cfg, tree)
    plan = schedule(program, grid=132, epilogues=CHAIN, spread_frames=True, aside=True)
    # (at the small size a node's matmul runs on one vEU: no grid barrier to leave out, nothing spread)
    assert plan.functions[0].spread == (1 if size == "bench" else 0)
    np.testing.assert_allclose(simulate(plan, flat)[0], rae.reference(weights, inputs, cfg), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ backends

@needs_cxx
@pytest.mark.parametrize("name", list(TREES))
def test_emulated(name):
    """vEUs as threads: a frame reused too early is a wrong answer."""
    tree = TREES[name]
    args = wide_args(tree, 32)
    expected = run_program(gdsl.make_ir(encoder(height(tree) + 2, 32))(*args), flat_args(args))[0]
    for grid in (1, 3, 8):
        for aside in (None, True):
            got = emulator.emulate(encoder(height(tree) + 2, 32), *args, grid=grid, block=32, spread_frames=True,
                                   aside=aside)
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@needs_cxx
def test_emulated_three_calls_and_overflow():
    args = ternary_args(32)
    expected = run_program(gdsl.make_ir(ternary_encoder(5, 32))(*args), flat_args(args))[0]
    got = emulator.emulate(ternary_encoder(5, 32), *args, grid=8, block=32, spread_frames=True)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(gdsl.RecursionDepthError):
        emulator.emulate(ternary_encoder(2, 32), *args, grid=8, block=32, spread_frames=True)


@needs_cxx
@pytest.mark.parametrize("fn", [passed_on, two_arguments])
def test_emulated_arguments(fn):
    for depth in (0, 4):
        args = args_of(depth, with_y=fn is two_arguments)
        expected = run_program(gdsl.make_ir(fn())(*args), flat_args(args))[0]
        got = emulator.emulate(fn(), *args, grid=4, block=32, spread_frames=True)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@needs_cxx
@pytest.mark.parametrize("tree", ["fixed", "random"])
def test_emulated_rae_small(tree):
    assert emulated_model_mismatches("rae", 1, {"tree": tree}, grid=8, block=32, spread_frames=True,
                                     aside=True) == []


def test_cpu_backend_accepts_the_options():
    assert cpu_encoder_mismatch(spread_frames=True, aside=True) < 1e-5


@needs_nvrtc
def test_rae_cuda_compiles():
    source = rae_lowered("cuda", tree="fixed", spread_frames=True, aside=True).source
    assert "c_encode += 2;" in source and "r_encode[d_encode - 1] == 2)" in source
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"



@pytest.mark.skipif(hip_toolchain.hiprtc_available() is not None, reason=str(hip_toolchain.hiprtc_available()))
def test_hip_source_compiles():
    args = wide_args(TREES["unbalanced"], 64)
    source = gdsl.jit(encoder(8, 64), backend="hip", grid=16, spread_frames=True, aside=True).lower(*args).source
    assert "c_encode += 2;" in source
    assert hip_toolchain.compile_hip(source, "gfx90a")[:4] == b"\x7fELF"


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{"spread_frames": True}, {"aside": True},
                                     {"spread_frames": True, "aside": True},
                                     {"spread_frames": True, "aside": True, "narrow": True}])
def test_cuda_rae_bench_trees(options):
    """On the GPU: RAE's bench size on the fixed tree and random trees against the numpy reference; an
    overflowing launch raises, and a lone leaf is right after it."""
    check_rae_trees(**options)
    check_rae_overflow(**options)
