"""Cell chains (gdsl/schedule/rows.py): connected elementwise items of one shape, fused into one ROWS op with
several outputs (a recurrent cell's new `c`, `h` and its carry updates), for the backends with the ROWS
lowering (the C-family ones). Which groups fuse, which carries the op may overwrite in place and which not,
and that the plan simulator (with its race checks), the g++ emulator of the generated C, the CPU backend
and the interpreter agree; the CUDA source compiles with NVRTC."""
import numpy as np
import pytest
from strategies import (
    BACKEND_TOLERANCE,
    as_list,
    assert_trees_close,
    emulated,
    interpreted,
    needs_cxx,
    needs_nvrtc,
    plan_ops,
    simulated,
)

import gdsl
import gdsl.nn
import gdsl.numpy as gnp
from gdsl.backends.cfamily.emulator import EmulatorDialect
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.backends.hip.emulated import EmulatedHIPDialect
from gdsl.primitives.linalg import matmul_p
from gdsl.schedule import schedule
from gdsl.schedule.plan import ROWS, STEPS, Loop, Wave, plan_statements

rng = np.random.default_rng(1)
CHAIN = EmulatorDialect().lowering_chain           # the C-family backends' rules: they have ROWS's


def _f32(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ------------------------------------------------------------------------------------------- programs
def two_readers(a, b):
    """`c` has two readers (and is no result): one op computes it in registers and stores only h and g."""
    c = gnp.tanh(a) * b + a
    return c * 2.0, gnp.exp(c) - b


def result_and_reader(a):
    """`c` is a result and has a reader: both stored by one op."""
    c = gnp.tanh(a) + 1.0
    return c, c * c


def mixed_dtypes(x):
    """Outputs of three dtypes from one group: the bool mask, an int32 count and the float value."""
    d = x * 2.0 - 1.0
    m = d > 0.0
    return gnp.where(m, d, -d), m, gnp.astype(m, gdsl.int32) + 3


def broadcast_operands(a, w, b):
    """Operands broadcast along the group's shape (a row vector w, a column b, a scalar)."""
    c = gnp.tanh(a * w + b)
    return c + w, c * b - 0.5


def lstm_cell(gates, h, c):
    i, f, g, o = gdsl.nn.sigmoid(gates[0]), gdsl.nn.sigmoid(gates[1]), gnp.tanh(gates[2]), gdsl.nn.sigmoid(gates[3])
    c = f * c + i * g
    return o * gnp.tanh(c), c


def lstm_steps(x, w, h, c):
    """An LSTM-like recurrence: the cell's `c` is read by `h` and is a carry; `h` feeds the next matmul."""
    def step(t, state):
        h, c = state
        gates = gnp.matmul(h, w) + x[t]
        return lstm_cell(gates, h, c)
    return gdsl.fori_loop(0, x.shape[0], step, (h, c))


def masked_lstm_steps(x, w, h, c):
    """The cell with masked carry updates (what the wavefront's skew writes): the selects read the new `c`
    and the old carries at the element they write: the one op overwrites both carries in place."""
    def step(t, state):
        h, c = state
        gates = gnp.matmul(h, w) + x[t]
        new_h, new_c = lstm_cell(gates, h, c)
        live = t < x.shape[0] - 1
        return gnp.where(live, new_h, h), gnp.where(live, new_c, c)
    return gdsl.fori_loop(0, x.shape[0], step, (h, c))


def nas_like_steps(x, c, h):
    """The carry c is updated in place from its old value, then h reads the new c (NASRNN's shape)."""
    def step(t, state):
        c, h = state
        c = gnp.tanh(c * 0.5 + x[t]) * 0.9 + c * 0.1
        return c, gnp.tanh(c) * h + 0.25
    return gdsl.fori_loop(0, x.shape[0], step, (c, h))


def independent_rows_steps(x, w):
    """Each row is an independent pipeline (a partitioned loop; the matmul mixes the last axis, so the
    partitions are whole rows): the cell's op, one uTask per partition."""
    def step(i, state):
        h, c = state
        c = gnp.tanh(c + h @ w)
        return c * 0.5 + h * 0.25, c
    return gdsl.fori_loop(0, 3, step, (x, x * 2.0))


def independent_elements_steps(x):
    """Each element is an independent pipeline: the partitions are no whole rows, the group keeps its ops."""
    def step(i, state):
        h, c = state
        c = gnp.tanh(c + h)
        return c * 0.5 + h * 0.25, c
    return gdsl.fori_loop(0, 3, step, (x, x * 2.0))


def carry_read_by_a_reduction(c):
    """The carry's row sum is read by the chain before it overwrites c: the sum reads other elements of the
    row, so the op must not write c in place."""
    def step(i, c):
        d = c - gnp.sum(c, axis=-1, keepdims=True) * 0.125
        return gnp.tanh(d) * 0.5 + d * 0.25
    return gdsl.fori_loop(0, 3, step, c)


def matmul_between_two_cells(a, w):
    """Two steps of a recurrence written out: the matmul reads the first cell's h and feeds the second
    cell, so one op could not run before and after it: the group is cut there, into two cell ops."""
    c1 = gnp.tanh(a) + 1.0
    h1 = c1 * 2.0
    c2 = c1 + h1 @ w
    return gnp.tanh(c2) * c2, c2 - 1.0


FUSING = {
    "two_readers": (two_readers, lambda: (_f32(4, 24), _f32(4, 24))),
    "result_and_reader": (result_and_reader, lambda: (_f32(3, 5, 7),)),
    "mixed_dtypes": (mixed_dtypes, lambda: (_f32(6, 10),)),
    "broadcast_operands": (broadcast_operands, lambda: (_f32(5, 12), _f32(12), _f32(5, 1))),
    "long_rows": (two_readers, lambda: (_f32(2, 700), _f32(2, 700))),
    "one_axis": (two_readers, lambda: (_f32(33), _f32(33))),
}
LOOPS = {
    "lstm_steps": (lstm_steps, lambda: (_f32(5, 4, 1, 16), _f32(4, 16, 16, scale=0.3), _f32(1, 16), _f32(1, 16))),
    "lstm_steps_batch": (lstm_steps, lambda: (_f32(3, 4, 8, 16), _f32(4, 16, 16, scale=0.3), _f32(8, 16),
                                              _f32(8, 16))),
    "masked_lstm_steps": (masked_lstm_steps, lambda: (_f32(4, 4, 2, 16), _f32(4, 16, 16, scale=0.3),
                                                      _f32(2, 16), _f32(2, 16))),
    "nas_like_steps": (nas_like_steps, lambda: (_f32(4, 3, 32), _f32(3, 32), _f32(3, 32))),
    "independent_rows_steps": (independent_rows_steps, lambda: (_f32(8, 1, 32), _f32(32, 32, scale=0.2))),
    "independent_elements_steps": (independent_elements_steps, lambda: (_f32(8, 1, 32),)),
    "carry_read_by_a_reduction": (carry_read_by_a_reduction, lambda: (_f32(4, 16),)),
}
CUT = {"matmul_between_two_cells": (matmul_between_two_cells, lambda: (_f32(4, 16), _f32(16, 16, scale=0.3)))}
ALL = {**FUSING, **LOOPS, **CUT}


# ------------------------------------------------------------------------------------------ helpers
def _cell_ops(plan):
    """The ROWS ops with no reduction (cell chains)."""
    return [op for op in plan_ops(plan) if op.kind == ROWS.name and
            all(s.reduce is None for s in op.params[STEPS])]


def _program(name):
    fn, make_args = ALL[name]
    args = make_args()
    return gdsl.make_ir(fn)(*args), args



def _loop_ops(plan) -> list:
    """The ops of the (one) loop body's waves."""
    (loop,) = [s for s in plan_statements(plan) if isinstance(s, Loop)]
    return [t.op for s in loop.body if isinstance(s, Wave) for t in s.tasks]


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", sorted(FUSING))
def test_group_fuses_into_one_op_with_several_outputs(name):
    program, args = _program(name)
    plan = schedule(program, grid=8, rows=CHAIN)
    off = schedule(program, grid=8, rows=CHAIN, cells=False)
    (op,) = _cell_ops(plan)
    assert len(op.outputs) >= 2 and len(op.params[STEPS]) >= 2
    assert plan.stats["cell_chains"] == 1 and off.stats["cell_chains"] == 0 and not _cell_ops(off)
    assert plan.stats["ops"] < off.stats["ops"] and plan.stats["waves"] < off.stats["waves"]
    assert_trees_close(simulated(plan, args), interpreted(program, args), tolerance=BACKEND_TOLERANCE)


def test_an_intermediate_read_only_inside_is_not_stored():
    program, args = _program("two_readers")
    plan = schedule(program, grid=8, rows=CHAIN)
    (op,) = _cell_ops(plan)
    assert plan.stats["ops"] == 1 and len(op.params[STEPS]) == 3
    assert [v.storage.name for v in op.outputs] == ["out0", "out1"]      # c itself is in registers only
    assert "op0_row_chain_add_mul_tanh" in str(plan) and "s1 = mul(s0, 2.0)" in str(plan)


def test_outputs_of_several_dtypes():
    program, _ = _program("mixed_dtypes")
    (op,) = _cell_ops(schedule(program, grid=8, rows=CHAIN))
    assert sorted(str(v.aval.dtype) for v in op.outputs) == ["bool", "float32", "int32"]


def test_a_group_is_cut_before_a_matmul_between_its_steps():
    program, args = _program("matmul_between_two_cells")
    plan = schedule(program, grid=8, rows=CHAIN)
    first, second = _cell_ops(plan)
    (matmul,) = [op for op in plan_ops(plan) if op.kind == matmul_p.name]
    assert [op.name for op in plan_ops(plan)] == [first.name, matmul.name, second.name]
    assert matmul.inputs[0].storage in {v.storage for v in first.outputs}       # h1, stored for the matmul
    assert {v.storage for v in second.inputs} & {v.storage for v in first.outputs}   # c1, read from memory
    assert_trees_close(simulated(plan, args), interpreted(program, args), tolerance=BACKEND_TOLERANCE)


def test_no_fusion_without_the_backends_rule():
    program, _ = _program("two_readers")
    assert not _cell_ops(schedule(program, grid=8))
    assert not _cell_ops(schedule(program, grid=8, rows=("no-such-backend",)))
    assert not _cell_ops(schedule(program, grid=8, rows=CHAIN, cells=False))


def test_rows_longer_than_a_thread_block_holds_stay_ops():
    fn, _ = FUSING["two_readers"]
    program = gdsl.make_ir(fn)(_f32(2, 256 * 8 + 1), _f32(2, 256 * 8 + 1))
    assert not _cell_ops(schedule(program, grid=8, rows=CHAIN))


@pytest.mark.parametrize("name", ["lstm_steps", "lstm_steps_batch", "masked_lstm_steps", "nas_like_steps"])
def test_the_cell_is_one_op_per_step_and_writes_its_carries_in_place(name):
    """Per loop step: the matmul, then one op (before: two or three), which overwrites the carries it reads
    at the element it writes; no copy op for the carries."""
    program, args = _program(name)
    # (x[t]: a view, as the backends read it; the plain plans: owner-computes would lay the cell out by columns)
    plan = schedule(program, grid=8, rows=CHAIN, views=CHAIN, owner=False)
    off = schedule(program, grid=8, rows=CHAIN, views=CHAIN, cells=False, owner=False)
    cell_work = [op for op in _loop_ops(plan) if op.kind != matmul_p.name]
    off_work = [op for op in _loop_ops(off) if op.kind != matmul_p.name]
    (cell,) = _cell_ops(plan)
    assert cell_work == [cell] and len(off_work) >= 2
    # Both carries (the program's results here) are written where they live, no copy after the op; c is
    # read at the element the op then overwrites.
    assert len(cell.outputs) == 2 and {v.storage.kind for v in cell.outputs} == {"output"}
    assert any(v.storage in {x.storage for x in cell.inputs} for v in cell.outputs)
    for control in ("device", "host"):
        for partition in (None, True, False):
            plan = schedule(program, grid=8, control=control, partition=partition, rows=CHAIN, views=CHAIN)
            assert _cell_ops(plan)
            assert_trees_close(simulated(plan, args), interpreted(program, args), tolerance=BACKEND_TOLERANCE)


def test_a_carry_read_across_its_row_is_not_overwritten_in_place():
    program, args = _program("carry_read_by_a_reduction")
    plan = schedule(program, grid=8, rows=CHAIN)
    (op,) = [op for op in plan_ops(plan) if op.kind == ROWS.name]
    assert [s.reduce for s in op.params[STEPS]][0] is not None        # the carry's row sum comes first
    assert op.outputs[0].storage not in {v.storage for v in op.inputs}
    assert_trees_close(simulated(plan, args), interpreted(program, args), tolerance=BACKEND_TOLERANCE)


def test_partitioned_cells_stay_on_their_veu():
    program, args = _program("independent_rows_steps")
    plan = schedule(program, grid=8, partition=True, rows=CHAIN)
    (loop,) = [s for s in plan_statements(plan) if isinstance(s, Loop)]
    assert loop.parts == 8
    (op,) = _cell_ops(plan)
    assert op.n_utasks == 8 and len(op.outputs) == 2
    assert plan.stats["grid_syncs"] < schedule(program, grid=8, partition=False, rows=CHAIN).stats["grid_syncs"]
    assert_trees_close(simulated(plan, args), interpreted(program, args), tolerance=BACKEND_TOLERANCE)


def test_partitions_that_are_not_whole_rows_keep_the_ops():
    program, args = _program("independent_elements_steps")
    plan = schedule(program, grid=8, partition=True, rows=CHAIN)
    (loop,) = [s for s in plan_statements(plan) if isinstance(s, Loop)]
    assert loop.parts == 256 and not _cell_ops(plan)
    assert _cell_ops(schedule(program, grid=8, partition=False, rows=CHAIN))
    assert_trees_close(simulated(plan, args), interpreted(program, args), tolerance=BACKEND_TOLERANCE)


@needs_cxx
@pytest.mark.parametrize("name", sorted(ALL))
def test_emulated_results_with_and_without_cells(name):
    fn, make_args = ALL[name]
    args = make_args()
    expected = interpreted(gdsl.make_ir(fn)(*args), args)
    for cells in (None, False):
        for block in (64, 256):
            got = emulated(fn, args, grid=4, block=block, cells=cells)
            assert_trees_close(got, expected, tolerance=BACKEND_TOLERANCE)


@needs_cxx
@pytest.mark.parametrize("name", ["mixed_dtypes", "masked_lstm_steps"])
def test_emulated_hip_wave64(name):
    """HIP's dialect (64-lane wavefronts) runs the same rule."""
    fn, make_args = ALL[name]
    args = make_args()
    expected = interpreted(gdsl.make_ir(fn)(*args), args)
    got = emulated(fn, args, grid=4, block=128, dialect=EmulatedHIPDialect(64))
    assert_trees_close(got, expected, tolerance=BACKEND_TOLERANCE)


@needs_cxx
@pytest.mark.parametrize("name", sorted(LOOPS))
def test_emulated_loops_partitioned_and_host_controlled(name):
    fn, make_args = LOOPS[name]
    args = make_args()
    expected = interpreted(gdsl.make_ir(fn)(*args), args)
    for control in ("device", "host"):
        for partition in (None, True):
            got = emulated(fn, args, grid=4, control=control, partition=partition)
            assert_trees_close(got, expected, tolerance=BACKEND_TOLERANCE)


@pytest.mark.parametrize("name", sorted(ALL))
def test_cpu_and_interpret_results(name):
    """The CPU backend (llvmlite) has no ROWS rule: it keeps the group's ops, with the same results."""
    fn, make_args = ALL[name]
    args = make_args()
    expected = interpreted(gdsl.make_ir(fn)(*args), args)
    assert not _cell_ops(gdsl.jit(fn, backend="cpu", grid=4).lower(*args).lowering.plan)
    for backend in ("cpu", "interpret"):
        got = gdsl.jit(fn, backend=backend, grid=4)(*args)
        assert_trees_close(as_list(got), expected, tolerance=BACKEND_TOLERANCE)


def test_option_turns_cells_off():
    fn, make_args = LOOPS["masked_lstm_steps"]
    args = make_args()
    on = gdsl.jit(fn, backend="cuda", grid=8).lower(*args)
    off = gdsl.jit(fn, backend="cuda", grid=8, cells=False).lower(*args)
    rows_off = gdsl.jit(fn, backend="cuda", grid=8, rows=False).lower(*args)
    assert _cell_ops(on.lowering.plan)
    assert not _cell_ops(off.lowering.plan) and not _cell_ops(rows_off.lowering.plan)
    with pytest.raises(ValueError):
        gdsl.jit(fn, backend="cuda", cells="yes")


@needs_nvrtc
@pytest.mark.parametrize("name", ["two_readers", "mixed_dtypes", "broadcast_operands", "long_rows",
                                  "masked_lstm_steps", "lstm_steps_batch"])
def test_cuda_kernel_with_cells_compiles(name):
    fn, make_args = ALL[name]
    lowering = gdsl.jit(fn, backend="cuda", grid=132).lower(*make_args())
    assert _cell_ops(lowering.lowering.plan)
    assert cuda_toolchain.compile_cuda(lowering.source, "sm_90")[:4] == b"\x7fELF"


# ------------------------------------------------------------------------------------ several rows a uTask
@needs_cxx
@pytest.mark.parametrize("shape, rows", [((11, 64), 4), ((6, 128), 2)])
def test_a_utask_of_a_few_whole_block_rows(shape, rows):
    """utasks.cell_rows_at_once: a cell chain whose rows fill the block (block 64 here) prices a uTask of up to
    CELL_ROW_SLOTS elements a lane as one pass, so the balance gives it several rows (rows of one slot: 4 a
    uTask, the last uTask one row short; rows of two slots: 2 a uTask). The emulator matches the interpreter."""
    from gdsl.backends.cfamily.lower import check_options, lower_with_grid
    a, b = _f32(*shape), _f32(*shape)
    dialect = EmulatorDialect()
    opts = check_options({"control": "device", "block": 64, "barrier": "atomic"}, dialect)
    (op,) = _cell_ops(lower_with_grid(gdsl.make_ir(two_readers)(a, b), opts, 4, dialect).plan)
    assert op.params["rows"] == rows
    expected = interpreted(gdsl.make_ir(two_readers)(a, b), [a, b])
    assert_trees_close(emulated(two_readers, [a, b], grid=4, block=64), expected, tolerance=BACKEND_TOLERANCE)


def test_lstm_batch_64_cells_take_one_round():
    """The LSTM's batch-64 cells (10 ops of 64 rows of 256 in one wave): 4 rows a uTask, each vEU one uTask,
    where one row a uTask took three rounds on 22 vEUs each."""
    from strategies import zoo_lowered
    plan = zoo_lowered("lstm", 64).lowering.plan
    (loop,) = [s for s in plan_statements(plan) if isinstance(s, Loop)]
    cells = [t for s in loop.body if isinstance(s, Wave) for t in s.tasks if t.op.kind == ROWS.name]
    assert len(cells) == 10
    assert all(t.op.params["rows"] == 4 and t.op.n_utasks == 16 <= t.count for t in cells)


# ----------------------------------------------------------------------------------- an iota in a chain
def _arange_one_where(x, k):
    return gnp.where(gnp.arange(1) == k, gnp.tanh(x + 1.0), x)


def _arange_one_add(x):
    return gnp.tanh(x + gnp.arange(1))


@needs_cxx
@pytest.mark.parametrize("fn, args", [(_arange_one_where, (np.float32([0.5]), np.int32(0))),
                                      (_arange_one_add, (np.float32([0.5]),))], ids=["where", "add"])
def test_a_one_element_iota_in_a_chain(fn, args):
    """`arange(1)` reads no variable: the chain finder asked its items for their first input, and an iota has
    none (IndexError on every C-family backend; found by a randomized sweep, the suite's D = 1 programs)."""
    expected = interpreted(gdsl.make_ir(fn)(*args), args)
    assert_trees_close(emulated(fn, args, grid=1, block=32), expected, tolerance=BACKEND_TOLERANCE)
    assert_trees_close(emulated(fn, args, grid=2, block=64, dialect=EmulatedHIPDialect(64)), expected,
                       tolerance=BACKEND_TOLERANCE)
