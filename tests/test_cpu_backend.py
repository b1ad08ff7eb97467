"""The llvmlite CPU backend against the reference interpreter: every primitive and Op kind (several shapes,
dtypes, uTask splits that cut rows and tiles), uniform ops, control flow and recursion in both placements,
random programs, the compile cache and the backend interface."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from backend_programs import PROGRAMS
from hypothesis import given
from strategies import (
    BACKEND_TOLERANCE,
    assert_trees_close,
    check_backend,
    programs,
    requires_backend,
)

import gdsl
import gdsl.nn
import gdsl.numpy as gnp
from gdsl.primitives import REGISTRY
from gdsl.primitives import elementwise as ew
from gdsl.tracing.trace import bind1

pytestmark = requires_backend("cpu")

f32, f16, bf16 = np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)
i32, i64, boolean = np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.bool_)
FLOATS = (f32, f16, bf16)
# default split (grid 1: whole rows, big tiles) and a fine one that cuts rows, chunks and tiles
SPLITS = [{}, {"grid": 5, "block": 2}]


def rand(rng, shape, dtype, lo=-3.0, hi=3.0, nonzero=False):
    dtype = np.dtype(dtype)
    if dtype == boolean:
        return rng.random(shape) < 0.5
    if dtype.kind == "i":
        x = rng.integers(int(lo), int(hi) + 1, size=shape).astype(dtype)
        return np.where(x == 0, 1, x).astype(dtype) if nonzero else x
    x = rng.uniform(lo, hi, size=shape).astype(np.float32)
    return x.astype(dtype)


def same(fn, args, *, controls=("device",), splits=(None,), **options):
    """cpu == interpreter for each placement and split."""
    for control in controls:
        for split in splits:
            check_backend(fn, args, "cpu", control=control, **(split or {}), **options)


def prim(name):
    return lambda *xs, **params: bind1(REGISTRY[name], *xs, **params)


# --------------------------------------------------------------------------------------- elementwise

UNARY_FLOAT = ["neg", "exp", "log", "tanh", "logistic", "sqrt", "rsqrt", "erf", "abs", "sign"]
BINARY_ALL = ["add", "sub", "mul", "floor_divide", "rem", "pow", "max", "min", "eq", "ne", "lt", "le", "gt", "ge"]


def each(names, *args):
    """A program computing every primitive of `names` on the same operands, as a dict by name."""
    return lambda *xs: {n: prim(n)(*xs) for n in names}


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_unary_float(dtype):
    rng = np.random.default_rng(0)
    x = rand(rng, (7, 37), dtype, -4, 4)
    x[0, :4] = [0.0, -0.0, 1e-3, -1e-3]
    x[1, :3] = [50.0, -50.0, 0.3]
    positive = np.abs(x).astype(dtype)
    positive[1, 0] = 0
    same(each(UNARY_FLOAT), (x,), splits=SPLITS)
    same(each(["log", "sqrt", "rsqrt"]), (positive,))
    same(each(UNARY_FLOAT), (x[0, 5],))           # a scalar: uniform ops under device control


@pytest.mark.parametrize("dtype", (i32, i64, boolean), ids=str)
def test_unary_int_bool(dtype):
    rng = np.random.default_rng(1)
    x = rand(rng, (5, 13), dtype, -9, 9)
    if dtype != boolean:
        x[0, :2] = [np.iinfo(dtype).min, np.iinfo(dtype).max]
    names = ["abs", "not"] + (["neg", "sign"] if dtype != boolean else [])
    same(each(names), (x,), splits=SPLITS)
    same(each(names), (x[1, 3],))


@pytest.mark.parametrize("dtype", (f32, f16, bf16, i32, i64), ids=str)
def test_binary(dtype):
    is_float = dtype in FLOATS
    names = BINARY_ALL + (["div"] if is_float else ["and", "or"])
    rng = np.random.default_rng(2)
    lo, hi = (-4, 4) if is_float else (-20, 20)
    a, b = rand(rng, (4, 1, 9), dtype, lo, hi), rand(rng, (3, 1), dtype, lo, hi)   # broadcast both ways
    if not is_float:
        b[0, 0], a[0, 0, :2] = 0, [np.iinfo(dtype).min, 7]    # x // 0 == 0; INT_MIN // -1 wraps
        b[1, 0] = -1
    same(each(names), (a, b), splits=SPLITS)
    same(each(names), (a[1, 0, 2], b[2, 0]))
    # pow: non-negative float bases, small integer exponents
    base = np.abs(a).astype(dtype) if is_float else a
    expo = np.abs(b).astype(dtype) if is_float else rand(rng, (3, 1), dtype, -2, 4)
    same(each(["pow"]), (base, expo))


def test_binary_bool():
    rng = np.random.default_rng(3)
    a, b = rand(rng, (6, 5), boolean), rand(rng, (5,), boolean)
    same(each(["add", "mul", "max", "min", "and", "or", "eq", "ne", "lt", "le", "gt", "ge"]), (a, b))


def test_float_floor_divide_and_remainder_edges():
    a = np.array([7.5, -7.5, 7.5, -7.5, 0.0, -0.0, 3.0, np.inf, np.nan, 1e-30, 5.0, -5.0], np.float32)
    b = np.array([2.0, 2.0, -2.0, -2.0, 3.0, 3.0, 0.0, 2.0, 2.0, 1e30, np.inf, 0.5], np.float32)
    got = gdsl.jit(lambda x, y: (prim("floor_divide")(x, y), prim("rem")(x, y)), backend="cpu")(a, b)
    with np.errstate(all="ignore"):
        want = (np.floor_divide(a, b), np.remainder(a, b))
    for g, w in zip(got, want):   # bit for bit, the sign of zero included
        np.testing.assert_array_equal(g.view(np.int32), w.view(np.int32))


def test_nan_propagation_in_max_min_and_arg_reductions():
    x = np.array([[1.0, np.nan, 3.0], [np.nan, -1.0, 2.0], [0.0, 5.0, 5.0]], np.float32)
    same(lambda a, b: (gnp.maximum(a, b), gnp.minimum(b, a), gnp.max(a, axis=1), gnp.argmax(a, axis=1),
                       gnp.argmin(a, axis=0), gnp.min(a)), (x, x[::-1].copy()))


def test_select_and_where():
    rng = np.random.default_rng(4)
    for dtype in (f32, bf16, i64, boolean):
        c, a, b = rand(rng, (3, 1, 5), boolean), rand(rng, (4, 5), dtype), rand(rng, (1, 5), dtype)
        same(prim("select"), (c, a, b), splits=SPLITS)


@pytest.mark.parametrize("src", (f32, f16, bf16, i32, i64, boolean), ids=str)
def test_convert_element_type(src):
    rng = np.random.default_rng(5)
    x = rand(rng, (3, 11), src, -300, 300)
    if src in FLOATS:
        x[0, :5] = np.array([2.5, -2.5, 0.7, -0.7, 0.0], np.float32).astype(src)
    for dst in (f32, f16, bf16, i32, i64, boolean):
        same(lambda v, dst=dst: prim("convert_element_type")(v, new_dtype=dst), (x,))


def test_bfloat16_and_float16_rounding_matches_ml_dtypes():
    """f32 -> bf16/f16 rounds to nearest even, exactly as ml_dtypes/numpy (ties, NaN, inf, overflow)."""
    rng = np.random.default_rng(6)
    bits = np.concatenate([rng.integers(0, 2**32, size=20000, dtype=np.uint64).astype(np.uint32),
                           np.array([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0xFF800000, 0x00000001,
                                     0x477FF000, 0x477FE000, 0x80000000], np.uint32)])
    x = bits.view(np.float32)
    for dtype in (bf16, f16):
        got = gdsl.jit(lambda v, dtype=dtype: gnp.astype(v, dtype), backend="cpu")(x)
        want = x.astype(dtype)
        nan = np.isnan(want.astype(np.float32))
        np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
        np.testing.assert_array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))


def test_low_precision_chain_rounds_after_every_operation():
    """A fused f16/bf16 chain gives the interpreter's result bit for bit (each op rounds, as numpy)."""
    rng = np.random.default_rng(7)
    for dtype in (f16, bf16):
        a, b, c = (rand(rng, (64,), dtype) for _ in range(3))
        f = gdsl.jit(lambda x, y, z: (x * y + z) * x - y, backend="cpu")
        want = gdsl.jit(lambda x, y, z: (x * y + z) * x - y, backend="interpret")(a, b, c)
        np.testing.assert_array_equal(f(a, b, c).view(np.uint16), want.view(np.uint16))


def test_erf_accuracy():
    x = np.linspace(-5, 5, 20001, dtype=np.float32)
    got = gdsl.jit(lambda v: prim("erf")(v), backend="cpu")(x)
    import math
    want = np.array([math.erf(float(v)) for v in x])
    assert np.max(np.abs(got - want)) < 1e-6


def test_fused_chain_with_iota_broadcast_and_literals():
    rng = np.random.default_rng(8)
    x = rand(rng, (3, 5, 7), f32)

    def f(x):
        r = gnp.arange(7, dtype=gdsl.float32) * 0.5 + gnp.reshape(gnp.arange(5), (5, 1))
        return gnp.tanh(x * r - 1.0) + gnp.broadcast_to(gnp.sum(x, axis=0), (3, 5, 7)) * 2
    same(f, (x,), splits=SPLITS, controls=("device", "host"))


# ---------------------------------------------------------------------------------------- structural

@pytest.mark.parametrize("dtype", (f32, bf16, i64, boolean), ids=str)
def test_transpose_slice_concatenate(dtype):
    rng = np.random.default_rng(9)
    x = rand(rng, (3, 4, 5), dtype)
    y = rand(rng, (3, 2, 5), dtype)
    same(lambda a: gnp.transpose(a, (2, 0, 1)), (x,), splits=SPLITS)
    same(lambda a: gnp.transpose(a, (1, 0, 2)), (x,))
    same(lambda a: (a[1:, ::2, 3], a[::-1, 1:3, ::-2], a[:, -1]), (x,), splits=SPLITS)
    same(lambda a, b: (gnp.concatenate([a, b, a], axis=1), gnp.concatenate([a, a], axis=2),
                       gnp.concatenate([b, b], axis=0)), (x, y), splits=SPLITS)


@pytest.mark.parametrize("start", [(0, 0), (2, 3), (-4, 1), (9, 9), (1, -7)])
def test_dynamic_slice_clamps(start):
    x = np.arange(6 * 7, dtype=np.float32).reshape(6, 7)
    def f(a, i, j):
        return prim("dynamic_slice")(a, i, j, sizes=(3, 4))
    same(f, (x, np.int32(start[0]), np.int64(start[1]) if start[1] < 0 else np.int32(start[1])),
         splits=SPLITS, controls=("device", "host"))
    same(lambda a, i: a[i], (x, np.int32(start[0])))      # one row (normalised negative index)


@pytest.mark.parametrize("mode", ["clip", "drop"])
@pytest.mark.parametrize("start", [(0, 0), (2, 3), (-1, 2), (5, 5), (1, 6)])
def test_dynamic_update_slice(mode, start):
    rng = np.random.default_rng(10)
    x, u = rand(rng, (6, 7), f32), rand(rng, (2, 3), f32)
    def f(a, b, i, j):
        return prim("dynamic_update_slice")(a, b, i, j, mode=mode)
    same(f, (x, u, np.int32(start[0]), np.int32(start[1])), splits=SPLITS)

    def in_place(a, b, i, j):        # a loop carry updated in place (the Op writes only the window)
        def body(k, acc):
            return prim("dynamic_update_slice")(acc, b * (k + 1).astype(gdsl.float32), i + k, j, mode=mode)
        return gdsl.fori_loop(0, 3, body, a)
    same(in_place, (x, u, np.int32(start[0]), np.int32(start[1])), splits=SPLITS, controls=("device", "host"))


def test_at_set_and_add():
    x = np.arange(10, dtype=np.int32)
    same(lambda a, i: (a.at[i].set(-1), a.at[i].add(5), a.at[2:5].set(0)), (x, np.int32(3)))
    same(lambda a, i: a.at[i].set(-1), (x, np.int32(12)))   # out of range: dropped


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_take(axis):
    rng = np.random.default_rng(11)
    x = rand(rng, (4, 5, 6), f32)
    idx = np.array([[0, 3, -2], [9, 1, 2]], np.int32)        # out-of-range indices clip
    same(lambda a, i: gnp.take(a, i, axis=axis), (x, idx), splits=SPLITS)
    same(lambda a, i: gnp.take(a, i, axis=axis), (x, idx.astype(np.int64)[0]))


def test_broadcast_to_iota_reshape():
    rng = np.random.default_rng(12)
    x = rand(rng, (3, 1), i32)
    same(lambda a: (gnp.broadcast_to(a, (2, 3, 5)), gnp.arange(11), gnp.reshape(a, (1, 3)) + 1,
                    gnp.arange(2, 9, 3, dtype=gdsl.float32)), (x,), splits=SPLITS)


# ---------------------------------------------------------------------------------------- reductions

@pytest.mark.parametrize("dtype", (f32, f16, bf16, i32, i64, boolean), ids=str)
def test_reductions(dtype):
    rng = np.random.default_rng(13)
    x = rand(rng, (3, 5, 7), dtype)
    axes = [None, 0, 1, 2, (0, 2), (1, 2), ()]

    def f(a):
        out = {}
        for axis in axes:
            for fn in (gnp.sum, gnp.max, gnp.min):
                out[f"{fn.__name__}{axis}"] = fn(a, axis=axis)
            if dtype != boolean and not isinstance(axis, tuple):
                out[f"argmax{axis}"], out[f"argmin{axis}"] = gnp.argmax(a, axis=axis), gnp.argmin(a, axis=axis)
        return out
    same(f, (x,), splits=SPLITS)


def test_argmax_ties_first_index_and_keepdims():
    x = np.array([[1, 3, 3, 0], [2, 2, 2, 2], [5, 1, 5, 0]], np.int32)
    same(lambda a: (gnp.argmax(a, axis=1), gnp.argmin(a, axis=1), gnp.argmax(a), gnp.sum(a, axis=1, keepdims=True),
                    gnp.mean(a.astype(gdsl.float32), axis=0)), (x,))


def test_tiny_reductions_are_uniform_and_correct():
    x = np.array([3.0, -1.0, 7.0, 2.0], np.float32)
    ir = gdsl.jit(lambda a: gnp.sum(a) * gnp.max(a) + gnp.argmax(a).astype(gdsl.float32), backend="cpu").lower(x)
    assert "every vEU" in ir.plan
    same(lambda a: gnp.sum(a) * gnp.max(a) + gnp.argmax(a).astype(gdsl.float32) - gnp.min(a[1:3]), (x,))


# --------------------------------------------------------------------------------------------- GEMMs

@pytest.mark.parametrize("dtype", (f32, f16, bf16, i32), ids=str)
@pytest.mark.parametrize("shapes", [((7, 13), (13, 5)), ((1, 300), (300, 257)), ((70, 33), (33, 130)),
                                    ((5, 64), (64, 160)), ((2, 1, 3, 4), (5, 4, 6)), ((9,), (9, 4)), ((4, 9), (9,))])
def test_matmul(dtype, shapes):
    rng = np.random.default_rng(14)
    a, b = rand(rng, shapes[0], dtype, -2, 2), rand(rng, shapes[1], dtype, -2, 2)
    same(gnp.matmul, (a, b), splits=SPLITS, rtol=2e-4 if dtype == f32 else None)


@pytest.mark.parametrize("dtype", (f32, bf16, i32), ids=str)
@pytest.mark.parametrize("shapes", [((1, 96), (96, 300)), ((3, 40), (40, 256)), ((2, 5, 17), (17, 200)),
                                    ((4, 1, 24), (4, 24, 160)), ((20, 33), (33, 130))])
def test_matmul_with_constant_weights(dtype, shapes):
    """A constant right operand of several column tiles is read from a copy packed tile by tile."""
    rng = np.random.default_rng(21)
    a, b = rand(rng, shapes[0], dtype, -2, 2), rand(rng, shapes[1], dtype, -2, 2)
    same(lambda x: gnp.matmul(x, b), (a,), controls=("device", "host"), splits=SPLITS,
         rtol=2e-4 if dtype == f32 else None)
    assert gdsl.jit(lambda x: gnp.matmul(x, b), backend="cpu").lower(a).lowering.packed


@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 1), (2, 1), (3, 2)])
def test_conv2d_and_pools(stride, padding):
    rng = np.random.default_rng(15)
    x, w, b = rand(rng, (2, 3, 9, 8), f32), rand(rng, (5, 3, 3, 3), f32), rand(rng, (5,), f32)
    same(lambda a, k, c: gdsl.nn.conv2d(a, k, c, stride=stride, padding=padding), (x, w, b), splits=SPLITS)
    window = max(3, 2 * padding)
    same(lambda a: (gdsl.nn.avg_pool2d(a, window, stride, padding), gdsl.nn.max_pool2d(a, window, stride, padding)),
         (x,), splits=SPLITS)


def test_conv2d_tiles_through_the_gemm_micro_kernel():
    """float32 tiles of whole images and channel blocks take the im2col + register-blocked path."""
    rng = np.random.default_rng(20)
    x, w = rand(rng, (2, 6, 8, 8), f32), rand(rng, (16, 6, 3, 3), f32)
    same(lambda a, k: gdsl.nn.conv2d(a, k, padding=1), (x, w), splits=SPLITS)
    x, w = rand(rng, (1, 300, 8, 8), f32), rand(rng, (8, 300, 1, 1), f32)     # K over several panels
    same(lambda a, k: gdsl.nn.conv2d(a, k), (x, w), rtol=1e-3)


def test_conv2d_low_precision_and_1x1():
    rng = np.random.default_rng(16)
    for dtype in (f16, bf16):
        x, w = rand(rng, (1, 4, 5, 5), dtype), rand(rng, (6, 4, 1, 1), dtype)
        same(lambda a, k: gdsl.nn.conv2d(a, k), (x, w))


# ------------------------------------------------------------------------------------------- control

BOTH = ("device", "host")


def test_nested_while_cond_fori():
    rng = np.random.default_rng(17)
    W = rand(rng, (6, 6), f32, -0.5, 0.5)

    def f(x, n):
        def outer(i, h):
            def cond(s):
                return s[0] < i + 1

            def body(s):
                k, h = s
                h = gdsl.cond(gnp.sum(h) > 0, lambda v: gnp.tanh(v @ W), lambda v: v * 0.5 + 0.1, h)
                return k + 1, h
            return gdsl.while_loop(cond, body, (0, h))[1]
        return gdsl.fori_loop(0, n, outer, x)
    for n in (0, 1, 4):
        same(f, (rand(rng, (2, 6), f32), np.int32(n)), controls=BOTH, splits=SPLITS)


def test_switch_clamps_index():
    def f(x, k):
        return gdsl.switch(k, [lambda v: v + 1, lambda v: v * 2, lambda v: gnp.tanh(v)], x)
    x = np.linspace(-1, 1, 10, dtype=np.float32)
    for k in (-3, 0, 1, 2, 7):
        same(f, (x, np.int32(k)), controls=BOTH)


def _random_tree(rng, leaves):
    """(left, right, is_leaf, root) of a random binary tree with `leaves` leaves (the model zoo's RAE
    trees: random bracketing, packed in post-order, so the root is the last node)."""
    from models import rae
    packed = rae.pack(rae.random_tree(leaves, rng), rae.Config(hidden=1, nodes=2 * leaves - 1), rng)
    return packed["left"], packed["right"], packed["is_leaf"], packed["root"]


def _tree_encoder(max_depth):
    def f(left, right, is_leaf, x, W, b, root=0):
        @gdsl.recurse(result=gdsl.ShapeDtype((x.shape[1],), gdsl.float32), max_depth=max_depth)
        def enc(node):
            return gdsl.cond(is_leaf[node], lambda: x[node],
                             lambda: gnp.tanh(gnp.concatenate([enc(left[node]), enc(right[node])]) @ W + b))
        return enc(root)
    return f


@pytest.mark.parametrize("seed", range(4))
def test_recursion_over_random_trees(seed):
    rng = np.random.default_rng(seed)
    left, right, is_leaf, root = _random_tree(rng, int(rng.integers(1, 12)))
    h = 8
    args = (left, right, is_leaf, rand(rng, (len(left), h), f32), rand(rng, (2 * h, h), f32, -0.4, 0.4),
            rand(rng, (h,), f32), root)
    same(_tree_encoder(16), args, controls=BOTH)


def test_recursion_depth_error_both_placements():
    n = 12                                    # a chain 12 deep
    left = np.array(list(range(1, n)) + [-1], np.int32)
    is_leaf = np.array([False] * (n - 1) + [True])
    rng = np.random.default_rng(18)
    args = (left, left, is_leaf, rand(rng, (n, 4), f32), rand(rng, (8, 4), f32), rand(rng, (4,), f32))
    for control in BOTH:
        with pytest.raises(gdsl.RecursionDepthError, match="max_depth=6"):
            gdsl.jit(_tree_encoder(6), backend="cpu", control=control)(*args)
        # the same executable still works on data that fits
        same(_tree_encoder(12), args, controls=(control,))


def test_recursion_inside_loop_and_loop_inside_recursion():
    def f(x, n):
        @gdsl.recurse(result=gdsl.ShapeDtype((4,), gdsl.float32), max_depth=10)
        def down(d, v):
            def deeper():
                w = gdsl.fori_loop(0, d, lambda i, w: gnp.tanh(w + i.astype(gdsl.float32) * 0.1), v)
                return down(d - 1, w) * 0.5 + down(d - 2, v) * 0.25
            return gdsl.cond(d <= 0, lambda: v + 1.0, deeper)
        return gdsl.fori_loop(0, n, lambda i, v: down(i % 4, v), x)
    x = np.array([0.1, -0.2, 0.3, 0.0], np.float32)
    for n in (0, 3, 6):
        same(f, (x, np.int32(n)), controls=BOTH)


def test_two_recursive_functions_and_several_call_sites():
    def f(x, k):
        @gdsl.recurse(result=gdsl.ShapeDtype((), gdsl.int32), max_depth=20)
        def fib(n):
            return gdsl.cond(n < 2, lambda: n, lambda: fib(n - 1) + fib(n - 2))

        @gdsl.recurse(result=gdsl.ShapeDtype((3,), gdsl.float32), max_depth=20)
        def halve(n, v):
            return gdsl.cond(n <= 0, lambda: v, lambda: halve(n - 1, v * 0.5) + fib(n).astype(gdsl.float32))
        return fib(k), halve(k, x), fib(k + 2)
    for k in (0, 1, 5, 9):
        same(f, (np.ones(3, np.float32), np.int32(k)), controls=BOTH)


@given(programs(dtypes=FLOATS))
def test_random_programs_match_interpreter(prog):
    for control in BOTH:
        check_backend(prog.fn, prog.args, "cpu", control=control)


@given(programs(dtypes=(f32,), constructs=("recurse", "while", "cond"), max_depth=3))
def test_random_programs_fine_split(prog):
    check_backend(prog.fn, prog.args, "cpu", control="device", grid=3, block=1)


@given(programs(dtypes=(f32,), constructs=("while", "cond"), max_depth=2))
def test_random_programs_partitioned_loops(prog):
    check_backend(prog.fn, prog.args, "cpu", control="device", grid=3, partition=True)


# ------------------------------------------------------------------------------------ the backend itself

def test_compile_cache_second_load_does_not_recompile():
    from gdsl.backends.cpu import compiler

    def f(x):
        return gnp.tanh(x) * 3.0 + 0.125

    x = np.ones((3, 3), np.float32)
    first = gdsl.jit(f, backend="cpu")
    first(x)
    compiles, hits = compiler.stats["compiles"], compiler.stats["cache_hits"]
    again = gdsl.jit(f, backend="cpu")        # a new jitted function: same IR, same module text
    np.testing.assert_allclose(again(x), np.tanh(x) * 3 + 0.125, rtol=1e-6)
    assert compiler.stats["compiles"] == compiles
    assert compiler.stats["cache_hits"] == hits + 1
    assert first.lower(x).source == again.lower(x).source


def test_lowering_has_plan_and_llvm_source():
    lowered = gdsl.jit(lambda x, n: gdsl.fori_loop(0, n, lambda i, v: gnp.tanh(v), x), backend="cpu").lower(
        np.ones(3, np.float32), 2)
    assert "kernel main" in lowered.plan and "loop:" in lowered.plan
    assert "define i32 @gdsl_" in lowered.source and "@gdsl_tanh_f32" in lowered.source


def test_outputs_are_fresh_arrays():
    f = gdsl.jit(lambda x, s: x * s, backend="cpu")
    x = np.ones(4, np.float32)
    a = f(x, np.float32(2))
    b = f(x, np.float32(3))
    assert a is not b and not np.shares_memory(a, b)
    np.testing.assert_array_equal(a, 2 * x)
    np.testing.assert_array_equal(b, 3 * x)


def test_default_backend_is_cpu_without_gpu(monkeypatch):
    from gdsl import backends
    from gdsl.backends import cpu
    monkeypatch.delenv("GDSL_BACKEND", raising=False)
    assert cpu.unavailable_reason() is None and "cpu" in gdsl.backends()
    if backends.unavailable_reason("cuda") is not None:
        assert gdsl.default_backend() == "cpu"


def test_every_elementwise_primitive_has_a_lowering():
    from gdsl.backends.cpu import LOWERINGS
    missing = [n for n, p in REGISTRY.items() if p.family == "elementwise" and n not in LOWERINGS]
    assert not missing
    assert set(ew.UNARY) | set(ew.BINARY) <= set(LOWERINGS)


def test_every_op_kind_has_a_lowering_rule():
    """Every op kind but control flow (the plan's own statements) has a uTask rule, or is an elementwise
    primitive that reaches the backend inside a fused chain (the elementwise table), or an optional kind the
    scheduler makes only for backends with its rule (a row chain); every uniform kind has a uniform rule."""
    from gdsl.backends.cpu import LOWERING_CHAIN, LOWERINGS
    from gdsl.primitives.registry import CONTROL, OP_KINDS, has_lowering
    no_utask = [name for name, kind in OP_KINDS.items() if kind.family != CONTROL and name not in LOWERINGS
                and not kind.optional and not has_lowering(name, LOWERING_CHAIN, "utask")]
    no_uniform = [name for name, kind in OP_KINDS.items() if kind.uniform
                  and not has_lowering(name, LOWERING_CHAIN, "uniform")]
    assert no_utask == [] and no_uniform == []


def test_a_kind_without_a_rule_is_named_in_the_error():
    from gdsl.backends.cpu import LOWERING_CHAIN
    from gdsl.primitives.registry import lowering_rule
    from gdsl.schedule.plan import FUSED
    with pytest.raises(NotImplementedError, match=r"uniform lowering rule for op kind 'fused' on backend 'cpu'"):
        lowering_rule(FUSED.name, LOWERING_CHAIN, "uniform")


def test_compile_error_is_reported():
    from gdsl.backends.cpu import compiler
    with pytest.raises(gdsl.CompileError) as info:
        compiler.compile_module("define i32 @broken() {\nentry:\n  ret i32 %nope\n}\n", ["broken"])
    assert "nope" in str(info.value) and info.value.source


def test_loops_run_many_iterations_natively():
    def f(n):
        return gdsl.while_loop(lambda s: s[0] < n, lambda s: (s[0] + 1, s[1] + s[0] % 7), (0, 0))
    got = gdsl.jit(f, backend="cpu")(np.int32(200000))
    want = sum(i % 7 for i in range(200000))
    assert int(got[1]) == want and int(got[0]) == 200000
    assert_trees_close(gdsl.jit(f, backend="cpu", control="host")(np.int32(300)), f(np.int32(300)),
                       tolerance=BACKEND_TOLERANCE)


# ------------------------------------------------------------------------------------ vEUs as threads

def _small_lstm(x, W, U, b):
    def step(t, s):
        h, c = s
        g = gnp.matmul(x[t], W) + gnp.matmul(h, U) + b
        i, f, o, u = gdsl.nn.sigmoid(g[0]), gdsl.nn.sigmoid(g[1]), gdsl.nn.sigmoid(g[2]), gnp.tanh(g[3])
        c = f * c + i * u
        return o * gnp.tanh(c), c
    z = gnp.zeros((x.shape[1], W.shape[-1]), gdsl.float32)
    return gdsl.fori_loop(0, x.shape[0], step, (z, z))


@pytest.mark.parametrize("grid", [2, 3, 8])
def test_threads_run_the_plan_like_veus(grid):
    """grid > 1: one thread per vEU (up to the cores), barriers between waves; same results."""
    rng = np.random.default_rng(19)
    x, W, U = rand(rng, (6, 3, 16), f32), rand(rng, (4, 16, 16), f32, -0.3, 0.3), rand(rng, (4, 16, 16), f32, -0.3, 0.3)
    same(_small_lstm, (x, W, U, rand(rng, (4, 1, 16), f32)), grid=grid, block=4)
    left, right, is_leaf, root = _random_tree(rng, 9)
    args = (left, right, is_leaf, rand(rng, (len(left), 8), f32), rand(rng, (16, 8), f32, -0.4, 0.4),
            rand(rng, (8,), f32), root)
    same(_tree_encoder(16), args, grid=grid, block=2)
    with pytest.raises(gdsl.RecursionDepthError):
        gdsl.jit(_tree_encoder(2), backend="cpu", grid=grid)(*args)
    # The executable runs the kernel on every thread or on one (it times both): the same results.
    jitted = gdsl.jit(_tree_encoder(16), backend="cpu", grid=grid)
    results = [jitted(*args) for _ in range(8)]
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_default_grid_follows_the_gemm_working_set():
    from gdsl.backends import cpu
    small = gdsl.make_ir(lambda a, b: a @ b)(np.ones((4, 4), np.float32), np.ones((4, 4), np.float32))
    big = gdsl.make_ir(lambda a, b: a @ b)(np.ones((1, 2048), np.float32), np.ones((2048, 2048), np.float32))
    assert cpu.default_grid(small) == 1
    assert cpu.default_grid(big) == cpu.cpu_count()


def _matches_the_plan_simulator(fn, args, **options) -> bool:
    """Run `fn` on the backend and its plan on gdsl.schedule.simulate: the same results, or both report a
    recursion deeper than a function's max_depth. Returns whether they overflowed."""
    from gdsl.schedule.simulate import simulate
    flat, _ = gdsl.tree_flatten(tuple(args))
    jitted = gdsl.jit(fn, backend="cpu", **options)
    plan = jitted.lower(*args).lowering.plan
    try:
        want = simulate(plan, [np.asarray(a) for a in flat])
    except gdsl.RecursionDepthError:
        with pytest.raises(gdsl.RecursionDepthError):
            jitted(*args)
        return True
    got, _ = gdsl.tree_flatten(gdsl.to_numpy(jitted(*args)))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=2e-4, atol=2e-5)
    return False


@given(programs(dtypes=(f32,), max_depth=2))
def test_random_programs_match_the_plan_simulator(prog):
    """The backend executes exactly the plan: its results equal gdsl.schedule.simulate on the same plan."""
    for options in ({}, {"grid": 3, "block": 1}):
        _matches_the_plan_simulator(prog.fn, prog.args, **options)


@pytest.mark.parametrize("options", [{}, {"grid": 3, "block": 1}, {"control": "host"}])
def test_recursion_overflow_matches_the_plan_simulator(options):
    """Where the simulated plan overflows a max_depth the backend raises RecursionDepthError too; called
    shallower, neither does."""
    fn, args = PROGRAMS["recursion_overflow"]
    assert _matches_the_plan_simulator(fn, args, **options)
    fn, args = PROGRAMS["recursion_depth_ok"]
    assert not _matches_the_plan_simulator(fn, args, **options)


def test_zero_size_arrays():
    x = np.zeros((0, 3), np.float32)
    same(lambda a: (a + 1, gnp.sum(a, axis=0), a.T @ a, gnp.concatenate([a, a])), (x,))



@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_backend_programs(name):
    fn, args = PROGRAMS[name]
    same(fn, args, controls=BOTH)
    same(fn, args, grid=4, block=8)
