"""`gdsl.jit`, `gdsl.make_ir` and the Lowered object.

A jitted function traces once per signature — (argument pytree, shapes/dtypes, static arguments, backend,
options) — into a Program, which the backend lowers (plan + source) and loads. A second call with the same
signature reuses both: no retrace, no recompile.

Repeated calls take a fast path when there are no keyword arguments and every positional argument is a
static one or a pytree of plain tuples, lists, dicts and None whose leaves are arrays (anything with
`shape` and `dtype`: numpy, CuPy, ...) or Python scalars: the signature is then keyed by one walk over the
arguments (a flat tuple of each leaf's type, shape and dtype, the containers' types and lengths or keys,
and the statics' values; no TreeDef objects, no avals), and maps straight to the loaded executable (or to
what its optional `fast_path()` returns: a callable of the same flat arguments and results that skips
work the backend can do once per signature). The general path fills that table after each load; any
other call (keyword arguments, namedtuples, other leaves) takes the general path, with identical results.

The fast path's contract, per call of a signature already in the table:
- the key is built in one loop over the positional arguments; an argument whose type is that of an array
  leaf of some signature in the table (numpy, CuPy, ...) is keyed there and then as (type, shape, dtype),
  anything else through _key_and_leaves, where the children of a tuple, list or dict that are all such
  arrays (a model's weights) are keyed as one entry of their types, shapes and dtypes, read by loops that
  run in C; a key not in the table (a new shape, dtype, static value or pytree) goes to the general path,
  which traces and lowers it once and enters it;
- Python scalars and arrays of another dtype than the traced one are converted (as the general path
  does), the leaves go to the executable's fast path in tree_flatten's order, and its results come back
  in the traced output pytree (a single result without any wrapping);
- the results are new arrays, as the general path's are, except that the cuda backend may hand out again
  a result array of an earlier call once nothing refers to it any more, never one the caller still holds
  (gdsl/backends/cuda/__init__.py; OutputRecycler in gdsl/backends/cfamily/executor.py).
"""
from __future__ import annotations

import functools
import inspect
import operator
import os
import threading
import time

import numpy as np

from gdsl import dtypes
from gdsl.backends import backend_module, default_backend, usable_backend
from gdsl.control_flow import reset_function_names
from gdsl.core.ir import Program, ShapedArray
from gdsl.debug import debug
from gdsl.tracing.pytree import LEAF, tree_flatten, tree_map, tree_unflatten
from gdsl.tracing.trace import (
    Builder,
    builder_stack,
    trace_options,
    tracing,
    type_error,
)

# Every option some backend accepts (each backend checks its own: `arch` and `wave` are HIP's).
KNOWN_OPTIONS = frozenset({"control", "grid", "block", "unroll", "autotune", "barrier", "partition", "wavefront",
                           "hoist", "resident", "tensor_cores", "owner", "epilogue", "balance", "rows",
                           "cells", "arch", "wave", "fork", "window_store", "resident_calls",
                           "narrow", "spread_frames", "aside", "uniform_reductions", "resident_partitioned",
                           "index_ranges", "concat_k", "thin_gemv", "row_views", "siblings", "flags", "double_temps",
                           "smem_temps", "split_k", "place_workspace", "peel"})
_CHOICES = {"control": (None, "device", "host"), "partition": (None, True, False), "wavefront": (None, True, False),
            "hoist": (None, True, False), "resident": (None, True, False),
            "tensor_cores": (None, True, False), "autotune": (None, True, False),
            "owner": (None, True, False, "auto"), "epilogue": (None, True, False), "balance": (None, True, False),
            "rows": (None, True, False), "cells": (None, True, False), "fork": (None, True, False),
            "barrier": (None, "atomic", "coop"), "window_store": (None, True, False),
            "resident_calls": (None, True, False), "narrow": (None, True, False),
            "spread_frames": (None, True, False), "aside": (None, True, False),
            "uniform_reductions": (None, True, False), "resident_partitioned": (None, True, False),
            "index_ranges": (None, True, False), "concat_k": (None, True, False),
            "thin_gemv": (None, True, False), "row_views": (None, True, False),
            "siblings": (None, True, False), "flags": (None, True, False),
            "double_temps": (None, True, False), "smem_temps": (None, True, False),
            "split_k": (None, True, False), "place_workspace": (None, True, False),
            "peel": (None, True, False)}
_POSITIVE_INTS = ("grid", "block", "unroll")


def check_options(options: dict):
    """TypeError/ValueError for an unknown option or a value no backend accepts (each backend checks its
    own further limits: cuda's block sizes, barriers only on cuda)."""
    unknown = set(options) - KNOWN_OPTIONS
    if unknown:
        raise TypeError(f"gdsl.jit: unknown option(s) {sorted(unknown)}; known: {sorted(KNOWN_OPTIONS)}")
    for name in _POSITIVE_INTS:
        value = options.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"gdsl.jit: {name} must be a positive int, got {value!r}")
        if value <= 0:
            raise ValueError(f"gdsl.jit: {name} must be a positive int, got {value!r}")
    for name, choices in _CHOICES.items():
        value = options.get(name)
        if not _is_choice(value, choices):
            raise ValueError(f"gdsl.jit: {name} must be one of {choices}, got {value!r}")


def _is_choice(value, choices) -> bool:
    if value is None:
        return None in choices
    return isinstance(value, (str, bool, np.bool_)) and any(value == c for c in choices if c is not None)


def leaf_aval(x) -> ShapedArray:
    """The type of a jit argument: numpy/CuPy/any array with shape+dtype, dlpack objects, Python scalars."""
    if dtypes.is_weak(x):
        return ShapedArray((), dtypes.dtype_of(x))
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        arr = dtypes.as_numpy(x)
        shape, dtype = arr.shape, arr.dtype
    try:
        dtype = np.dtype(dtype)
    except TypeError:  # e.g. torch.float32
        dtype = np.dtype(str(dtype).rsplit(".", 1)[-1])
    return ShapedArray(tuple(int(d) for d in shape), dtypes.canonicalize(dtype))


def trace_program(fun, args, kwargs, name="main", options=None) -> Program:
    """Trace `fun(*args, **kwargs)` (pytrees of arrays) into a closed Program. `options` are the jit
    options that act while tracing (`unroll`)."""
    flat, in_tree = tree_flatten((tuple(args), dict(kwargs)))
    avals = [leaf_aval(x) for x in flat]
    if builder_stack():
        raise type_error("calling a jitted function while tracing another one is not supported yet; call "
                         "the undecorated Python function instead")
    reset_function_names()
    builder = Builder()
    with tracing(builder), trace_options(options or {}):
        tracers = [builder.new_arg(a) for a in avals]
        a, k = tree_unflatten(in_tree, tracers)
        out = fun(*a, **k)
        out_flat, out_tree = tree_flatten(out)
        from gdsl.control_flow import _operand
        jaxpr, consts = builder.finish([_operand(o) for o in out_flat])
    program = Program(jaxpr, tuple(consts), in_tree, out_tree, name=name)
    if os.environ.get("GDSL_CHECK"):
        from gdsl.core.typecheck import typecheck_program
        typecheck_program(program)
    debug(1, f"IR of {name}", lambda: str(program))
    return program


def make_ir(fun, *, static_argnums=(), static_argnames=()):
    """`gdsl.make_ir(f)(*args)` -> the traced Program; `str()` of it prints the IR."""
    jitted = Jitted(fun, "interpret", static_argnums, static_argnames, {})

    @functools.wraps(fun)
    def build(*args, **kwargs):
        dyn_args, dyn_kwargs, _ = jitted._split_static(args, kwargs)
        return trace_program(jitted._with_static(args, kwargs), dyn_args, dyn_kwargs, jitted.__name__)
    return build


def plan_text(lowering) -> str:
    """The text of a lowering's plan, the Ops its backend reads in place (no code runs) marked so."""
    from gdsl.schedule.plan import Plan
    from gdsl.schedule.printer import print_plan
    if not isinstance(lowering.plan, Plan):        # (the interpreter's is its own text)
        return str(lowering.plan)
    rendered = getattr(lowering, "rendered", None)
    return print_plan(lowering.plan, getattr(rendered, "views", frozenset()))


class Lowered:
    """What `f.lower(*args)` returns: the IR, the backend's plan and its generated source (as text)."""

    def __init__(self, program, lowering, backend, autotune_choice=None):
        self.program = program
        self.lowering = lowering
        self.backend = backend
        # With autotune=True, after the first call of this signature: the candidate's options it runs (the default
        # schedule's when no other won); None before that call and without autotune.
        self.autotune_choice = autotune_choice

    @property
    def ir(self) -> str:
        return str(self.program)

    @property
    def plan(self) -> str:
        return plan_text(self.lowering)

    @property
    def source(self) -> str:
        return self.lowering.source


class Jitted:
    def __init__(self, fun, backend, static_argnums, static_argnames, options):
        check_options(options)
        self.fun = fun
        self.backend = backend
        self.static_argnums = tuple(sorted(static_argnums if isinstance(static_argnums, (tuple, list))
                                           else (static_argnums,)))
        self.static_argnames = tuple(static_argnames if isinstance(static_argnames, (tuple, list))
                                     else (static_argnames,))
        self.options = dict(options)
        # The options are fixed from here on: their part of the cache key is computed once, not per call.
        self._options_key = tuple(sorted(self.options.items(), key=str))
        self.trace_count = 0
        self._cache: dict = {}
        # The fast path's table: fast key (_fast_signature) -> a caller of the loaded executable.
        # Negative static_argnums name a position only relative to each call's length: general path only.
        self._fast: dict = {}
        self._static_positions = frozenset(self.static_argnums)
        self._fast_ok = all(i >= 0 for i in self.static_argnums)
        # Types of the array leaves of the signatures in the fast table: an argument of one of them is keyed
        # in _fast_signature's loop itself, without walking _key_and_leaves' cases.
        self._array_types: set = set()
        # Threads that call a new signature at once trace, lower and load it once. Reentrant: a function
        # that calls itself while tracing gets the clear error of trace_program, not a deadlock.
        self._lock = threading.RLock()
        self.__name__ = getattr(fun, "__name__", "main")
        self.__doc__ = getattr(fun, "__doc__", None)
        self.__wrapped__ = fun
        try:
            self._signature = inspect.signature(fun)
        except (TypeError, ValueError):
            self._signature = None

    def _split_static(self, args, kwargs):
        """Dynamic args/kwargs (statics replaced by None) and the hashable static key."""
        static = []
        dyn_args = list(args)
        for i in self.static_argnums:
            if i < len(args):
                static.append(("arg", i, args[i]))
                dyn_args[i] = None
        dyn_kwargs = dict(kwargs)
        for name in self.static_argnames:
            if name in kwargs:
                static.append(("kw", name, kwargs[name]))
                dyn_kwargs.pop(name)
        try:
            hash(tuple(static))
        except TypeError:
            raise TypeError(f"gdsl.jit: static arguments must be hashable, got {static!r}") from None
        return tuple(dyn_args), dyn_kwargs, tuple(static)

    def _with_static(self, args, kwargs):
        """`fun` with the static arguments of this call put back in place."""
        static_pos = {i: args[i] for i in self.static_argnums if i < len(args)}
        static_kw = {n: kwargs[n] for n in self.static_argnames if n in kwargs}

        def fun(*dyn_args, **dyn_kwargs):
            full = [static_pos.get(i, a) for i, a in enumerate(dyn_args)]
            return self.fun(*full, **dyn_kwargs, **static_kw)
        return fun

    def _entry(self, args, kwargs):
        backend = self.backend or default_backend()
        dyn_args, dyn_kwargs, static = self._split_static(args, kwargs)
        flat, in_tree = tree_flatten((dyn_args, dyn_kwargs))
        avals = tuple(leaf_aval(x) for x in flat)
        key = (in_tree, avals, static, backend, self._options_key)
        entry = self._cache.get(key)
        if entry is None:
            with self._lock:
                entry = self._cache.get(key) or self._trace_and_lower(key, backend, args, kwargs, dyn_args,
                                                                      dyn_kwargs, avals)
        return entry, flat

    def _trace_and_lower(self, key, backend, args, kwargs, dyn_args, dyn_kwargs, avals):
        """The cache entry of a new signature: its Program and the backend's Lowering (loaded on first call)."""
        module = backend_module(backend)
        unknown = set(self.options) - module.KNOWN_OPTIONS
        if unknown:
            raise TypeError(f"gdsl.jit: backend {backend!r} has no option(s) {sorted(unknown)}")
        self.trace_count += 1
        program = trace_program(self._with_static(args, kwargs), dyn_args, dyn_kwargs, self.__name__,
                                self.options)
        t0 = time.perf_counter()
        lowering = module.lower(program, self.options)
        debug(2, f"plan of {self.__name__} ({backend})", lambda: plan_text(lowering))
        debug(3, f"source of {self.__name__} ({backend})", lowering.source)
        debug(4, "timing", f"lower: {1e3 * (time.perf_counter() - t0):.1f} ms")
        entry = self._cache[key] = {"program": program, "lowering": lowering, "backend": backend,
                                    "executable": None, "avals": avals}
        return entry

    def lower(self, *args, **kwargs) -> Lowered:
        entry, _ = self._entry(args, kwargs)
        return Lowered(entry["program"], entry["lowering"], entry["backend"], entry.get("autotune_choice"))

    def __call__(self, *args, **kwargs):
        if not kwargs and self._fast_ok:
            signature = self._fast_signature(args)
            fast = _fast_lookup(self._fast, signature)
            if fast is not None:
                return fast(signature[1])
        return self._call(args, kwargs)

    def _call(self, args, kwargs):
        """The general path: flatten the pytrees, look the signature up (tracing and lowering a new one),
        load on first call; then remember the fast path for this signature when it has one."""
        entry, leaves = self._entry(args, kwargs)
        flat = [_as_dtype(x, a) for x, a in zip(leaves, entry["avals"])]
        if entry["executable"] is None:
            with self._lock:
                if entry["executable"] is None:
                    self._load(entry, flat)
        outs = entry["executable"](flat)
        if not kwargs and self._fast_ok:
            self._remember_fast(args, leaves, entry)
        return tree_unflatten(entry["program"].out_tree, outs)

    def bind(self, *args) -> Bound:
        """`g = f.bind(*args)`: `g(*rest, **kwargs)` is `f(*args, *rest, **kwargs)`, with the leading `args`
        (a model's weights) keyed once, here, instead of at every call (Bound)."""
        return Bound(self, args)

    def _fast_signature(self, args, start: int = 0):
        """(key, leaves) of positional `args` as the fast path sees them, or None (the general path takes
        the call). The key is the backend, then per argument its value if static, else its pytree written
        out by _key_and_leaves; leaves are the dynamic arguments' leaves in tree_flatten's order. `start`:
        the position of args[0] among the call's arguments (Bound keys the arguments after its own)."""
        key = [self.backend or default_backend()]
        leaves = []
        static, array_types = self._static_positions, self._array_types
        for i, a in enumerate(args, start):
            if i in static:
                key.append(a)
            elif type(a) in array_types:        # what _key_and_leaves appends for an array leaf, inline
                try:
                    key.append((type(a), a.shape, a.dtype))
                except AttributeError:          # an object of that type without them: general path
                    return None
                leaves.append(a)
            elif not _key_and_leaves(a, key, leaves, array_types):
                return None
        return tuple(key), leaves

    def _remember_fast(self, args, leaves, entry):
        """Enter this call's signature in the fast table when its fast key fixes the general key (pytree,
        avals, statics), so that both find the same entry: every leaf keyed by type, shape and dtype, and
        the fast path's leaves the general path's, in the same order. The leaves' array types join the
        table's first, so that the key entered is the one the next call builds (its containers of arrays
        keyed at once): one entry, and no second trip through the general path."""
        if not all(_keyed_by_type_shape_dtype(x) for x in leaves):
            return
        with self._lock:
            self._array_types.update(type(x) for x in leaves if type(x) not in _PYTHON_SCALARS)
        signature = self._fast_signature(args)
        if signature is None:
            return
        key, fast_leaves = signature
        if len(fast_leaves) != len(leaves) or any(a is not b for a, b in zip(fast_leaves, leaves)):
            return
        try:
            hash(key)
        except TypeError:
            return
        conversions = [(k, aval) for k, (x, aval) in enumerate(zip(leaves, entry["avals"]))
                       if _needs_conversion(x, aval)]
        with self._lock:
            if "fast_run" not in entry:     # one per signature, however many fast keys reach it
                fast_path = getattr(entry["executable"], "fast_path", None)
                entry["fast_run"] = (fast_path and fast_path()) or entry["executable"]
            self._fast[key] = _fast_caller(entry["fast_run"], conversions, entry["program"].out_tree)

    def _load(self, entry, flat):
        """Compile and load the entry's lowering (autotuning first when asked)."""
        module = usable_backend(entry["backend"])
        t0 = time.perf_counter()
        if self.options.get("autotune"):
            from gdsl.autotune import autotune
            entry["lowering"], entry["executable"], entry["autotune_choice"] = autotune(
                module, entry["backend"], entry["program"], self.options, flat)
            debug(1, f"autotune of {self.__name__}", f"chose {entry['autotune_choice']}")
        else:
            entry["executable"] = module.load(entry["lowering"])
        # (loading may re-schedule a plan whose grid cannot be co-resident: lower() then shows what runs)
        entry["lowering"] = getattr(entry["executable"], "lowering", None) or entry["lowering"]
        if self.options.get("place_workspace") is not False:
            from gdsl.autotune import place_workspace
            place_workspace(entry["executable"], flat)
        debug(4, "timing", f"compile+load of {self.__name__}: {1e3 * (time.perf_counter() - t0):.1f} ms")


class Bound:
    """A jitted function with its leading arguments bound (`Jitted.bind`): `g(*rest)` is `f(*args, *rest)`.

    What a call of `f` does per argument, reading the type, shape and dtype of every leaf of a few hundred
    weights to find the signature (docs/guide.md, "Binding the weights"), `g` does for `rest` only: the bound
    arguments' leaves are flattened once, here, and a call looks up its signature by `rest` alone in a table
    of its own, filled from `f`'s fast path on the first call of each signature; where that path can hold the
    bound device arrays' pointers itself (`_rest_caller`), a call passes it only the rest's. The bound arrays
    are held as views taken now: their values are read at every call (an update in place is seen, as when
    they are passed), their pytree, shapes and dtypes are the ones they had here (a later in-place reshape of the
    array, `a.shape = ...` in CuPy, does not reach the view; bind again for new shapes). Any call the table
    does not know (a new signature, keyword arguments, a static argument among `rest`) takes `f`'s path with
    every argument, so its results are `f`'s.
    """

    def __init__(self, jitted: Jitted, args: tuple):
        self._jitted = jitted
        self._args = tree_map(_view, tuple(args))
        signature = jitted._fast_signature(self._args) if jitted._fast_ok else None
        self._leaves = None if signature is None else signature[1]     # (None: every call takes f's path)
        self._table: dict = {}           # fast key of rest (Jitted._fast_signature) -> caller of rest's leaves
        self.__name__ = jitted.__name__
        self.__wrapped__ = jitted

    def __call__(self, *rest, **kwargs):
        if not kwargs and self._leaves is not None:
            signature = self._jitted._fast_signature(rest, start=len(self._args))
            fast = _fast_lookup(self._table, signature)
            if fast is not None:
                return fast(signature[1])
            if signature is not None:
                out = self._jitted(*self._args, *rest)
                self._remember(*signature, rest)
                return out
        return self._jitted(*self._args, *rest, **kwargs)

    def _remember(self, key, leaves, rest):
        """Enter `rest`'s key with a caller of `rest`'s leaves made from the fast caller `f`'s table now holds
        for the whole call, when there is one and its leaves are the bound leaves followed by `rest`'s."""
        full = self._jitted._fast_signature(self._args + rest)
        fast = _fast_lookup(self._jitted._fast, full)
        expected = self._leaves + leaves
        if fast is not None and len(full[1]) == len(expected) and all(map(operator.is_, full[1], expected)):
            self._table[key] = self._rest_caller(fast)

    def _rest_caller(self, fast):
        """`call(rest_leaves)`: `fast` with the bound leaves in front, or, where the executable's fast run can
        take them once (`run.bind_leading`: the C-family backends, for arrays used as they are), a fast
        caller of a run that holds them already and reads only the rest's (docs/backends.md, host dispatch)."""
        bound, n = self._leaves, len(self._leaves)
        run, conversions, out_tree = fast.parts
        bind = getattr(run, "bind_leading", None) if BIND_LEADING else None
        rest_run = bind(bound) if bind is not None and all(k >= n for k, _ in conversions) else None
        if rest_run is None:
            return lambda rest: fast(bound + rest)
        return _fast_caller(rest_run, [(k - n, aval) for k, aval in conversions], out_tree)

    def lower(self, *rest, **kwargs) -> Lowered:
        return self._jitted.lower(*self._args, *rest, **kwargs)


def _fast_lookup(table: dict, signature):
    """The fast caller `table` holds for `signature` ((key, leaves) of _fast_signature, or None), or None."""
    if signature is None:
        return None
    try:
        return table.get(signature[0])
    except TypeError:           # an unhashable static argument: the general path says so
        return None


def _view(x):
    """A bound leaf as Bound keeps it: an array as a view (same memory, the shape of now), anything else as is."""
    view = getattr(x, "view", None)
    if callable(view) and getattr(x, "shape", None) is not None and getattr(x, "dtype", None) is not None:
        return view()
    return x


# Bound hands its device arrays to the executable's fast run once (`run.bind_leading`); False: a call passes
# every leaf as before (a switch for measuring what it gives).
BIND_LEADING = True

_PYTHON_SCALARS = frozenset({bool, int, float})


def _keyed_by_type_shape_dtype(x) -> bool:
    """Whether leaf_aval(x) depends on type(x), x.shape and x.dtype alone (and x is a pytree leaf), so
    that the fast key of `x` fixes its aval: Python scalars, and leaves with a shape and a dtype."""
    if type(x) in _PYTHON_SCALARS:
        return True
    if x is None or isinstance(x, (tuple, list, dict)) or dtypes.is_weak(x):
        return False
    return getattr(x, "shape", None) is not None and getattr(x, "dtype", None) is not None


def _needs_conversion(x, aval) -> bool:
    """Whether _as_dtype changes `x`: decided by its type and dtype, so once per fast-path signature."""
    return dtypes.is_weak(x) or getattr(x, "dtype", None) != aval.dtype


def _key_and_leaves(x, key: list, leaves: list, array_types=frozenset()) -> bool:
    """Append the fast key of pytree `x` to `key` and its leaves to `leaves`; False if some part of it is
    not for the fast path (namedtuples, dict subclasses, leaves without shape and dtype, unsortable keys).

    The key is a prefix code, so that distinct pytrees never give one key: a tuple or list is (type,
    length) followed by its children, a dict (dict, sorted keys) followed by its values in that order (as
    tree_flatten orders them), None is None, a Python scalar its type, any other leaf (type, shape, dtype).
    Children that are all arrays of `array_types` (the types of the array leaves already in the fast table:
    a model's dict of weights) are written as one entry (_ARRAYS, their types, shapes, dtypes), built by
    loops that run in C: a call with a few hundred weights pays microseconds for its key, not a Python
    step per leaf."""
    kind = type(x)
    if kind in _PYTHON_SCALARS:
        key.append(kind)
        leaves.append(x)
        return True
    if kind is tuple or kind is list:
        key.append((kind, len(x)))
        return _children_key(x, key, leaves, array_types)
    if kind is dict:
        order = _dict_order(x)
        if order is None:
            return False
        names, values_of = order
        key.append((dict, names))
        return _children_key(values_of(x), key, leaves, array_types)
    if x is None:
        key.append(None)
        return True
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        return False
    key.append((kind, shape, dtype))
    leaves.append(x)
    return True


_ARRAYS = object()          # the marker of a run of array children in a fast key (_key_and_leaves)
_shape_of, _dtype_of = operator.attrgetter("shape"), operator.attrgetter("dtype")


def _children_key(children, key: list, leaves: list, array_types) -> bool:
    """_key_and_leaves of a container's children, in order: one entry when all are arrays of array_types."""
    if len(children) > 1 and array_types:
        types = tuple(map(type, children))
        if all(map(array_types.__contains__, types)):
            try:
                key.append((_ARRAYS, types, tuple(map(_shape_of, children)), tuple(map(_dtype_of, children))))
            except AttributeError:          # an object of an array type without them: general path
                return False
            leaves.extend(children)
            return True
    return all(_key_and_leaves(c, key, leaves, array_types) for c in children)


_DICT_ORDERS: dict = {}     # a dict's keys in insertion order -> (sorted keys, their values' getter)
_DICT_ORDERS_LIMIT = 4096   # forgotten all at once past this many key sets (a program has a few)


def _dict_order(x: dict):
    """(sorted keys, a function of the dict giving its values in that order) for a plain dict's keys, or
    None when they do not sort. Cached by the keys in insertion order: sorting a model's few hundred
    parameter names on every call would cost more than the rest of the key."""
    keys = tuple(x)
    order = _DICT_ORDERS.get(keys)
    if order is None:
        try:
            names = tuple(sorted(keys))
        except TypeError:
            return None
        # itemgetter of several names returns a tuple of their values; of one name, the value itself
        values_of = operator.itemgetter(*names) if len(names) > 1 else (lambda d: tuple(d.values()))
        if len(_DICT_ORDERS) >= _DICT_ORDERS_LIMIT:
            _DICT_ORDERS.clear()
        order = _DICT_ORDERS[keys] = (names, values_of)
    return order


def _fast_caller(run, conversions, out_tree):
    """The fast path of one signature: `call(leaves)` -> the results, as the general path returns them.

    run: the executable's `fast_path()`, or the executable itself (`run(flat leaves) -> flat results`);
    conversions: (leaf index, aval) of the leaves _as_dtype converts (Python scalars, float64, ...)."""
    unflatten = _unflattener(out_tree)
    if not conversions and out_tree == LEAF:
        def call(leaves):                   # the most common case, one function call shorter
            return run(leaves)[0]
    elif not conversions:
        def call(leaves):
            return unflatten(run(leaves))
    else:
        def call(leaves):
            for k, aval in conversions:
                leaves[k] = _as_dtype(leaves[k], aval)
            return unflatten(run(leaves))
    call.parts = (run, conversions, out_tree)       # (what Bound makes its own caller of)
    return call


def _unflattener(out_tree):
    """`outs -> result pytree`, short for the common shapes (one array, a flat tuple or list of arrays)."""
    if out_tree == LEAF:
        return lambda outs: outs[0]
    if out_tree.kind in ("tuple", "list") and all(c == LEAF for c in out_tree.children):
        return tuple if out_tree.kind == "tuple" else list
    return functools.partial(tree_unflatten, out_tree)


def _as_dtype(x, aval):
    """Python scalars and arrays of non-canonical dtypes (float64, ...) as the traced dtype."""
    if dtypes.is_weak(x):
        return np.asarray(x, dtype=aval.dtype)
    if getattr(x, "dtype", None) != aval.dtype and hasattr(x, "astype"):
        try:
            return x.astype(aval.dtype)
        except TypeError:
            return x
    return x


def jit(fun=None, *, backend=None, static_argnums=(), static_argnames=(), **options):
    """Compile `fun` (traced on first call per signature). Bare (`@gdsl.jit`) or with arguments.
    Options: control ("device"|"host"), grid, block, unroll, partition, autotune (docs/guide.md)."""
    if fun is None:
        return lambda f: jit(f, backend=backend, static_argnums=static_argnums,
                             static_argnames=static_argnames, **options)
    jitted = Jitted(fun, backend, static_argnums, static_argnames, options)
    functools.update_wrapper(jitted, fun, updated=())
    return jitted
