"""Operators and methods of traced arrays, attached by the API layer (as jax.numpy attaches array
methods): tracing itself never imports gdsl.numpy or gdsl.indexing."""
from __future__ import annotations

from gdsl import numpy as gnp
from gdsl.indexing import IndexUpdateHelper, getitem
from gdsl.tracing.trace import Tracer, type_error


def install_array_methods():
    """Operators and methods of traced arrays (the same functions gdsl.numpy exposes)."""
    def binary(fn):
        return lambda self, other: fn(self, other)

    def reflected(fn):
        return lambda self, other: fn(other, self)

    table = {"add": gnp.add, "sub": gnp.subtract, "mul": gnp.multiply, "truediv": gnp.divide,
             "floordiv": gnp.floor_divide, "mod": gnp.remainder, "pow": gnp.power, "matmul": gnp.matmul,
             "and": gnp.bitwise_and, "or": gnp.bitwise_or}
    for name, fn in table.items():
        setattr(Tracer, f"__{name}__", binary(fn))
        setattr(Tracer, f"__r{name}__", reflected(fn))
    for name, fn in {"lt": gnp.less, "le": gnp.less_equal, "gt": gnp.greater, "ge": gnp.greater_equal,
                     "eq": gnp.equal, "ne": gnp.not_equal}.items():
        setattr(Tracer, f"__{name}__", binary(fn))
    Tracer.__neg__ = lambda self: gnp.negative(self)
    Tracer.__pos__ = lambda self: self
    Tracer.__abs__ = lambda self: gnp.abs(self)
    Tracer.__invert__ = lambda self: gnp.bitwise_not(self)
    Tracer.__getitem__ = getitem
    Tracer.T = property(lambda self: gnp.transpose(self))
    Tracer.at = property(lambda self: IndexUpdateHelper(self))
    Tracer.reshape = lambda self, *shape: gnp.reshape(self, shape[0] if len(shape) == 1 else shape)
    Tracer.astype = lambda self, dtype: gnp.astype(self, dtype)
    Tracer.transpose = lambda self, *axes: gnp.transpose(self, (axes[0] if len(axes) == 1 else axes) or None)
    for name in ("sum", "max", "min", "mean", "argmax", "argmin"):
        setattr(Tracer, name, _reduction_method(getattr(gnp, name)))


def _reduction_method(fn):
    """`x.sum(...)` and friends with numpy's method signature, so that numpy's own functions, which call
    the method of an object they do not know (`np.sum(tracer)` calls `tracer.sum(axis=, dtype=, out=)`),
    work on traced arrays too."""
    def method(self, axis=None, dtype=None, out=None, keepdims=False, **unsupported):
        if out is not None:
            raise type_error(f"{fn.__name__}(out=...) on a traced array: traced arrays are immutable; use the "
                             f"returned value")
        if unsupported:
            raise type_error(f"{fn.__name__} of a traced array takes axis, dtype and keepdims; "
                             f"{', '.join(sorted(unsupported))} is not supported")
        return fn(self if dtype is None else gnp.astype(self, dtype), axis=axis, keepdims=keepdims)
    method.__name__ = fn.__name__
    method.__doc__ = fn.__doc__
    return method
