"""A partitioned loop's carries in its vEUs' shared memory (gdsl/schedule/local.py's smem_carries, Loop.staged;
with smem_temps, where the switch local.SMEM_CARRIES is on: off by default, measured neutral on the H200): a buffer
the loop writes whose every access by vEU v stays in v's slice [v * size, (v + 1) * size) is copied into v's shared
memory when the loop starts and back when it ends. Attention bs1's K/V caches and x are staged; nothing is where a
vEU runs several partitions; the simulator rejects a plan whose staged slice another vEU touches; the emulator and
NVRTC take the rendered scopes; the GPU matches the reference twice."""
import dataclasses

import numpy as np
import pytest
from strategies import cuda_lowering, first_loop, needs_nvrtc, zoo_lowered
from test_schedule import check_emulated

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.schedule import local
from gdsl.schedule.plan import Sync, Task, Wave
from gdsl.schedule.simulate import BarrierError, simulate


@pytest.fixture(autouse=True)
def carries_on(monkeypatch):
    monkeypatch.setattr(local, "SMEM_CARRIES", True)


def _staged(plan) -> list:
    return [(s.buffer.name, s.offset, s.size) for s in first_loop(plan).staged]


def _rows(W, h0):
    """Four independent recurrences h[p] <- tanh(h[p] @ W[p]) + h[p] / 2 (a partitioned loop with partition=True)."""
    def body(i, h):
        return gnp.tanh(gnp.matmul(h, W)) + h * 0.5
    return gdsl.fori_loop(0, 6, body, h0)


def _rows_args():
    rng = np.random.default_rng(0)
    return (0.3 * rng.standard_normal((4, 16, 16))).astype(np.float32), \
        rng.standard_normal((4, 1, 16)).astype(np.float32)


def test_attention_batch_1_stages_its_caches_and_x():
    """Attention bs1 (head h on vEU h): the K and V caches (out0, out1: 64 x 64 floats a head) and x (out2) live in
    the vEU's shared memory during the 32 steps, past the block-local temps; the C names point into the copies."""
    lowered = zoo_lowered("attention", 1)
    plan = lowered.lowering.plan
    assert _staged(plan) == [("out0", 6144, 4096), ("out1", 22528, 4096), ("out2", 38912, 64)]
    assert local.local_bytes(plan) == 39168
    text = str(plan).splitlines()
    assert "    in each vEU's shared memory while it runs, its slice of: out0[4096 per vEU] at +6144, out1[4096 " \
           "per vEU] at +22528, out2[64 per vEU] at +38912" in text
    assert "  end loop (the staged slices copied out)" in text
    source = lowered.source
    assert "float* gdsl_staged0 = (float*)(gdsl_smem + GDSL_LOCAL_BASE + 6144);" in source
    assert "float* out0 = gdsl_staged0 - (long long)blockIdx.x * 4096;" in source
    copy_in = "if (blockIdx.x < 12) gdsl_copy_block(gdsl_staged1, out1 + (long long)blockIdx.x * 4096, 4096);"
    copy_out = "if (blockIdx.x < 12) gdsl_copy_block(out1 + (long long)blockIdx.x * 4096, gdsl_staged1, 4096);"
    assert source.index(copy_in) < source.index("while (true)") < source.index(copy_out)


def test_nothing_is_staged_where_a_vEU_runs_several_partitions():
    """Attention bs64 (768 partitions on 264 vEUs) and bs1 on 8 vEUs (vEU 0 runs heads 0 and 8): no vEU's accesses
    stay in one slice, so nothing is staged; the switch off stages nothing either."""
    assert first_loop(zoo_lowered("attention", 64).lowering.plan).staged == ()
    assert first_loop(cuda_lowering(_rows, _rows_args(), grid=3, partition=True).plan).staged == ()
    assert _staged(cuda_lowering(_rows, _rows_args(), grid=8, partition=True).plan) == [("out0", 256, 16)]


def test_the_switch_off_leaves_the_plan_as_it_was(monkeypatch):
    """local.SMEM_CARRIES = False: the plan is the default's but for the staged lines (and the header's words)."""
    def text(plan):
        return [x for x in str(plan).splitlines() if not x.startswith(("shared memory: ", "    in each vEU's"))]
    on = zoo_lowered("attention", 1).lowering.plan
    monkeypatch.setattr(local, "SMEM_CARRIES", False)
    off = zoo_lowered("attention", 1).lowering.plan
    assert first_loop(off).staged == () and local.local_bytes(off) == 6144
    assert text(off) == [x.replace(" (the staged slices copied out)", "") for x in text(on)]


def test_a_slice_another_vEU_touches_is_rejected():
    """The user loop of four recurrences on 8 vEUs with its add moved one vEU up (partition p's h written on vEU
    p + 1, behind grid barriers): the simulator finds the staged plan's vEU touching another's slice, and
    smem_carries on the moved plan stages nothing."""
    args = _rows_args()
    plan = cuda_lowering(_rows, args, grid=8, partition=True).plan
    loop = first_loop(plan)

    def shifted(stmt):          # (the loop's block syncs made grid barriers: only the slices are wrong)
        if isinstance(stmt, Wave) and stmt.tasks[0].op.kind != "matmul":
            return Wave(tuple(Task(t.op, t.first + 1, t.count) for t in stmt.tasks))
        return Sync("grid") if isinstance(stmt, Sync) else stmt
    moved = dataclasses.replace(loop, body=tuple(shifted(s) for s in loop.body))
    body = tuple(moved if s is loop else s for s in plan.kernels[0].body)
    bad = dataclasses.replace(plan, kernels=(dataclasses.replace(plan.kernels[0], body=body),))
    with pytest.raises(BarrierError, match="outside its staged slice"):
        simulate(bad, list(args))
    unstaged = dataclasses.replace(moved, staged=())
    body = tuple(unstaged if s is loop else s for s in plan.kernels[0].body)
    again = local.smem_carries(dataclasses.replace(plan, kernels=(dataclasses.replace(plan.kernels[0], body=body),)),
                               1 << 16)
    assert first_loop(again).staged == ()


def test_the_staged_plan_simulates_and_emulates():
    """The user loop staged (8 vEUs) and not (3): the simulator's race and slice checks pass and the g++
    emulator of the rendered C matches the interpreter."""
    args = _rows_args()
    plan = cuda_lowering(_rows, args, grid=8, partition=True).plan
    assert first_loop(plan).staged
    expected = gdsl.jit(_rows, backend="interpret")(*args)
    np.testing.assert_allclose(simulate(plan, list(args))[0], np.asarray(expected), rtol=1e-5, atol=1e-5)
    check_emulated(_rows, *args, grids=(3, 8), partition=True)


@needs_nvrtc
def test_the_staged_scopes_compile():
    """NVRTC compiles Attention bs1's staged loop (the shadowing names, the copies) and the user loop's."""
    assert cuda_toolchain.compile_cuda(zoo_lowered("attention", 1).source, "sm_90")[:4] == b"\x7fELF"
    source = cuda_lowering(_rows, _rows_args(), grid=8, partition=True).source
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"


@pytest.mark.gpu
def test_gpu_staged_loop_matches_twice():
    """On the GPU: the user loop staged on 8 vEUs matches the interpreter, twice (the copies are per call); so
    does Attention bs1 at full size with its caches staged."""
    from models import common, load
    prob = common.build_problem(load("attention"), 1)
    f = prob.model.make_forward(prob.cfg, backend="cuda")
    assert first_loop(f.lower(prob.weights, prob.batches[0]).lowering.plan).staged
    for _ in range(2):
        assert common.compare(gdsl.to_numpy(f(prob.weights, prob.batches[0])), prob.references()[0]) == []
    args = _rows_args()
    f = gdsl.jit(_rows, backend="cuda", grid=8, partition=True)
    expected = np.asarray(gdsl.jit(_rows, backend="interpret")(*args))
    for _ in range(2):
        np.testing.assert_allclose(gdsl.to_numpy(f(*args)), expected, rtol=1e-5, atol=1e-5)
