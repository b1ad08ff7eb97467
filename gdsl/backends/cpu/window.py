"""Window kinds: avg_pool2d and max_pool2d, each output element a small reduction over its window.

Output element (n, c, ho, wo) folds x[n, c, ho*stride - pad + kh, wo*stride - pad + kw] for kh, kw in
range(window) in float32; positions in the padding count as the pool's identity (-inf for the maximum; 0 for
the average, whose divisor is always window * window).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from gdsl import dtypes
from gdsl.backends.cpu.ir import affine, const, convert, strides
from gdsl.backends.cpu.lowerings import maximum
from gdsl.backends.cpu.operands import ElementRules

NEGATIVE_INFINITY = "0xFFF0000000000000"    # float -inf as LLVM IR writes it


@dataclass(frozen=True)
class Pool:
    identity: str      # the float32 start of the accumulator, and the value of a padding position
    is_max: bool       # fold by maximum (else by sum, divided by the window's size at the end)


MAX_POOL = Pool(NEGATIVE_INFINITY, is_max=True)
AVERAGE_POOL = Pool("0.0", is_max=False)


def pool_element(fn, ops, params, out_aval, idx, *, pool: Pool):
    x = ops.aval(0)
    _, _, h, w = x.shape
    win, stride, pad = params["window"], params["stride"], params["padding"]
    n, c, ho, wo = idx
    xs = strides(x.shape)
    base = affine(fn, 0, [(n, xs[0]), (c, xs[1])])
    acc = fn.alloca("float", "acc")
    fn.store("float", pool.identity, acc)
    h0 = fn.op(f"sub nsw i64 {fn.op(f'mul nsw i64 {ho}, {stride}') if ho != 0 else 0}, {pad}")
    w0 = fn.op(f"sub nsw i64 {fn.op(f'mul nsw i64 {wo}, {stride}') if wo != 0 else 0}, {pad}")

    def window_row(kh):
        hh = fn.op(f"add nsw i64 {h0}, {kh}")
        h_ok = fn.op(f"icmp ult i64 {hh}, {h}")
        hc = fn.clamp(hh, 0, h - 1)

        def window_column(kw):
            ww = fn.op(f"add nsw i64 {w0}, {kw}")
            ok = fn.op(f"and i1 {h_ok}, {fn.op(f'icmp ult i64 {ww}, {w}')}")
            v = ops.load(0, affine(fn, base, [(hc, xs[2]), (fn.clamp(ww, 0, w - 1), xs[3])]))
            v = convert(fn, v, x.dtype, dtypes.float32)
            a = fn.load("float", acc)
            v = fn.op(f"select i1 {ok}, float {v}, float {pool.identity}")
            if pool.is_max:
                new = maximum(fn, dtypes.float32, [a, v], {})
            else:
                new = fn.op(f"fadd float {a}, {v}")
            fn.store("float", new, acc)
        fn.loop(0, win, window_column)
    fn.loop(0, win, window_row)
    total = fn.load("float", acc)
    if not pool.is_max:
        total = fn.op(f"fdiv float {total}, {const(dtypes.float32, win * win)}")
    return convert(fn, total, dtypes.float32, x.dtype)


# Pools are no uniform kinds (their registry flag), so they have uTask rules only.
ElementRules(partial(pool_element, pool=MAX_POOL)).register("max_pool2d", uniform=False)
ElementRules(partial(pool_element, pool=AVERAGE_POOL)).register("avg_pool2d", uniform=False)
