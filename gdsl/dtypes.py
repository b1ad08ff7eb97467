"""The dtypes gdsl knows, and numpy-style promotion among them.

Promotion follows numpy for the six supported dtypes, with JAX's two refinements: Python scalars are
weakly typed (they take the array's dtype when they fit its kind), and float64/complex never appear
(float64 inputs are canonicalised to float32). Narrower integers (int8/int16/uint8/uint16) are stored as
int32, which holds all their values; uint32/uint64 are refused (TypeError), since int32/int64 cannot hold all
theirs and converting would wrap silently. Big-endian data converts to the native byte order.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

float32 = np.dtype(np.float32)
float16 = np.dtype(np.float16)
bfloat16 = np.dtype(ml_dtypes.bfloat16)
int32 = np.dtype(np.int32)
int64 = np.dtype(np.int64)
bool_ = np.dtype(np.bool_)

SUPPORTED = (bool_, int32, int64, float16, bfloat16, float32)
SHORT_NAMES = {bool_: "bool", int32: "i32", int64: "i64", float16: "f16", bfloat16: "bf16", float32: "f32"}

# Kinds ordered as numpy orders them: a value of a lower kind converts to any dtype of a higher kind.
_KIND = {bool_: 0, int32: 1, int64: 1, float16: 2, bfloat16: 2, float32: 2}
_DEFAULT_OF_KIND = {0: bool_, 1: int32, 2: float32}


def canonicalize(dtype) -> np.dtype:
    """The gdsl dtype that values of numpy dtype `dtype` are stored as (TypeError if none)."""
    dtype = np.dtype(dtype)
    if not dtype.isnative:  # big-endian data (`>f4`, `>i4`) holds the same values; they convert on entry
        dtype = dtype.newbyteorder("=")
    if dtype in SUPPORTED:
        return dtype
    if dtype == np.float64:
        return float32
    if dtype.kind == "u" and dtype.itemsize >= 4:
        # int32/int64 cannot hold every uint32/uint64 value: converting would wrap silently.
        raise TypeError(f"gdsl does not support unsigned dtype {dtype}: its values above "
                        f"{np.iinfo(int32 if dtype.itemsize == 4 else int64).max} do not fit a signed integer "
                        f"of its size. Convert explicitly (x.astype(np.int64)) where the values fit")
    if dtype.kind in "iu" and dtype.itemsize <= 4:
        return int32  # int8/int16/uint8/uint16 fit int32 exactly
    if dtype.kind == "i":
        return int64
    raise TypeError(f"gdsl does not support dtype {dtype}; use one of "
                    + ", ".join(str(d) for d in SUPPORTED))


def is_float(dtype) -> bool:
    return _KIND[np.dtype(dtype)] == 2


def is_int(dtype) -> bool:
    return _KIND[np.dtype(dtype)] == 1


def promote(a: np.dtype, b: np.dtype) -> np.dtype:
    """numpy's promotion of two (strong) gdsl dtypes."""
    if a == b:
        return a
    ka, kb = _KIND[a], _KIND[b]
    if ka != kb:
        high, low_kind = (a, kb) if ka > kb else (b, ka)
        if low_kind == 1 and high in (float16, bfloat16):
            return float32  # numpy: int32/int64 with float16 -> float64, canonically float32
        return high
    if ka == 1:
        return int64
    return float32  # two different floats: f16 with bf16, or either with f32


def result_type(*operands) -> np.dtype:
    """The dtype an operation on `operands` computes in. Python scalars are weak: they defer to arrays."""
    strong = [dtype_of(x) for x in operands if not is_weakly_typed(x)]
    weak = [x for x in operands if is_weakly_typed(x)]
    out = None
    for d in strong:
        out = d if out is None else promote(out, d)
    weak_kind = max((_weak_kind(x) for x in weak), default=-1)
    if out is None:
        return _DEFAULT_OF_KIND[weak_kind]
    if weak_kind > _KIND[out]:
        return _DEFAULT_OF_KIND[weak_kind]
    return out


def is_weak(x) -> bool:
    return isinstance(x, (bool, int, float)) and not isinstance(x, np.generic)


def promote_weak(weak_dtype, dtype) -> np.dtype:
    """The dtype an operation on a weakly typed value of `weak_dtype` and a strong `dtype` computes in."""
    weak_kind = _KIND[np.dtype(weak_dtype)]
    return np.dtype(dtype) if _KIND[np.dtype(dtype)] >= weak_kind else _DEFAULT_OF_KIND[weak_kind]


def is_weakly_typed(x) -> bool:
    """A Python scalar, or a traced value standing for one (a Tracer with `weak_type` set: the carry of a
    loop started from a Python scalar, while the loop's body is traced to learn the carry's dtype)."""
    return is_weak(x) or getattr(x, "weak_type", False) is True


def _weak_kind(x) -> int:
    return _python_kind(x) if is_weak(x) else _KIND[np.dtype(x.dtype)]


def _python_kind(x) -> int:
    return 0 if isinstance(x, bool) else 1 if isinstance(x, int) else 2


def as_numpy(x) -> np.ndarray:
    """`x` as a numpy array; objects that only speak DLPack (`__dlpack__`, no `__array__`) included."""
    if hasattr(x, "__dlpack__") and not hasattr(x, "__array__"):
        return np.from_dlpack(x)
    return np.asarray(x)


def dtype_of(x) -> np.dtype:
    """The gdsl dtype of an array-like, tracer or Python scalar."""
    if is_weak(x):
        return _DEFAULT_OF_KIND[_python_kind(x)]
    d = getattr(x, "dtype", None)
    if d is None:
        d = as_numpy(x).dtype
    return canonicalize(d)
