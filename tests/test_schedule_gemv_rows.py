"""A GEMV, a row chain on its rows and a GEMV reading the chain's rows as one uTask (gdsl/schedule/gemv_rows.py,
plan.GEMV_ROWS_GEMV, the C-family rule in cfamily/gemv_rows.py): Attention's `softmax(q · Kᵀ) · V` of one query
row, in a partitioned loop. The plan fuses the pattern and nothing else; the plan simulator (races checked) and
the C-family emulator equal the interpreter; NVRTC compiles the zoo's Attention with it."""
import numpy as np
import pytest
from strategies import emulated_model_mismatches, needs_cxx, needs_nvrtc, zoo_lowered
from test_schedule import VIEWS, check_emulated, check_plan

import gdsl
import gdsl.nn
import gdsl.numpy as gnp
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.schedule import gemv_rows, schedule
from gdsl.schedule.plan import CHAIN_PARTS, GEMV_ROWS_GEMV, Loop, Wave, plan_statements
from gdsl.schedule.printer import describe_op
from models.floor import op_flops

rng = np.random.default_rng(5)
STEPS = 3


def _w(*shape):
    return (rng.standard_normal(shape) * 0.5).astype(np.float32)


def _fused(plan) -> list:
    return [t.op for s in plan_statements(plan) if isinstance(s, Wave) for t in s.tasks
            if t.op.kind == GEMV_ROWS_GEMV.name]


def decode(x, K, V, Wq, Wo):
    """Heads of one query row attending over a cache, in a loop (a partitioned loop, as Attention's)."""
    def step(i, x):
        q = x @ Wq
        a = gdsl.nn.softmax(0.5 * (q @ gnp.swapaxes(K, 1, 2)), axis=-1)
        return gnp.tanh((a @ V) @ Wo)
    return gdsl.fori_loop(0, STEPS, step, x)


def kept(x, K, V, keep):
    """The chain reads an input beside the scores (a row step: the weights scaled after the softmax)."""
    def step(i, x):
        a = gdsl.nn.softmax(x @ gnp.swapaxes(K, 1, 2), axis=-1) * keep
        return gnp.tanh(a @ V)
    return gdsl.fori_loop(0, STEPS, step, x)


def scores_read_twice(x, K, V, keep):
    def step(i, carry):
        x, total = carry
        s = x @ gnp.swapaxes(K, 1, 2)
        return gnp.tanh(gdsl.nn.softmax(s, axis=-1) @ V), total + s
    return gdsl.fori_loop(0, STEPS, step, (x, keep * 0.0 + gnp.zeros((HEADS, 1, L), np.float32)))


def two_rows(x, K, V, keep):
    def step(i, x):
        return gnp.tanh(gdsl.nn.softmax(x @ gnp.swapaxes(K, 1, 2), axis=-1) @ V)
    return gdsl.fori_loop(0, STEPS, step, x)


HEADS, L, D = 4, 40, 24          # (a row of 40: two slots a lane, the second partly masked; 24 columns < a warp)
DECODE_ARGS = (_w(HEADS, 1, D), _w(HEADS, L, D), _w(HEADS, L, D), _w(HEADS, D, D), _w(HEADS, D, D))
KEPT_ARGS = (_w(HEADS, 1, D), _w(HEADS, L, D), _w(HEADS, L, D), _w(1, 1, L))


@pytest.mark.parametrize("fn, args, grid, partition", [
    (decode, DECODE_ARGS, 132, True),
    (decode, DECODE_ARGS, 3, True),
    (kept, KEPT_ARGS, 132, True),
])
def test_fused_and_equal_to_the_interpreter(fn, args, grid, partition):
    program = gdsl.make_ir(fn)(*args)
    plan = schedule(program, grid=grid, partition=partition, views=VIEWS, epilogues=VIEWS, rows=VIEWS,
                    siblings=VIEWS)
    assert any(isinstance(s, Loop) and s.parts == HEADS for s in plan_statements(plan))
    (op,) = _fused(plan)
    first, chain, second = op.params[CHAIN_PARTS]
    assert (first.kind, chain.kind, second.kind) == ("matmul", "row_chain", "matmul")
    assert op.n_utasks == HEADS and op.outputs == second.outputs
    assert plan.stats["gemv_rows_gemv"] == 1
    text = describe_op(op)
    assert " as one uTask: " in text and first.name in text and chain.name in text and second.name in text, text
    assert op_flops(op) == sum(op_flops(p) for p in (first, chain, second))
    check_plan(fn, *args, grids=(1, 3, 132), epilogues=VIEWS, rows=VIEWS, siblings=VIEWS)


def test_what_is_not_fused():
    """Scores read outside the chain, two rows a uTask, a backend without the rule, the switch off."""
    for fn, args in ((scores_read_twice, KEPT_ARGS), (two_rows, (_w(HEADS, 2, D),) + KEPT_ARGS[1:])):
        program = gdsl.make_ir(fn)(*args)
        plan = schedule(program, grid=132, partition=True, views=VIEWS, epilogues=VIEWS, rows=VIEWS)
        assert any(isinstance(s, Loop) and s.parts for s in plan_statements(plan)), fn.__name__
        assert _fused(plan) == [], fn.__name__
        check_plan(fn, *args, grids=(1, 3), epilogues=VIEWS, rows=VIEWS)
    program = gdsl.make_ir(decode)(*DECODE_ARGS)
    assert _fused(schedule(program, grid=1, views=VIEWS, rows=("cpu",))) == []
    old, gemv_rows.ENABLED = gemv_rows.ENABLED, False
    try:
        assert _fused(schedule(program, grid=1, views=VIEWS, rows=VIEWS)) == []
    finally:
        gemv_rows.ENABLED = old


@needs_cxx
@pytest.mark.parametrize("block", [64, 128])
def test_emulated_equal_to_the_interpreter(block):
    """The generated C on the g++ emulator, partitioned and on one vEU (block 64: 24 columns of 32 lanes, two
    slices of the row; 128: four)."""
    check_emulated(decode, *DECODE_ARGS, grids=(1, 4), block=block, partition=True)
    check_emulated(kept, *KEPT_ARGS, grids=(4,), block=block, partition=True)


@needs_cxx
def test_emulated_attention_matches_its_reference():
    assert emulated_model_mismatches("attention", 1, grid=4) == []
    assert emulated_model_mismatches("attention", 3, grid=4) == []


@needs_nvrtc
@pytest.mark.parametrize("batch", [1, 64])
def test_zoo_attention_compiles_with_it(batch):
    lowered = zoo_lowered("attention", batch, control="device")
    plan = lowered.lowering.plan
    (op,) = _fused(plan)
    loop = next(s for s in plan.kernels[0].body if isinstance(s, Loop))
    assert loop.parts == 12 * batch
    assert "_gemv_rows_gemv(" in lowered.source and "GDSL_SHFL(" in lowered.source
    # (the fused op's first GEMV reads its A in place; so does `@ W_o` at batch 1, whose A is a block-local temp in
    # shared memory: gemm.GEMV_A_IN_PLACE; at batch 64 no temp is block-local)
    assert lowered.source.count("smem, true);") == (1 if batch == 1 else 0)
    cuda_toolchain.compile_cuda(lowered.source, "sm_90")
