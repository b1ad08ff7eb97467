"""Block-local temporaries in shared memory (the scheduler/jit option `smem_temps`, gdsl/schedule/local.py): a
temp whose every element only uTasks of one vEU write and read lives in that vEU's shared memory at the same
indices (Plan.block_local), declared by the C-family renderer past the resident tiles. Attention bs1's per-head
chain (q, scores, softmax, context) and NASRNN bs1's gate columns and cell state of the first step become local;
a temp another vEU reads never does; the emulator matches the references; NVRTC compiles every zoo row with it;
the default takes only temps of loop bodies; smem_temps=False leaves every plan as it was without the option."""
import dataclasses
import re

import numpy as np
import pytest
from strategies import cuda_lowering, emulated_model_mismatches, needs_nvrtc, zoo_lowered

import gdsl.numpy as gnp
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.schedule import gemv_rows
from gdsl.schedule.local import local_buffers, local_bytes
from gdsl.schedule.plan import Loop, Task, Wave

ALL_ROWS = [("lstm", 1), ("lstm", 64), ("nasrnn", 1), ("nasrnn", 64), ("attention", 1), ("attention", 64),
            ("seq2seq", 1), ("seq2seq", 64), ("blockdrop", 1), ("blockdrop", 64), ("skipnet", 1), ("rae", 1)]


def _local(plan) -> dict:
    return {buf.name: offset for buf, offset in plan.block_local}


def test_attention_batch_1_head_chain_is_local(monkeypatch):
    """Attention bs1 (partitioned loop, head h on vEU h): q (t3) and the context (t12), 12 x 64 floats each, live in
    shared memory (the scores and the softmax never leave the uTask that computes the context: gemv_rows.py); the
    outputs (the K/V caches) stay global. With the scores and softmax as ops of their own (t10, t11), they do too."""
    lowered = zoo_lowered("attention", 1, smem_temps=True)
    plan = lowered.lowering.plan
    assert _local(plan) == {"t12": 0, "t3": 3072} and local_bytes(plan) == 6144
    assert "shared memory: t12 at +0, t3 at +3072 (block-local, 6144 bytes per vEU after the resident weights)" \
        in str(plan).splitlines()
    source = lowered.source
    assert "float* t3 = (float*)(gdsl_smem + GDSL_LOCAL_BASE + 3072);" in source
    assert "float* out0 = " not in source and "(gdsl_ws + " not in source.split("float* t3")[1].split(";")[0]
    monkeypatch.setattr(gemv_rows, "ENABLED", False)
    plan = zoo_lowered("attention", 1, smem_temps=True).lowering.plan
    assert _local(plan) == {"t10": 0, "t11": 3072, "t12": 6144, "t3": 9216} and local_bytes(plan) == 12288


def test_nasrnn_batch_1_gates_and_cell_are_local():
    """NASRNN bs1 (owner plan, two steps an iteration, column j on vEU j): both steps' gate buffers (t11, t18:
    8 x 256, vEU j's GEMV writes column j of each gate, its cell reads it) and the first step's cell state t12
    are local; the carried h (t4, t13: flag-published) and c (t5: written before the loop by one vEU) are not."""
    plan = zoo_lowered("nasrnn", 1, smem_temps=True).lowering.plan
    assert _local(plan) == {"t12": 0, "t11": 1024, "t18": 9216} and local_bytes(plan) == 17408
    assert "shared memory: t12 at +0, t11 at +1024, t18 at +9216 (block-local, 17408 bytes per vEU after the " \
           "resident weights)" in str(plan).splitlines()


def test_a_temp_read_on_another_vEU_is_never_local(monkeypatch):
    """Attention bs1's loop (the softmax an op of its own: gemv_rows.ENABLED off) with the softmax moved one vEU up
    (head h's scores read on vEU h + 1): the scores (t10, written on vEU h) and the softmax (t11, read by the next
    matmul on vEU h) are no longer block-local; q and the context still are."""
    monkeypatch.setattr(gemv_rows, "ENABLED", False)
    plan = zoo_lowered("attention", 1).lowering.plan
    body = plan.kernels[0].body
    loop = next(s for s in body if isinstance(s, Loop))

    def shifted(stmt):
        if isinstance(stmt, Wave) and stmt.tasks[0].op.outputs[0].storage.name == "t11":
            return Wave(tuple(Task(t.op, t.first + 1, t.count) for t in stmt.tasks))
        return stmt
    moved = dataclasses.replace(loop, body=tuple(shifted(s) for s in loop.body))
    names = {b.name for b in local_buffers(tuple(moved if s is loop else s for s in body), 1 << 20)}
    assert names == {"t3", "t12"}
    assert {b.name for b in local_buffers(body, 1 << 20)} == {"t3", "t10", "t11", "t12"}


@needs_nvrtc
def test_a_temp_reduced_on_one_vEU_is_not_local():
    """A program: y = x * 2 over 4096 elements (16 chunks on vEUs 0-15), its sum (on vEU 0) and tanh (on vEUs
    1-16): y is read on other vEUs than its writers' and stays in the workspace; so do the sum and tanh(y),
    read by uniform ops (every vEU)."""
    def f(x):
        y = x * 2.0
        return gnp.sum(y) + gnp.tanh(y)[0]
    lowered = cuda_lowering(f, (np.ones(4096, np.float32),), smem_temps=True)
    assert lowered.plan.block_local == ()
    assert "GDSL_LOCAL_BASE" not in lowered.rendered.source


@pytest.mark.parametrize("name,bs", [("attention", 1), ("attention", 4), ("nasrnn", 1), ("blockdrop", 1),
                                     ("skipnet", 1)])
def test_emulated_matches_the_reference(name, bs):
    """The small configurations (grid 4) with smem_temps, where it fires (each vEU its own shared memory in
    emu.h): the emulator matches the float64 reference."""
    assert emulated_model_mismatches(name, bs, smem_temps=True) == []


@needs_nvrtc
@pytest.mark.parametrize("name,bs", ALL_ROWS)
def test_every_zoo_row_compiles(name, bs):
    """Every zoo row's CUDA with smem_temps=True compiles through NVRTC; its plan is the one without the option
    but for the `shared memory:` line and which inputs are loaded a wave early (preload.py leaves block-local
    temps alone: NASRNN's second cell loads its carry early only when it is in memory); the default (None: loop
    temporaries only) takes a subset of True's buffers, and only Attention's and NASRNN's at batch 1
    (BlockDrop's, SkipNet's and Seq2seq bs64's local temps are outside loops)."""
    def text(plan):
        return "\n".join(re.sub(r", operands [0-9, ]+ loaded a wave early", "", x) for x in str(plan).splitlines()
                         if not x.startswith("shared memory: "))
    off = zoo_lowered(name, bs, smem_temps=False).lowering.plan
    lowered = zoo_lowered(name, bs, smem_temps=True)
    assert cuda_toolchain.compile_cuda(lowered.source, "sm_90")[:4] == b"\x7fELF"
    assert text(lowered.lowering.plan) == text(off) and not off.block_local
    default = zoo_lowered(name, bs).lowering.plan
    assert text(default) == text(off)
    assert set(_local(default)) <= set(_local(lowered.lowering.plan))
    assert bool(default.block_local) == ((name, bs) in (("attention", 1), ("nasrnn", 1)))


@pytest.mark.gpu
@pytest.mark.parametrize("name,bs", [("attention", 1), ("nasrnn", 1), ("blockdrop", 1), ("skipnet", 1),
                                     ("seq2seq", 64)])
def test_gpu_full_size_matches_the_reference(name, bs):
    """On the GPU at full size (where the option fires), with smem_temps=True: the float64 reference, twice (the
    shared copies are zeroed at each kernel start: a second call must not see the first's values)."""
    import gdsl
    from models import common, load
    prob = common.build_problem(load(name), bs)
    f = prob.model.make_forward(prob.cfg, backend="cuda", smem_temps=True)
    assert f.lower(prob.weights, prob.batches[0]).lowering.plan.block_local
    expected = prob.references()[0]
    for _ in range(2):
        assert common.compare(gdsl.to_numpy(f(prob.weights, prob.batches[0])), expected) == []
