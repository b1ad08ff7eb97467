"""Programs that cover every Op kind, every dtype and the control-flow shapes a GPU backend must render:
shared by the CUDA and HIP backend tests (CI compiles each one's source; on a GPU they run against the
interpreter, and on the CPU emulator too).

PROGRAMS: name -> (fn, args). Sizes are chosen to hit several uTasks per op, partial tiles and both the
GEMV (few rows) and the tiled GEMM paths.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

import gdsl
import gdsl.nn
import gdsl.numpy as gnp

BF16 = np.dtype(ml_dtypes.bfloat16)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _f(shape, seed=0, scale=1.0, dtype=np.float32):
    return (_rng(seed).standard_normal(shape) * scale).astype(dtype)


def _i(shape, lo, hi, seed=0, dtype=np.int32):
    return _rng(seed).integers(lo, hi, shape).astype(dtype)


# ------------------------------------------------------------------------------------------ straight-line
def elementwise_float(x, y):
    a = gnp.tanh(x) * gnp.exp(-gnp.abs(y)) + gnp.sqrt(gnp.abs(x)) - gdsl.nn.sigmoid(y) / (1.0 + x * x)
    b = gnp.maximum(x, y) - gnp.minimum(x, 0.5) + gnp.log(1.0 + gnp.abs(y)) + gnp.sign(x) * 0.25
    c = gnp.floor_divide(x, 0.7) + gnp.remainder(y, 0.9) + gnp.power(gnp.abs(x), 1.5) + gnp.negative(y)
    return a, b + c, gnp.where(x > y, a, b), x == y, gnp.logical_and(x > 0, gnp.logical_not(y > 0))


def elementwise_int(a, b):
    return (a + b * 3 - 7, gnp.floor_divide(a, b), gnp.remainder(a, b), gnp.maximum(a, b), gnp.abs(a),
            gnp.sign(b), a // 3, a % 4, gnp.power(a, 2), a & b, a | b, ~a, -a, a < b, a >= b)


def elementwise_bool(p, q):
    return p & q, p | q, ~p, gnp.logical_and(p, gnp.logical_not(q)), p == q, p != q, gnp.sum(p)


def elementwise_i64(a, b):
    return a * b + a // (b + 1000), gnp.maximum(a, b), gnp.sum(a), gnp.argmax(a)


def half_types(h, g):
    return gnp.tanh(h) * 2 + h * h, (g * 3.0 - 1.0) / (g + 4.0), gnp.sum(h, axis=1), gnp.max(g), \
        gnp.astype(h, gdsl.float32) + 1, gnp.astype(g, gdsl.float16), gnp.matmul(h, gnp.transpose(h))


def conversions(x, i, p):
    return (gnp.astype(x, gdsl.int32), gnp.astype(x, gdsl.bool_), gnp.astype(i, gdsl.float32),
            gnp.astype(p, gdsl.float32), gnp.astype(i, gdsl.int64), gnp.astype(x, gdsl.bfloat16),
            gnp.astype(x * 100, gdsl.int64))


def broadcasting(x, row, col, s):
    return x + row, x * col - row, gnp.broadcast_to(row, (5, 7, 6)) * s, gnp.arange(6) + x, \
        gnp.arange(30).reshape((5, 6)) * col[0]


def reductions(x):
    return (gnp.sum(x), gnp.sum(x, axis=0), gnp.sum(x, axis=(0, 2)), gnp.max(x, axis=1), gnp.min(x, axis=2),
            gnp.mean(x, axis=-1, keepdims=True), gnp.argmax(x, axis=1), gnp.argmin(x, axis=0), gnp.argmax(x))


def long_reductions(x):
    return gnp.sum(x, axis=1), gnp.max(x), gnp.argmax(x, axis=1), gnp.argmin(x), gnp.min(x, axis=0)


def ties_and_nans(x, y):
    return gnp.argmax(x, axis=1), gnp.argmin(x, axis=1), gnp.max(y, axis=1), gnp.argmax(y, axis=1), \
        gnp.argmin(y), gnp.maximum(y, 0.0)


def int_reductions(a, p):
    return gnp.sum(a, axis=1), gnp.max(a, axis=0), gnp.min(a), gnp.argmax(a, axis=1), gnp.sum(p, axis=0), \
        gnp.max(p, axis=1)


def softmax_rows(x):
    return gdsl.nn.softmax(x, axis=-1), gdsl.nn.log_softmax(x, axis=0)


def matmuls(a, b, v, bt, w3):
    return a @ b, v @ b, gnp.matmul(bt, b), gnp.matmul(a[:3], w3), gnp.einsum("ij,jk->ik", v, b)


def matmul_int(a, b):
    return a @ b, gnp.matmul(a[:2], b)


def gemv_batch1(x, w):
    return gnp.tanh(x @ w), gnp.matmul(x[:, :7], w[:7, :5])


def structural(x, i, j):
    return (gnp.transpose(x, (2, 0, 1)), x[1:4, ::2], x[i], x[:, j, 1:3], gnp.concatenate([x, x * 2], axis=1),
            gnp.stack([x[0], x[1]], axis=0), gnp.take(x, gnp.array([3, 0, 9, -1]), axis=1),
            gnp.swapaxes(x, 0, 2)[::-1], x.T.sum(axis=0))


def updates(x, i, v, far, neg):
    return x.at[i].set(v), x.at[i, 2].add(1.0), x.at[far].set(v), x.at[neg].add(v), x.at[1:3, :2].set(0.5), \
        x.at[far, 1].set(v)


def conv_pool(x, w, b):
    y = gdsl.nn.conv2d(x, w, b, stride=1, padding=1)
    z = gdsl.nn.conv2d(x, w[:, :, :2, :2], stride=2, padding=0)
    return y, z, gdsl.nn.max_pool2d(y, 2), gdsl.nn.avg_pool2d(y, 3, stride=2, padding=1), gdsl.nn.global_avg_pool(z)


def conv_batch1(x, w):
    return gdsl.nn.relu(gdsl.nn.conv2d(x, w, padding=1))


def odd_sizes(x, w):
    return gnp.tanh(x @ w) + 1.0, gnp.sum(x, axis=1), gdsl.nn.softmax(x @ w)


def tiny(s, t):
    return s * t + 1.0, gnp.maximum(s, t), gnp.reshape(s, (1, 1)) @ gnp.reshape(t, (1, 1))


def large(x, w):
    return gnp.tanh(x @ w), gnp.sum(x, axis=0), gnp.max(x)


# ------------------------------------------------------------------------------------------ control flow
def loop(x, w, n):
    return gdsl.fori_loop(0, n, lambda i, h: gnp.tanh(h @ w + 1.0), x)


def branch(x, p):
    return gdsl.cond(p > 0, lambda: x * 2.0, lambda: gnp.exp(x).sum() + x)


def recursion(x, left, right, leaf):
    @gdsl.recurse(result=gdsl.ShapeDtype((4,), gdsl.float32), max_depth=8)
    def enc(n):
        return gdsl.cond(leaf[n], lambda: x[n], lambda: gnp.tanh(enc(left[n]) + enc(right[n])))
    return enc(0)


def while_data_exit(x, limit):
    def cond(s):
        i, h = s
        return gnp.logical_and(gnp.sum(h) < limit, i < 50)

    def body(s):
        i, h = s
        return i + 1, h + gnp.abs(gnp.tanh(h)) + 0.1
    return gdsl.while_loop(cond, body, (0, x))


def in_place_carry(x, idx):
    def body(i, s):
        buf, acc = s
        buf = buf.at[idx[i % 4]].set(buf[i % 6] * 0.5 + acc)
        return buf, acc + gnp.sum(buf[i % 6])
    return gdsl.fori_loop(0, 9, body, (x, 0.0))


def switch_in_loop(x, k):
    def body(i, h):
        return gdsl.switch((i + k) % 4, [lambda h: h * 0.5, lambda h: gnp.tanh(h) + 1.0, lambda h: h[::-1],
                                         lambda h: h - gnp.mean(h)], h)
    return gdsl.fori_loop(0, 7, body, x)


def nested_while_cond_recurse(x, w, depth, n):
    @gdsl.recurse(result=gdsl.ShapeDtype((6,), gdsl.float32), max_depth=6)
    def rec(d, h):
        def inner(h):
            h = gdsl.fori_loop(0, 2, lambda i, g: gnp.tanh(g @ w) + 0.1 * i, h)
            return gnp.tanh(rec(d - 1, h) + rec(d - 2, h * 0.5))
        return gdsl.cond(d <= 0, lambda h: h * 0.5, inner, h)

    def body(i, h):
        return gdsl.cond(gnp.sum(h) > 0, lambda h: rec(depth, h), lambda h: h + 1.0, h)
    return gdsl.fori_loop(0, n, body, x)


def recursion_overflow(x, depth):
    @gdsl.recurse(result=gdsl.ShapeDtype((3,), gdsl.float32), max_depth=5)
    def down(d, h):
        return gdsl.cond(d <= 0, lambda: h, lambda: down(d - 1, gnp.tanh(h) + 1.0))
    return down(depth, x)


def scalar_recursion(n):
    @gdsl.recurse(result=gdsl.ShapeDtype((), gdsl.int32), max_depth=20)
    def fib(k):
        return gdsl.cond(k < 2, lambda: k, lambda: fib(k - 1) + fib(k - 2))
    return fib(n)


def loop_in_branch_in_loop(x, m):
    def outer(i, h):
        def taken(h):
            return gdsl.while_loop(lambda s: s[0] < i, lambda s: (s[0] + 1, gnp.tanh(s[1] @ m)), (0, h))[1]
        return gdsl.cond(i % 2 == 0, taken, lambda h: h * 1.1, h)
    return gdsl.fori_loop(0, 5, outer, x)


def heads(K, x, Wq, Wo, start):
    """Per-head attention over a KV cache written in place: independent pipelines (a partitioned loop)."""
    def step(g, c):
        K, x = c
        K = K.at[:, :, g].set((x @ Wq)[:, :, 0])
        a = gdsl.nn.softmax(0.3 * (x @ gnp.swapaxes(K, 2, 3)), axis=-1)
        return K, gnp.tanh((a @ K) @ Wo)
    return gdsl.fori_loop(start, K.shape[2], step, (K, x))


def _tree():
    # node 0 = (1, 2); 1 = (3, 4); 2 leaf; 3 leaf; 4 = (5, 6); 5, 6 leaves
    left = np.array([1, 3, 0, 0, 5, 0, 0], np.int32)
    right = np.array([2, 4, 0, 0, 6, 0, 0], np.int32)
    leaf = np.array([False, False, True, True, False, True, True])
    return left, right, leaf


PROGRAMS = {
    "elementwise_float": (elementwise_float, (_f((37, 29), 1), _f((37, 29), 2))),
    "elementwise_int": (elementwise_int, (_i((300,), -50, 50, 1), _i((300,), -5, 6, 2))),
    "elementwise_bool": (elementwise_bool, (_i((70,), 0, 2, 3).astype(bool), _i((70,), 0, 2, 4).astype(bool))),
    "elementwise_i64": (elementwise_i64, (_i((40,), -10**12, 10**12, 5, np.int64), _i((40,), 1, 10**6, 6, np.int64))),
    "half_types": (half_types, (_f((9, 40), 7, dtype=np.float16), _f((130,), 8, dtype=BF16))),
    "conversions": (conversions, (_f((50,), 9, 3.0), _i((50,), -100, 100, 10), _i((50,), 0, 2, 11).astype(bool))),
    "broadcasting": (broadcasting, (_f((5, 1, 6), 12), _f((6,), 13), _f((5, 1, 1), 14), np.float32(0.5))),
    "reductions": (reductions, (_f((6, 7, 5), 15),)),
    "long_reductions": (long_reductions, (_f((3, 3000), 16),)),
    "ties_and_nans": (ties_and_nans, (np.array([[1, 3, 3, 0], [2, 2, 2, 2], [5, -1, 5, -1]], np.float32),
                                      np.array([[1, np.nan, 3], [np.nan, np.nan, 0], [4, 5, 6]], np.float32))),
    "int_reductions": (int_reductions, (_i((5, 9), -20, 20, 17), _i((5, 9), 0, 2, 18).astype(bool))),
    "softmax_rows": (softmax_rows, (_f((33, 70), 19),)),
    "matmuls": (matmuls, (_f((70, 45), 20, 0.2), _f((45, 66), 21, 0.2), _f((1, 45), 22), _f((3, 70, 45), 23, 0.2),
                          _f((2, 1, 45, 10), 24, 0.2))),
    "matmul_int": (matmul_int, (_i((5, 20), -3, 4, 25), _i((20, 33), -3, 4, 26))),
    "gemv_batch1": (gemv_batch1, (_f((1, 300), 27), _f((300, 520), 28, 0.05))),
    "structural": (structural, (_f((5, 10, 4), 29), np.int32(2), np.int32(-3))),
    "updates": (updates, (_f((7, 4), 30), np.int32(3), np.float32(9.0), np.int32(10), np.int32(-20))),
    "conv_pool": (conv_pool, (_f((2, 3, 9, 9), 31), _f((5, 3, 3, 3), 32, 0.3), _f((5,), 33))),
    "conv_batch1": (conv_batch1, (_f((1, 4, 2, 3), 34), _f((6, 4, 3, 3), 35, 0.3))),
    "odd_sizes": (odd_sizes, (_f((13, 17), 36), _f((17, 11), 37, 0.3))),
    "tiny": (tiny, (np.float32(1.5), np.float32(-2.0))),
    "large": (large, (_f((256, 300), 38, 0.1), _f((300, 200), 39, 0.1))),
    "loop": (loop, (_f((4, 8), 40), _f((8, 8), 41, 0.3), np.int32(3))),
    "branch": (branch, (_f((5,), 42), np.float32(-1.0))),
    "recursion": (recursion, (_f((7, 4), 43),) + _tree()),
    "while_data_exit": (while_data_exit, (_f((10,), 44), np.float32(8.0))),
    "in_place_carry": (in_place_carry, (_f((6,), 45), np.array([0, 5, 2, 9], np.int32))),
    "switch_in_loop": (switch_in_loop, (_f((8,), 46), np.int32(1))),
    "nested_while_cond_recurse": (nested_while_cond_recurse, (_f((6,), 47) + 1, _f((6, 6), 48, 0.4), np.int32(3),
                                                              np.int32(3))),
    "recursion_overflow": (recursion_overflow, (_f((3,), 49), np.int32(9))),
    "recursion_depth_ok": (recursion_overflow, (_f((3,), 49), np.int32(4))),
    "scalar_recursion": (scalar_recursion, (np.int32(9),)),
    "loop_in_branch_in_loop": (loop_in_branch_in_loop, (_f((2, 5), 50), _f((5, 5), 51, 0.4))),
    "heads": (heads, (_f((2, 3, 12, 20), 52), _f((2, 3, 1, 20), 53), _f((3, 20, 20), 54, 0.3),
                      _f((3, 20, 20), 55, 0.3), np.int32(5))),
}

# The tiny programs whose generated source is kept as golden text (tests/golden/).
GOLDEN = ("loop", "branch", "recursion")
