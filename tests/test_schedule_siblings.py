"""Sibling matmuls of a wave computed as one op (gdsl/schedule/siblings.py, the option `siblings`, plan.N_PARTS,
the C-family "n_parts" rule): products of one left operand by loop-invariant right operands, on the same vEUs
with the same uTasks, become one op with one uTask per batch element / partition where there were several;
results equal the interpreter on the plan simulator (race checks included) and the C-family emulator; NVRTC
compiles the kernels; what must stay separate does."""
import numpy as np
import pytest
from strategies import emulated_model_mismatches, needs_cxx, needs_nvrtc, zoo_lowered
from test_schedule import VIEWS, check_emulated, check_plan

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.schedule import schedule
from gdsl.schedule.plan import N_PARTS, Loop, Wave, plan_statements, walk
from gdsl.schedule.printer import describe_op
from gdsl.schedule.resident import RESIDENT
from gdsl.schedule.scheduler import loop_step_rounds
from models.floor import op_flops

rng = np.random.default_rng(11)
SIBLINGS = ("cfamily",)      # the lowering chain whose "n_parts" rule the scheduler asks for


def _w(*shape):
    return (rng.standard_normal(shape) * 0.3).astype(np.float32)


def _merged(plan) -> list:
    """The parts (widths) of every sibling op of the plan."""
    return [t.op.params[N_PARTS] for s in plan_statements(plan) if isinstance(s, Wave) for t in s.tasks
            if N_PARTS in t.op.params]


def _matmuls(plan) -> int:
    return sum(1 for s in plan_statements(plan) if isinstance(s, Wave) for t in s.tasks if t.op.kind == "matmul")


# ------------------------------------------------------------------------------------------------ programs

STEPS = 3


def three_in_loop(h0, W1, W2, W3, cache):
    """Three siblings in a loop, one stored into a window of a carried cache (x.at[i].set(h @ W))."""
    def step(i, carry):
        h, cache = carry
        q, k = h @ W1, h @ W2
        cache = cache.at[i].set(h @ W3)
        return gnp.tanh(q + k) + cache[i] * 0.5, cache
    return gdsl.fori_loop(0, STEPS, step, (h0, cache))


def two_in_loop(h0, W1, W2):
    def step(i, h):
        a, q = h @ W1, h @ W2          # (a read twice, q read with a: neither becomes an epilogue's)
        return gnp.tanh(q * a[:, :16] + a[:, 16:])
    return gdsl.fori_loop(0, STEPS, step, h0)


def out_of_loop(x, W1, W2, W3):
    return x @ W1, x @ W2, x @ W3


def heads_in_loop(h0, W1, W2, W3, cache):
    """Per-head weights (batched GEMVs, independent pipelines: a partitioned loop like Attention's)."""
    def step(i, carry):
        h, cache = carry
        cache = cache.at[:, i].set(h @ W3)
        return gnp.tanh(h @ W1 + h @ W2), cache
    return gdsl.fori_loop(0, STEPS, step, (h0, cache))


THREE_ARGS = (_w(1, 16), _w(16, 16), _w(16, 16), _w(16, 16), np.zeros((STEPS, 1, 16), np.float32))
TWO_ARGS = (_w(2, 16), _w(16, 32), _w(16, 16))
OUT_ARGS = (_w(1, 16), _w(16, 8), _w(16, 16), _w(16, 32))
HEADS_ARGS = (_w(4, 1, 16), _w(4, 16, 16), _w(4, 16, 16), _w(4, 16, 16), np.zeros((4, STEPS, 1, 16), np.float32))
HEADS_WINDOW_ARGS = HEADS_ARGS[:4] + (np.zeros((4, STEPS, 16), np.float32),)


def heads_window(h0, W1, W2, W3, cache):
    """heads_in_loop with the cache written per head, as Attention's K/V cache: cache[:, i] = (h @ W3)[:, 0]."""
    def step(i, carry):
        h, cache = carry
        cache = cache.at[:, i].set((h @ W3)[:, 0])
        return gnp.tanh(h @ W1 + h @ W2), cache
    return gdsl.fori_loop(0, STEPS, step, (h0, cache))


# ------------------------------------------------------------------------------------------------ the plan

@pytest.mark.parametrize("fn, args, parts", [
    (three_in_loop, THREE_ARGS, (16, 16, 16)),
    (two_in_loop, TWO_ARGS, (32, 16)),
    (out_of_loop, OUT_ARGS, (8, 16, 32)),
])
def test_siblings_merge_on_one_veu_and_match_the_interpreter(fn, args, parts):
    """On one vEU (every op of a wave on the same vEU, one uTask each) the siblings become one op; every
    placement, grid and control the simulator runs (races checked) equals the interpreter."""
    program = gdsl.make_ir(fn)(*args)
    plan = schedule(program, grid=1, views=VIEWS, window_stores=VIEWS, siblings=SIBLINGS)
    assert _merged(plan) == [parts]
    assert plan.stats["siblings_merged"] == len(parts) - 1
    plain = schedule(program, grid=1, views=VIEWS, window_stores=VIEWS)
    assert _matmuls(plain) - _matmuls(plan) == len(parts) - 1
    check_plan(fn, *args, window_stores=VIEWS, siblings=SIBLINGS)


def test_window_store_is_kept_and_printed():
    program = gdsl.make_ir(three_in_loop)(*THREE_ARGS)
    plan = schedule(program, grid=1, views=VIEWS, window_stores=VIEWS, siblings=SIBLINGS)
    (op,) = [t.op for s in plan_statements(plan) if isinstance(s, Wave) for t in s.tasks if N_PARTS in t.op.params]
    assert sum(v.window is not None for v in op.outputs) == 1
    text = describe_op(op)
    assert " window at " in text and text.count(" | ") == 2, text
    assert op.params["tile_n"] == 48 and op.n_utasks == 1
    assert op_flops(op) == 3 * 2 * 16 * 16          # (models/floor.py: every part's products)


def test_partitioned_loop_merges():
    """A partitioned loop (uTask p of every op on vEU p): the per-head siblings merge at any grid."""
    for fn, args in ((heads_in_loop, HEADS_ARGS), (heads_window, HEADS_WINDOW_ARGS)):
        program = gdsl.make_ir(fn)(*args)
        plan = schedule(program, grid=132, partition=True, views=VIEWS, window_stores=VIEWS, siblings=SIBLINGS)
        loop = next(s for s in plan.kernels[0].body if isinstance(s, Loop))
        assert loop.parts == 4
        assert _merged(plan) == [(16, 16, 16)]
        check_plan(fn, *args, window_stores=VIEWS, siblings=SIBLINGS)


@pytest.mark.parametrize("budget, parts, read", [(3 * 8192, [(16, 16, 16)], 0), (2 * 8192, [(16, 16)], 1),
                                                 (0, [(16, 16, 16)], 1)])
def test_resident_siblings_merge_where_their_tiles_follow_one_another(budget, parts, read):
    """Siblings whose B waits in shared memory (resident.py: 8 KiB for the scheduler's 16 x 128 tile of each) merge
    with one another where
    their tiles lie one after another, the merged op keeping their region; with room for two, those two merge
    and the third, read from memory, stays apart; the simulator agrees with the interpreter."""
    program = gdsl.make_ir(three_in_loop)(*THREE_ARGS)
    plan = schedule(program, grid=1, views=VIEWS, window_stores=VIEWS, siblings=SIBLINGS, resident_bytes=budget)
    assert _merged(plan) == parts
    ops = [t.op for s in plan_statements(plan) if isinstance(s, Wave) for t in s.tasks if t.op.kind == "matmul"]
    assert sum(RESIDENT not in op.params for op in ops) == read
    assert all(op.params[RESIDENT] == (0, 1, 1) for op in ops if N_PARTS in op.params and budget)
    check_plan(three_in_loop, *THREE_ARGS, window_stores=VIEWS, siblings=SIBLINGS, resident_bytes=budget)


@needs_cxx
def test_emulated_resident_siblings_match_the_interpreter():
    """The generated C with the siblings' tiles staged in shared memory (the emulator's budget), at one vEU and
    partitioned at four."""
    from gdsl.backends.cfamily.emulator import EmulatorDialect
    for fn, args, grid, partition in ((three_in_loop, THREE_ARGS, 1, None), (heads_in_loop, HEADS_ARGS, 4, True)):
        plan = _lowered(fn, args, grid, EmulatorDialect(), block=64, partition=partition,
                        resident_partitioned=True).plan
        assert [op.params.get(RESIDENT) is not None for op in _sibling_ops(plan)] == [True]
        check_emulated(fn, *args, grids=(grid,), partition=partition, resident_partitioned=True, siblings=True)


def shared_with_a_read(x, Wq, Wk, Wo):
    """Partitions of which a vEU runs two, whose q and k products are siblings and whose `tanh(x @ Wq)` (an epilogue:
    not a sibling) shares the q product's resident tiles."""
    def step(i, x):
        q, k = gnp.matmul(x, Wq), gnp.matmul(x, Wk)
        return gnp.matmul(q + k + gnp.tanh(gnp.matmul(x, Wq)), Wo)
    return gdsl.fori_loop(0, 1, step, x)


SHARED_ARGS = (rng.standard_normal((2, 1, 3)).astype(np.float32), _w(2, 3, 4), _w(2, 3, 4), _w(2, 4, 3))


@needs_cxx
def test_resident_siblings_with_a_slot_a_round_stay_apart():
    """A vEU keeping a slot of resident tiles a round lays out a merged op's region round by round, not part by
    part, under another op that shares a part's tiles: such siblings stay apart (the merged op read the other
    round's tiles: an error of 1.25)."""
    from gdsl.backends.cfamily.emulator import EmulatorDialect
    plan = _lowered(shared_with_a_read, SHARED_ARGS, 1, EmulatorDialect(), block=32, partition=True).plan
    matmuls = [t.op for s in plan_statements(plan) if isinstance(s, Wave) for t in s.tasks if t.op.kind == "matmul"]
    assert _sibling_ops(plan) == [] and all(op.params[RESIDENT][2] == 2 for op in matmuls)
    check_emulated(shared_with_a_read, *SHARED_ARGS, grids=(1, 2), block=32, partition=True)


def _sibling_ops(plan) -> list:
    return [t.op for s in plan_statements(plan) if isinstance(s, Wave) for t in s.tasks if N_PARTS in t.op.params]


def test_ordinary_loop_on_separate_veus_stays_separate():
    """Siblings that the wave spreads over different vEUs already run at once: nothing to merge."""
    program = gdsl.make_ir(two_in_loop)(*TWO_ARGS)
    plan = schedule(program, grid=132, partition=False, views=VIEWS, siblings=SIBLINGS)
    assert _merged(plan) == []


def test_what_must_not_merge():
    """Different left operands (or views: another depth), an epilogue, a B the loop writes: separate ops."""
    def different_a(x, y, W1, W2):
        return x @ W1, y @ W2

    def different_k(x, W1, W2):
        return x[:, :8] @ W1, x @ W2

    def epilogue(x, W1, W2):
        return gnp.tanh(x @ W1), x @ W2

    def b_written(h0, W1, W2):
        def step(i, carry):
            h, W = carry
            return gnp.tanh(h @ W + h @ W2), W * 0.5
        return gdsl.fori_loop(0, STEPS, step, (h0, W1))

    cases = [(different_a, (_w(1, 16), _w(1, 16), _w(16, 16), _w(16, 16))),
             (different_k, (_w(1, 16), _w(8, 16), _w(16, 16))),
             (epilogue, (_w(1, 16), _w(16, 16), _w(16, 16))),
             (b_written, (_w(1, 16), _w(16, 16), _w(16, 16)))]
    for fn, args in cases:
        program = gdsl.make_ir(fn)(*args)
        plan = schedule(program, grid=1, views=VIEWS, epilogues=VIEWS, siblings=SIBLINGS)
        assert _merged(plan) == [], fn.__name__
        check_plan(fn, *args, grids=(1,), controls=("device",), epilogues=VIEWS, siblings=SIBLINGS)


def test_off_by_default_and_without_the_rule():
    program = gdsl.make_ir(out_of_loop)(*OUT_ARGS)
    assert _merged(schedule(program, grid=1, views=VIEWS)) == []
    assert _merged(schedule(program, grid=1, views=VIEWS, siblings=("cpu",))) == []     # no "n_parts" rule


# ------------------------------------------------------------------------------------------------ C family

def _lowered(fn, args, grid, dialect, **options):
    """`fn(*args)` lowered in `dialect` with the option siblings on (device control)."""
    from gdsl.backends.cfamily.lower import check_options, lower_with_grid
    opts = check_options({"control": "device", "siblings": True, **options}, dialect)
    return lower_with_grid(gdsl.make_ir(fn)(*args), opts, grid, dialect)


@pytest.mark.parametrize("fn, args", [(three_in_loop, THREE_ARGS), (two_in_loop, TWO_ARGS),
                                      (out_of_loop, OUT_ARGS), (heads_in_loop, HEADS_ARGS),
                                      (heads_window, HEADS_WINDOW_ARGS)])
def test_emulated_siblings_match_the_interpreter(fn, args):
    """The generated C on the emulator at one vEU (siblings merged in any loop: resident weights off, those
    stay separate) and, partitioned, at four."""
    from gdsl.backends.cfamily.emulator import EmulatorDialect
    assert _merged(_lowered(fn, args, 1, EmulatorDialect(), block=64, resident=False).plan)
    check_emulated(fn, *args, resident=False, siblings=True)
    check_emulated(fn, *args, grids=(4,), partition=True, siblings=True)


@needs_nvrtc
@pytest.mark.parametrize("fn, args, grid", [(three_in_loop, THREE_ARGS, 1), (out_of_loop, OUT_ARGS, 1),
                                            (heads_window, HEADS_WINDOW_ARGS, 132)])
def test_small_siblings_compile_with_nvrtc(fn, args, grid):
    from gdsl.backends.cuda.dialect import CUDADialect
    lowered = _lowered(fn, args, grid, CUDADialect(), block=256, partition=True, resident=False)
    assert _merged(lowered.plan)
    assert cuda_toolchain.compile_cuda(lowered.rendered.source, "sm_90")[:4] == b"\x7fELF"


@pytest.mark.parametrize("batch", [1, 4])
def test_attention_emulated_with_siblings(batch):
    assert emulated_model_mismatches("attention", batch, siblings=True) == []


def _loop_wave0(plan):
    loop = next(s for s in plan.kernels[0].body if isinstance(s, Loop))
    return next(s for s in walk(loop.body) if isinstance(s, Wave))


@needs_nvrtc
@pytest.mark.parametrize("batch", [1, 64])
def test_attention_full_size_plan_and_nvrtc(batch):
    """Attention's Q, K and V GEMVs of a step (wave 0 of its partitioned loop) are one op, K and V still stored
    into the caches' windows; each vEU runs two uTasks fewer a step per round of partitions; NVRTC compiles it."""
    plain = zoo_lowered("attention", batch, siblings=False).lowering.plan
    lowered = zoo_lowered("attention", batch)          # (on by default)
    plan = lowered.lowering.plan
    before, after = _loop_wave0(plain), _loop_wave0(plan)
    assert [t.op.kind for t in before.tasks] == ["matmul"] * 3
    assert len(after.tasks) == 1
    (task,) = after.tasks
    assert task.op.params[N_PARTS] == (64, 64, 64)
    assert sum(v.window is not None for v in task.op.outputs) == 2
    rounds = -(-task.op.n_utasks // task.count)
    assert loop_step_rounds(plain) - loop_step_rounds(plan) == 2 * rounds
    assert plan.stats["ops"] == plain.stats["ops"] - 2
    assert str(plan).count("barrier") == str(plain).count("barrier")
    assert cuda_toolchain.compile_cuda(lowered.source, "sm_90")[:4] == b"\x7fELF"
