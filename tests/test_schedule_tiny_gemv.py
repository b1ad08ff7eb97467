"""Tiny batched GEMVs in one uTask (utasks.TINY_GEMV_GATHER, tiny_gathered_gemv): a batched GEMV whose left
operand is broadcast over the batch and whose whole work one vEU does in about one memory round trip (SkipNet's
gate: 1 x 10 @ [4, 10, 10]) runs as one uTask covering every batch element (GATHER_BATCH) instead of one uTask
per batch element on vEUs of their own, so that a chain of tiny ops on one vEU keeps block syncs between them
(SkipNet: 64 grid barriers of 269 fewer). Outside loop bodies only (inside them owner.py's layouts place chains).

Checked: the split (tiny and not tiny), a chain's syncs, the plan simulator and the C emulator against the
interpreter, the cpu backend, NVRTC."""
import numpy as np
from strategies import cuda_lowering, needs_cxx, needs_nvrtc
from test_schedule import check_emulated, check_plan

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.primitives.linalg import matmul_p
from gdsl.schedule import utasks
from gdsl.schedule.plan import Sync, Wave, plan_statements

F32 = np.dtype(np.float32)


class _Aval:
    def __init__(self, shape):
        self.shape, self.dtype, self.size = shape, F32, int(np.prod(shape))


def split(a_shape, b_shape, out_shape, grid=132, gather_tiny=True):
    return utasks.split(matmul_p.name, [_Aval(a_shape), _Aval(b_shape)], [_Aval(out_shape)], {}, grid, 256,
                        gather_tiny=gather_tiny)


def test_a_tiny_broadcast_gemv_is_one_gathered_utask():
    count, params, _ = split((1, 10), (4, 10, 10), (4, 1, 10))
    assert (count, params) == (1, {"tile_m": 1, "tile_n": 10, utasks.GATHER_BATCH: True})


def test_larger_or_unbroadcast_gemvs_keep_a_utask_per_batch_element():
    count, params, _ = split((1, 256), (4, 256, 256), (4, 1, 256))       # (the LSTM's four gates: not tiny)
    assert count > 1 and utasks.GATHER_BATCH not in params
    count, params, _ = split((4, 1, 10), (4, 10, 10), (4, 1, 10))        # (A batched: nothing to gather)
    assert (count, utasks.GATHER_BATCH in params) == (4, False)
    count, params, _ = split((1, 10), (4, 10, 10), (4, 1, 10), gather_tiny=False)    # (in a loop body)
    assert (count, utasks.GATHER_BATCH in params) == (4, False)


def gate(h, w1, w4, w2):
    """SkipNet's gate in miniature: a GEMV, the tiny 4-gate GEMV, a cell, a GEMV, each one vEU's work."""
    z = gnp.tanh(h @ w1)                      # [1, 10]
    g = z @ w4                                # [4, 1, 10]: A broadcast over the 4 gates
    c = gnp.tanh(g[0]) * (1 / (1 + gnp.exp(-g[1]))) + g[2] * g[3]
    return c @ w2


def gate_args():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((1, 32), dtype=np.float32), rng.standard_normal((32, 10), dtype=np.float32),
            rng.standard_normal((4, 10, 10), dtype=np.float32), rng.standard_normal((10, 1), dtype=np.float32))


def test_a_chain_of_tiny_ops_keeps_block_syncs():
    plan = cuda_lowering(gate, gate_args()).plan
    stmts = [s for s in plan_statements(plan) if isinstance(s, (Wave, Sync))]
    gathered = [k for k, s in enumerate(stmts) if isinstance(s, Wave)
                and any(utasks.gathers_batch(t.op.params) for t in s.tasks)]
    assert len(gathered) == 1
    k = gathered[0]
    (task,) = stmts[k].tasks
    assert (task.op.n_utasks, task.count) == (1, 1)
    assert stmts[k - 1].scope == "block" and stmts[k + 1].scope == "block"


def test_gate_matches_the_interpreter_in_the_simulator():
    check_plan(gate, *gate_args())


@needs_cxx
def test_gate_matches_the_interpreter_on_the_emulator():
    check_emulated(gate, *gate_args())


def test_gate_on_the_cpu_backend():
    args = gate_args()
    expected = np.asarray(gdsl.jit(gate, backend="interpret")(*args))
    np.testing.assert_allclose(np.asarray(gdsl.jit(gate, backend="cpu")(*args)), expected, rtol=1e-5, atol=1e-5)


@needs_nvrtc
def test_gate_cuda_compiles():
    source = cuda_lowering(gate, gate_args()).source
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"
