"""Gathered-row views (the option row_views, on by default since session 34): a take of whole rows `E[idx]` read
only by matmuls as their left operand folds into them (Scheduler._fold_row_gathers, plan.ROW_INDEX,
plan.Value.rows): the tile loaders read row m of A at E[clamp(idx[m], 0, V - 1)], and the take's op, wave and
barrier go. Simulated with its race checks against the interpreter, emulated, compiled with NVRTC; Seq2seq's
decoder step at batch 64 (full size) loses its gather's wave and grid barrier."""
from __future__ import annotations

import numpy as np
import pytest
from strategies import (
    BACKEND_TOLERANCE,
    assert_trees_close,
    emulated_model_mismatches,
    first_loop,
    needs_cxx,
    needs_nvrtc,
    zoo_lowered,
)
from test_schedule import VIEWS, _flat_args, check_emulated, check_plan

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import emulator
from gdsl.interpreter import run_program
from gdsl.primitives.structural import take_p
from gdsl.schedule import schedule
from gdsl.schedule.plan import EPILOGUE, ROW_INDEX, Loop, Sync, Wave, plan_statements, walk
from gdsl.schedule.printer import describe_op
from gdsl.schedule.scheduler import loop_grid_barriers
from gdsl.tracing.pytree import tree_unflatten
from models import common, load

rng = np.random.default_rng(11)
f32 = np.float32


def gathered(E, idx, W, U, h):
    """A gather feeding a matmul before a loop and in it; the loop's indices an argmax pushed out of range
    (below 0 after take's wrap, past the last row: both clamped)."""
    x0 = gnp.take(E, idx, axis=0) @ W

    def step(t, c):
        h, tok = c
        h = gnp.tanh(gnp.take(E, tok, axis=0) @ W + h @ U)
        return h, gnp.argmax(h, axis=1).astype(gdsl.int32) * 7 - 30
    return gdsl.fori_loop(0, 3, step, (h + x0, idx))


def two_readers(E, idx, W, V):
    """Two matmuls read the same gathered rows: both read them in place."""
    x = gnp.take(E, idx, axis=0)
    return gnp.tanh(x @ W) + x @ V


def with_epilogue(E, idx, W, b):
    """The matmul reading the rows takes an epilogue: its operands come after the indices."""
    return gnp.tanh(gnp.take(E, idx, axis=0) @ W + b)


def other_reader(E, idx, W):
    """The rows are also read elementwise: the take stays an op."""
    x = gnp.take(E, idx, axis=0)
    return x @ W + gnp.tanh(x)[:, :3]


def right_operand(E, idx, W):
    """The rows are a matmul's right operand: the take stays an op."""
    return W @ gnp.take(E, idx, axis=0)


IDX = np.array([0, 9, -15, 12, 4], np.int32)          # -15 wraps to -5, then take clamps it to row 0; 12 to 9
ARGS = {
    gathered: (rng.standard_normal((10, 8)).astype(f32), IDX, (rng.standard_normal((8, 12)) * 0.3).astype(f32),
               (rng.standard_normal((12, 12)) * 0.3).astype(f32), rng.standard_normal((5, 12)).astype(f32)),
    two_readers: (rng.standard_normal((10, 8)).astype(f32), IDX, rng.standard_normal((8, 6)).astype(f32),
                  rng.standard_normal((8, 6)).astype(f32)),
    with_epilogue: (rng.standard_normal((10, 8)).astype(f32), IDX, rng.standard_normal((8, 6)).astype(f32),
                    rng.standard_normal(6).astype(f32)),
    other_reader: (rng.standard_normal((10, 8)).astype(f32), IDX, rng.standard_normal((8, 3)).astype(f32)),
    right_operand: (rng.standard_normal((10, 8)).astype(f32), IDX[:2], rng.standard_normal((3, 2)).astype(f32)),
}
FOLDED = {gathered: 2, two_readers: 1, with_epilogue: 1, other_reader: 0, right_operand: 0}


def _ops(plan):
    return [t.op for s in plan_statements(plan) if isinstance(s, Wave) for t in s.tasks]


@pytest.mark.parametrize("fn", list(ARGS), ids=lambda f: f.__name__)
def test_simulated_plans_compute_what_the_interpreter_does(fn):
    def check(plan, control):
        ops = _ops(plan)
        assert plan.stats["row_gathers"] == FOLDED[fn]
        assert sum(op.kind == take_p.name for op in ops) == (0 if FOLDED[fn] else 1)
        for op in ops:
            if ROW_INDEX in op.params:
                assert op.inputs[0].rows is not None and op.inputs[0].dynamic
                assert op.inputs[0].rows.index is op.inputs[op.params[ROW_INDEX]]
                assert EPILOGUE in op.params or fn is not with_epilogue
    check_plan(fn, *ARGS[fn], seeds=(0, 1), row_gathers=VIEWS, epilogues=VIEWS, check=check)


def test_the_loop_loses_the_gather_s_wave():
    program = gdsl.make_ir(gathered)(*ARGS[gathered])
    plain, folded = (schedule(program, grid=16, views=VIEWS, row_gathers=chain) for chain in ((), VIEWS))
    loops = [next(s for s in p.kernels[0].body if isinstance(s, Loop)) for p in (plain, folded)]
    waves = [sum(isinstance(s, Wave) for s in walk(loop.body)) for loop in loops]
    assert waves[1] == waves[0] - 1
    (op,) = [t.op for s in walk(loops[1].body) if isinstance(s, Wave) for t in s.tasks if ROW_INDEX in t.op.params]
    assert "in0[rows clamp(" in describe_op(op) and "[m], 0, 9)]<f32[5,8]>" in describe_op(op)


def test_without_the_rule_the_take_stays_an_op():
    program = gdsl.make_ir(gathered)(*ARGS[gathered])
    plan = schedule(program, grid=16, views=VIEWS, row_gathers=("cpu",))
    assert plan.stats["row_gathers"] == 0 and sum(op.kind == take_p.name for op in _ops(plan)) == 2


@needs_cxx
@pytest.mark.parametrize("fn", [gathered, two_readers, with_epilogue], ids=lambda f: f.__name__)
def test_emulated_plans_match_the_interpreter(fn):
    check_emulated(fn, *ARGS[fn], row_views=True)


@needs_cxx
@pytest.mark.parametrize("control", ["device", "host"])
def test_emulated_hip_dialect_and_host_control_match_the_interpreter(control):
    """The HIP dialect's text (its chain reaches the C-family "row_gather" rule), and host control, where each
    wave is a launch and the matmul reads the indices its own launch finds in memory."""
    from gdsl.backends.hip.emulated import EmulatedHIPDialect
    program = gdsl.make_ir(gathered)(*ARGS[gathered])
    expected = tree_unflatten(program.out_tree, run_program(program, _flat_args(ARGS[gathered])))
    for dialect in (None, EmulatedHIPDialect(64)):
        got = emulator.emulate(gathered, *ARGS[gathered], control=control, grid=3, block=64, row_views=True,
                               dialect=dialect)
        assert_trees_close(got, expected, tolerance=BACKEND_TOLERANCE)


@needs_cxx
@pytest.mark.parametrize("batch,options", [(64, {}), (64, {"uniform_reductions": True, "index_ranges": True}),
                                           (5, {"owner": True})])
def test_emulated_seq2seq_matches_its_reference(batch, options):
    assert emulated_model_mismatches("seq2seq", batch, grid=8, block=64, row_views=True, **options) == []


def test_simulated_seq2seq_batch_64():
    """The small Seq2seq at batch 64, simulated with its race checks (the token read as indices by the matmul
    and overwritten in place by the argmax)."""
    prob = common.build_problem(load("seq2seq"), 64, small=True)

    def forward(weights, inputs):
        return prob.model.forward(weights, inputs, prob.cfg)
    check_plan(forward, prob.weights, prob.batches[0], controls=("device",), grids=(8,), row_gathers=VIEWS,
               uniform_reductions=True, index_ranges=True)


def _seq2seq_step(**options):
    """(waves, grid barriers, block syncs) per decoder step of Seq2seq at batch 64, full size, rendered for CUDA;
    and the lowering."""
    lowering = zoo_lowered("seq2seq", 64, **options).lowering
    loop = first_loop(lowering.plan)
    stmts = list(walk(loop.cond + loop.body))
    syncs = [s.scope for s in stmts if isinstance(s, Sync)]
    counts = (sum(isinstance(s, Wave) for s in stmts), syncs.count("grid"), syncs.count("block"))
    assert counts[1] == loop_grid_barriers(lowering.plan)
    return counts, lowering


def test_seq2seq_batch_64_step_loses_a_wave_and_a_grid_barrier():
    neither = {"uniform_reductions": False, "index_ranges": False}      # (all three on by default)
    assert _seq2seq_step(row_views=False, **neither)[0] == (7, 7, 0)
    assert _seq2seq_step(**neither)[0] == _seq2seq_step(row_views=True, **neither)[0] == (6, 6, 0)
    both = {"uniform_reductions": True, "index_ranges": True}
    assert _seq2seq_step(row_views=False, **both)[0] == (5, 5, 0)
    assert _seq2seq_step(**both)[0] == _seq2seq_step()[0] == (4, 4, 0)


@needs_nvrtc
def test_seq2seq_full_size_compiles_with_nvrtc():
    from gdsl.backends.cuda import toolchain as cuda_toolchain
    _, lowering = _seq2seq_step(row_views=True, uniform_reductions=True, index_ranges=True)
    assert lowering.plan.stats["row_gathers"] == 1
    assert "r > 3796 ? 3796 : r" in lowering.source        # the loader clamps the token into the vocabulary
    assert cuda_toolchain.compile_cuda(lowering.source, "sm_90")[:4] == b"\x7fELF"


@needs_nvrtc
def test_small_program_compiles_with_nvrtc():
    from gdsl.backends.cfamily.lower import check_options, lower_with_grid
    from gdsl.backends.cuda import toolchain as cuda_toolchain
    from gdsl.backends.cuda.dialect import CUDADialect
    dialect = CUDADialect()
    opts = check_options({"control": "device", "block": 256, "barrier": "atomic", "row_views": True}, dialect)
    lowering = lower_with_grid(gdsl.make_ir(gathered)(*ARGS[gathered]), opts, 132, dialect)
    assert lowering.plan.stats["row_gathers"] == 2
    assert cuda_toolchain.compile_cuda(lowering.source, "sm_90")[:4] == b"\x7fELF"


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
def test_other_backends_accept_the_option(backend):
    expected = run_program(gdsl.make_ir(gathered)(*ARGS[gathered]), _flat_args(ARGS[gathered]))
    got = gdsl.jit(gathered, backend=backend, row_views=True)(*ARGS[gathered])
    assert_trees_close([np.asarray(g) for g in got], expected, tolerance=BACKEND_TOLERANCE)


def test_the_floor_counter_reads_gathered_rows_as_the_simulator_does():
    """models/floor.py's counter reads buffers its own way: gathered rows through the simulator's gather (the
    decoded tokens, and so the trip count it counts, depend on them)."""
    from gdsl.schedule.simulate import Simulator
    from models import floor
    prob = common.build_problem(load("seq2seq"), 64, small=True, seed=0)
    lowered = prob.model.make_forward(prob.cfg, backend="cuda", row_views=True).lower(prob.weights, prob.batches[0])
    plan = floor.plan_of(lowered)
    assert any(v.rows is not None for op in _ops(plan) for v in op.inputs)
    flat = floor.flat_arguments(prob.weights, prob.batches[0])
    expected = Simulator(plan, check=False).run(flat)
    for got, want in zip(floor._Counter(plan).run(flat), expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert common.compare(tree_unflatten(lowered.lowering.program.out_tree, expected), prob.references()[0]) == []
