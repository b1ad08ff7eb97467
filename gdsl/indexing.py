"""Indexing of traced arrays: `x[i]`, `x[:, 3]`, `x[2:5]`, `x[i, j]` with traced integer scalars, one
integer-array index (a gather), and functional updates `x.at[idx].set(v)` / `.add(v)` / `.get()`.

Semantics follow JAX: static out-of-range integers raise IndexError; traced indices may be negative (counted
from the end) and out-of-range ones clamp when reading; updates at an out-of-range traced index are dropped.
"""
from __future__ import annotations

import numpy as np

from gdsl import dtypes
from gdsl import numpy as gnp
from gdsl.primitives import structural
from gdsl.tracing.trace import Tracer, aval_of, bind1, type_error


def _normalize(x, idx):
    """idx -> a list with one entry per axis of x (ints, traced scalars, slices) and the positions of
    None (new axes) in the result."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    for i in idx:
        if _is_float_index(i):
            raise IndexError(f"only integers, slices (`:`), ellipsis (`...`), None and integer arrays are valid "
                             f"indices, got {i!r} (at {_where()})")
    if sum(i is Ellipsis for i in idx) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if n_real > x.ndim:
        raise IndexError(f"too many indices for an array of rank {x.ndim}")
    expanded = []
    for i in idx:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (x.ndim - n_real))
        else:
            expanded.append(i)
    if not any(i is Ellipsis for i in idx):
        expanded.extend([slice(None)] * (x.ndim - n_real))
    return expanded


def _is_float_index(i) -> bool:
    """x[1.0] is an error in numpy (not x[1]); so are float arrays and traced floats."""
    if isinstance(i, (float, np.floating)):
        return True
    if isinstance(i, Tracer):
        return dtypes.is_float(i.dtype)
    return isinstance(i, np.ndarray) and i.dtype.kind == "f"


def _is_scalar_index(i) -> bool:
    if isinstance(i, (bool, np.bool_)):
        return False
    if isinstance(i, (int, np.integer)):
        return True
    return isinstance(i, (Tracer, np.ndarray)) and aval_of(i).shape == () and dtypes.is_int(aval_of(i).dtype)


def _is_array_index(i) -> bool:
    return isinstance(i, (list, np.ndarray, Tracer)) or hasattr(i, "__dlpack__")


def _dynamic_index(i, n):
    """A traced index with negative values counted from the end (clamping happens in the primitive). An
    int32 index into an axis longer than int32 can count is widened to int64 first."""
    if n - 1 > np.iinfo(aval_of(i).dtype).max:
        i = gnp.astype(i, dtypes.int64)
    return gnp.where(gnp.less(i, 0), gnp.add(i, n), i)


def _static_index(k: int):
    """A static start position as an index scalar: int32 where it fits, else int64."""
    return np.int32(k) if k <= np.iinfo(np.int32).max else np.int64(k)


def getitem(x, idx):
    parts = _normalize(x, idx)
    axes = [p for p in parts if p is not None]
    array_axes = [k for k, p in enumerate(axes) if _is_array_index(p) and not _is_scalar_index(p)]
    if array_axes:
        return _gather(x, parts, axes, array_axes)
    # 1. static slices (and steps) with the slice primitive
    start, limit, step = [], [], []
    for d, p in zip(x.shape, axes):
        if isinstance(p, slice):
            b, e, s = p.indices(d)
            start.append(b), limit.append(max(b, e) if s > 0 else min(b, e)), step.append(s)
        else:
            start.append(0), limit.append(d), step.append(1)
    if (tuple(start), tuple(limit), tuple(step)) != ((0,) * x.ndim, tuple(x.shape), (1,) * x.ndim):
        x = bind1(structural.slice_p, x, start=tuple(start), limit=tuple(limit), step=tuple(step))
    # 2. integer indices (static or traced) with one dynamic_slice
    int_axes = [k for k, p in enumerate(axes) if not isinstance(p, slice)]
    if int_axes:
        starts, sizes = [], []
        for k, (d, p) in enumerate(zip(x.shape, axes)):
            if k not in int_axes:
                starts.append(np.int32(0)), sizes.append(d)
                continue
            sizes.append(1)
            if isinstance(p, Tracer):
                starts.append(_dynamic_index(p, d))
            else:
                p = int(p)
                if not -d <= p < d:
                    raise IndexError(f"index {p} is out of bounds for axis {k} with size {d} "
                                     f"(at {_where()})")
                starts.append(_static_index(p % d))
        if all(not isinstance(s, Tracer) for s in starts):
            lim = [int(s) + z for s, z in zip(starts, sizes)]
            x = bind1(structural.slice_p, x, start=tuple(int(s) for s in starts), limit=tuple(lim),
                      step=(1,) * x.ndim)
        else:
            x = bind1(structural.dynamic_slice_p, x, *_same_int_dtype(starts), sizes=tuple(sizes))
        x = gnp.reshape(x, tuple(d for k, d in enumerate(x.shape) if k not in int_axes))
    return _insert_new_axes(x, parts)


def _where():
    from gdsl.tracing.trace import user_location
    return user_location()


def _same_int_dtype(starts):
    dtype = dtypes.int64 if any(aval_of(s).dtype == dtypes.int64 for s in starts) else dtypes.int32
    return [gnp.astype(s, dtype) for s in starts]


def _insert_new_axes(x, parts):
    if all(p is not None for p in parts):
        return x
    shape, k = [], 0
    for p in parts:
        if p is None:
            shape.append(1)
        elif isinstance(p, slice):
            shape.append(x.shape[k])
            k += 1
    return gnp.reshape(x, tuple(shape))


def _gather(x, parts, axes, array_axes):
    if len(array_axes) > 1 or any(p is None for p in parts) or any(
            not isinstance(p, slice) or p != slice(None) for k, p in enumerate(axes) if k not in array_axes):
        raise type_error("indexing with an integer array is supported as x[idx] or x[:, idx] (one array index, "
                         "the other axes taken whole); use gnp.take for the general case")
    (axis,) = array_axes
    idx = axes[axis]
    if dtypes.dtype_of(idx) == dtypes.bool_:
        raise type_error("boolean mask indexing gives a data-dependent shape; use gnp.where(mask, x, 0)")
    return gnp.take(x, idx, axis=axis)


class IndexUpdateHelper:
    """`x.at[idx]` -> an _IndexUpdateRef with .set(v), .add(v) and .get()."""

    def __init__(self, x):
        self.x = x

    def __getitem__(self, idx):
        return _IndexUpdateRef(self.x, idx)


class _IndexUpdateRef:
    def __init__(self, x, idx):
        self.x, self.idx = x, idx

    def get(self):
        return getitem(self.x, self.idx)

    def set(self, value):
        starts, window, kept = self._window()
        update = gnp.broadcast_to(gnp.astype(value, self.x.dtype), kept).reshape(window)
        return bind1(structural.dynamic_update_slice_p, self.x, update, *starts, mode="drop")

    def add(self, value):
        starts, window, kept = self._window()
        current = bind1(structural.dynamic_slice_p, self.x, *starts, sizes=window)
        update = gnp.add(current, gnp.broadcast_to(gnp.astype(value, self.x.dtype), kept).reshape(window))
        return bind1(structural.dynamic_update_slice_p, self.x, gnp.astype(update, self.x.dtype), *starts,
                     mode="drop")

    def _window(self):
        """Start indices, the window's shape, and its shape without the integer-indexed axes."""
        x = self.x
        parts = _normalize(x, self.idx)
        if any(p is None for p in parts):
            raise type_error("x.at[...] does not take None (new axes)")
        starts, window, kept = [], [], []
        for d, p in zip(x.shape, parts):
            if isinstance(p, slice):
                b, e, s = p.indices(d)
                if s != 1:
                    raise type_error("x.at[...] takes slices with step 1 only")
                starts.append(_static_index(b)), window.append(max(e - b, 0)), kept.append(max(e - b, 0))
            elif _is_scalar_index(p):
                window.append(1)
                if isinstance(p, Tracer):
                    starts.append(_dynamic_index(p, d))
                else:
                    p = int(p)
                    if not -d <= p < d:
                        raise IndexError(f"index {p} is out of bounds for an axis of size {d} (at {_where()})")
                    starts.append(_static_index(p % d))
            else:
                raise type_error("x.at[...] takes integers, traced integer scalars and slices")
        return _same_int_dtype(starts), tuple(window), tuple(kept)
