"""numpy-named array functions (`import gdsl.numpy as gnp`).

They work on numpy arrays (eagerly), Python scalars and traced arrays alike, with numpy's signatures,
broadcasting and type promotion (Python scalars are weakly typed, as in JAX). Deviations from numpy, as in
JAX: float64 becomes float32; sums keep the operand's dtype (bool sums are int32); argmax/argmin return
int32; out-of-range traced indices clamp.
"""
from __future__ import annotations

import builtins
import math
import string

import numpy as np

from gdsl import dtypes
from gdsl.dtypes import bfloat16, bool_, float16, float32, int32, int64  # noqa: F401
from gdsl.primitives import elementwise as ew
from gdsl.primitives import linalg, reductions, structural
from gdsl.tracing.trace import Tracer, aval_of, bind1, type_error, user_location

# ----------------------------------------------------------------------------------------------------------
# helpers


def _is_array(x) -> bool:
    return isinstance(x, Tracer) or hasattr(x, "shape")


def asarray(x, dtype=None):
    """An array of `x` (tracers pass through; Python scalars get the default dtype)."""
    if isinstance(x, Tracer):
        return x if dtype is None else astype(x, dtype)
    if isinstance(x, (list, tuple)) and builtins.any(isinstance(e, Tracer) for e in x):
        return stack([asarray(e) for e in x])
    target = dtypes.canonicalize(dtype) if dtype is not None else dtypes.dtype_of(x)
    if not dtypes.is_weak(x) and hasattr(x, "__dlpack__") and not hasattr(x, "__array__"):
        x = np.from_dlpack(x)
    return np.asarray(x).astype(target) if np.asarray(x).dtype != target else np.asarray(x)


array = asarray


def _cast(x, dtype):
    """`x` as `dtype`: weak scalars become numpy scalars, arrays are converted where needed."""
    dtype = np.dtype(dtype)
    if dtypes.is_weak(x):
        return np.asarray(x, dtype=dtype)[()]  # OverflowError for an int that does not fit, as numpy
    if isinstance(x, Tracer):
        return x if x.dtype == dtype else bind1(ew.convert_p, x, new_dtype=dtype)
    x = asarray(x)
    return x if x.dtype == dtype else x.astype(dtype)


def _promote(*xs, want_float=False):
    dtype = dtypes.result_type(*xs)
    if want_float and not dtypes.is_float(dtype):
        dtype = float32
    return [_cast(x, dtype) for x in xs]


def _elementwise(name, want_float=False):
    prim = ew.UNARY_PRIMS.get(name) or ew.BINARY_PRIMS[name]

    def fn(*xs):
        return bind1(prim, *_promote(*xs, want_float=want_float))
    fn.__name__ = name
    return fn


def _axes(axis, ndim) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    out = []
    for a in axes:
        a = int(a)
        if not -ndim <= a < builtins.max(ndim, 1):
            raise type_error(f"axis {a} is out of bounds for an array of rank {ndim}")
        out.append(a % ndim if ndim else 0)
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------
# elementwise

add = _elementwise("add")
subtract = _elementwise("sub")
multiply = _elementwise("mul")
divide = _elementwise("div", want_float=True)
true_divide = divide
floor_divide = _elementwise("floor_divide")
remainder = _elementwise("rem")
mod = remainder
_elementwise_power = _elementwise("pow")


def power(base, exponent):
    """numpy.power. An integer power with a negative exponent known while tracing (a Python int, a numpy
    value) raises ValueError, as numpy and JAX do. A traced negative integer exponent cannot raise in
    compiled code: it gives 1 on every backend (docs/guide.md, "Limits and guarantees")."""
    if not isinstance(exponent, Tracer) and dtypes.is_int(dtypes.result_type(base, exponent)) \
            and np.any(np.asarray(exponent) < 0):
        raise ValueError(f"Integers to negative integer powers are not allowed (exponent {exponent!r} at "
                         f"{user_location()}); raise a float base instead (x.astype(gdsl.float32) ** e)")
    return _elementwise_power(base, exponent)


maximum = _elementwise("max")
minimum = _elementwise("min")
equal = _elementwise("eq")
not_equal = _elementwise("ne")
less = _elementwise("lt")
less_equal = _elementwise("le")
greater = _elementwise("gt")
greater_equal = _elementwise("ge")
bitwise_and = _elementwise("and")
bitwise_or = _elementwise("or")
bitwise_not = _elementwise("not")
invert = bitwise_not
negative = _elementwise("neg")
exp = _elementwise("exp", want_float=True)
log = _elementwise("log", want_float=True)
tanh = _elementwise("tanh", want_float=True)
sqrt = _elementwise("sqrt", want_float=True)
abs = _elementwise("abs")  # noqa: A001 - numpy's name
absolute = abs
sign = _elementwise("sign")


def logical_and(a, b):
    return bind1(ew.BINARY_PRIMS["and"], astype(a, bool_), astype(b, bool_))


def logical_or(a, b):
    return bind1(ew.BINARY_PRIMS["or"], astype(a, bool_), astype(b, bool_))


def logical_not(a):
    return bind1(ew.UNARY_PRIMS["not"], astype(a, bool_))


def where(condition, x, y):
    x, y = _promote(x, y)
    return bind1(ew.select_p, astype(condition, bool_), x, y)


def clip(a, a_min=None, a_max=None):
    if a_min is not None:
        a = maximum(a, a_min)
    if a_max is not None:
        a = minimum(a, a_max)
    return a


def astype(x, dtype):
    return _cast(x if not dtypes.is_weak(x) else asarray(x), dtypes.canonicalize(dtype))


# ----------------------------------------------------------------------------------------------------------
# reductions


def _reduce(name, a, axis, keepdims):
    a = asarray(a)
    axes = _axes(axis, a.ndim)
    out = bind1(reductions.REDUCE_PRIMS[name], a, axes=axes)
    if keepdims:
        out = reshape(out, tuple(1 if i in axes else d for i, d in enumerate(a.shape)))
    return out


def sum(a, axis=None, keepdims=False):  # noqa: A001
    return _reduce("reduce_sum", a, axis, keepdims)


def max(a, axis=None, keepdims=False):  # noqa: A001
    return _reduce("reduce_max", a, axis, keepdims)


def min(a, axis=None, keepdims=False):  # noqa: A001
    return _reduce("reduce_min", a, axis, keepdims)


amax, amin = max, min


def mean(a, axis=None, keepdims=False):
    a = asarray(a)
    count = math.prod(a.shape[i] for i in _axes(axis, a.ndim))
    if dtypes.is_float(a.dtype) and a.dtype.itemsize < 4:    # float16/bfloat16: sum and divide in float32
        return astype(divide(sum(astype(a, float32), axis, keepdims), count), a.dtype)   # (the count may not fit)
    total = sum(astype(a, float32) if not dtypes.is_float(a.dtype) else a, axis, keepdims)
    return divide(total, count)


def _arg_reduce(name, a, axis, keepdims):
    a = asarray(a)
    if axis is None:
        out = _arg_reduce(name, reshape(a, (-1,)), 0, False)
        return reshape(out, (1,) * a.ndim) if keepdims else out  # numpy keeps every axis, as size 1
    (axis,) = _axes(axis, a.ndim)
    out = bind1(reductions.REDUCE_PRIMS[name], a, axis=axis)
    if keepdims:
        out = expand_dims(out, axis)
    return out


def argmax(a, axis=None, keepdims=False):
    return _arg_reduce("argmax", a, axis, keepdims)


def argmin(a, axis=None, keepdims=False):
    return _arg_reduce("argmin", a, axis, keepdims)


# ----------------------------------------------------------------------------------------------------------
# linear algebra


def matmul(a, b):
    a, b = _promote(asarray(a) if not _is_array(a) else a, asarray(b) if not _is_array(b) else b)
    if a.ndim == 0 or b.ndim == 0:
        raise type_error(f"matmul: operands must not be scalars, got {aval_of(a)} and {aval_of(b)}")
    a2 = reshape(a, (1,) + a.shape) if a.ndim == 1 else a
    b2 = reshape(b, b.shape + (1,)) if b.ndim == 1 else b
    out = bind1(linalg.matmul_p, a2, b2)
    if b.ndim == 1:
        out = reshape(out, out.shape[:-1])
    if a.ndim == 1:  # a's row axis is the last one left when b's column axis is gone
        out = reshape(out, out.shape[:-1] if b.ndim == 1 else out.shape[:-2] + out.shape[-1:])
    return out


def dot(a, b):
    a, b = asarray(a), asarray(b)
    if a.ndim == 0 or b.ndim == 0:
        return multiply(a, b)
    if b.ndim <= 2:
        return matmul(a, b)
    # numpy.dot: contract a's last axis with b's second-to-last; the other axes form an outer product.
    if a.shape[-1] != b.shape[-2]:
        raise type_error(f"dot: shapes {a.shape} and {b.shape} not aligned")
    perm = tuple(i for i in range(b.ndim) if i != b.ndim - 2) + (b.ndim - 2,)
    bt = transpose(b, perm)                               # [..., N, K]
    b_mat = reshape(bt, (-1, b.shape[-2]))                # [rest, K]
    out = matmul(reshape(a, (-1, a.shape[-1])), transpose(b_mat))  # [M, rest]
    return reshape(out, a.shape[:-1] + b.shape[:-2] + b.shape[-1:])


def einsum(subscripts: str, a, b):
    """Two-operand einsum, lowered to transposes, reshapes, reductions and one batched matmul."""
    a, b = _promote(asarray(a), asarray(b))
    spec = subscripts.replace(" ", "")
    if "..." in spec:
        raise type_error("einsum: ellipsis subscripts are not supported; name the axes")
    ins, _, out = spec.partition("->")
    sa, sb = ins.split(",")
    if not _:
        counts = {c: (sa + sb).count(c) for c in sa + sb}
        out = "".join(sorted(c for c, n in counts.items() if n == 1))
    for s, x in ((sa, a), (sb, b)):
        if len(s) != x.ndim or len(set(s)) != len(s) or not builtins.all(c in string.ascii_letters for c in s):
            raise type_error(f"einsum: subscripts {s!r} do not fit an operand of shape {x.shape}")
    size = {}
    for s, x in ((sa, a), (sb, b)):
        for c, d in zip(s, x.shape):
            if size.setdefault(c, d) != d:
                raise type_error(f"einsum: axis {c!r} has sizes {size[c]} and {d}")
    # Sum away axes that appear in one operand only and not in the output.
    a, sa = _einsum_reduce_only(a, sa, sb + out)
    b, sb = _einsum_reduce_only(b, sb, sa + out)
    batch = [c for c in sa if c in sb and c in out]
    contract = [c for c in sa if c in sb and c not in out]
    free_a = [c for c in sa if c not in sb]
    free_b = [c for c in sb if c not in sa]
    a3 = reshape(transpose(a, tuple(sa.index(c) for c in batch + free_a + contract)),
                 (_prod(size, batch), _prod(size, free_a), _prod(size, contract)))
    b3 = reshape(transpose(b, tuple(sb.index(c) for c in batch + contract + free_b)),
                 (_prod(size, batch), _prod(size, contract), _prod(size, free_b)))
    res_axes = batch + free_a + free_b
    res = reshape(bind1(linalg.matmul_p, a3, b3), tuple(size[c] for c in res_axes))
    return transpose(res, tuple(res_axes.index(c) for c in out))


def _prod(size, axes):
    return math.prod(size[c] for c in axes)


def _einsum_reduce_only(x, s, others):
    drop = [i for i, c in enumerate(s) if c not in others]
    if not drop:
        return x, s
    return sum(x, axis=tuple(drop)), "".join(c for i, c in enumerate(s) if i not in drop)


# ----------------------------------------------------------------------------------------------------------
# shapes


def reshape(a, newshape):
    a = asarray(a) if not _is_array(a) else a
    newshape = (newshape,) if isinstance(newshape, (int, np.integer)) else tuple(int(d) for d in newshape)
    if newshape.count(-1) > 1:
        raise type_error(f"reshape: more than one -1 in {newshape}")
    if -1 in newshape:
        known = math.prod(d for d in newshape if d != -1)
        if known == 0 or a.size % known:
            raise type_error(f"cannot reshape {aval_of(a)} to {newshape}")
        newshape = tuple(a.size // known if d == -1 else d for d in newshape)
    if tuple(newshape) == tuple(a.shape):
        return a
    return bind1(structural.reshape_p, a, new_shape=newshape)


def transpose(a, axes=None):
    a = asarray(a) if not _is_array(a) else a
    perm = tuple(reversed(range(a.ndim))) if axes is None else _axes(tuple(axes), a.ndim)
    if perm == tuple(range(a.ndim)):
        return a
    return bind1(structural.transpose_p, a, permutation=perm)


def swapaxes(a, axis1, axis2):
    a = asarray(a) if not _is_array(a) else a
    perm = list(range(a.ndim))
    (i,), (j,) = _axes(axis1, a.ndim), _axes(axis2, a.ndim)
    perm[i], perm[j] = perm[j], perm[i]
    return transpose(a, perm)


def expand_dims(a, axis):
    a = asarray(a) if not _is_array(a) else a
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    ndim = a.ndim + len(axes)
    axes = sorted(_axes(axes, ndim))
    shape = list(a.shape)
    for ax in axes:
        shape.insert(ax, 1)
    return reshape(a, tuple(shape))


def squeeze(a, axis=None):
    a = asarray(a) if not _is_array(a) else a
    axes = tuple(i for i, d in enumerate(a.shape) if d == 1) if axis is None else _axes(axis, a.ndim)
    if builtins.any(a.shape[i] != 1 for i in axes):
        raise type_error(f"squeeze: cannot remove axes {axes} of size != 1 from {aval_of(a)}")
    return reshape(a, tuple(d for i, d in enumerate(a.shape) if i not in axes))


def broadcast_to(a, shape):
    a = asarray(a) if not _is_array(a) else a
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if tuple(a.shape) == shape:
        return a
    return bind1(structural.broadcast_p, a, shape=shape)


def concatenate(arrays, axis=0):
    arrays = _promote(*[asarray(x) if not _is_array(x) else x for x in arrays])
    if not arrays:
        raise type_error("concatenate needs at least one array")
    if arrays[0].ndim == 0:
        raise type_error("concatenate: zero-dimensional arrays cannot be concatenated")
    (axis,) = _axes(axis, arrays[0].ndim)
    if len(arrays) == 1:
        return arrays[0]
    return bind1(structural.concatenate_p, *arrays, axis=axis)


def stack(arrays, axis=0):
    arrays = [asarray(x) if not _is_array(x) else x for x in arrays]
    if not arrays:
        raise type_error("stack needs at least one array")
    (axis,) = _axes(axis, arrays[0].ndim + 1)
    return concatenate([expand_dims(x, axis) for x in arrays], axis)


def _static_slice(a, axis, start, stop):
    starts = [0] * a.ndim
    limits = list(a.shape)
    starts[axis], limits[axis] = start, stop
    return bind1(structural.slice_p, a, start=tuple(starts), limit=tuple(limits), step=(1,) * a.ndim)


def split(ary, indices_or_sections, axis=0):
    ary = asarray(ary) if not _is_array(ary) else ary
    (axis,) = _axes(axis, ary.ndim)
    n = ary.shape[axis]
    if isinstance(indices_or_sections, (int, np.integer)):
        if n % indices_or_sections:
            raise type_error(f"split: array split does not result in an equal division ({n} by "
                             f"{indices_or_sections})")
        step = n // indices_or_sections
        bounds = list(range(0, n + 1, step))
    else:
        bounds = [0] + [builtins.min(builtins.max(int(i), 0), n) for i in indices_or_sections] + [n]
    return [_static_slice(ary, axis, b, builtins.max(b, e)) for b, e in zip(bounds[:-1], bounds[1:])]


def take(a, indices, axis=None):
    a = asarray(a) if not _is_array(a) else a
    if axis is None:
        a, axis = reshape(a, (-1,)), 0
    (axis,) = _axes(axis, a.ndim)
    indices = asarray(indices) if not _is_array(indices) else indices
    if not dtypes.is_int(indices.dtype):
        raise type_error(f"take: indices must be integers, got {aval_of(indices)}")
    n = a.shape[axis]
    indices = where(less(indices, 0), add(indices, n), indices)  # negative indices count from the end
    return bind1(structural.take_p, a, indices, axis=axis)


# ----------------------------------------------------------------------------------------------------------
# creation


def full(shape, fill_value, dtype=None):
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    dtype = dtypes.canonicalize(dtype) if dtype is not None else dtypes.dtype_of(fill_value)
    return bind1(structural.broadcast_p, _cast(fill_value, dtype), shape=shape)


def zeros(shape, dtype=float32):
    return full(shape, 0, dtype)


def ones(shape, dtype=float32):
    return full(shape, 1, dtype)


def full_like(a, fill_value, dtype=None):
    a = asarray(a) if not _is_array(a) else a
    return full(a.shape, fill_value, dtype if dtype is not None else a.dtype)


def zeros_like(a, dtype=None):
    return full_like(a, 0, dtype)


def ones_like(a, dtype=None):
    return full_like(a, 1, dtype)


def arange(start, stop=None, step=1, dtype=None):
    """Static bounds only (the shape of every gdsl array is known when tracing)."""
    if stop is None:
        start, stop = 0, start
    for v in (start, stop, step):
        if isinstance(v, Tracer):
            raise type_error("arange needs static bounds (its length fixes the array's shape); "
                             "use gdsl.fori_loop over a traced range")
    if dtype is None:
        dtype = dtypes.result_type(start, stop, step)
    dtype = dtypes.canonicalize(dtype)
    n = builtins.max(0, math.ceil((stop - start) / step))
    ramp = bind1(structural.iota_p, shape=(n,), dtype=dtype, dimension=0)
    if step != 1:
        ramp = multiply(ramp, _cast(step, dtype))
    if start != 0:
        ramp = add(ramp, _cast(start, dtype))
    return ramp


def _shape(a):
    return tuple(aval_of(a).shape)


def shape(a):
    return _shape(a)


def ndim(a):
    return len(_shape(a))
