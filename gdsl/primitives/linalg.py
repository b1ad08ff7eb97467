"""matmul: a[..., M, K] @ b[..., K, N] with numpy broadcasting of the batch dimensions (both ranks >= 2;
gdsl.numpy reshapes vectors). Float accumulation happens in float32."""
from __future__ import annotations

import numpy as np

from gdsl import dtypes
from gdsl.core.ir import ShapedArray
from gdsl.primitives.elementwise import broadcast_shapes
from gdsl.primitives.registry import CONTRACTION, primitive

matmul_p = primitive("matmul", CONTRACTION)


@matmul_p.def_abstract_eval
def _matmul(a, b):
    if a.ndim < 2 or b.ndim < 2:
        raise TypeError(f"needs operands of rank >= 2, got {a} and {b}")
    if a.dtype != b.dtype:
        raise TypeError(f"operand dtypes differ: {a} @ {b}")
    if a.shape[-1] != b.shape[-2]:
        raise TypeError(f"contracting dimensions differ: {a} @ {b}")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return [ShapedArray(batch + (a.shape[-2], b.shape[-1]), a.dtype)]


@matmul_p.def_impl
def _matmul_impl(a, b):
    if dtypes.is_float(a.dtype):
        return [np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(a.dtype)]
    return [np.matmul(a, b)]
