"""Owner-computes layouts of several rows (batch > 1) in 2-D chunks (plan.ROW_BLOCK, owner.py's row blocks):
a matmul's uTask is a block of rows by a column range of every gate, the cell's the same rows and columns on
the same vEU. NASRNN and the LSTM at batch 64 full size with owner=True run one grid barrier per step and
NVRTC compiles them; small cells (odd rows and columns, blocks forced by owner.FORCE_ROW_BLOCK) match the
interpreter on the plan simulator (race checks on) and the g++ emulator; without the double buffering the
forced block sync is a race."""
import numpy as np
import pytest
from strategies import BACKEND_TOLERANCE, assert_trees_close, emulated_model_mismatches, needs_nvrtc, zoo_lowered
from test_schedule import VIEWS, check_emulated
from test_schedule_owner import (
    CHAIN,
    _assert_cells_own_their_columns,
    _grid_barriers,
    _loop,
    _model,
    _skewed,
    lstm_like,
)

import gdsl
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.interpreter import run_program
from gdsl.primitives.linalg import matmul_p
from gdsl.schedule import owner, schedule, shares, steps
from gdsl.schedule.hazards import Hazards
from gdsl.schedule.plan import ROW_BLOCK, ROWS, Wave, chunk_count, chunk_elements, chunk_utask
from gdsl.schedule.scheduler import Scheduler, loop_grid_barriers
from gdsl.schedule.simulate import BarrierError, simulate


def _loop_tasks(plan, kind):
    return [t for s in _loop(plan).body if isinstance(s, Wave) for t in s.tasks if t.op.kind == kind]


def test_chunk_elements_and_utasks_agree():
    """uTask t's 2-D chunk (rows block by column range, the last of each shorter) and the uTask of each element
    are inverse; every element is covered once."""
    params, shape = {"chunk": 4, ROW_BLOCK: 3}, (7, 10)
    count = chunk_count(params, shape)
    assert count == 3 * 3
    seen = np.concatenate([chunk_elements(params, shape, t) for t in range(count)])
    assert sorted(seen.tolist()) == list(range(70))
    for t in range(count):
        assert (chunk_utask(params, shape, chunk_elements(params, shape, t)) == t).all()
    assert chunk_elements(params, shape, 4).tolist() == [34, 35, 36, 37, 44, 45, 46, 47, 54, 55, 56, 57]


@needs_nvrtc
@pytest.mark.parametrize("name", ["nasrnn", "lstm"])
def test_full_size_batch_64_one_grid_barrier_per_step(name):
    """owner=True at batch 64 (full size, cuda): the layout takes blocks of rows, the cell chains 2-D chunks on
    their matmuls' vEUs reading only what those wrote; one grid barrier per step; NVRTC compiles it. The
    default (owner="auto") keeps the plain plan with two (the cost model: the layout's uTasks cost more)."""
    lowered = zoo_lowered(name, 64, owner=True)
    plan = lowered.lowering.plan
    assert plan.stats["steps_per_iteration"] == 2 and loop_grid_barriers(plan) == 1
    cells = _loop_tasks(plan, ROWS.name)
    assert cells and all(ROW_BLOCK in t.op.params for t in cells)
    _assert_cells_own_their_columns(plan)
    assert cuda_toolchain.compile_cuda(lowered.source, "sm_90")[:4] == b"\x7fELF"
    assert loop_grid_barriers(zoo_lowered(name, 64).lowering.plan) == 2


@needs_nvrtc
def test_full_size_nasrnn_forced_row_blocks_compile(monkeypatch):
    """NASRNN at batch 64 in blocks of 32 rows: gathered GEMM tiles of 32 rows by the gates' columns."""
    monkeypatch.setattr(owner, "FORCE_ROW_BLOCK", 32)
    lowered = zoo_lowered("nasrnn", 64, owner=True)
    plan = lowered.lowering.plan
    assert loop_grid_barriers(plan) == 1
    assert {t.op.params["tile_m"] for t in _loop_tasks(plan, matmul_p.name)} == {32}
    assert {t.op.params[ROW_BLOCK] for t in _loop_tasks(plan, ROWS.name)} == {32}
    _assert_cells_own_their_columns(plan)
    assert cuda_toolchain.compile_cuda(lowered.source, "sm_90")[:4] == b"\x7fELF"


@pytest.mark.parametrize("name,bs,force", [("nasrnn", 4, None), ("lstm", 4, None), ("nasrnn", 7, 3),
                                           ("lstm", 6, 4)])
def test_models_emulated_match_the_reference(name, bs, force, monkeypatch):
    """The zoo's small configs through the g++ emulator against their float64 reference, all rows a uTask
    (the cost model's choice) or forced blocks whose last one is shorter."""
    monkeypatch.setattr(owner, "FORCE_ROW_BLOCK", force)
    assert emulated_model_mismatches(name, bs, owner=True, grid=8) == []


def _cell_args(rows, n, steps=4):
    rng = np.random.default_rng(rows * 100 + n)
    return [rng.standard_normal((steps, rows, n)).astype(np.float32),
            (rng.standard_normal((4, n, n)) * 0.2).astype(np.float32)]


@pytest.mark.parametrize("rows,n,force", [(5, 16, 2), (6, 10, 4), (8, 12, None)])
def test_cells_in_row_blocks_match_the_interpreter(rows, n, force, monkeypatch):
    """Cells of several rows in 2-D chunks (rows not a multiple of the block, columns not of the range): the
    plan simulator (race checks) on every placement and grid, the g++ emulator of the generated C."""
    monkeypatch.setattr(owner, "FORCE_ROW_BLOCK", force)
    args = _cell_args(rows, n)
    program = gdsl.make_ir(lstm_like)(*args)
    expected = run_program(program, args)
    for grid in (3, 5, 132):
        plan = schedule(program, grid=grid, owner=True, views=VIEWS, rows=CHAIN, row_blocks=CHAIN)
        assert loop_grid_barriers(plan) == 1
        cells = _loop_tasks(plan, ROWS.name)
        assert cells and all(ROW_BLOCK in t.op.params for t in cells)
        if force is not None:
            assert {t.op.params["tile_m"] for t in _loop_tasks(plan, matmul_p.name)} == {force}
        _assert_cells_own_their_columns(plan)
        assert_trees_close(simulate(plan, args, seed=grid), expected, tolerance=BACKEND_TOLERANCE)
    check_emulated(lstm_like, *args, grids=(3, 8), owner=True)


def test_without_row_block_rules_the_layout_keeps_whole_rows():
    """A backend without the "row_block" rule (no row_blocks chain, the CPU's): no 2-D chunks; the CPU backend
    still computes the batch-4 cell right."""
    args = _cell_args(4, 16)
    program = gdsl.make_ir(lstm_like)(*args)
    plan = schedule(program, grid=8, owner=True, views=VIEWS, rows=CHAIN)
    assert not any(ROW_BLOCK in t.op.params for s in _loop(plan).body if isinstance(s, Wave) for t in s.tasks)
    got = gdsl.jit(lstm_like, backend="cpu", owner=True)(*args)
    assert_trees_close([np.asarray(g) for g in got], run_program(program, args), tolerance=BACKEND_TOLERANCE)


def test_shares_of_a_row_block():
    """A 2-D chunk's write share is its rows by its columns; the matmul uTask of the same number wrote exactly
    the elements of each gate the cell uTask reads."""
    args = _cell_args(6, 10)
    plan = schedule(gdsl.make_ir(lstm_like)(*args), grid=132, owner=True, views=VIEWS, rows=CHAIN,
                    row_blocks=CHAIN)
    cell = _loop_tasks(plan, ROWS.name)[0].op
    block, chunk = cell.params[ROW_BLOCK], cell.params["chunk"]
    ranges = -(-10 // chunk)
    for t in range(cell.n_utasks):
        i, j = divmod(t, ranges)
        rows = range(i * block, min((i + 1) * block, 6))
        cols = range(j * chunk, min((j + 1) * chunk, 10))
        assert shares.write_share(cell, t, 0).tolist() == [r * 10 + c for r in rows for c in cols]


def test_without_double_buffering_the_row_block_sync_is_a_race(monkeypatch):
    """The layout in row blocks alone (the body not unrolled): forcing vEU-local syncs where the hazards keep
    grid barriers, the simulator reports the race."""
    # (the step product as one batched GEMM, not gate by gate: the forced syncs would first race in the prologue,
    # where the gate-major product's transpose reads tiles other vEUs wrote; the race shown is the loop's)
    monkeypatch.setattr(steps, "BY_GATE_MAX_ROWS", 0)
    monkeypatch.setattr(owner, "FORCE_ROW_BLOCK", 2)
    *_, program, flat = _model("nasrnn", 5)
    skewed = _skewed(program)
    single = Scheduler(skewed, grid=132, owner=True, views=VIEWS, rows=CHAIN, row_blocks=CHAIN).run()
    assert any(ROW_BLOCK in t.op.params for t in _loop_tasks(single, ROWS.name))
    assert _grid_barriers(_loop(single).body) == 2
    assert_trees_close(simulate(single, flat), run_program(program, flat), tolerance=BACKEND_TOLERANCE)
    monkeypatch.setattr(Hazards, "local", lambda self, wave: True)
    forced = Scheduler(skewed, grid=132, owner=True, views=VIEWS, rows=CHAIN, row_blocks=CHAIN).run()
    assert _grid_barriers(_loop(forced).body) == 1
    with pytest.raises(BarrierError, match="overwrites"):
        simulate(forced, flat)
