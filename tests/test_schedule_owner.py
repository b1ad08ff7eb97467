"""Owner-computes placement (gdsl/schedule/owner.py) with double-buffered carries (gdsl/schedule/unroll.py),
the scheduler option `owner=True`: the LSTM and NASRNN loops (small configs, batch 1 and 64) run one grid
barrier per step; results equal the interpreter on the plan simulator (its race checks pass), cpu,
interpret and the C-family emulator; NVRTC compiles the CUDA; without the double buffering, a block sync in
place of the barrier the hazards keep is a race the simulator reports."""
import dataclasses
import functools

import numpy as np
import pytest
from strategies import BACKEND_TOLERANCE, assert_trees_close, needs_nvrtc
from test_schedule import VIEWS

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily.emulator import EmulatorDialect, emulate
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.interpreter import run_program
from gdsl.jit import leaf_aval
from gdsl.primitives.linalg import matmul_p
from gdsl.schedule import hazards, licm, owner, resident, schedule, shares, steps, utasks
from gdsl.schedule.hazards import Hazards
from gdsl.schedule.plan import ROWS, Loop, Sync, Wave, plan_statements, row_chunk, walk
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
    plain = schedule(program, grid=grid, views=VIEWS, owner=False)
    owned = schedule(program, grid=grid, owner=True, views=VIEWS)
    assert loop_grid_barriers(plain) == 2
    if bs > 1:
        # Batch 64: the cell's chunks of tile_n elements per row would be hundreds of rounds per vEU, far more
        # than the barrier saved (owner.column_layouts compares): no layout, the plain plan.
        assert str(owned) == str(plain)
        return
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
        got = simulate(schedule(program, grid=grid, owner=True, views=VIEWS), flat, seed=grid)    # (race checks on)
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
    plan = schedule(program, grid=132, owner=True, resident_bytes=64 * 1024, views=VIEWS)
    assert loop_grid_barriers(plan) == 1
    resident = [t for s in plan_statements(plan) if isinstance(s, Wave) for t in s.tasks if RESIDENT in t.op.params]
    assert resident
    assert_trees_close(simulate(plan, flat, seed=1), run_program(program, flat), tolerance=BACKEND_TOLERANCE)


@needs_nvrtc
def test_nvrtc_compiles_the_cuda():
    forward, weights, inputs, *_ = _model("lstm", 1)
    lowered = gdsl.jit(forward, backend="cuda", grid=132, owner=True).lower(weights, inputs)
    loop = lowered.plan[lowered.plan.index("  loop:"):lowered.plan.index("  end loop")]
    # two steps per iteration, each ending in a flag sync (cuda's default flags=True) whose waits order the
    # skewed layers' overwrites (tests/test_schedule_flags.py)
    assert loop.count("sync (flags:") == 2 and "barrier (grid)" not in loop and " wait for " in loop
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
    # (the step product as one batched GEMM, not gate by gate: the forced syncs would first race in the prologue,
    # where the gate-major product's transpose reads tiles other vEUs wrote; the race shown is the loop's)
    monkeypatch.setattr(steps, "BY_GATE_MAX_ROWS", 0)
    *_, program, flat = _model("lstm", 1)
    skewed = _skewed(program)
    single = Scheduler(skewed, grid=132, owner=True, views=VIEWS).run()
    assert _grid_barriers(_loop(single).body) == 2             # per step: the layout alone removes nothing
    assert_trees_close(simulate(single, flat), run_program(program, flat), tolerance=BACKEND_TOLERANCE)
    monkeypatch.setattr(Hazards, "local", lambda self, wave: True)
    forced = Scheduler(skewed, grid=132, owner=True, views=VIEWS).run()
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
    plan = schedule(program, grid=16, owner=True, views=VIEWS)
    assert_trees_close(simulate(plan, args), run_program(program, args), tolerance=BACKEND_TOLERANCE)


def test_no_owner_plan_where_it_removes_no_barrier():
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
    program = gdsl.make_ir(elementwise_loop)(x)
    plan = schedule(program, grid=16, owner=True, views=VIEWS)
    assert "steps_per_iteration" not in plan.stats
    assert str(plan) == str(schedule(program, grid=16, views=VIEWS))


# ------------------------------------------------------------------------ batch-gathered tiles, any count
def gated_rnn(xs, U, scale):
    """A gated recurrence whose matmul is batched over 4 gates, `h @ U` with U [4, n, n]: A (the state) is
    broadcast over the gates, unless `scale` [4, 1, 1] makes one state per gate (a batched A)."""
    def step(t, h):
        a = h if scale is None else h * scale
        gates = gnp.matmul(a, U) + xs[t]                                # [4, 1, n] (xs[t]: [1, n])
        return gnp.tanh(gates[0]) * gdsl.nn.sigmoid(gates[1]) + gates[2] * h - 0.25 * gates[3]
    return gdsl.fori_loop(0, xs.shape[0], step, gnp.zeros((1, U.shape[-1]), dtype=gdsl.float32))


def _gated_args(n, steps=3, batched_a=False):
    rng = np.random.default_rng(n)
    return [rng.standard_normal((steps, 1, n)).astype(np.float32),
            (rng.standard_normal((4, n, n)) * 0.2).astype(np.float32),
            rng.uniform(0.5, 1.5, (4, 1, 1)).astype(np.float32) if batched_a else None]


def _loop_matmuls(plan):
    """The tasks of the matmuls in a loop body (where column layouts are)."""
    return [t for loop in plan_statements(plan) if isinstance(loop, Loop) for s in walk(loop.body)
            if isinstance(s, Wave) for t in s.tasks if t.op.kind == matmul_p.name]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("grid", [8, 132])
def test_layout_matmuls_gather_their_gates(name, grid):
    """Batch 1: each layout matmul's uTask covers its column range of every gate (one staging of the state
    and one reduction), so each vEU of a chain runs one uTask per matmul per step."""
    *_, program, _ = _model(name, 1)
    plan = schedule(program, grid=grid, owner=True, resident_bytes=48 * 1024, views=VIEWS)
    matmuls = [t for t in _loop_matmuls(plan) if utasks.gathers_batch(t.op.params)]
    assert matmuls
    for task in matmuls:
        batch = task.op.outputs[0].aval.shape[0]
        assert task.op.n_utasks == -(-task.op.outputs[0].aval.shape[-1] // task.op.params["tile_n"])
        assert task.op.n_utasks <= task.count                   # one round
        assert RESIDENT in task.op.params
        assert resident.tile_bytes(task.op) == batch * task.op.inputs[0].aval.shape[-1] * task.op.params["tile_n"] * 4


def test_one_row_chains_take_any_count_with_a_partial_range():
    """n = 20 columns on a budget of 3 vEUs: ranges of 8 columns (32 gathered: whole memory sectors), the
    last one 4 wide; a divisor of 20 would leave vEUs idle or give narrower tiles."""
    args = _gated_args(20)
    program = gdsl.make_ir(gated_rnn)(*args)
    plan = schedule(program, grid=3, owner=True, views=VIEWS)
    assert loop_grid_barriers(plan) == 1
    (task, *_) = _loop_matmuls(plan)
    assert utasks.gathers_batch(task.op.params)
    assert (task.op.params["tile_n"], task.op.n_utasks, task.count) == (8, 3, 3)
    layout = owner.column_layouts([owner.Node(1, task.op.kind, task.op.inputs, task.op.outputs[0])], 3, 256)
    assert layout == {}                  # (a matmul alone is no chain: nothing reads it column for column)


def test_shares_of_a_gathered_tile():
    """A gathered uTask writes its column range in every batch element; the hazards' owner of each output
    element is that uTask."""
    args = _gated_args(20)
    plan = schedule(gdsl.make_ir(gated_rnn)(*args), grid=3, owner=True, views=VIEWS)
    task = _loop_matmuls(plan)[0]
    written = shares.write_share(task.op, 2)
    assert sorted(written) == [g * 20 + j for g in range(4) for j in range(16, 20)]
    veus = hazards._output_veus(task).reshape(4, 20)
    assert (veus == task.first + np.arange(20) // 8).all()


@pytest.mark.parametrize("batched_a", [False, True])
@pytest.mark.parametrize("n", [16, 20])
def test_gated_rnn_matches_the_interpreter(n, batched_a):
    """Gathered tiles (A broadcast) and per-gate tiles (A batched: no gathering) with full and partial
    column ranges: the plan simulator (race checks), cpu, interpret and the C-family emulator."""
    args = _gated_args(n, batched_a=batched_a)
    f = functools.partial(gated_rnn, scale=args[2]) if batched_a else functools.partial(gated_rnn, scale=None)
    flat = args[:2] + ([args[2]] if batched_a else [])
    program = gdsl.make_ir(gated_rnn)(*args)
    expected = run_program(program, flat)
    for grid in (3, 5, 132):
        plan = schedule(program, grid=grid, owner=True, resident_bytes=16 * 1024, views=VIEWS)
        if not batched_a:   # (batched: h * scale joins the chain and the matmul reads all of it, more barriers)
            assert loop_grid_barriers(plan) == 1
        gathered = [utasks.gathers_batch(t.op.params) for t in _loop_matmuls(plan)]
        assert gathered and all(g != batched_a for g in gathered)
        assert_trees_close(simulate(plan, flat, seed=grid), expected, tolerance=BACKEND_TOLERANCE)
    for backend in ("cpu", "interpret"):
        got = gdsl.jit(f, backend=backend, owner=True)(*args[:2])
        assert_trees_close([np.asarray(got)], expected, tolerance=BACKEND_TOLERANCE)
    for grid in (3, 8):
        got = emulate(f, *args[:2], grid=grid, owner=True)
        assert_trees_close([np.asarray(got)], expected, tolerance=BACKEND_TOLERANCE)


@needs_nvrtc
@pytest.mark.parametrize("name", MODELS)
def test_nvrtc_compiles_the_full_size_gathered_cuda(name):
    """The zoo's full-size batch-1 model at 264 vEUs: gathered, resident GEMV tiles; NVRTC compiles them."""
    from models import common, load
    model = load(name)
    problem = common.build_problem(model, 1)
    lowered = model.make_forward(problem.cfg, backend="cuda", grid=264, owner=True, flags=False).lower(
        problem.weights, problem.batches[0])
    assert loop_grid_barriers(lowered.lowering.plan) == 1          # (NASRNN's is a flag sync with flags on)
    assert any(utasks.gathers_batch(t.op.params) and RESIDENT in t.op.params
               for t in _loop_matmuls(lowered.lowering.plan))
    _assert_cells_own_their_columns(lowered.lowering.plan)        # (the cell chains in chunks: _cell_chunk)
    assert cuda_toolchain.compile_cuda(lowered.source, "sm_90")[:4] == b"\x7fELF"


# ------------------------------------------------------------------------ cell chains in the column layout
# The C-family backends' lowering chain (they have ROWS's rule): with it the cell's elementwise ops fuse into one
# ROWS op (rows.py's cell chains), which takes the layout in chunks of its row shape (plan.row_chunk).
CHAIN = EmulatorDialect().lowering_chain


def _step_statements(plan) -> list:
    """The loop body's waves and syncs as ("wave", tasks) / ("sync", scope), in order."""
    return [("wave", s.tasks) if isinstance(s, Wave) else ("sync", s.scope)
            for s in _loop(plan).body if isinstance(s, (Wave, Sync))]


def _assert_cells_own_their_columns(plan):
    """Every ROWS op of the loop body is split in chunks and runs on the vEUs of the matmuls it reads; on
    each vEU, every element of a matmul result that its uTasks read was written by that vEU's matmul uTasks
    (owner-computes: the GEMV tiles' column ranges and the cell's coincide)."""
    waves = [s for s in _loop(plan).body if isinstance(s, Wave)]
    cells = [t for w in waves for t in w.tasks if t.op.kind == ROWS.name]
    assert cells
    for cell in cells:
        assert row_chunk(cell.op) is not None and "rows" not in cell.op.params
        for k, value in enumerate(cell.op.inputs):
            matmuls = [t for w in waves for t in w.tasks
                       if t.op.kind == matmul_p.name and t.op.outputs[0].storage is value.storage]
            for matmul in matmuls:
                assert (matmul.first, matmul.count) == (cell.first, cell.count)
                for veu in range(cell.count):
                    written = set()
                    for t in range(veu, matmul.op.n_utasks, matmul.count):
                        written.update(shares.write_share(matmul.op, t).tolist())
                    for t in range(veu, cell.op.n_utasks, cell.count):
                        read = shares.storage_elements(value, shares.read_share(cell.op, k, t))
                        assert set(read.tolist()) <= written


@pytest.mark.parametrize("grid", [3, 132, 264])
@pytest.mark.parametrize("name", MODELS)
def test_cells_join_the_layout_batch_1(name, grid):
    """Batch 1 with cell chains: per step the GEMV tiles of every gate, a block sync, ONE wave of the cells'
    ROWS ops (one per layer), the step's one grid barrier."""
    *_, program, _ = _model(name, 1)
    plan = schedule(program, grid=grid, owner=True, views=VIEWS, rows=CHAIN)
    assert plan.stats["steps_per_iteration"] == 2 and loop_grid_barriers(plan) == 1
    step = [("wave", {matmul_p.name}), ("sync", "block"), ("wave", {ROWS.name}), ("sync", "grid")]
    assert [(what, {t.op.kind for t in x} if what == "wave" else x) for what, x in _step_statements(plan)] == step * 2
    _assert_cells_own_their_columns(plan)


@pytest.mark.parametrize("name,bs", CASES)
def test_simulated_cell_plans_match_the_interpreter(name, bs):
    *_, program, flat = _model(name, bs, steps=3)
    expected = run_program(program, flat)
    for grid in (1, 3, 132):
        plan = schedule(program, grid=grid, owner=True, views=VIEWS, rows=CHAIN)
        if bs == 1 and grid > 1:
            assert any(row_chunk(t.op) is not None for s in plan_statements(plan) if isinstance(s, Wave)
                       for t in s.tasks if t.op.kind == ROWS.name)
        assert_trees_close(simulate(plan, flat, seed=grid), expected, tolerance=BACKEND_TOLERANCE)  # (races checked)


def lstm_like(xs, U):
    """A gated recurrence with two carries (h, c) whose cell is a chain of two elementwise results (the new c
    and h from it): one ROWS op with two outputs; U [4, n, n] (the gates), xs [steps, rows, n]."""
    def step(t, carry):
        h, c = carry
        gates = gnp.matmul(h, U) + xs[t]
        c = gdsl.nn.sigmoid(gates[0]) * c + gdsl.nn.sigmoid(gates[1]) * gnp.tanh(gates[2])
        return gdsl.nn.sigmoid(gates[3]) * gnp.tanh(c), c
    zeros = gnp.zeros(xs.shape[1:], dtype=gdsl.float32)
    return gdsl.fori_loop(0, xs.shape[0], step, (zeros, zeros))


@pytest.mark.parametrize("rows,n", [(1, 16), (1, 20), (2, 16)])
def test_lstm_like_cells_match_the_interpreter(rows, n):
    """Full and partial column ranges (n = 20 on 3 vEUs: 8, 8, 4 columns) and a cell of two rows: the plan
    simulator (race checks), the g++ emulator of the generated C at small grids."""
    rng = np.random.default_rng(n + rows)
    args = [rng.standard_normal((5, rows, n)).astype(np.float32),
            (rng.standard_normal((4, n, n)) * 0.2).astype(np.float32)]
    program = gdsl.make_ir(lstm_like)(*args)
    expected = run_program(program, args)
    for grid in (3, 5, 132):
        plan = schedule(program, grid=grid, owner=True, views=VIEWS, rows=CHAIN)
        if rows == 1:
            assert loop_grid_barriers(plan) == 1
            _assert_cells_own_their_columns(plan)
        assert_trees_close(simulate(plan, args, seed=grid), expected, tolerance=BACKEND_TOLERANCE)
    for grid in (3, 8):
        got = emulate(lstm_like, *args, grid=grid, owner=True)
        assert_trees_close([np.asarray(g) for g in got], expected, tolerance=BACKEND_TOLERANCE)
