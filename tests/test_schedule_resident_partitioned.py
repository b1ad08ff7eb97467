"""The option resident_partitioned=True: a partitioned loop (uTask p of every op on vEU p mod grid) keeps the
loop-invariant weights of its GEMV-shaped matmuls in the vEUs' shared memory too (resident.keep_resident), as
other loops do. Attention's heads: each vEU keeps its head's W_q, W_k, W_v and W_o. Checked on the g++ emulator
(which runs the resident-weight code with a budget of its own) against the interpreter and Attention's float64
reference, and compiled with NVRTC. A vEU whose rounds read one head's weights keeps them once
(resident.slots)."""
import numpy as np
import pytest
from strategies import (
    BACKEND_TOLERANCE,
    assert_trees_close,
    emulated_model_mismatches,
    needs_cxx,
    needs_nvrtc,
    plan_ops,
    zoo_lowered,
)
from test_schedule import _flat_args

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import emulator
from gdsl.interpreter import run_program
from gdsl.schedule import resident, schedule
from gdsl.schedule.plan import N_PARTS, Loop, walk
from gdsl.schedule.resident import RESIDENT
from gdsl.tracing.pytree import tree_unflatten

rng = np.random.default_rng(3)


def heads(x, W, U):
    """Independent heads (a partitioned loop): each head's row through its own W and U, every step."""
    def step(t, x):
        return gnp.tanh(gnp.matmul(gnp.tanh(gnp.matmul(x, W)), U) * 0.5 + x)
    return gdsl.fori_loop(0, 4, step, x)


ARGS = (rng.standard_normal((3, 1, 8)).astype(np.float32), (rng.standard_normal((3, 8, 8)) * 0.3).astype(np.float32),
        (rng.standard_normal((3, 8, 8)) * 0.3).astype(np.float32))


def _resident_ops(plan) -> list:
    return [op for op in plan_ops(plan) if RESIDENT in op.params]


def test_a_partitioned_loop_keeps_its_weights_unless_the_option_says_not():
    program = gdsl.make_ir(heads)(*ARGS)
    for option, expected in ((False, 0), (None, 2), (True, 2)):
        plan = schedule(program, grid=8, partition=True, resident_bytes=4096, resident_partitioned=option)
        loop = next(s for k in plan.kernels for s in walk(k.body) if isinstance(s, Loop))
        assert loop.parts == 3 and len(_resident_ops(plan)) == expected


@needs_cxx
@pytest.mark.parametrize("grid", [1, 2, 3, 8])
def test_emulated_partitioned_loop_with_resident_weights_matches_the_interpreter(grid):
    program = gdsl.make_ir(heads)(*ARGS)
    expected = tree_unflatten(program.out_tree, run_program(program, _flat_args(ARGS)))
    got = emulator.emulate(heads, *ARGS, grid=grid, block=64, partition=True, resident_partitioned=True)
    assert_trees_close(got, expected, tolerance=BACKEND_TOLERANCE)


@needs_cxx
@pytest.mark.parametrize("batch", [1, 2])
def test_emulated_attention_matches_its_reference(batch):
    for grid in (2, 8):
        assert emulated_model_mismatches("attention", batch, grid=grid, block=64, resident_partitioned=True) == []


def test_attention_at_full_size_keeps_every_head_s_weights():
    """Rendered for CUDA (no GPU needed): at batch 1 the four projections of every head read shared memory, the
    Q, K and V GEMVs still one op (siblings.py: their tiles lie one after another, the merged op's region)."""
    counts = [len(_resident_ops(zoo_lowered("attention", 1, resident_partitioned=option).lowering.plan))
              for option in (False, True)]
    assert counts == [0, 2]
    merged, w_o = _resident_ops(zoo_lowered("attention", 1, resident_partitioned=True).lowering.plan)
    assert merged.params[N_PARTS] == (64, 64, 64) and merged.params[RESIDENT] == (0, 12, 1)
    assert w_o.params[RESIDENT] == (3 * 64 * 64 * 4, 12, 1) and N_PARTS not in w_o.params


@pytest.mark.parametrize("grid", [264, 396])
def test_at_batch_64_each_veu_keeps_its_head_once_for_all_its_rounds(grid):
    """768 (batch, head) partitions on 264 vEUs: partitions p, p + 264 and p + 528 of a vEU are one head's (264 is a
    multiple of 12), so one slot holds its weights for all three rounds: 64 KiB a vEU (the same on 396, two rounds)."""
    plan = zoo_lowered("attention", 64, grid=grid).lowering.plan
    merged, w_o = _resident_ops(plan)
    assert merged.n_utasks == 768 and merged.params[RESIDENT] == (0, grid, 1)
    assert w_o.params[RESIDENT] == (3 * 64 * 64 * 4, grid, 1)
    assert resident.region_bytes(plan) == 4 * 64 * 64 * 4
    assert "(one tile for all its rounds)" in str(plan)


def test_cuda_takes_more_veus_for_more_partitions_in_flight():
    """gdsl.backends.cuda.partitions_in_flight (no GPU here: 132 SMs assumed): Attention bs64's 768 partitions run in
    two rounds on three vEUs an SM, its heads' weights still resident (on four or more they are not: 48 KiB a vEU);
    batch 1 (12 partitions) stays on 132 vEUs, a plan without partitioned loops on its 264."""
    grids = {(name, batch): zoo_lowered(name, batch).lowering.plan.grid
             for name, batch in (("attention", 64), ("attention", 1), ("lstm", 64))}
    assert grids == {("attention", 64): 396, ("attention", 1): 132, ("lstm", 64): 264}
    assert len(_resident_ops(zoo_lowered("attention", 64).lowering.plan)) == 2


def test_a_partitioned_loop_keeps_all_of_its_weights_or_none(monkeypatch):
    """With a slot a round (SHARED_SLOTS off), at batch 64 the Q, K and V tiles fit only in part: none are
    kept, and the siblings stay one op."""
    monkeypatch.setattr(resident, "SHARED_SLOTS", False)
    plan = zoo_lowered("attention", 64, resident_partitioned=True).lowering.plan
    assert _resident_ops(plan) == []
    assert [len(op.params[N_PARTS]) for op in plan_ops(plan) if N_PARTS in op.params] == [3]


def batched_heads(x, W):
    """x [4, 3, 1, 8] through the heads' W [3, 8, 8]: 12 partitions, a head's tiles every 3 uTasks."""
    return gdsl.fori_loop(0, 3, lambda t, x: gnp.tanh(gnp.matmul(x, W)) * 0.5 + x, x)


BATCHED = (rng.standard_normal((4, 3, 1, 8)).astype(np.float32),
           (rng.standard_normal((3, 8, 8)) * 0.3).astype(np.float32))


@pytest.mark.parametrize("grid, slots", [(3, 1), (6, 1), (4, 3), (5, 3), (12, 1)])
def test_rounds_of_one_head_share_a_slot(grid, slots):
    """One slot where the vEU count is a multiple of the heads (every round of a vEU reads one head's W), else
    one a round (grid 4 and 5: rounds of different heads); the region is that many tiles."""
    plan = schedule(gdsl.make_ir(batched_heads)(*BATCHED), grid=grid, partition=True, resident_bytes=4096)
    (op,) = _resident_ops(plan)
    assert op.n_utasks == 12 and op.params[RESIDENT] == (0, grid, slots)
    assert resident.region_bytes(plan) == slots * 8 * 8 * 4


SHARED_W = (rng.standard_normal((6, 1, 8)).astype(np.float32), (rng.standard_normal((8, 8)) * 0.3).astype(np.float32))


@pytest.mark.parametrize("grid", [1, 4, 5])
def test_one_weight_for_every_partition_takes_one_slot(grid):
    """x [6, 1, 8] @ W [8, 8]: every partition reads the one W, so a vEU keeps it once for all its rounds."""
    plan = schedule(gdsl.make_ir(batched_heads)(*SHARED_W), grid=grid, partition=True, resident_bytes=4096)
    (op,) = _resident_ops(plan)
    assert op.params[RESIDENT] == (0, grid, 1)


@needs_cxx
@pytest.mark.parametrize("args, grid", [(BATCHED, 1), (BATCHED, 3), (BATCHED, 4), (BATCHED, 6), (SHARED_W, 4)])
def test_emulated_shared_slots_match_the_interpreter(args, grid):
    program = gdsl.make_ir(batched_heads)(*args)
    expected = tree_unflatten(program.out_tree, run_program(program, _flat_args(args)))
    got = emulator.emulate(batched_heads, *args, grid=grid, block=64, partition=True)
    assert_trees_close(got, expected, tolerance=BACKEND_TOLERANCE)


@needs_nvrtc
def test_attention_with_resident_heads_compiles_with_nvrtc():
    from gdsl.backends.cuda import toolchain as cuda_toolchain
    source = zoo_lowered("attention", 1, resident_partitioned=True).source
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"
