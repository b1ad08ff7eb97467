"""C types of gdsl dtypes: how a value is stored, computed, loaded, stored back and written as a literal.

    storage type   what a buffer holds: float, gdsl_f16 / gdsl_bf16 (16-bit words), int, long long, bool
    compute type   what an expression computes in: float for every float dtype, else the storage type
    class          "f" float, "i" integer, "b" bool (picks the entry of the elementwise table)
"""
from __future__ import annotations

import math

import numpy as np

from gdsl import dtypes

STORAGE = {dtypes.float32: "float", dtypes.float16: "gdsl_f16", dtypes.bfloat16: "gdsl_bf16",
           dtypes.int32: "int", dtypes.int64: "long long", dtypes.bool_: "bool"}
_TO_FLOAT = {dtypes.float16: "gdsl_h2f({})", dtypes.bfloat16: "gdsl_bf2f({})"}
_FROM_FLOAT = {dtypes.float16: "gdsl_f2h({})", dtypes.bfloat16: "gdsl_f2bf({})"}
_ROUND = {dtypes.float16: "gdsl_round_f16({})", dtypes.bfloat16: "gdsl_round_bf16({})"}
LOWEST = {dtypes.int32: "(-2147483647 - 1)", dtypes.int64: "(-9223372036854775807LL - 1)", dtypes.bool_: "false"}
HIGHEST = {dtypes.int32: "2147483647", dtypes.int64: "9223372036854775807LL", dtypes.bool_: "true"}


def storage(dtype) -> str:
    return STORAGE[np.dtype(dtype)]


def compute(dtype) -> str:
    return "float" if dtypes.is_float(dtype) else STORAGE[np.dtype(dtype)]


def klass(dtype) -> str:
    return "f" if dtypes.is_float(dtype) else "b" if np.dtype(dtype) == dtypes.bool_ else "i"


def accumulator(dtype) -> str:
    """What sums, products and extrema accumulate in (bool as int: warp shuffles have no bool)."""
    return {"f": "float", "b": "int"}.get(klass(dtype), compute(dtype))


def from_storage(dtype, expr: str) -> str:
    """A stored element (C expression of the storage type) in the compute type."""
    return _TO_FLOAT.get(np.dtype(dtype), "{}").format(expr)


def to_storage(dtype, expr: str) -> str:
    """A compute-type expression converted for storing."""
    dtype = np.dtype(dtype)
    if dtype in _FROM_FLOAT:
        return _FROM_FLOAT[dtype].format(expr)
    if dtype == dtypes.bool_:
        return f"(bool)({expr})"
    return f"({STORAGE[dtype]})({expr})"


def rounded(dtype, expr: str) -> str:
    """A float expression rounded to `dtype`'s precision (numpy rounds each float16 operation)."""
    return _ROUND.get(np.dtype(dtype), "{}").format(expr)


def convert(expr: str, src, dst) -> str:
    """convert_element_type between compute types (float -> int truncates toward zero, as C)."""
    src, dst = np.dtype(src), np.dtype(dst)
    if dst == dtypes.bool_:
        return f"({expr} != 0)"
    if dtypes.is_float(dst):
        return rounded(dst, f"(float)({expr})")
    return f"(({STORAGE[dst]})({expr}))"


def literal(value, dtype) -> str:
    """A C literal of `value` in the compute type of `dtype`."""
    dtype = np.dtype(dtype)
    if dtype == dtypes.bool_:
        return "true" if bool(value) else "false"
    if dtypes.is_int(dtype):
        v = int(value)
        if dtype == dtypes.int64:
            return LOWEST[dtype] if v == -2**63 else f"{v}LL"
        return LOWEST[dtype] if v == -2**31 else str(v)
    v = float(np.float32(value))
    if math.isnan(v):
        return "GDSL_NAN"
    if math.isinf(v):
        return "GDSL_INF" if v > 0 else "(-GDSL_INF)"
    text = f"{v:.9g}"
    if not any(ch in text for ch in ".en"):
        text += ".0"
    return f"{text}f"


def lowest(dtype) -> str:
    return "(-GDSL_INF)" if dtypes.is_float(dtype) else LOWEST[np.dtype(dtype)]


def highest(dtype) -> str:
    return "GDSL_INF" if dtypes.is_float(dtype) else HIGHEST[np.dtype(dtype)]
