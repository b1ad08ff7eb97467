"""Hypothesis strategies and comparison helpers shared by the gdsl test suite — and by every backend's tests.

Backends reuse the random-program strategy and `check_backend` to compare themselves with the interpreter:

    from hypothesis import given
    from strategies import check_backend, programs, requires_backend

    @requires_backend("cuda")
    @given(programs())
    def test_cuda_matches_interpreter(prog):
        check_backend(prog.fn, prog.args, "cuda", control="device")

`programs()` draws a `RandomProgram`: a plain Python function written against the gdsl API (nested
while_loop / fori_loop / cond / switch / recurse around random elementwise, matmul, reduction and indexing
statements), its arguments, and its source text (shown by hypothesis when an example fails).
"""
from __future__ import annotations

import itertools
import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gdsl
import gdsl.nn  # noqa: F401  (the programs call gdsl.nn.*)
import gdsl.numpy as gnp
from gdsl.backends.cfamily import emulator
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.interpreter import run_program
from gdsl.schedule.plan import Wave, plan_statements
from gdsl.schedule.simulate import simulate

# Tests that need a compiler but no GPU (CI has both): NVRTC for the CUDA source, g++ for the CPU emulator.
needs_nvrtc = pytest.mark.skipif(cuda_toolchain.nvrtc_available() is not None,
                                 reason=str(cuda_toolchain.nvrtc_available()))
needs_cxx = pytest.mark.skipif(emulator.cxx() is None, reason="the CPU emulator needs g++ (C++20)")

f32, f16, bf16 = np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)
i32, i64, boolean = np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.bool_)
FLOATS = (f32, f16, bf16)
INTS = (i32, i64)
NUMERIC = FLOATS + INTS
ALL_DTYPES = NUMERIC + (boolean,)

# ----------------------------------------------------------------------------------------------------------
# arrays


def shapes(min_dims=0, max_dims=3, min_side=1, max_side=4):
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side)


def arrays(dtype, shape, *, min_value=-4, max_value=4):
    """numpy arrays of any gdsl dtype (bfloat16 included): floats are drawn as float32 in
    [min_value, max_value] and rounded to `dtype`; ints uniformly in the same range."""
    dtype = np.dtype(dtype)
    if dtype == boolean:
        return hnp.arrays(np.bool_, shape, elements=st.booleans())
    if dtype.kind in "iu":
        return hnp.arrays(dtype, shape, elements=st.integers(int(min_value), int(max_value)))
    elements = st.floats(float(np.float32(min_value)), float(np.float32(max_value)), width=32,
                         allow_subnormal=False)
    return hnp.arrays(np.float32, shape, elements=elements).map(lambda a: a.astype(dtype))


def dtype_strategy(dtypes=ALL_DTYPES):
    return st.sampled_from(tuple(dtypes))


# ----------------------------------------------------------------------------------------------------------
# the oracle's dtypes: numpy's promotion, extended to bfloat16 and canonicalised the way gdsl documents


def canonical(dtype) -> np.dtype:
    """float64 -> float32 and narrow ints -> int32 (gdsl has no float64; a deliberate deviation, as JAX)."""
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return f32
    if dtype.kind in "iu":
        return i32 if dtype.itemsize <= 4 else i64
    return dtype


def is_python_scalar(x) -> bool:
    return isinstance(x, (bool, int, float)) and not isinstance(x, np.generic)


def expected_dtype(*operands) -> np.dtype:
    """The dtype numpy gives `operands` (numpy >= 2: Python scalars are weak, NEP 50), with bfloat16 taking
    float16's place in the promotion lattice (bfloat16 with float16 -> float32), canonicalised.

    Deliberate deviation (as JAX): a Python int/float meeting a lower-kind array gives the *default* gdsl
    dtype of its kind (int32 / float32) where numpy gives int64 / float64."""
    strong = [np.dtype(getattr(x, "dtype", None) or np.asarray(x).dtype) for x in operands
              if not is_python_scalar(x)]
    weak = [x for x in operands if is_python_scalar(x)]
    kind = {"b": 0, "i": 1, "u": 1, "f": 2, "V": 2}

    def python_kind(x):
        return 0 if isinstance(x, bool) else 1 if isinstance(x, int) else 2
    weak_kind = max((python_kind(x) for x in weak), default=-1)
    if not strong:
        return (boolean, i32, f32)[weak_kind]
    as_numpy = [f16 if d == bf16 else d for d in strong]
    result = np.result_type(*as_numpy)
    if result == f16 and bf16 in strong:
        result = f32 if f16 in strong else bf16
    if weak_kind > kind[result.kind if result != bf16 else "f"]:
        return (boolean, i32, f32)[weak_kind]
    return canonical(result)


def float_result_dtype(*operands) -> np.dtype:
    """exp/log/divide/...: numpy's result dtype, except that bool and integer operands compute in float32
    (numpy gives float16 for bool and float64 -> float32 for ints: the bool case is a deliberate
    deviation, as JAX)."""
    d = expected_dtype(*operands)
    return d if d in FLOATS else f32


# ----------------------------------------------------------------------------------------------------------
# comparison

TOLERANCE = {f32: (2e-5, 2e-5), f16: (4e-3, 4e-3), bf16: (3e-2, 3e-2)}
BACKEND_TOLERANCE = {f32: (2e-4, 2e-5), f16: (2e-2, 2e-2), bf16: (8e-2, 8e-2)}


def assert_close(actual, expected, *, dtype=None, rtol=None, atol=None, scale=1.0, err_msg=""):
    """`actual` (any array-like) equals `expected` (numpy): same shape, the dtype `dtype` (default: expected's),
    exact for bool/int, within per-dtype tolerances for floats (`atol` is multiplied by `scale`: pass
    the magnitude of the terms a reduction adds up). NaNs must match NaNs."""
    actual = gdsl.to_numpy(actual)
    assert isinstance(actual, np.ndarray), f"expected a numpy array, got {type(actual)} {err_msg}"
    dtype = np.dtype(dtype) if dtype is not None else np.asarray(expected).dtype
    assert actual.dtype == dtype, f"dtype {actual.dtype} != {dtype} {err_msg}"
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape} {err_msg}"
    if dtype in FLOATS:
        r, a = TOLERANCE[dtype]
        np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64),
                                   rtol=r if rtol is None else rtol, atol=(a if atol is None else atol) * scale,
                                   equal_nan=True, err_msg=err_msg)
    else:
        np.testing.assert_array_equal(actual, expected.astype(dtype), err_msg=err_msg)


def assert_trees_close(actual, expected, *, exact=False, rtol=None, atol=None, tolerance=TOLERANCE):
    """Two result pytrees: same structure, leaf shapes and dtypes; values exactly equal (`exact`) or within
    `tolerance[dtype]` (overridden by rtol/atol)."""
    a_leaves, a_tree = gdsl.tree_flatten(actual)
    e_leaves, e_tree = gdsl.tree_flatten(expected)
    assert a_tree == e_tree, f"result structure {a_tree} != {e_tree}"
    for k, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        a, e = gdsl.to_numpy(a), gdsl.to_numpy(e)
        where = f"(leaf {k} of {e_tree})"
        assert a.dtype == e.dtype and a.shape == e.shape, \
            f"{where}: {a.dtype}{list(a.shape)} != {e.dtype}{list(e.shape)}"
        if exact or a.dtype not in FLOATS:
            np.testing.assert_array_equal(a, e, err_msg=where)
        else:
            r, t = tolerance[a.dtype]
            np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), rtol=r if rtol is None else rtol,
                                       atol=t if atol is None else atol, equal_nan=True, err_msg=where)


def plan_ops(plan) -> list:
    """Every Op of every wave of `plan` (its kernels' and functions'), in plan order."""
    return [t.op for s in plan_statements(plan) if isinstance(s, Wave) for t in s.tasks]


def interpreted(program, args) -> list:
    """`program`'s results from the IR interpreter (the reference a plan is checked against)."""
    return run_program(program, [np.asarray(a) for a in args])


def simulated(plan, args) -> list:
    """`plan`'s results from the schedule simulator (its race checks on)."""
    return simulate(plan, [np.asarray(a) for a in args])


def as_list(got) -> list:
    """A call's results (one array or a tuple of them) as a list of numpy arrays."""
    return [np.asarray(g) for g in (got if isinstance(got, tuple) else [got])]


def emulated(fn, args, **options) -> list:
    """`fn(*args)`'s results from the CPU emulator of the generated C (`options`: emulator.emulate's)."""
    return as_list(emulator.emulate(fn, *args, **options))


def cuda_lowering(fn, args, grid=132, **options):
    """`fn(*args)` lowered for CUDA (device control, 256 threads a vEU, `grid` vEUs, jit `options`) without a
    GPU: its `.plan` and its `.source` (for NVRTC)."""
    from gdsl.backends.cfamily.lower import check_options, lower_with_grid
    from gdsl.backends.cuda.dialect import CUDADialect
    dialect = CUDADialect()
    opts = check_options({"control": "device", "block": 256, "barrier": "atomic", **options}, dialect)
    return lower_with_grid(gdsl.make_ir(fn)(*args), opts, grid, dialect)


def zoo_lowered(name, batch, **options):
    """A zoo model at full size and `batch` lowered for CUDA with jit `options` (no GPU needed): the Lowered
    (its `.source` and its `.lowering.plan`)."""
    from models import common, load
    model = load(name)
    prob = common.build_problem(model, batch)
    return model.make_forward(prob.cfg, backend="cuda", **options).lower(prob.weights, prob.batches[0])


def first_loop(plan):
    """The first Loop of a plan's first kernel."""
    from gdsl.schedule.plan import Loop
    return next(s for s in plan.kernels[0].body if isinstance(s, Loop))


def emulated_model_mismatches(name, batch, variant=None, **options) -> list:
    """A zoo model's small configuration at `batch` (`variant`: its input variant's keywords, e.g. RAE's
    tree="fixed") on the CPU emulator of the generated C (`options`: emulator.emulate's) against its float64
    reference: the mismatches (models.common.compare), [] when it matches."""
    from models import common, load
    prob = common.build_problem(load(name), batch, small=True, **(variant or {}))

    def forward(weights, inputs):
        return prob.model.forward(weights, inputs, prob.cfg)
    got = emulator.emulate(forward, prob.weights, prob.batches[0], **options)
    return common.compare(got, prob.references()[0])


def run_jit(fn, args, backend="interpret", **options):
    return gdsl.jit(fn, backend=backend, **options)(*args)


def check_backend(fn, args, backend, *, reference="interpret", rtol=None, atol=None, **options):
    """Assert that `gdsl.jit(fn, backend=backend, **options)(*args)` gives what the reference interpreter
    gives: same pytree, shapes and dtypes; ints and bools exactly, floats within BACKEND_TOLERANCE (loops
    compound rounding differences). If the reference raises gdsl.RecursionDepthError, so must the backend.
    Returns the backend's results (numpy)."""
    try:
        expected = run_jit(fn, args, reference)
    except gdsl.RecursionDepthError:
        with pytest.raises(gdsl.RecursionDepthError):
            run_jit(fn, args, backend, **options)
        return None
    got = gdsl.to_numpy(run_jit(fn, args, backend, **options))
    assert_trees_close(got, expected, rtol=rtol, atol=atol, tolerance=BACKEND_TOLERANCE)
    return got


def requires_backend(name):
    """Skip marker for tests that need a backend usable on this machine."""
    reason = None if name in gdsl.backends() else f"backend {name!r} is not usable here"
    if reason:
        try:
            from gdsl.backends import unavailable_reason
            reason = f"{reason}: {unavailable_reason(name)}"
        except Exception:  # noqa: BLE001 - the reason is informative only
            pass
    return pytest.mark.skipif(reason is not None, reason=reason or "")


# ----------------------------------------------------------------------------------------------------------
# random programs with nested control flow

CONSTRUCTS = ("while", "fori", "cond", "switch", "recurse")


@dataclass
class RandomProgram:
    """`fn(*args)` is a gdsl program; `source` its Python text (exec'd to make `fn`)."""
    fn: Callable
    args: tuple
    source: str
    constructs: frozenset  # the control-flow constructs that occur in it

    def __repr__(self):
        shapes_ = ", ".join(f"{np.asarray(a).dtype}{list(np.shape(a))}" if not is_python_scalar(a) else repr(a)
                            for a in self.args)
        return f"RandomProgram(args=({shapes_}))\n{self.source}"


# Statements update the state (h: DT[D], m: DT[R, D], c: int32 scalar); every float update stays bounded
# (tanh, sigmoid, clip, softmax) so values remain finite whatever the nesting. `x`, `W`, `k` are the
# program's (traced) inputs and C_* numpy constants: bodies close over both at every nesting level.
# Each entry: (statement, eager_compatible). Eager-compatible statements use only gdsl.numpy functions and
# operators whose numpy meaning is the same, so the program also runs on plain numpy arrays (eagerly);
# the others use traced-array features (x.at[i].set, clamped traced indexing, methods with gdsl dtypes).
H_STATEMENTS = [
    ("h = gnp.tanh(gnp.matmul(h, W))", True),
    ("h = gnp.tanh(gnp.matmul(h, C_DD))", True),
    ("h = gdsl.nn.sigmoid(h * 2.0) - 0.5", True),
    ("h = gnp.tanh(gnp.maximum(h, -0.25) - gnp.mean(h))", True),
    ("h = gnp.where(h > 0, h, 0.1 * h)", True),
    ("h = gnp.tanh(0.5 * h + 0.5 * x)", True),
    ("h = gnp.tanh(h + 0.3 * gnp.sum(m, axis=0))", True),
    ("h = gnp.tanh(h + gnp.take(m, c, axis=0))", True),
    ("h = gnp.tanh(gnp.concatenate([h[1:], h[:1]]) * 1.5)", True),
    ("h = gnp.clip(h * 1.5, -1.0, 1.0)", True),
    ("h = gnp.tanh(gnp.einsum('i,ij->j', h, W) + C_D)", True),
    ("h = gnp.tanh(gnp.matmul(gnp.matmul(m, h), m))", True),
    ("h = gnp.tanh(h * gnp.astype(c, DT) * 0.1 + gnp.astype(k, DT) * 0.05)", True),
    ("h = gdsl.nn.softmax(h) * D - 1.0", True),
    ("h = gnp.tanh(h - gnp.max(h) + gnp.min(h) + gnp.take(h, c))", True),
    ("h = gnp.sqrt(gnp.abs(h)) * gnp.sign(h)", True),
    ("h = gnp.where(gnp.arange(D) == c % D, gnp.tanh(h + 1.0), h)", True),
    ("h = h.at[c % D].set(0.5)", False),
    ("h = h.at[c].add(0.25)", False),            # out-of-range c: the update is dropped
    ("h = gnp.tanh(h + m[c])", False),           # out-of-range c clamps
    ("h = gnp.tanh(h.T * m.max() + m[:, (c + 1) % D].sum())", False),
    # (a row stored between two uses: a reader of a fused chain's earlier member, Scheduler._level's order)
    ("s = gdsl.nn.softmax(h); m = m.at[c % R].set(s); h = gnp.tanh(s * D - 1.0)", False),
]
M_STATEMENTS = [
    ("m = gnp.tanh(gnp.matmul(m, W))", True),
    ("m = gnp.tanh(m * 0.5 + h)", True),
    ("m = gdsl.nn.softmax(m, axis=-1)", True),
    ("m = gnp.tanh(m + gnp.expand_dims(h, 0) * C_R1)", True),
    ("m = gnp.tanh(m - gnp.mean(m, axis=1, keepdims=True))", True),
    ("m = gnp.stack([gnp.tanh(m[r] * (r + 1) * 0.5) for r in range(R)])", True),
    ("m = m.at[c % R].set(h)", False),
    ("m = m.at[c, :].add(h * 0.5).astype(DT)", False),
]
C_STATEMENTS = [
    ("c = (c + 1) % 5", True),
    ("c = (c + gnp.argmax(h)) % 7", True),
    ("c = gnp.where(gnp.sum(h) > 0, c + 1, c - 1)", True),
    ("c = (c * 3 + k) % 11", True),
    ("c = gnp.maximum(c, k) - 1", True),
    ("c = c // 2 + gnp.argmin(m[0])", True),
    ("c = (c + h.argmax() - m.sum().astype(gdsl.int32)) % 9", False),
]
PREDICATES = ["gnp.sum(h) > 0", "c % 2", "k > 1", "gnp.take(h, c) > 0", "gnp.logical_and(c > 0, gnp.max(h) < 0.5)",
              "gnp.logical_or(c == 3, k == 0)"]
SWITCH_INDICES = ["c - 1", "k", "gnp.argmax(h)", "c * 3 - 4", "-1", "5"]
FORI_BOUNDS = [("0", "3"), ("k", "3"), ("0", "k"), ("c % 3", "2"), ("1", "k - 1"), ("k", "k"), ("2", "1"),
               ("gnp.minimum(c, 2)", "gnp.maximum(k, 1)")]
WHILE_LIMITS = ["0", "2", "3", "gnp.minimum(k, 3)", "gnp.minimum(c % 4, 3)"]
WHILE_EXTRA = ["", " & (gnp.sum(h) < 1.0)", " & (c < 6)", " & gnp.logical_not(gnp.max(h) > 0.9)"]
# Control decisions taken on float values (a comparison, an argmax): a backend whose float results differ in
# the last bits may rarely take the other path. programs(float_control=False) leaves them out.
FLOAT_CONTROL = {"gnp.sum(h) > 0", "gnp.take(h, c) > 0", "gnp.logical_and(c > 0, gnp.max(h) < 0.5)",
                 "gnp.argmax(h)", " & (gnp.sum(h) < 1.0)", " & gnp.logical_not(gnp.max(h) > 0.9)",
                 "c = (c + gnp.argmax(h)) % 7", "c = gnp.where(gnp.sum(h) > 0, c + 1, c - 1)",
                 "c = c // 2 + gnp.argmin(m[0])", "c = (c + h.argmax() - m.sum().astype(gdsl.int32)) % 9"}
RECURSION_DEPTHS = ["gnp.minimum(k, 3)", "c % 3", "2", "k - 2", "gnp.minimum(gnp.maximum(c, 0), 3)"]
OUTPUTS = ["(h, m, c)", "{'h': h, 'rest': [m, c]}", "h", "(c, None, (h,))", "[gnp.sum(h) + gnp.sum(m), c]"]


class _Writer:
    """Draws statements and writes their Python source."""

    def __init__(self, draw, max_statements, constructs, eager_compatible, float_control):
        self.draw = draw
        self.max_statements = max_statements
        self.constructs = tuple(constructs)
        self.eager = eager_compatible
        self.float_control = float_control
        self.counter = itertools.count(1)
        self.used: set = set()

    def pick(self, options):
        if not self.float_control:
            options = [o for o in options if o not in FLOAT_CONTROL]
        return self.draw(st.sampled_from(options))

    def simple(self, table):
        return self.pick([s for s, eager in table if eager or not self.eager])

    def block(self, depth) -> list[str]:
        """Statements updating h, m, c."""
        n = self.draw(st.integers(1, self.max_statements))
        lines: list[str] = []
        for _ in range(n):
            kinds = ["h", "h", "m", "c"] + (list(self.constructs) if depth > 0 else [])
            kind = self.pick(kinds)
            if kind == "h":
                lines.append(self.simple(H_STATEMENTS))
            elif kind == "m":
                lines.append(self.simple(M_STATEMENTS))
            elif kind == "c":
                lines.append(self.simple(C_STATEMENTS))
            else:
                lines.extend(self.construct(kind, depth - 1))
        return lines

    def construct(self, kind, depth) -> list[str]:
        self.used.add(kind)
        write = {"while": self.while_, "fori": self.fori, "cond": self.cond, "switch": self.switch,
                 "recurse": self.recurse}[kind]
        return write(depth, next(self.counter))

    def body(self, depth) -> list[str]:
        return ["    " + line for line in self.block(depth)]

    def while_(self, depth, n):
        limit = self.pick(WHILE_LIMITS)
        extra = self.pick(WHILE_EXTRA)
        carry = self.pick(["tuple", "dict"])
        if carry == "tuple":
            unpack, pack, init = "t, (h, m, c) = s", "return t + 1, (h, m, c)", "(0, (h, m, c))"
            result = "_, (h, m, c)"
        else:
            unpack = "t, h, m, c = s['t'], s['state'][0], s['state'][1], s['state'][2]"
            pack, init = "return {'t': t + 1, 'state': [h, m, c]}", "{'t': 0, 'state': [h, m, c]}"
            result = "_w"
        lines = [f"def cond_{n}(s):", f"    {unpack}", f"    return (t < {limit}){extra}",
                 f"def body_{n}(s):", f"    {unpack}", *self.body(depth), f"    {pack}",
                 f"{result} = gdsl.while_loop(cond_{n}, body_{n}, {init})"]
        if carry == "dict":
            lines.append("h, m, c = _w['state']")
        return lines

    def fori(self, depth, n):
        lo, hi = self.pick(FORI_BOUNDS)
        use_i = self.pick(["h = gnp.tanh(h + gnp.astype(i, DT) * 0.1)", "c = (c + i) % 7",
                           "h = gnp.where(gnp.arange(D) == i % D, 0.5 * h, h)"])
        return [f"def body_{n}(i, s):", "    h, m, c = s", f"    {use_i}", *self.body(depth),
                "    return [h, m, c]",
                f"h, m, c = gdsl.fori_loop({lo}, {hi}, body_{n}, [h, m, c])"]

    def cond(self, depth, n):
        pred = self.pick(PREDICATES)
        if self.draw(st.booleans()):  # operands passed explicitly
            return [f"def true_{n}(h, m, c):", *self.body(depth), "    return h, m, c",
                    f"def false_{n}(h, m, c):", *self.body(depth), "    return h, m, c",
                    f"h, m, c = gdsl.cond({pred}, true_{n}, false_{n}, h, m, c)"]
        # no operands: the branches close over the current h, m, c (captured as constants of the branch)
        return [f"def true_{n}(h=h, m=m, c=c):", *self.body(depth), "    return h, m, c",
                f"def false_{n}(h=h, m=m, c=c):", *self.body(depth), "    return h, m, c",
                f"h, m, c = gdsl.cond({pred}, true_{n}, false_{n})"]

    def switch(self, depth, n):
        index = self.pick(SWITCH_INDICES)
        count = self.draw(st.integers(1, 3))
        lines = []
        for j in range(count):
            lines += [f"def branch_{n}_{j}(h, m, c):", *self.body(depth), "    return h, m, c"]
        names = ", ".join(f"branch_{n}_{j}" for j in range(count))
        return lines + [f"h, m, c = gdsl.switch({index}, [{names}], h, m, c)"]

    def recurse(self, depth, n):
        start = self.pick(RECURSION_DEPTHS)
        two_calls = self.draw(st.booleans())
        inner = [f"    def inner_{n}(h, m, c):",
                 f"        h, m, c = rec_{n}(d - 1, gnp.tanh(h * 0.5), m, c)"]
        if two_calls:
            inner += [f"        h2, m2, c2 = rec_{n}(d - 2, h, m, (c + 1) % 5)",
                      "        h, m, c = gnp.tanh(h + h2), gnp.tanh(m - m2), (c + c2) % 13"]
        inner += ["    " + line for line in self.body(depth)] if self.draw(st.booleans()) else []
        inner += ["        return h, m, c"]
        return ["@gdsl.recurse(result=(gdsl.ShapeDtype((D,), DT), gdsl.ShapeDtype((R, D), DT),",
                "                      gdsl.ShapeDtype((), gdsl.int32)), max_depth=8)",
                f"def rec_{n}(d, h, m, c):",
                f"    def leaf_{n}(h, m, c):",
                *["    " + line for line in self.body(depth)],
                "        return h, m, c",
                *inner,
                f"    return gdsl.cond(d <= 0, leaf_{n}, inner_{n}, h, m, c)",
                f"h, m, c = rec_{n}({start}, h, m, c)"]


@st.composite
def programs(draw, *, max_depth=3, max_statements=3, constructs=CONSTRUCTS, dtypes=(f32,),
             eager_compatible=False, float_control=True, dims=(1, 4), rows=(1, 3)):
    """A RandomProgram `fn(x, m, k, W)` with x: DT[D], m: DT[R, D], k: int32 scalar (numpy or Python int) and
    W: DT[D, D], where DT is drawn from `dtypes`. Control flow nests up to `max_depth` deep (each construct's
    body is a block of up to `max_statements` statements); loops run at most 3 times and recursion goes at
    most 4 frames deep, so every program is small enough to run on the interpreter in milliseconds.

    eager_compatible=True keeps to statements that mean the same on plain numpy arrays, so that `fn` also
    runs eagerly; the default also uses traced-array features (`x.at[i].set`, clamped traced indexing).
    float_control=False takes every branch/loop decision on integers only (see FLOAT_CONTROL): use it where a
    backend's float rounding legitimately differs (reordered float16 sums) and a flipped comparison would
    make `check_backend` compare two different paths."""
    writer = _Writer(draw, max_statements, constructs, eager_compatible, float_control)
    depth = draw(st.integers(1, max_depth)) if constructs else 0
    # At least one control-flow construct at the top: the point of these programs is nested control flow.
    lines = writer.block(depth)
    if constructs and not writer.used:
        lines += writer.construct(draw(st.sampled_from(tuple(constructs))), depth - 1)
    output = draw(st.sampled_from(OUTPUTS))
    source = "\n".join(["def program(x, m, k, W):", "    h, c = x, gnp.astype(k, gdsl.int32)",
                        *["    " + line for line in lines], f"    return {output}"])
    dtype = draw(st.sampled_from(tuple(dtypes)))
    d, r = draw(st.integers(*dims)), draw(st.integers(*rows))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)
    namespace = {"gdsl": gdsl, "gnp": gnp, "np": np, "D": d, "R": r, "DT": dtype,
                 "C_DD": normal(d, d, scale=1 / math.sqrt(d)), "C_D": normal(d), "C_R1": normal(r, 1)}
    exec(compile(source, f"<random program {seed}>", "exec"), namespace)  # noqa: S102 - generated test code
    k = draw(st.integers(0, 4))
    k = np.int32(k) if draw(st.booleans()) else k  # Python ints are weakly typed int32 under jit
    args = (normal(d), normal(r, d), k, normal(d, d, scale=1 / math.sqrt(d)))
    header = f"# D={d} R={r} DT={dtype} (C_DD, C_D, C_R1: numpy constants)\n"
    return RandomProgram(namespace["program"], args, header + textwrap.dedent(source), frozenset(writer.used))
