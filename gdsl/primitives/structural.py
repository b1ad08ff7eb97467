"""Shape, indexing and creation primitives."""
from __future__ import annotations

import numpy as np

from gdsl import dtypes
from gdsl.core.ir import ShapedArray
from gdsl.primitives.registry import DATA_MOVEMENT, GATHER, primitive

reshape_p = primitive("reshape", DATA_MOVEMENT, uniform=True)
transpose_p = primitive("transpose", DATA_MOVEMENT, uniform=True)
broadcast_p = primitive("broadcast_to", DATA_MOVEMENT, fusible=True, uniform=True)
concatenate_p = primitive("concatenate", DATA_MOVEMENT, uniform=True)
slice_p = primitive("slice", DATA_MOVEMENT, uniform=True)
dynamic_slice_p = primitive("dynamic_slice", DATA_MOVEMENT, uniform=True)
dynamic_update_slice_p = primitive("dynamic_update_slice", GATHER)
take_p = primitive("take", GATHER, uniform=True)
iota_p = primitive("iota", DATA_MOVEMENT, fusible=True, uniform=True)


@reshape_p.def_abstract_eval
def _reshape(x, *, new_shape):
    if int(np.prod(new_shape, dtype=np.int64)) != x.size:
        raise TypeError(f"cannot reshape {x} to {tuple(new_shape)}")
    return [ShapedArray(tuple(new_shape), x.dtype)]


reshape_p.def_impl(lambda x, *, new_shape: [np.reshape(x, new_shape)])


@transpose_p.def_abstract_eval
def _transpose(x, *, permutation):
    if sorted(permutation) != list(range(x.ndim)):
        raise TypeError(f"{tuple(permutation)} is not a permutation of the axes of {x}")
    return [ShapedArray(tuple(x.shape[p] for p in permutation), x.dtype)]


transpose_p.def_impl(lambda x, *, permutation: [np.transpose(x, permutation)])


@broadcast_p.def_abstract_eval
def _broadcast(x, *, shape):
    shape = tuple(shape)
    ok = len(shape) >= x.ndim and all(d in (1, s) for d, s in zip(x.shape[::-1], shape[::-1]))
    if not ok:
        raise TypeError(f"cannot broadcast {x} to {shape}")
    return [ShapedArray(shape, x.dtype)]


broadcast_p.def_impl(lambda x, *, shape: [np.broadcast_to(x, shape).copy()])


@concatenate_p.def_abstract_eval
def _concatenate(*xs, axis):
    first = xs[0]
    for x in xs[1:]:
        if x.dtype != first.dtype or x.ndim != first.ndim or any(
                a != b for i, (a, b) in enumerate(zip(x.shape, first.shape)) if i != axis):
            raise TypeError("cannot concatenate " + ", ".join(map(str, xs)) + f" along axis {axis}")
    shape = list(first.shape)
    shape[axis] = sum(x.shape[axis] for x in xs)
    return [ShapedArray(tuple(shape), first.dtype)]


concatenate_p.def_impl(lambda *xs, axis: [np.concatenate(xs, axis)])


@slice_p.def_abstract_eval
def _slice(x, *, start, limit, step):
    shape = tuple(len(range(b, e, s)) for b, e, s in zip(start, limit, step))
    return [ShapedArray(shape, x.dtype)]


slice_p.def_impl(lambda x, *, start, limit, step: [  # limit -1 (negative steps) means "past index 0"
    x[tuple(slice(b, e if e >= 0 else None, s) for b, e, s in zip(start, limit, step))]])


def _check_indices(x, idx, what):
    if len(idx) != x.ndim or any(i.shape != () or not dtypes.is_int(i.dtype) for i in idx):
        raise TypeError(f"{what} needs {x.ndim} scalar integer indices, got " + ", ".join(map(str, idx)))


def clamp_starts(shape, sizes, starts):
    """Start indices clamped so that the window lies inside the array (JAX's rule)."""
    return tuple(int(min(max(int(s), 0), d - z)) for s, d, z in zip(starts, shape, sizes))


@dynamic_slice_p.def_abstract_eval
def _dynamic_slice(x, *idx, sizes):
    _check_indices(x, idx, "dynamic_slice")
    if any(z > d for z, d in zip(sizes, x.shape)):
        raise TypeError(f"window {tuple(sizes)} larger than {x}")
    return [ShapedArray(tuple(sizes), x.dtype)]


@dynamic_slice_p.def_impl
def _dynamic_slice_impl(x, *idx, sizes):
    starts = clamp_starts(x.shape, sizes, idx)
    return [x[tuple(slice(s, s + z) for s, z in zip(starts, sizes))].copy()]


@dynamic_update_slice_p.def_abstract_eval
def _dynamic_update_slice(x, update, *idx, mode):
    _check_indices(x, idx, "dynamic_update_slice")
    if update.dtype != x.dtype or update.ndim != x.ndim or any(
            u > d for u, d in zip(update.shape, x.shape)):
        raise TypeError(f"cannot write {update} into {x}")
    if mode not in ("clip", "drop"):
        raise TypeError(f"mode must be 'clip' or 'drop', got {mode!r}")
    return [x]


@dynamic_update_slice_p.def_impl
def _dynamic_update_slice_impl(x, update, *idx, mode):
    out = x.copy()
    if mode == "drop" and any(int(i) < 0 or int(i) + u > d for i, u, d in zip(idx, update.shape, x.shape)):
        return [out]
    starts = clamp_starts(x.shape, update.shape, idx)
    out[tuple(slice(s, s + u) for s, u in zip(starts, update.shape))] = update
    return [out]


@take_p.def_abstract_eval
def _take(x, indices, *, axis):
    if not dtypes.is_int(indices.dtype):
        raise TypeError(f"take needs integer indices, got {indices}")
    return [ShapedArray(x.shape[:axis] + indices.shape + x.shape[axis + 1:], x.dtype)]


take_p.def_impl(lambda x, indices, *, axis: [np.take(x, indices, axis=axis, mode="clip")])


@iota_p.def_abstract_eval
def _iota(*, shape, dtype, dimension):
    return [ShapedArray(tuple(shape), dtype)]


@iota_p.def_impl
def _iota_impl(*, shape, dtype, dimension):
    ramp = np.arange(shape[dimension], dtype=dtype)
    view = [1] * len(shape)
    view[dimension] = shape[dimension]
    return [np.broadcast_to(ramp.reshape(view), shape).copy()]
