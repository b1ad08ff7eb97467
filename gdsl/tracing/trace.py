"""Tracing: tracers record primitive applications into the innermost active Builder.

`bind(prim, *args, **params)` is the single entry point every operation goes through:
- no trace is active -> the primitive's numpy rule runs now (eager mode, same semantics as jit);
- otherwise an equation is appended to the innermost Builder. Values from outer builders and numpy
  arrays that the traced function closes over are captured as explicit constants of the Builder
  (closure conversion): the finished Jaxpr reads nothing but its binders.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading

import numpy as np

from gdsl import dtypes
from gdsl.core.ir import Eqn, Jaxpr, Lit, ShapedArray, Var
from gdsl.errors import ConcretizationError
from gdsl.primitives.registry import apply_impl

_GDSL_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Frames that are not the user's code: gdsl's own, and numpy's (np.sum(tracer) calls tracer.sum()).
_LIBRARY_DIRS = tuple(d + os.sep for d in (_GDSL_DIR, os.path.dirname(os.path.abspath(np.__file__))))
_state = threading.local()


def builder_stack() -> list[Builder]:
    if not hasattr(_state, "builders"):
        _state.builders = []
    return _state.builders


def current_builder() -> Builder | None:
    stack = builder_stack()
    return stack[-1] if stack else None


def user_location() -> str:
    """file:line of the innermost frame outside the gdsl package (the user's code)."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(_LIBRARY_DIRS) and "importlib" not in filename:
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


def type_error(message: str) -> TypeError:
    """A TypeError whose message names the user's file:line."""
    return TypeError(f"{message} (at {user_location()})")


class Builder:
    """Collects the equations of one Jaxpr being traced."""

    def __init__(self):
        self.eqns: list[Eqn] = []
        self.in_binders: list[Var] = []
        self.captured: list = []          # outer tracers or numpy arrays, in capture order
        self.captured_vars: list[Var] = []
        self._capture_index: dict[int, Var] = {}

    def new_arg(self, aval: ShapedArray, weak_type: bool = False) -> Tracer:
        var = Var(aval)
        self.in_binders.append(var)
        return Tracer(self, var, weak_type)

    def capture(self, value) -> Var:
        """The binder standing for an outer tracer or a closed-over array inside this Builder."""
        key = id(value)
        if key not in self._capture_index:
            if isinstance(value, Tracer):
                aval = value.aval
            else:
                value = dtypes.as_numpy(value)
                value = value.astype(dtypes.canonicalize(value.dtype), copy=False)
                aval = ShapedArray(value.shape, value.dtype)
            var = Var(aval)
            self._capture_index[key] = var
            self.captured.append(value)
            self.captured_vars.append(var)
        return self._capture_index[key]

    def atom(self, x):
        if isinstance(x, Tracer):
            return x.var if x.builder is self else self.capture(x)
        if isinstance(x, Lit):
            return x
        if dtypes.is_weak(x):
            return Lit.of(x, dtypes.dtype_of(x))
        arr = dtypes.as_numpy(x)
        if arr.ndim == 0:
            return Lit.of(arr, dtypes.canonicalize(arr.dtype))
        return self.capture(x)

    def finish(self, outs) -> tuple[Jaxpr, list]:
        """The closed Jaxpr (captured values first, then arguments) and the captured values."""
        out_atoms = tuple(self.atom(o) for o in outs)
        jaxpr = Jaxpr(tuple(self.captured_vars) + tuple(self.in_binders), tuple(self.eqns), out_atoms)
        return jaxpr, list(self.captured)


@contextlib.contextmanager
def tracing(builder: Builder):
    """Make `builder` the innermost Builder for the duration of the `with` block."""
    builder_stack().append(builder)
    try:
        yield builder
    finally:
        builder_stack().pop()


@contextlib.contextmanager
def trace_options(options: dict):
    """Make the jit options that act at trace time (`unroll`) visible to the tracers in the `with` block."""
    saved = getattr(_state, "options", {})
    _state.options = options
    try:
        yield
    finally:
        _state.options = saved


def current_option(name, default=None):
    return getattr(_state, "options", {}).get(name, default)


def aval_of(x) -> ShapedArray:
    if isinstance(x, Tracer):
        return x.aval
    if isinstance(x, Lit):
        return x.aval
    if dtypes.is_weak(x):
        return ShapedArray((), dtypes.dtype_of(x))
    arr = dtypes.as_numpy(x)
    return ShapedArray(arr.shape, dtypes.canonicalize(arr.dtype))


def bind(prim, *args, **params) -> list:
    """Apply `prim` to `args`: eagerly with numpy, or by recording an equation when tracing."""
    builder = current_builder()
    avals = [aval_of(a) for a in args]
    try:
        out_avals = prim.abstract_eval(*avals, **params)
    except TypeError as e:
        if "(at " in str(e):
            raise
        raise type_error(f"{prim.name}: {e}") from None
    if builder is None:
        return apply_impl(prim, [dtypes.as_numpy(a) for a in args], params, out_avals)
    inputs = tuple(builder.atom(a) for a in args)
    outs = tuple(Var(a) for a in out_avals)
    builder.eqns.append(Eqn(prim, inputs, params, outs))
    return [Tracer(builder, v) for v in outs]


def bind1(prim, *args, **params):
    (out,) = bind(prim, *args, **params)
    return out


def _concretization_error(what: str, hint: str) -> ConcretizationError:
    return ConcretizationError(
        f"{what} on a traced value at {user_location()}: its value is known only when the compiled program "
        f"runs. {hint}")


_CONTROL_HINT = ("Use gdsl.cond(pred, true_fun, false_fun, *operands) (or gdsl.switch) for a branch, and "
                 "gdsl.while_loop(cond_fun, body_fun, init_val) / gdsl.fori_loop for a loop.")


class Tracer:
    """A traced array. Supports the numpy-like surface of SPEC §1 by calling gdsl.numpy."""
    __slots__ = ("builder", "var", "weak_type")
    __array_ufunc__ = None          # numpy defers to our reflected operators
    __array_priority__ = 1000

    def __init__(self, builder: Builder, var: Var, weak_type: bool = False):
        self.builder = builder
        self.var = var
        self.weak_type = weak_type  # stands for a Python scalar: promotes like one (dtypes.result_type)

    aval = property(lambda self: self.var.aval)
    shape = property(lambda self: self.aval.shape)
    dtype = property(lambda self: self.aval.dtype)
    ndim = property(lambda self: self.aval.ndim)
    size = property(lambda self: self.aval.size)

    def __repr__(self):
        return f"Tracer<{self.aval}>"

    def __hash__(self):
        return id(self)

    def __len__(self):
        if not self.shape:
            raise TypeError("len() of a 0-d traced array")
        return self.shape[0]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __bool__(self):
        raise _concretization_error("Python `if`/`while`/bool()", _CONTROL_HINT)

    def __int__(self):
        raise _concretization_error("int()", "Keep it an array (x.astype(gdsl.int32)); " + _CONTROL_HINT)

    def __float__(self):
        raise _concretization_error("float()", "Keep it an array (x.astype(gdsl.float32)); " + _CONTROL_HINT)

    def __index__(self):
        raise _concretization_error("Using it as a Python int (range(), list index)",
                                    "Index arrays with it instead (x[i]); " + _CONTROL_HINT)

    def item(self, *args):
        raise _concretization_error(".item()", "Return it from the jitted function to get its value, or "
                                    "keep computing with it as an array. " + _CONTROL_HINT)

    def tolist(self):
        raise _concretization_error(".tolist()", "Return it from the jitted function to get its value.")

    def __array__(self, *args, **kwargs):
        raise _concretization_error("Converting it to a numpy array",
                                    "Return it from the jitted function to get its value.")
