"""gdsl.while_loop, fori_loop, cond, switch and recurse (semantics as in JAX where JAX has them).

Each traces its Python functions into closed sub-programs (captured values become explicit operands) and
binds one control-flow primitive. Outside jit they run at once through the interpreter.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from gdsl import dtypes
from gdsl import numpy as gnp
from gdsl.core.ir import FunctionDef, Jaxpr, ShapedArray, Var
from gdsl.primitives.control import cond_p, recurse_call_p, recurse_p, while_p
from gdsl.tracing.pytree import tree_flatten, tree_unflatten
from gdsl.tracing.trace import (
    Builder,
    Tracer,
    aval_of,
    bind,
    builder_stack,
    current_option,
    tracing,
    type_error,
)


@dataclass(frozen=True)
class ShapeDtype:
    """The type of an array: `ShapeDtype((512,), gdsl.float32)`."""
    shape: tuple
    dtype: object

    def aval(self) -> ShapedArray:
        return ShapedArray(tuple(int(d) for d in self.shape), dtypes.canonicalize(self.dtype))


def _operand(x):
    """A pytree leaf as an operand: tracers stay, everything else becomes a canonical numpy array."""
    return x if isinstance(x, Tracer) else gnp.asarray(x)


def trace_function(fun, in_avals, in_tree, weak=None):
    """Trace `fun` on abstract arguments (`weak[k]`: argument k stands for a Python scalar and promotes like
    one). Returns (jaxpr, captured values, output pytree def)."""
    builder = Builder()
    weak = weak or [False] * len(in_avals)
    with tracing(builder):
        args = [builder.new_arg(a, w) for a, w in zip(in_avals, weak, strict=True)]
        out = fun(*tree_unflatten(in_tree, args))
        out_flat, out_tree = tree_flatten(out)
        jaxpr, captured = builder.finish([_operand(o) for o in out_flat])
    return jaxpr, captured, out_tree


def _describe(avals) -> str:
    return "(" + ", ".join(map(str, avals)) + ")"


# ----------------------------------------------------------------------------------------------------------


def while_loop(cond_fun, body_fun, init_val):
    """Semantics:

        val = init_val
        while cond_fun(val):
            val = body_fun(val)
        return val
    """
    init_flat, tree = tree_flatten(init_val)
    _, args_tree = tree_flatten((init_val,))  # the functions take the carry as one argument
    weak = [dtypes.is_weak(x) for x in init_flat]
    init_flat = [_operand(x) for x in init_flat]
    while True:  # each pass makes at least one weak carry strong, or is the last
        avals = [aval_of(x) for x in init_flat]
        body_jaxpr, body_consts, body_tree = trace_function(body_fun, avals, args_tree, weak)
        promoted = _promote_weak_carry(init_flat, weak, body_jaxpr.out_avals if body_tree == tree else None)
        if promoted is None:
            break
        init_flat, weak = promoted
    cond_jaxpr, cond_consts, _ = trace_function(cond_fun, avals, args_tree, weak)
    pred = cond_jaxpr.out_avals
    if len(pred) != 1 or pred[0].shape != () or pred[0].dtype != dtypes.bool_:
        raise type_error(f"while_loop: cond_fun must return a bool scalar, got {_describe(pred)}")
    if body_tree != tree:
        raise type_error(f"while_loop: body_fun must return the structure of init_val {tree}, got {body_tree}")
    if tuple(body_jaxpr.out_avals) != tuple(avals):
        raise type_error(f"while_loop: body_fun must keep the carry's types {_describe(avals)}, "
                         f"got {_describe(body_jaxpr.out_avals)}")
    outs = bind(while_p, *cond_consts, *body_consts, *init_flat, cond_jaxpr=cond_jaxpr, body_jaxpr=body_jaxpr,
                cond_nconsts=len(cond_consts), body_nconsts=len(body_consts))
    return tree_unflatten(tree, outs)


def _promote_weak_carry(init_flat, weak, body_avals):
    """A loop carry started from a Python scalar is weakly typed (as in JAX): when the body gives it another
    dtype, the carry starts as that dtype instead (`fori_loop(0, n, lambda i, t: t + i, 0)` with an int64 `n`
    carries int64), and the body is traced again. Returns the new (init_flat, weak), or None when nothing
    changes."""
    if body_avals is None or len(body_avals) != len(init_flat):
        return None  # a structure mismatch: while_loop reports it
    changed = False
    init_flat, weak = list(init_flat), list(weak)
    for k, (value, out) in enumerate(zip(init_flat, body_avals)):
        dtype = dtypes.promote_weak(aval_of(value).dtype, out.dtype)
        if weak[k] and out.shape == () and dtype != aval_of(value).dtype:
            init_flat[k] = gnp.astype(value, dtype)
            weak[k], changed = False, True
    return (init_flat, weak) if changed else None


def _check_fori_body(val, out):
    """body_fun(i, val) must return val's structure and types, reported in fori_loop's terms (the loop
    counter that fori_loop adds to the while_loop carry stays out of the message). A carry that stands for
    a Python scalar may change dtype: while_loop promotes it and traces the body again."""
    val_flat, val_tree = tree_flatten(val)
    out_flat, out_tree = tree_flatten(out)
    if out_tree != val_tree:
        raise type_error(f"fori_loop: body_fun must return the structure of init_val {val_tree}, got {out_tree}")
    got = [aval_of(_operand(x)) for x in out_flat]
    expected = [aval_of(x) for x in val_flat]
    if any(g.shape != e.shape or g.dtype != e.dtype and not _weak_promotes_to(x, g.dtype)
           for g, e, x in zip(got, expected, val_flat)):
        raise type_error(f"fori_loop: body_fun must keep init_val's types {_describe(expected)}, "
                         f"got {_describe(got)}")


def _weak_promotes_to(value, dtype) -> bool:
    return dtypes.is_weakly_typed(value) and dtypes.promote_weak(value.dtype, dtype) == dtype


def fori_loop(lower, upper, body_fun, init_val):
    """Semantics:

        val = init_val
        for i in range(lower, upper):
            val = body_fun(i, val)
        return val

    `lower` and `upper` may be traced integer scalars. Under `jit(..., unroll=k)` the loop runs k steps per
    iteration (plus a remainder loop), which gives the scheduler k bodies to overlap and fuse."""
    index_dtype = dtypes.result_type(lower, upper)
    if not dtypes.is_int(index_dtype):
        raise type_error(f"fori_loop: bounds must be integers, got {index_dtype}")
    lower = gnp.astype(lower, index_dtype)
    upper = gnp.astype(upper, index_dtype)

    def cond(carry):
        return gnp.less(carry[0], upper)

    def body(carry):
        i, val = carry
        next_i = gnp.add(i, np.asarray(1, index_dtype))  # first, as before: plans in docs and goldens
        out = body_fun(i, val)
        _check_fori_body(val, out)
        return next_i, out

    unroll = int(current_option("unroll") or 1)
    start = (lower, init_val)
    if unroll > 1:
        # "k more steps fit" is `i + k <= upper`, written so that nothing overflows: `i + k` wraps past the
        # dtype's maximum when `upper` is near it (a loop that never ends), `upper - k` below its minimum.
        lowest = np.iinfo(index_dtype).min + unroll
        last_start = gnp.subtract(gnp.maximum(upper, np.asarray(lowest, index_dtype)),
                                  np.asarray(unroll, index_dtype))
        fits = gnp.greater_equal(upper, np.asarray(lowest, index_dtype))

        def cond_unrolled(carry):
            return gnp.logical_and(fits, gnp.less_equal(carry[0], last_start))

        def body_unrolled(carry):
            for _ in range(unroll):
                carry = body(carry)
            return carry
        start = while_loop(cond_unrolled, body_unrolled, start)
    return while_loop(cond, body, start)[1]


def cond(pred, true_fun, false_fun, *operands):
    """Semantics: `true_fun(*operands) if pred else false_fun(*operands)`; pred is a scalar."""
    _check_callables("cond", {"true_fun": true_fun, "false_fun": false_fun})
    if _selector_aval(pred, "cond", "pred").shape != ():
        raise type_error(f"cond: pred must be a scalar, got {aval_of(pred)}")
    index = gnp.astype(gnp.not_equal(pred, 0) if aval_of(pred).dtype != dtypes.bool_ else pred, dtypes.int32)
    return _switch(index, (false_fun, true_fun), operands, "cond")


def switch(index, branches, *operands):
    """Semantics: `branches[clamp(index, 0, len(branches) - 1)](*operands)`."""
    if callable(branches) or not hasattr(branches, "__iter__"):
        raise type_error(f"switch: branches must be a sequence of functions, got {branches!r}")
    branches = tuple(branches)
    if not branches:
        raise type_error("switch needs at least one branch")
    _check_callables("switch", {f"branches[{k}]": b for k, b in enumerate(branches)})
    aval = _selector_aval(index, "switch", "index")
    if aval.shape != () or not dtypes.is_int(aval.dtype):
        raise type_error(f"switch: index must be an integer scalar, got {aval}")
    index = gnp.astype(gnp.clip(index, 0, len(branches) - 1), dtypes.int32)
    return _switch(index, branches, operands, "switch")


def _selector_aval(value, what, role):
    """The type of cond's predicate / switch's index, or a TypeError naming `what` for a value that is not
    an array or number at all (None, a string, a function)."""
    try:
        return aval_of(value)
    except TypeError:
        raise type_error(f"{what}: {role} must be a scalar array or a Python number, got "
                         f"{type(value).__name__} {value!r}") from None


def _check_callables(what, functions: dict):
    for role, fun in functions.items():
        if not callable(fun):
            raise type_error(f"{what}: {role} must be a function, got {type(fun).__name__} {fun!r}")


def _switch(index, branches, operands, what):
    ops_flat, ops_tree = tree_flatten(operands)
    ops_flat = [_operand(x) for x in ops_flat]
    avals = [aval_of(x) for x in ops_flat]
    traced = [trace_function(b, avals, ops_tree) for b in branches]
    out_tree, out_avals = traced[0][2], traced[0][0].out_avals
    for k, (jaxpr, _, tree) in enumerate(traced):
        if tree != out_tree or tuple(jaxpr.out_avals) != tuple(out_avals):
            raise type_error(f"{what}: branches must return the same types: branch 0 returns "
                             f"{out_tree} {_describe(out_avals)}, branch {k} returns {tree} "
                             f"{_describe(jaxpr.out_avals)}")
    # Every branch takes the union of all captured values (each ignores the others'), then the operands.
    union: list = []
    position: dict[int, int] = {}
    for _, captured, _ in traced:
        for value in captured:
            if id(value) not in position:
                position[id(value)] = len(union)
                union.append(value)
    jaxprs = []
    for jaxpr, captured, _ in traced:
        binders = [Var(aval_of(v)) for v in union]
        for value, var in zip(captured, jaxpr.in_binders):
            binders[position[id(value)]] = var
        jaxprs.append(Jaxpr(tuple(binders) + jaxpr.in_binders[len(captured):], jaxpr.eqns, jaxpr.outs))
    outs = bind(cond_p, index, *union, *ops_flat, branches=tuple(jaxprs))
    return tree_unflatten(out_tree, outs)


# ----------------------------------------------------------------------------------------------------------

_recursion = threading.local()


def _active() -> list:
    """The recursive functions whose bodies are being traced, innermost last: (RecursiveFunction, name)."""
    if not hasattr(_recursion, "active"):
        _recursion.active = []
    return _recursion.active


def _unique_name(base: str) -> str:
    used = getattr(_recursion, "names", None)
    if used is None:
        used = _recursion.names = set()
    name, k = base, 1
    while name in used:
        name, k = f"{base}_{k}", k + 1
    used.add(name)
    return name


def reset_function_names():
    """Called at the start of each top-level trace so names restart at `encode`, not `encode_7`."""
    _recursion.names = set()


class RecursiveFunction:
    def __init__(self, fun, result, max_depth):
        self.fun = fun
        self.result_flat, self.result_tree = tree_flatten(result)
        for r in self.result_flat:
            if not isinstance(r, ShapeDtype):
                raise TypeError(f"recurse: result must be a pytree of gdsl.ShapeDtype, got {r!r}")
        self.result_avals = tuple(r.aval() for r in self.result_flat)
        if isinstance(max_depth, bool) or not isinstance(max_depth, (int, np.integer)):
            raise TypeError(f"recurse: max_depth must be an int, got {max_depth!r}")
        self.max_depth = int(max_depth)
        if self.max_depth < 1:
            raise ValueError(f"recurse: max_depth must be at least 1, got {max_depth!r}")
        self.__name__ = getattr(fun, "__name__", "fn")
        self.__doc__ = getattr(fun, "__doc__", None)

    def __call__(self, *args):
        args_flat, args_tree = tree_flatten(args)
        for entry in reversed(_active()):
            if entry[0] is self:
                return self._recursive_call(entry, args_flat, args_tree)
        return self._enter(args_flat, args_tree)

    def _enter(self, args_flat, args_tree):
        weak = tuple(dtypes.is_weak(x) for x in args_flat)
        args_flat = [_operand(x) for x in args_flat]
        arg_avals = tuple(aval_of(x) for x in args_flat)
        if not builder_stack():  # an eager call is a program of its own: names restart there too
            reset_function_names()
        name = _unique_name(self.__name__)
        entry = (self, name, arg_avals, args_tree, weak)
        _active().append(entry)
        try:
            jaxpr, captured, out_tree = trace_function(self.fun, arg_avals, args_tree)
        finally:
            _active().pop()
        if out_tree != self.result_tree or tuple(jaxpr.out_avals) != self.result_avals:
            raise type_error(f"recursive function {self.__name__} must return result={self.result_tree} "
                             f"{_describe(self.result_avals)}, but its body returns {out_tree} "
                             f"{_describe(jaxpr.out_avals)}")
        fn = FunctionDef(name, jaxpr, len(captured), self.max_depth)
        outs = bind(recurse_p, *captured, *args_flat, fn=fn)
        return tree_unflatten(self.result_tree, outs)

    def _recursive_call(self, entry, args_flat, args_tree):
        _, name, arg_avals, tree, weak = entry
        if args_tree != tree or len(args_flat) != len(arg_avals):
            raise type_error(f"recursive call of {self.__name__}: arguments {args_tree} do not match the "
                             f"first call's {tree}")
        # Python scalars are weakly typed, and integer scalars (node indices: an int32 root, an int64
        # child table) convert to the first call's integer dtype.
        args = [gnp.astype(x, a.dtype) if (dtypes.is_weak(x) or w or _int_scalar(x, a)) and _same_kind(x, a.dtype)
                else _operand(x) for x, a, w in zip(args_flat, arg_avals, weak)]
        got = tuple(aval_of(x) for x in args)
        if got != arg_avals:
            raise type_error(f"recursive call of {self.__name__}: argument types {_describe(got)} differ from "
                             f"the first call's {_describe(arg_avals)}")
        outs = bind(recurse_call_p, *args, name=name, arg_avals=arg_avals, result=self.result_avals)
        return tree_unflatten(self.result_tree, outs)


def _int_scalar(x, aval) -> bool:
    return aval.shape == () and dtypes.is_int(aval.dtype) and aval_of(x).shape == ()


def _same_kind(x, dtype) -> bool:
    d = dtypes.dtype_of(x)
    return (dtypes.is_int(d) and dtypes.is_int(dtype)) or (dtypes.is_float(d) and dtypes.is_float(dtype))


def recurse(fun=None, *, result, max_depth=64):
    """Declare a recursive function. Inside its body, calls to it are recursive calls; calling it from
    anywhere else enters the recursion. Going deeper than `max_depth` at run time raises
    gdsl.RecursionDepthError on every backend."""
    if fun is None:
        return lambda f: RecursiveFunction(f, result, max_depth)
    return RecursiveFunction(fun, result, max_depth)
