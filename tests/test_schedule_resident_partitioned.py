"""The option resident_partitioned=True: a partitioned loop (uTask p of every op on vEU p mod grid) keeps the
loop-invariant weights of its GEMV-shaped matmuls in the vEUs' shared memory too (resident.keep_resident), as
other loops do. Attention's heads: each vEU keeps its head's W_q, W_k, W_v and W_o. Checked on the g++ emulator
(which runs the resident-weight code with a budget of its own) against the interpreter and Attention's float64
reference, and compiled with NVRTC."""
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
from gdsl.schedule import schedule
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
    assert merged.params[N_PARTS] == (64, 64, 64) and merged.params[RESIDENT] == (0, 12)
    assert w_o.params[RESIDENT] == (3 * 64 * 64 * 4, 12) and N_PARTS not in w_o.params


def test_a_partitioned_loop_keeps_all_of_its_weights_or_none():
    """At batch 64 (three rounds of 768 partitions on 264 vEUs) the Q, K and V tiles fit only in part: none are
    kept, and the siblings stay one op."""
    plan = zoo_lowered("attention", 64, resident_partitioned=True).lowering.plan
    assert _resident_ops(plan) == []
    assert [len(op.params[N_PARTS]) for op in plan_ops(plan) if N_PARTS in op.params] == [3]


@needs_nvrtc
def test_attention_with_resident_heads_compiles_with_nvrtc():
    from gdsl.backends.cuda import toolchain as cuda_toolchain
    source = zoo_lowered("attention", 1, resident_partitioned=True).source
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"
