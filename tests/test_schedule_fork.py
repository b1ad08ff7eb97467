"""Parallel recursion (the scheduler option `fork`, plan.Fork): a node's two calls run at once, each on one half
of the running vEU group, with barriers of that group and frames of their own; a group too small to split
runs them one after the other with a barrier of the group in between.

Checked against the interpreter on the plan simulator (its race checks treat a group barrier as clearing
only what the group's vEUs did), the C-family CPU emulator (vEUs are threads: group barriers really wait),
the cpu backend (calls one after the other) and NVRTC (the CUDA source compiles); on unbalanced trees, a
tree of depth 1, a lone leaf, RAE's small and bench sizes, with groups split down to one vEU and with groups
that stop splitting early."""
import dataclasses

import numpy as np
import pytest
from strategies import needs_cxx, needs_nvrtc
from test_schedule_recursion import CHAIN, chain, encoder, encoder_args, flat_args, height, rae_case

import gdsl
from gdsl.backends.cfamily import emulator
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.backends.hip import toolchain as hip_toolchain
from gdsl.interpreter import run_program
from gdsl.schedule import scheduler
from gdsl.schedule.plan import Branch, Call, Fork, Sync, walk
from gdsl.schedule.simulate import BarrierError, simulate

TREES = {
    "leaf": None,
    "depth 1": (None, None),
    "balanced": ((None, None), (None, None)),
    "left chain": (chain(4, "left"), None),
    "right chain": (None, chain(4, "right")),
    "unbalanced": (((None, None), None), ((None, (None, None)), (chain(3, "left"), None))),
}
# FORK_MIN_SHARE: groups split down to one vEU (0.01), or only while a half keeps the widest task's vEUs.
SHARES = (0.01, 1.0)


def wide_args(tree, hidden, seed=0):
    """encoder_args at another width (the node's matmul then spreads over several vEUs)."""
    rng = np.random.default_rng(seed)
    _, _, _, *rest = encoder_args(tree, seed)
    n = len(rest[0])
    x = rng.uniform(-1, 1, (n, hidden)).astype(np.float32)
    W = (rng.standard_normal((2 * hidden, hidden)) / np.sqrt(2 * hidden)).astype(np.float32)
    b = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
    return (x, W, b, *rest)


def cpu_encoder_mismatch(tree_name="unbalanced", hidden=16, **options):
    """The largest difference between the encoder over TREES[tree_name] at width `hidden` on the cpu backend
    with `options` (scheduler options it accepts and ignores) and the interpreter."""
    tree = TREES[tree_name]
    args = wide_args(tree, hidden)
    fn = encoder(height(tree) + 1, hidden)
    got = gdsl.to_numpy(gdsl.jit(fn, backend="cpu", **options)(*args))
    expected = run_program(gdsl.make_ir(fn)(*args), flat_args(args))[0]
    return float(np.max(np.abs(got - expected) / (np.abs(expected) + 1)))


def forks(plan):
    return [s for f in plan.functions for s in walk(f.body) if isinstance(s, Fork)]


def fork_plan(tree, hidden=4, grid=8, max_depth=None):
    args = wide_args(tree, hidden)
    program = gdsl.make_ir(encoder(max_depth or height(tree) + 2, hidden))(*args)
    return program, args, gdsl.schedule.schedule(program, grid=grid, epilogues=CHAIN, fork=True)


# ------------------------------------------------------------------------------------------ the plan

def test_the_two_calls_of_a_node_are_one_fork():
    """The node's calls are a Fork: each half's argument Assign and Call, the right child's index computed
    by both halves in between; no barrier before it (nothing before it touches memory), the join after it a
    grid barrier (of the caller's group); without the option the plan has no Fork."""
    program, _, plan = fork_plan(TREES["balanced"])
    (fork,) = forks(plan)
    assert [c.site for c in fork.calls] == [0, 1] and [c.step for c in fork.calls] == [1, 2]
    assert isinstance(fork.first[-1], Call) and isinstance(fork.second[-1], Call) and fork.between
    node = next(s for s in walk(plan.functions[0].body) if isinstance(s, Branch)).branches[0]
    at = node.index(fork)
    assert not isinstance(node[at - 1], Sync) and node[at + 1].always_grid
    assert "fork (each half of the vEU group makes one call):" in str(plan)
    assert not forks(gdsl.schedule.schedule(program, grid=8, epilogues=CHAIN))


def test_min_group_follows_the_widest_task(monkeypatch):
    """A half keeps FORK_MIN_SHARE of the widest task's vEUs (the node's matmul: 4 vEUs at hidden 64)."""
    monkeypatch.setattr(scheduler, "FORK_MIN_SHARE", 1.0)
    (fork,) = forks(fork_plan(TREES["balanced"], hidden=64, grid=8)[2])
    assert fork.min_group == 4
    monkeypatch.setattr(scheduler, "FORK_MIN_SHARE", 0.01)
    assert forks(fork_plan(TREES["balanced"], hidden=64, grid=8)[2])[0].min_group == 1


# ------------------------------------------------------------------------------------------ simulated

@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("hidden", [4, 64])
@pytest.mark.parametrize("name", list(TREES))
def test_simulated(name, hidden, share, monkeypatch):
    monkeypatch.setattr(scheduler, "FORK_MIN_SHARE", share)
    tree = TREES[name]
    args = wide_args(tree, hidden)
    program = gdsl.make_ir(encoder(height(tree) + 2, hidden))(*args)
    expected = run_program(program, flat_args(args))[0]
    for grid in (1, 2, 3, 5, 8, 16):
        plan = gdsl.schedule.schedule(program, grid=grid, epilogues=CHAIN, fork=True)
        for seed in range(2):
            np.testing.assert_allclose(simulate(plan, flat_args(args), seed=seed)[0], expected,
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["left chain", "balanced"])
def test_depth_limit_with_forks(name):
    args = wide_args(TREES[name], 4)
    program = gdsl.make_ir(encoder(height(TREES[name]), 4))(*args)
    with pytest.raises(gdsl.RecursionDepthError):
        simulate(gdsl.schedule.schedule(program, grid=8, epilogues=CHAIN, fork=True), flat_args(args))


def _join_as_block_sync(block):
    out = []
    for k, stmt in enumerate(block):
        if isinstance(stmt, Branch):
            stmt = dataclasses.replace(stmt, branches=tuple(_join_as_block_sync(b) for b in stmt.branches))
        elif isinstance(stmt, Sync) and k and isinstance(block[k - 1], Fork):
            stmt = Sync("block")
        out.append(stmt)
    return tuple(out)


def test_a_missing_join_is_a_race():
    """The barrier after a Fork is needed: as a block sync, the parent's matmul (4 vEUs) reads the upper
    half's result with no barrier of the group between."""
    _, args, plan = fork_plan(TREES["unbalanced"], hidden=64, grid=8)
    f = plan.functions[0]
    broken = dataclasses.replace(plan, functions=(dataclasses.replace(f, body=_join_as_block_sync(f.body)),))
    simulate(plan, flat_args(args))
    with pytest.raises(BarrierError):
        simulate(broken, flat_args(args))


@pytest.mark.parametrize("tree", ["fixed", "random"])
@pytest.mark.parametrize("size", ["small", "bench"])
def test_rae_simulated(size, tree):
    from models import rae
    program, flat, _, _ = rae_case(rae.small() if size == "small" else rae.Config(), tree)
    plan = gdsl.schedule.schedule(program, grid=132, epilogues=CHAIN, fork=True)
    assert len(forks(plan)) == 1
    np.testing.assert_allclose(simulate(plan, flat)[0], run_program(program, flat)[0], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ backends

@needs_cxx
@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("name", list(TREES))
def test_emulated(name, share, monkeypatch):
    """vEUs as threads: a missing or wrong group barrier is a wrong answer or a hang."""
    monkeypatch.setattr(scheduler, "FORK_MIN_SHARE", share)
    tree = TREES[name]
    args = wide_args(tree, 32)
    expected = run_program(gdsl.make_ir(encoder(height(tree) + 2, 32))(*args), flat_args(args))[0]
    for grid in (1, 3, 8):
        got = emulator.emulate(encoder(height(tree) + 2, 32), *args, grid=grid, block=32, fork=True)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@needs_cxx
def test_emulated_overflow_leaves_every_group():
    """A call that overflows in one half: the other half's vEUs leave their group barriers too (no hang),
    and the host raises RecursionDepthError."""
    args = wide_args((chain(3, "left"), (None, None)), 32)
    with pytest.raises(gdsl.RecursionDepthError):
        emulator.emulate(encoder(3, 32), *args, grid=8, block=32, fork=True)


@needs_cxx
def test_emulated_rae_small():
    from models import rae
    cfg = rae.small()
    weights = rae.init_weights(cfg)
    for seed in range(2):
        inputs = rae.make_inputs(cfg, seed=seed)
        got = emulator.emulate(lambda w, t: rae.forward(w, t, cfg), weights, inputs, grid=8, block=32, fork=True)
        np.testing.assert_allclose(got, rae.reference(weights, inputs, cfg), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["unbalanced", "right chain"])
def test_cpu_backend_runs_the_calls_one_after_the_other(name):
    args = wide_args(TREES[name], 16)
    fn = encoder(height(TREES[name]) + 2, 16)
    got = gdsl.to_numpy(gdsl.jit(fn, backend="cpu", grid=3, fork=True)(*args))
    np.testing.assert_allclose(got, run_program(gdsl.make_ir(fn)(*args), flat_args(args))[0], rtol=1e-4, atol=1e-5)


@needs_nvrtc
def test_cuda_source_compiles():
    from models import rae
    cfg = rae.Config()
    weights, inputs = rae.init_weights(cfg), rae.make_inputs(cfg, tree="fixed")
    lowered = gdsl.jit(lambda w, t: rae.forward(w, t, cfg), backend="cuda", grid=132, fork=True).lower(
        weights, inputs)
    assert "gdsl_group_sync_atomic(gdsl_gbar + gdsl_g" in lowered.source
    assert cuda_toolchain.compile_cuda(lowered.source, "sm_90")[:4] == b"\x7fELF"


@pytest.mark.gpu
@pytest.mark.parametrize("min_share", [0.01, 0.25, 1.0])
def test_cuda_rae_bench_trees(min_share, monkeypatch):
    """On the GPU: RAE's bench size on random trees and the fixed tree, forked (groups down to one vEU, the
    default, and halves that keep the matmul's 32 vEUs), against the numpy reference; a launch that
    overflows raises and leaves the next launch correct (the group counters are cleared)."""
    from models import rae
    monkeypatch.setattr(scheduler, "FORK_MIN_SHARE", min_share)
    cfg = rae.Config()
    weights = rae.init_weights(cfg)
    forward = gdsl.jit(lambda w, t: rae.forward(w, t, cfg), backend="cuda", fork=True)
    for inputs in [rae.make_inputs(cfg, tree="fixed")] + [rae.make_inputs(cfg, seed=s) for s in range(5)]:
        got = gdsl.to_numpy(forward(weights, inputs))
        np.testing.assert_allclose(got, rae.reference(weights, inputs, cfg), rtol=1e-3, atol=1e-4)
    shallow = dataclasses.replace(cfg, max_depth=3)
    inputs = rae.make_inputs(cfg, tree="fixed")
    too_deep = gdsl.jit(lambda w, t: rae.forward(w, t, shallow), backend="cuda", fork=True)
    with pytest.raises(gdsl.RecursionDepthError):
        too_deep(weights, inputs)
    leaf = {**inputs, "root": np.asarray(np.flatnonzero(inputs["is_leaf"])[0], inputs["root"].dtype)}
    np.testing.assert_allclose(gdsl.to_numpy(too_deep(weights, leaf)), rae.reference(weights, leaf, shallow),
                               rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(hip_toolchain.hiprtc_available() is not None, reason=str(hip_toolchain.hiprtc_available()))
def test_hip_source_compiles():
    args = wide_args(TREES["unbalanced"], 64)
    source = gdsl.jit(encoder(8, 64), backend="hip", grid=16, fork=True).lower(*args).source
    assert "gdsl_group_sync_atomic(gdsl_gbar + gdsl_g" in source
    assert hip_toolchain.compile_hip(source, "gfx90a")[:4] == b"\x7fELF"
