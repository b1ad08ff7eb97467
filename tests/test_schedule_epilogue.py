"""Elementwise chains folded into the matmul / conv2d whose result they read, as its epilogue
(Scheduler._fold_epilogues): which chains fold and which must not, what the plan says, and that the plan
simulator (with its race checks), the CPU emulator of the generated C and the CPU backend compute what the
interpreter computes, with and without epilogues; the CUDA source with an epilogue compiles with NVRTC."""
import numpy as np
import pytest
from strategies import BACKEND_TOLERANCE, assert_trees_close, interpreted, needs_cxx, needs_nvrtc, plan_ops, simulated

import gdsl
import gdsl.nn
import gdsl.numpy as gnp
from gdsl.backends.cfamily.emulator import EmulatorDialect, emulate
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.primitives.registry import CONTRACTION, CONVOLUTION, family_of
from gdsl.schedule import schedule
from gdsl.schedule.plan import COPY, EPILOGUE, FUSED, RESULT, epilogue_of, fold_expr

rng = np.random.default_rng(0)
CHAIN = EmulatorDialect().lowering_chain           # the C-family backends' rules: they apply epilogues


def _f32(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ------------------------------------------------------------------------------------------- programs
def dense_tanh(x, w, b):
    return gnp.tanh(x @ w + b)


def bn_affine(y, scale, shift):
    """Inference batch norm folded to a per-channel affine map (scale, shift precomputed)."""
    return y * gnp.reshape(scale, (1, -1, 1, 1)) + gnp.reshape(shift, (1, -1, 1, 1))


def conv_bn_relu(x, w, scale, shift):
    return gdsl.nn.relu(bn_affine(gdsl.nn.conv2d(x, w, padding=1), scale, shift))


def conv_bn_residual_relu(x, w, scale, shift):
    return gdsl.nn.relu(x + bn_affine(gdsl.nn.conv2d(x, w, padding=1), scale, shift))


def conv_batch_norm_relu(x, w, mean, var, weight, bias):
    """gdsl.nn.batch_norm: its scale 1/sqrt(var + eps) * weight is an op of its own, before the conv's."""
    return gdsl.nn.relu(gdsl.nn.batch_norm(gdsl.nn.conv2d(x, w, padding=1), mean, var, weight, bias))


def silu_of_matmul(x, w):
    y = x @ w                          # read twice, both times by the one chain
    return y * gdsl.nn.sigmoid(y)


def column_ramp(x, w):
    """An iota leaf in the epilogue: each column gets its index added (the CPU backend's iota rule)."""
    return gnp.tanh(x @ w + gnp.arange(w.shape[1], dtype=gdsl.float32) * 0.01)


def vector_matrix(x, w, b):
    """A vector times a matrix: traced as reshape (K,) -> (1, K), matmul, reshape (1, N) -> (N,); the
    chain reads the reshaped result (RAE's node)."""
    return gnp.tanh(x @ w + b)


def vector_args():
    return _f32(32), _f32(32, 24, scale=0.2), _f32(24)


def dense_args():
    return _f32(16, 32), _f32(32, 24, scale=0.2), _f32(24)


def conv_args(channels=8):
    return _f32(2, channels, 6, 6), _f32(channels, channels, 3, 3, scale=0.2), _f32(channels), _f32(channels)


def batch_norm_args(channels=8):
    var = np.abs(_f32(channels)) + 0.5
    return conv_args(channels)[:2] + (_f32(channels), var, _f32(channels), _f32(channels))


FOLDING = {
    "matmul_bias_tanh": (dense_tanh, dense_args),
    "conv_bn_relu": (conv_bn_relu, conv_args),
    "conv_bn_residual_relu": (conv_bn_residual_relu, conv_args),
    "silu": (silu_of_matmul, lambda: dense_args()[:2]),
    "conv_batch_norm_relu": (conv_batch_norm_relu, batch_norm_args),
    "column_ramp": (column_ramp, lambda: dense_args()[:2]),
    "vector_matrix": (vector_matrix, vector_args),
}
# The chains whose other operands are all program inputs (or iota): the contraction waits for no new producer.
READ_INPUTS_ONLY = ("matmul_bias_tanh", "conv_bn_relu", "conv_bn_residual_relu", "silu", "column_ramp",
                    "vector_matrix")


# ------------------------------------------------------------------------------------ what must not fold
def used_twice(x, w):
    y = x @ w
    return gnp.tanh(y), y * 2.0


def also_an_output(x, w):
    y = x @ w
    return y, gnp.tanh(y)


def reduced(x, w):
    return gnp.sum(x @ w, axis=1)      # a reduction is no elementwise chain


def transposed(x, w, b):
    return gnp.transpose(x @ w) + b[:, None]


def sliced(x, w):
    return (x @ w)[1:] + 1.0


def broadcast_wider(x, w, z):
    return (x @ w) + z                 # z has a batch dimension more than x @ w: another index per element


def flattened(x, w):
    return gnp.reshape(x @ w, (-1,)) + 1.0     # (16, 24) -> (384,): the chain's index map is another one


def trailing_unit(x, w, b):
    return gnp.reshape(x @ w, (-1,)) + b       # (16, 1) -> (16,): b broadcast to (16, 1) would be (16, 16)


def vector_used_twice(x, w):
    y = x @ w                                  # the reshaped result is read by the chain and is an output
    return gnp.tanh(y), y


def carried(x, w):
    """The matmul's result is the loop carry itself: it must exist in memory for the next step."""
    def step(i, h):
        return h @ w
    return gdsl.fori_loop(0, 3, step, x)


NOT_FOLDING = {
    "used_twice": (used_twice, lambda: dense_args()[:2]),
    "also_an_output": (also_an_output, lambda: dense_args()[:2]),
    "reduced": (reduced, lambda: dense_args()[:2]),
    "transposed": (transposed, lambda: (_f32(16, 32), _f32(32, 24), _f32(24))),
    "sliced": (sliced, lambda: dense_args()[:2]),
    "broadcast_wider": (broadcast_wider, lambda: dense_args()[:2] + (_f32(3, 16, 24),)),
    "flattened": (flattened, lambda: dense_args()[:2]),
    "trailing_unit": (trailing_unit, lambda: (_f32(16, 32), _f32(32, 1), _f32(16))),
    "vector_used_twice": (vector_used_twice, lambda: vector_args()[:2]),
    "carried": (carried, lambda: (_f32(4, 16), _f32(16, 16, scale=0.2))),
}


# --------------------------------------------------------------------------------------- in loops
def residual_carry(x, w, b):
    """h = relu(h + h W + b): the matmul reads whole rows of the carry, so a folded op could not write it in
    place; unfolded, the chain does (after a barrier), so it stays unfolded: no copy back per step."""
    def step(i, h):
        return gdsl.nn.relu(h + h @ w + b)
    return gdsl.fori_loop(0, 4, step, x)


def input_residual_carry(g, w):
    """h = tanh(g W + h), g halved every step: only the epilogue reads h, at the element it writes."""
    def step(i, carry):
        g, h = carry
        return g * 0.5, gnp.tanh(g @ w + h)
    return gdsl.fori_loop(0, 3, step, (g, gnp.zeros((g.shape[0], w.shape[1]), dtype=gdsl.float32)))[1]


LOOPS = {
    "residual_carry": (residual_carry, lambda: (_f32(4, 16), _f32(16, 16, scale=0.2), _f32(16))),
    "input_residual_carry": (input_residual_carry, lambda: (_f32(4, 8), _f32(8, 16, scale=0.3))),
}
NOT_FOLDING["residual_carry"] = LOOPS.pop("residual_carry")
ALL = {**FOLDING, **NOT_FOLDING, **LOOPS}


# ------------------------------------------------------------------------------------------ helpers

def _with_epilogue(plan):
    return [op for op in plan_ops(plan) if epilogue_of(op) is not None]


def _program(name):
    fn, make_args = ALL[name]
    args = make_args()
    return gdsl.make_ir(fn)(*args), args




# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", sorted(FOLDING))
def test_chain_folds_into_the_contraction(name):
    program, args = _program(name)
    plan = schedule(program, grid=8, epilogues=CHAIN)
    plain = schedule(program, grid=8)
    (op,) = _with_epilogue(plan)
    assert family_of(op.kind) in (CONTRACTION, CONVOLUTION)
    assert op.outputs[0].storage.kind == "output"          # it writes the chain's result itself
    assert not [o for o in plan_ops(plan) if o.kind == FUSED.name and o.outputs[0].storage.kind == "output"]
    leaves = fold_expr(op.params[EPILOGUE], lambda node, args: [node.op] + sum(args, []))
    assert RESULT in leaves
    assert plan.stats["epilogues"] == 1
    # the chain's own wave and the grid barrier before it are gone, and so is the intermediate buffer (a
    # chain that reads another op's result makes the contraction wait for that op instead)
    saved = 1 if name in READ_INPUTS_ONLY else 0
    assert plan.stats["waves"] == plain.stats["waves"] - saved
    assert plan.stats["grid_syncs"] == plain.stats["grid_syncs"] - saved
    assert len(plan.buffers) == len(plain.buffers) - 1
    assert f"{op.name}(" in str(plan) and "with epilogue" in str(plan)
    assert_trees_close(simulated(plan, args), interpreted(program, args), tolerance=BACKEND_TOLERANCE)


def test_the_plan_prints_the_epilogue():
    program, _ = _program("matmul_bias_tanh")
    text = str(schedule(program, grid=8, epilogues=CHAIN))
    assert "out0 = op0_matmul_tanh_add(in0, in1, in2) with epilogue tanh(add(result, in2))" in text
    assert "1 as epilogues of contractions" in text


def test_the_vector_matrix_epilogue_writes_under_the_matmul_shape():
    """Folded through the reshape, the op writes the chain's (N,) output under the matmul's (1, N) shape."""
    program, _ = _program("vector_matrix")
    (op,) = _with_epilogue(schedule(program, grid=8, epilogues=CHAIN))
    assert op.outputs[0].aval.shape == (1, 24) and op.outputs[0].storage.aval.shape == (24,)
    assert "out0<f32[1,24]> = op0_matmul_tanh_add(" in str(schedule(program, grid=8, epilogues=CHAIN))


@pytest.mark.parametrize("name", sorted(NOT_FOLDING))
def test_chain_that_must_not_fold(name):
    program, args = _program(name)
    plan = schedule(program, grid=8, epilogues=CHAIN)
    assert not _with_epilogue(plan) and plan.stats["epilogues"] == 0
    assert_trees_close(simulated(plan, args), interpreted(program, args), tolerance=BACKEND_TOLERANCE)


def windowed_epilogue_member(x, W):
    """A chain read by an epilogue (`h`) whose middle value is also read through a window (`e` reshaped and sliced),
    where its reader recomputes it from the matmul's result."""
    e = gdsl.nn.sigmoid(gnp.matmul(x, W) * 0.5)
    return e * 2.0 + 0.25, gnp.sum(gnp.reshape(e, (4, 3))[:1] * 0.5)


@needs_cxx
def test_a_result_recomputed_elsewhere_is_no_epilogue():
    """The window's reader recomputes `e` from the matmul's result, so that result must exist in memory: the chain
    is no epilogue of it (it was, and scheduling failed with a KeyError on every backend; found by a randomized
    sweep of row and cell chains)."""
    rng = np.random.default_rng(52)
    args = (rng.standard_normal((3, 4)).astype(np.float32), (rng.standard_normal((4, 4)) * 0.3).astype(np.float32))
    program = gdsl.make_ir(windowed_epilogue_member)(*args)
    plan = schedule(program, grid=3, epilogues=CHAIN)
    assert not any(EPILOGUE in op.params for op in plan_ops(plan))
    expected = interpreted(program, args)
    assert_trees_close(simulated(plan, args), expected, tolerance=BACKEND_TOLERANCE)
    assert_trees_close(list(emulate(windowed_epilogue_member, *args, grid=3, block=64)), expected,
                       tolerance=BACKEND_TOLERANCE)
    assert_trees_close(list(gdsl.jit(windowed_epilogue_member, backend="cpu")(*args)), expected,
                       tolerance=BACKEND_TOLERANCE)


def test_no_epilogue_without_the_backends_rule():
    """A backend whose lowering chain has no "epilogue" rule for the contraction keeps the chain apart."""
    program, _ = _program("conv_batch_norm_relu")
    assert not _with_epilogue(schedule(program, grid=8))
    assert not _with_epilogue(schedule(program, grid=8, epilogues=("no-such-backend",)))


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_epilogues_in_loops_are_race_free(name):
    program, args = _program(name)
    for control in ("device", "host"):
        plan = schedule(program, grid=8, control=control, epilogues=CHAIN)
        assert _with_epilogue(plan)
        assert_trees_close(simulated(plan, args), interpreted(program, args), tolerance=BACKEND_TOLERANCE)


def test_input_residual_writes_the_carry_in_place():
    """Only the epilogue reads the carry, at the element it writes: the op writes the carry itself."""
    program, _ = _program("input_residual_carry")
    (op,) = _with_epilogue(schedule(program, grid=8, epilogues=CHAIN))
    assert op.outputs[0].storage in {v.storage for v in op.inputs[2:]}


def test_carry_read_by_the_matmul_keeps_its_in_place_update():
    """Folding `h = relu(h + h W + b)` would cost a copy of the new h behind a barrier of its own."""
    program, _ = _program("residual_carry")
    plan = schedule(program, grid=8, epilogues=CHAIN)
    assert not _with_epilogue(plan)
    assert not [op for op in plan_ops(plan) if op.kind == COPY.name and op.outputs[0].storage.kind == "output"
                and op.inputs[0].storage.kind == "temp"]


@needs_cxx
@pytest.mark.parametrize("name", sorted(FOLDING) + sorted(LOOPS) + ["used_twice", "residual_carry", "trailing_unit",
                                  "vector_used_twice"])
def test_emulated_results_with_and_without_epilogues(name):
    fn, make_args = ALL[name]
    args = make_args()
    expected = interpreted(gdsl.make_ir(fn)(*args), args)
    for epilogue in (None, False):
        got = emulate(fn, *args, grid=4, epilogue=epilogue)
        assert_trees_close(list(got) if isinstance(got, tuple) else [got], expected, tolerance=BACKEND_TOLERANCE)


@pytest.mark.parametrize("name", sorted(FOLDING) + sorted(LOOPS) + ["residual_carry", "trailing_unit"])
def test_cpu_and_interpret_results(name):
    fn, make_args = ALL[name]
    args = make_args()
    expected = interpreted(gdsl.make_ir(fn)(*args), args)
    cpu_plan = gdsl.jit(fn, backend="cpu", grid=4).lower(*args).lowering.plan
    assert bool(_with_epilogue(cpu_plan)) == (name in FOLDING or name in LOOPS)    # the CPU applies them too
    for backend, options in (("cpu", {}), ("cpu", {"epilogue": False}), ("interpret", {})):
        got = gdsl.jit(fn, backend=backend, grid=4, **options)(*args)
        got = [np.asarray(g) for g in (got if isinstance(got, tuple) else [got])]
        assert_trees_close(got, expected, tolerance=BACKEND_TOLERANCE)


def test_option_turns_epilogues_off():
    fn, make_args = FOLDING["conv_bn_relu"]
    args = make_args()
    on = gdsl.jit(fn, backend="cuda", grid=8).lower(*args)
    off = gdsl.jit(fn, backend="cuda", grid=8, epilogue=False).lower(*args)
    assert _with_epilogue(on.lowering.plan) and not _with_epilogue(off.lowering.plan)


@needs_nvrtc
@pytest.mark.parametrize("name", ["conv_bn_residual_relu", "vector_matrix"])
def test_cuda_kernel_with_epilogues_compiles(name):
    fn, make_args = FOLDING[name]
    lowering = gdsl.jit(fn, backend="cuda", grid=132).lower(*make_args())
    assert _with_epilogue(lowering.lowering.plan)
    assert "const int e_ = " in lowering.source          # the GEMM's store applies the epilogue
    assert cuda_toolchain.compile_cuda(lowering.source, "sm_90")[:4] == b"\x7fELF"
