"""Wave balancing (gdsl/schedule/balance.py): a wave's splits and vEU shares chosen together. The solver on
its own; the plans it gives (wider GEMV tiles instead of rounds, finer elementwise chunks on idle vEUs, a
consumer taking its producer's chunks so the barrier between them stays vEU-local); and that what runs
computes what the interpreter computes (the CPU emulator of the generated C, the CPU backend, the plan
simulator with its race checks), including GEMV tiles whose width is not a power of two, which the CUDA
source of compiles with NVRTC."""
import numpy as np
import pytest
from strategies import BACKEND_TOLERANCE, assert_trees_close, needs_cxx, needs_nvrtc, plan_ops, simulated

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily.emulator import emulate
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.interpreter import run_program
from gdsl.schedule import balance, schedule
from gdsl.schedule.plan import Sync, Wave, plan_statements

rng = np.random.default_rng(0)


def _f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------------------- the solver
def test_solver_takes_one_round_of_wider_tiles_over_rounds_of_narrow_ones():
    # Two ops, each either 8 uTasks of 100 ns or 2 of 300 ns, on 4 vEUs: the current choice (the narrow
    # split, 2 vEUs each, 4 rounds = 400 ns) against one round of the wide one (300 ns).
    options = [[(2, 300.0, None), (8, 100.0, None)]] * 2
    choice = balance.balance(options, 4, [(1, 2), (1, 2)])
    assert choice == [(0, 2), (0, 2)]
    assert balance.wave_time(options, choice) == 300.0


def test_solver_spreads_an_op_over_idle_veus():
    options = [[(16, 2800.0, None), (64, 700.0, 1)]]      # an elementwise op: 4 passes per thread, or 1 (one round)
    assert balance.balance(options, 264, [(0, 16)]) == [(1, 64)]


def test_solver_keeps_a_wave_that_gains_less_than_the_threshold():
    options = [[(4, 1000.0, None), (8, 950.0, None)]]
    assert balance.balance(options, 8, [(0, 4)]) is None


def test_solver_gives_up_with_more_ops_than_veus():
    assert balance.balance([[(1, 10.0, None)]] * 3, 2, [(0, 1)] * 3) is None


def test_need_is_none_below_the_fastest_split():
    assert balance.need([(4, 500.0, None)], 400.0) is None
    assert balance.need([(4, 500.0, None)], 1000.0) == (2, 0)


# ------------------------------------------------------------------------------------------- plans
def three_gemvs(x, w0, w1, w2):
    return x @ w0, x @ w1, x @ w2


def _gemv_args():
    return (_f32(1, 64),) + tuple(_f32(64, 256) * 0.1 for _ in range(3))



def _rounds(plan):
    return [-(-task.op.n_utasks // task.count) for stmt in plan_statements(plan) if isinstance(stmt, Wave)
            for task in stmt.tasks]


def test_gemvs_sharing_a_wave_take_wider_tiles_in_one_round():
    program = gdsl.make_ir(three_gemvs)(*_gemv_args())
    plain = schedule(program, grid=9, block=64, balance=False)
    balanced = schedule(program, grid=9, block=64)
    assert max(_rounds(plain)) > 1
    assert _rounds(balanced) == [1, 1, 1]
    # 96 columns: three tiles of a 256-column output (the last one 64 wide), three vEUs per op.
    assert [op.params["tile_n"] for op in plan_ops(balanced)] == [96, 96, 96]
    assert "[3 uTasks on vEU 0-2]" in str(balanced)


def elementwise_alone(a, b):
    return gnp.tanh(a * b + a)


def test_an_elementwise_op_alone_in_its_wave_spreads_over_the_grid():
    a, b = _f32(64, 64), _f32(64, 64)
    program = gdsl.make_ir(elementwise_alone)(a, b)
    plain = schedule(program, grid=64, block=64, balance=False)
    balanced = schedule(program, grid=64, block=64)
    assert [op.n_utasks for op in plan_ops(plain)] == [16]               # chunks of 4 elements per thread
    assert [op.n_utasks for op in plan_ops(balanced)] == [64]            # one element per thread
    assert plan_ops(balanced)[0].params["chunk"] == 64


def chain_with_a_carry(x, w, n):
    """A loop whose step ends in two elementwise ops on the same elements, the second behind a barrier it
    needs only if the two are split differently (NASRNN's cell has that shape)."""
    def step(i, carry):
        h, c = carry
        s = h @ w
        c = gnp.tanh(s) * c + s
        return gnp.tanh(c) * s, c
    return gdsl.fori_loop(0, n, step, (x, x))


def _syncs(plan):
    return [stmt.scope for stmt in plan_statements(plan) if isinstance(stmt, Sync)]


def test_a_consumer_takes_its_producers_chunks_and_the_barrier_stays_local():
    x, w = _f32(32, 64) * 0.5, _f32(64, 64) * 0.1
    program = gdsl.make_ir(chain_with_a_carry)(x, w, np.int32(3))
    plain = schedule(program, grid=64, block=64, balance=False)
    balanced = schedule(program, grid=64, block=64)
    assert _syncs(balanced).count("block") >= _syncs(plain).count("block")
    assert _syncs(balanced).count("grid") <= _syncs(plain).count("grid")
    assert_trees_close(simulated(balanced, (x, w, np.int32(3))), run_program(program, [x, w, np.int32(3)]),
                       tolerance=BACKEND_TOLERANCE)



# ------------------------------------------------------------------------------------------- results
CASES = [
    (three_gemvs, _gemv_args(), 9),
    (elementwise_alone, (_f32(64, 64), _f32(64, 64)), 64),
    (chain_with_a_carry, (_f32(32, 64) * 0.5, _f32(64, 64) * 0.1, np.int32(3)), 64),
]


@pytest.mark.parametrize("fun, args, grid", CASES, ids=[c[0].__name__ for c in CASES])
def test_simulated_plan_matches_the_interpreter(fun, args, grid):
    program = gdsl.make_ir(fun)(*args)
    expected = run_program(program, list(args))
    got = simulated(schedule(program, grid=grid, block=64), args)
    assert_trees_close(got, expected, tolerance=BACKEND_TOLERANCE)


@needs_cxx
@pytest.mark.parametrize("fun, args, grid", CASES, ids=[c[0].__name__ for c in CASES])
def test_emulator_matches_the_interpreter(fun, args, grid):
    expected = gdsl.jit(fun, backend="interpret")(*args)
    for setting in (None, False):
        got = emulate(fun, *args, grid=grid, block=64, balance=setting)
        assert_trees_close(got, expected, tolerance=BACKEND_TOLERANCE)


@pytest.mark.parametrize("fun, args, grid", CASES, ids=[c[0].__name__ for c in CASES])
def test_cpu_backend_matches_the_interpreter(fun, args, grid):
    expected = gdsl.jit(fun, backend="interpret")(*args)
    got = gdsl.jit(fun, backend="cpu", grid=grid)(*args)
    assert_trees_close(got, expected, tolerance=BACKEND_TOLERANCE)


@needs_nvrtc
def test_cuda_source_of_a_96_column_gemv_tile_compiles():
    source = gdsl.jit(three_gemvs, backend="cuda", grid=9).lower(*_gemv_args()).source
    assert "gdsl_gemv_tile<1, 96," in source
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"
