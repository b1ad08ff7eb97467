"""Owner-computes placement (gdsl/schedule/owner.py) with double-buffered carries (gdsl/schedule/unroll.py),
the scheduler option `owner=True`: the LSTM and NASRNN loops (small configs, batch 1 and 64) run one grid
barrier per step; results equal the interpreter on the plan simulator (its race checks pass), cpu,
interpret and the C-family emulator; NVRTC compiles the CUDA; without the double buffering, a block sync in
place of the barrier the hazards keep is a race the simulator reports."""
import dataclasses

import numpy as np
import pytest
from strategies import BACKEND_TOLERANCE, assert_trees_close

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily.emulator import emulate
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.interpreter import run_program
from gdsl.jit import leaf_aval
from gdsl.primitives.linalg import matmul_p
from gdsl.schedule import licm, schedule
from gdsl.schedule.hazards import Hazards
from gdsl.schedule.plan import Loop, Sync, Wave, plan_statements
from gdsl.schedule.resident import RESIDENT
from gdsl.schedule.scheduler import Scheduler, loop_grid_barriers
from gdsl.schedule.simulate import BarrierError, simulate
from gdsl.schedule.steps import hoist_step_products
from gdsl.schedule.unroll import unroll_twice
from gdsl.schedule.wavefront import skew_program
from gdsl.tracing.pytree import tree_flatten
from models import lstm, nasrnn

MODELS = {"lstm": lstm, "nasrnn": nasrnn}
CASES = [(name, bs) for name in MODELS for bs in (1, 64)]
needs_nvrtc = pytest.mark.skipif(cuda_toolchain.nvrtc_available() is not None,
                                 reason=str(cuda_toolchain.nvrtc_available()))


def _model(name, bs, steps=None):
    """(forward function, weights, inputs, program, flat arguments) of a model's small config (`steps`: a
    shorter sequence, for the simulator, which runs uTask by uTask)."""
    model = MODELS[name]
    cfg = model.small() if steps is None else dataclasses.replace(model.small(), seq_len=steps)
    weights, inputs = model.init_weights(cfg), model.make_inputs(cfg, bs)

    def forward(w, x):
        return model.forward(w, x, cfg)
    program = gdsl.make_ir(forward)(weights, inputs)
    flat, _ = tree_flatten(((weights, inputs), {}))
    return forward, weights, inputs, program, [np.asarray(x, leaf_aval(x).dtype) for x in flat]


def _loop(plan) -> Loop:
    loops = [s for s in plan.kernels[0].body if isinstance(s, Loop)]
    assert len(loops) == 1
    return loops[0]


def _grid_barriers(block) -> int:
    return sum(1 for s in block if isinstance(s, Sync) and s.scope == "grid")


@pytest.mark.parametrize("grid", [132, 264])
@pytest.mark.parametrize("name,bs", CASES)
def test_one_grid_barrier_per_step(name, bs, grid):
    *_, program, _ = _model(name, bs)
    plain = schedule(program, grid=grid)
    owned = schedule(program, grid=grid, owner=True)
    assert loop_grid_barriers(plain) == 2
    assert owned.stats["steps_per_iteration"] == 2            # the body runs two steps (unroll.py)
    loop = _loop(owned)
    assert _grid_barriers(loop.cond + loop.body) == 2          # one per step, counted from the statements
    assert loop_grid_barriers(owned) == 1
    waves = [s for s in loop.body if isinstance(s, Wave)]
    # Each matmul and every elementwise op reading it (the cell) run on the same vEU range.
    for wave in waves:
        for task in wave.tasks:
            if task.op.kind == matmul_p.name:
                readers = [t for w in waves for t in w.tasks
                           if any(v.storage is task.op.outputs[0].storage for v in t.op.inputs)]
                assert readers and all((t.first, t.count) == (task.first, task.count) for t in readers)


@pytest.mark.parametrize("name,bs", CASES)
def test_simulated_plans_match_the_interpreter(name, bs):
    *_, program, flat = _model(name, bs, steps=3)      # (the LSTM skewed: 5 steps, an odd count: one peeled)
    expected = run_program(program, flat)
    for grid in (1, 3, 132):
        got = simulate(schedule(program, grid=grid, owner=True), flat, seed=grid)    # (race checks on)
        assert_trees_close(got, expected, tolerance=BACKEND_TOLERANCE)


@pytest.mark.parametrize("name,bs", CASES)
def test_backends_match_the_interpreter(name, bs):
    forward, weights, inputs, program, flat = _model(name, bs)
    expected = run_program(program, flat)
    for backend in ("cpu", "interpret"):
        got = gdsl.jit(forward, backend=backend, owner=True)(weights, inputs)
        assert_trees_close([np.asarray(got)], expected, tolerance=BACKEND_TOLERANCE)
    got = emulate(forward, weights, inputs, grid=8, owner=True)
    assert_trees_close([np.asarray(got)], expected, tolerance=BACKEND_TOLERANCE)


def test_resident_weights_keep_their_column_tiles():
    *_, program, flat = _model("lstm", 1)
    plan = schedule(program, grid=132, owner=True, resident_bytes=64 * 1024)
    assert loop_grid_barriers(plan) == 1
    resident = [t for s in plan_statements(plan) if isinstance(s, Wave) for t in s.tasks if RESIDENT in t.op.params]
    assert resident
    assert_trees_close(simulate(plan, flat, seed=1), run_program(program, flat), tolerance=BACKEND_TOLERANCE)


@needs_nvrtc
def test_nvrtc_compiles_the_cuda():
    forward, weights, inputs, *_ = _model("lstm", 1)
    lowered = gdsl.jit(forward, backend="cuda", grid=132, owner=True).lower(weights, inputs)
    loop = lowered.plan[lowered.plan.index("  loop:"):lowered.plan.index("  end loop")]
    assert loop.count("barrier (grid)") == 2                     # two steps per iteration
    assert cuda_toolchain.compile_cuda(lowered.source, "sm_90")[:4] == b"\x7fELF"


def _skewed(program):
    program = hoist_step_products(licm.hoist_program(program))
    skewed, _ = skew_program(program)
    return skewed


def test_without_double_buffering_the_local_sync_is_a_race(monkeypatch):
    """The owner layout alone (the body not unrolled): the hazards keep a grid barrier before the cell
    overwrites the state that other vEUs' matmuls read; forcing vEU-local syncs there, the simulator reports
    the race (a write over another vEU's read). Unrolled (double-buffered), the real hazards give one grid
    barrier per step and the simulator finds no race (test_simulated_plans_match_the_interpreter)."""
    *_, program, flat = _model("lstm", 1)
    skewed = _skewed(program)
    single = Scheduler(skewed, grid=132, owner=True).run()
    assert _grid_barriers(_loop(single).body) == 2             # per step: the layout alone removes nothing
    assert_trees_close(simulate(single, flat), run_program(program, flat), tolerance=BACKEND_TOLERANCE)
    monkeypatch.setattr(Hazards, "local", lambda self, wave: True)
    forced = Scheduler(skewed, grid=132, owner=True).run()
    assert _grid_barriers(_loop(forced).body) == 1
    with pytest.raises(BarrierError, match="overwrites"):
        simulate(forced, flat)


def rnn(xs, W, U):
    def step(t, h):
        return gnp.tanh(xs[t] @ W + h @ U)
    return gdsl.fori_loop(0, xs.shape[0], step, gnp.zeros((1, U.shape[0]), dtype=gdsl.float32))


def elementwise_loop(x):
    return gdsl.fori_loop(0, 5, lambda i, v: gnp.tanh(v) * 0.5 + 1.0, x)


@pytest.mark.parametrize("steps", [2, 5, 6])
def test_unrolled_loop_computes_the_same(steps):
    rng = np.random.default_rng(steps)
    args = [rng.standard_normal((steps, 1, 8)).astype(np.float32),
            (rng.standard_normal((8, 16)) * 0.3).astype(np.float32),
            (rng.standard_normal((16, 16)) * 0.3).astype(np.float32)]
    program = gdsl.make_ir(rnn)(*args)
    unrolled, count = unroll_twice(program)
    assert count == 1
    # (the same equations on the same values, in the same order: the same numbers)
    assert_trees_close(run_program(unrolled, args), run_program(program, args), exact=True)
    plan = schedule(program, grid=16, owner=True)
    assert_trees_close(simulate(plan, args), run_program(program, args), tolerance=BACKEND_TOLERANCE)


def test_no_owner_plan_where_it_removes_no_barrier():
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
    program = gdsl.make_ir(elementwise_loop)(x)
    plan = schedule(program, grid=16, owner=True)
    assert "steps_per_iteration" not in plan.stats
    assert str(plan) == str(schedule(program, grid=16))
