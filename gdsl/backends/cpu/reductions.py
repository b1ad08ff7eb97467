"""Reduce kinds: reduce_sum / reduce_max / reduce_min and argmax / argmin.

uTask t computes output elements [t*rows, ...) (params["rows"]), each a full reduction over the reduced
axes (adjacent ones merged into one loop), in order. A uniform reduction is output element 0.

    whole reductions   float operands fold in float32 (float16/bfloat16 too: the result is rounded to
                       the output dtype, as JAX), others in the output dtype; the start value and the
                       fold of each kind are its `Fold` (a sum, or an elementwise maximum/minimum); float
                       sums add float32 blocks into a float64 total (reduce_element)
    argmax / argmin    the int32 index of the first extreme; the first NaN wins, as numpy's
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from gdsl import dtypes
from gdsl.backends.cpu.ir import affine, compute_type, const, convert, strides
from gdsl.backends.cpu.lowerings import maximum, minimum
from gdsl.backends.cpu.operands import ElementRules


def _reduced_loops(x, axes):
    """(kept axes, x's strides, [(length, stride)] of the reduced axes, adjacent row-major ones merged)."""
    kept = [d for d in range(x.ndim) if d not in axes]
    xs = strides(x.shape)
    reduced = [(x.shape[d], xs[d]) for d in sorted(axes) if x.shape[d] != 1]
    merged: list = []
    for n, s in reduced:   # adjacent reduced axes of a row-major array form one longer axis
        if merged and merged[-1][1] == s * n:
            merged[-1] = (merged[-1][0] * n, s)
        else:
            merged.append((n, s))
    return kept, xs, merged


# ---------------------------------------------------------------------------------- whole reductions

def _lowest(dtype) -> str:
    """Where a maximum starts: -inf, false, or the integer type's minimum."""
    if dtypes.is_float(dtype):
        return "0xFFF0000000000000"
    return "false" if dtype == dtypes.bool_ else str(np.iinfo(dtype).min)


def _highest(dtype) -> str:
    """Where a minimum starts: +inf, true, or the integer type's maximum."""
    if dtypes.is_float(dtype):
        return "0x7FF0000000000000"
    return "true" if dtype == dtypes.bool_ else str(np.iinfo(dtype).max)


@dataclass(frozen=True)
class Fold:
    start: Callable      # start(x_dtype, acc_dtype) -> the accumulator's first value
    combine: Callable | None    # an elementwise lowering (lowerings.py) folding (acc, value); None: a sum


SUM = Fold(lambda x_dtype, acc_dtype: const(acc_dtype, 0), None)
MAXIMUM = Fold(lambda x_dtype, acc_dtype: _lowest(x_dtype), maximum)
MINIMUM = Fold(lambda x_dtype, acc_dtype: _highest(x_dtype), minimum)


SUM_BLOCK = 4096     # elements a float sum adds up in float32 before the block's sum joins a float64 total


def reduce_element(fn, ops, params, out_aval, idx, *, fold: Fold):
    """The reduction of output element `idx` (kept axes in order). A float sum adds blocks of SUM_BLOCK
    elements in float32 (vectorised: several partial sums) and the blocks' sums in float64, so its error
    does not grow with the length (one float32 accumulator stalls at 2**24 times its addend)."""
    x = ops.aval(0)
    kept, xs, loops = _reduced_loops(x, tuple(params["axes"]))
    base = affine(fn, 0, zip(idx, [xs[d] for d in kept]))
    acc_dtype = out_aval.dtype if not dtypes.is_float(x.dtype) else dtypes.float32
    ty = compute_type(acc_dtype)
    acc = fn.alloca(ty, "acc")
    fn.store(ty, fold.start(x.dtype, acc_dtype), acc)
    blocked = fold is SUM and ty == "float"
    if blocked:
        total = fn.alloca("double", "total")
        fn.store("double", "0.0", total)

    def flush():      # total += acc; acc = 0
        block_sum = fn.op(f"fpext float {fn.load('float', acc)} to double")
        fn.store("double", fn.op(f"fadd double {fn.load('double', total)}, {block_sum}"), total)
        fn.store("float", "0.0", acc)

    def nest(level, offset):
        if level == len(loops):
            v = convert(fn, ops.load(0, offset), x.dtype, acc_dtype)
            a = fn.load(ty, acc)
            if fold.combine:
                new = fold.combine(fn, acc_dtype, [a, v], {})
            elif ty == "float":
                new = fn.op(f"fadd reassoc contract float {a}, {v}")
            else:
                new = fn.op(f"add {ty} {a}, {v}")
            fn.store(ty, new, acc)
            return
        n, s = loops[level]

        def step(i):
            nest(level + 1, affine(fn, offset, [(i, s)]))
        if not blocked or level < len(loops) - 1:
            fn.loop(0, n, step)
        elif n <= SUM_BLOCK:
            fn.loop(0, n, step)
            flush()
        else:
            def block(j):
                fn.loop(j, fn.imin(fn.op(f"add nsw i64 {j}, {SUM_BLOCK}"), n), step)
                flush()
            fn.loop(0, n, block, step=SUM_BLOCK)
    nest(0, base)
    if not blocked:
        return convert(fn, fn.load(ty, acc), acc_dtype, out_aval.dtype)
    if not loops:
        flush()
    return convert(fn, fn.op(f"fptrunc double {fn.load('double', total)} to float"), acc_dtype, out_aval.dtype)


# ------------------------------------------------------------------------------------ arg reductions

@dataclass(frozen=True)
class Extreme:
    """The comparisons that say a value beats the best so far, per compute type."""
    float_pred: str
    bool_pred: str
    int_pred: str


LARGEST = Extreme("ogt", "ugt", "sgt")
SMALLEST = Extreme("olt", "ult", "slt")


def arg_reduce_element(fn, ops, params, out_aval, idx, *, extreme: Extreme):
    """Index (int32) of the first maximum/minimum along the axis; the first NaN wins, as numpy."""
    x = ops.aval(0)
    kept, xs, loops = _reduced_loops(x, (params["axis"],))
    base = affine(fn, 0, zip(idx, [xs[d] for d in kept]))
    n, s = loops[0] if loops else (1, 0)
    ty = compute_type(x.dtype)
    best, where = fn.alloca(ty, "best"), fn.alloca("i64", "at")
    fn.store(ty, ops.load(0, base), best)
    fn.store("i64", "0", where)

    def step(i):
        v = ops.load(0, affine(fn, base, [(i, s)]))
        b = fn.load(ty, best)
        if dtypes.is_float(x.dtype):
            better = fn.op(f"fcmp {extreme.float_pred} float {v}, {b}")
            nan = fn.op(f"and i1 {fn.op(f'fcmp uno float {v}, 0.0')}, {fn.op(f'fcmp ord float {b}, 0.0')}")
            better = fn.op(f"or i1 {better}, {nan}")
        else:
            pred = extreme.bool_pred if ty == "i1" else extreme.int_pred
            better = fn.op(f"icmp {pred} {ty} {v}, {b}")
        fn.store(ty, fn.op(f"select i1 {better}, {ty} {v}, {ty} {b}"), best)
        fn.store("i64", fn.op(f"select i1 {better}, i64 {i}, i64 {fn.load('i64', where)}"), where)
    fn.loop(1, n, step)
    return fn.op(f"trunc i64 {fn.load('i64', where)} to i32")


# ------------------------------------------------------------------------------------------- rules
# uTask t computes output elements [t*rows, ...); a uniform reduction is element 0.

ElementRules(partial(reduce_element, fold=SUM), share="rows").register("reduce_sum")
ElementRules(partial(reduce_element, fold=MAXIMUM), share="rows").register("reduce_max")
ElementRules(partial(reduce_element, fold=MINIMUM), share="rows").register("reduce_min")
ElementRules(partial(arg_reduce_element, extreme=LARGEST), share="rows").register("argmax")
ElementRules(partial(arg_reduce_element, extreme=SMALLEST), share="rows").register("argmin")
