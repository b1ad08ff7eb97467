"""Elementwise primitives, declared from one table.

Each row: name -> (arity, numpy rule, result dtype rule). Backends map the same names to C expressions /
LLVM instructions in their own tables. Binary and ternary ops broadcast their operands as numpy does;
operand dtypes are already promoted to one dtype by gdsl.numpy (comparison results are bool).
"""
from __future__ import annotations

import numpy as np

from gdsl import dtypes
from gdsl.core.ir import ShapedArray
from gdsl.primitives.registry import ELEMENTWISE, primitive


def _floor_divide(a, b):
    if dtypes.is_int(a.dtype):
        safe = np.where(b == 0, 1, b)
        return np.where(b == 0, 0, np.floor_divide(a, safe))
    return np.floor_divide(a, b)


def _remainder(a, b):
    if dtypes.is_int(a.dtype):
        safe = np.where(b == 0, 1, b)
        return np.where(b == 0, 0, np.remainder(a, safe))
    return np.remainder(a, b)


def _divide(a, b):
    return np.divide(a, b)


def _logistic(x):
    return (1 / (1 + np.exp(-x.astype(np.float32)))).astype(x.dtype)


def _power(a, b):
    if dtypes.is_int(a.dtype):
        return np.power(a, np.maximum(b, 0))  # numpy raises on negative integer powers
    return np.power(a, b)


def _erf(x):
    import math
    return np.vectorize(math.erf, otypes=[np.float32])(x.astype(np.float32)).astype(x.dtype)


SAME = "same"   # result has the operands' dtype
BOOL = "bool"   # result is bool
FLOAT = "float"  # operands must be floating point

UNARY = {
    "neg": (np.negative, SAME),
    "exp": (np.exp, FLOAT),
    "log": (np.log, FLOAT),
    "tanh": (np.tanh, FLOAT),
    "logistic": (_logistic, FLOAT),
    "sqrt": (np.sqrt, FLOAT),
    "rsqrt": (lambda x: (1 / np.sqrt(x)).astype(x.dtype), FLOAT),
    "erf": (_erf, FLOAT),
    "abs": (np.abs, SAME),
    "sign": (np.sign, SAME),
    "not": (np.invert, SAME),  # logical not for bool, bitwise not for ints
}

BINARY = {
    "add": (np.add, SAME),
    "sub": (np.subtract, SAME),
    "mul": (np.multiply, SAME),
    "div": (_divide, FLOAT),
    "floor_divide": (_floor_divide, SAME),
    "rem": (_remainder, SAME),
    "pow": (_power, SAME),
    "max": (np.maximum, SAME),
    "min": (np.minimum, SAME),
    "and": (np.bitwise_and, SAME),
    "or": (np.bitwise_or, SAME),
    "eq": (np.equal, BOOL),
    "ne": (np.not_equal, BOOL),
    "lt": (np.less, BOOL),
    "le": (np.less_equal, BOOL),
    "gt": (np.greater, BOOL),
    "ge": (np.greater_equal, BOOL),
}


BITWISE = {"and", "or", "not"}   # bool or integer operands only
NO_BOOL = {"neg", "sub", "sign"}  # numpy raises for bool operands


def broadcast_shapes(*shapes) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise TypeError("shapes " + " and ".join(str(tuple(s)) for s in shapes)
                        + " cannot be broadcast together") from None


def _declare(name, arity, rule, result):
    p = primitive(name, ELEMENTWISE)
    p.arity = arity

    @p.def_abstract_eval
    def _abstract(*avals):
        if len({a.dtype for a in avals}) != 1:
            raise TypeError("operand dtypes differ: " + ", ".join(str(a) for a in avals))
        dtype = avals[0].dtype
        if result == FLOAT and not dtypes.is_float(dtype):
            raise TypeError(f"needs floating-point operands, got {avals[0]}")
        if name in BITWISE and dtypes.is_float(dtype):
            raise TypeError(f"needs bool or integer operands, got {avals[0]}")
        if name in NO_BOOL and dtype == dtypes.bool_:
            raise TypeError(f"is not defined for bool operands (as in numpy), got {avals[0]}")
        out_dtype = dtypes.bool_ if result == BOOL else dtype
        return [ShapedArray(broadcast_shapes(*(a.shape for a in avals)), out_dtype)]

    p.def_impl(lambda *args: [rule(*args)])
    return p


UNARY_PRIMS = {n: _declare(n, 1, rule, res) for n, (rule, res) in UNARY.items()}
BINARY_PRIMS = {n: _declare(n, 2, rule, res) for n, (rule, res) in BINARY.items()}
# The ones IR passes build equations of (gdsl/schedule: loop counters, masks, index arithmetic).
add_p, sub_p, mul_p, lt_p, ge_p, and_p = (BINARY_PRIMS[n] for n in ("add", "sub", "mul", "lt", "ge", "and"))

select_p = primitive("select", ELEMENTWISE)
select_p.arity = 3


@select_p.def_abstract_eval
def _select_abstract(pred, on_true, on_false):
    if pred.dtype != dtypes.bool_:
        raise TypeError(f"the predicate must be bool, got {pred}")
    if on_true.dtype != on_false.dtype:
        raise TypeError(f"branch dtypes differ: {on_true} vs {on_false}")
    return [ShapedArray(broadcast_shapes(pred.shape, on_true.shape, on_false.shape), on_true.dtype)]


select_p.def_impl(lambda pred, a, b: [np.where(pred, a, b)])

convert_p = primitive("convert_element_type", ELEMENTWISE)
convert_p.arity = 1


@convert_p.def_abstract_eval
def _convert_abstract(x, *, new_dtype):
    return [ShapedArray(x.shape, new_dtype)]


def _convert_impl(x, *, new_dtype):
    if new_dtype == dtypes.bool_:
        return [x != 0]
    if dtypes.is_int(new_dtype) and dtypes.is_float(x.dtype):
        x = np.trunc(x.astype(np.float32))  # C semantics: truncate toward zero
    return [x.astype(new_dtype)]


convert_p.def_impl(_convert_impl)
