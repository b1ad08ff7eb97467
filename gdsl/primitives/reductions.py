"""Reductions over static axes. Results keep the operand dtype (bool sums count in int32; float16 and
bfloat16 sums accumulate in float32 and round the result, as JAX);
argmax/argmin return int32 indices of the first extreme value, as numpy."""
from __future__ import annotations

import numpy as np

from gdsl import dtypes
from gdsl.core.ir import ShapedArray
from gdsl.primitives.registry import REDUCE, primitive


def _reduced_shape(x, axes):
    if any(not 0 <= a < x.ndim for a in axes) or len(set(axes)) != len(axes):
        raise TypeError(f"bad reduction axes {tuple(axes)} for {x}")
    return tuple(d for i, d in enumerate(x.shape) if i not in axes)


REDUCTIONS = {"reduce_sum": np.sum, "reduce_max": np.max, "reduce_min": np.min}
ARG_REDUCE = {"argmax": np.argmax, "argmin": np.argmin}
REDUCE_PRIMS = {}


def _is_low_float(dtype) -> bool:
    """float16 / bfloat16: floats that sums accumulate in float32 (every backend, as JAX)."""
    return dtypes.is_float(dtype) and np.dtype(dtype).itemsize < 4


def _declare_reduce(name, rule):
    p = primitive(name, REDUCE, uniform=True)

    @p.def_abstract_eval
    def _abstract(x, *, axes):
        dtype = dtypes.int32 if (name == "reduce_sum" and x.dtype == dtypes.bool_) else x.dtype
        shape = _reduced_shape(x, axes)
        if name != "reduce_sum" and any(x.shape[a] == 0 for a in axes):
            raise TypeError(f"{name} of an empty array")
        return [ShapedArray(shape, dtype)]

    @p.def_impl
    def _impl(x, *, axes):
        if name == "reduce_sum" and x.dtype == dtypes.bool_:
            x = x.astype(np.int32)
        if name == "reduce_sum" and _is_low_float(x.dtype):    # JAX's rule: accumulate in float32, then
            return [np.asarray(rule(x, axis=tuple(axes), dtype=np.float32)).astype(x.dtype)]   # round
        return [np.asarray(rule(x, axis=tuple(axes)))]
    return p


def _declare_arg(name, rule):
    p = primitive(name, REDUCE, uniform=True)

    @p.def_abstract_eval
    def _abstract(x, *, axis):
        if x.shape[axis] == 0:
            raise TypeError(f"{name} of an empty axis")
        return [ShapedArray(_reduced_shape(x, (axis,)), dtypes.int32)]

    p.def_impl(lambda x, *, axis: [np.asarray(rule(x, axis=axis)).astype(np.int32)])
    return p


REDUCE_PRIMS.update({n: _declare_reduce(n, r) for n, r in REDUCTIONS.items()})
REDUCE_PRIMS.update({n: _declare_arg(n, r) for n, r in ARG_REDUCE.items()})

reduce_sum_p = REDUCE_PRIMS["reduce_sum"]
reduce_max_p = REDUCE_PRIMS["reduce_max"]
reduce_min_p = REDUCE_PRIMS["reduce_min"]
# The reductions over static axes (each has params `axes`), as opposed to argmax / argmin (one `axis`).
AXES_REDUCTIONS = (reduce_sum_p, reduce_max_p, reduce_min_p)
