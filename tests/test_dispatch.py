"""The host path of a repeated jitted call (gdsl/jit.py's fast path, the C-family Executable.fast_path and
the cuda backend's KernelLauncher): the same results as the general path, fresh outputs, and a retrace on
every change of signature (shape, dtype, pytree structure, static argument)."""
import threading

import numpy as np
import pytest
from backend_programs import PROGRAMS
from strategies import assert_trees_close, needs_cxx

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import emulator

HOST_BACKENDS = ("interpret", "cpu")


def general_path(f, *args, **kwargs):
    """`f(*args, **kwargs)` through the general path alone (flatten, key, look up), as before the fast path."""
    return f._call(args, kwargs)


def forbid_general_path(monkeypatch, f):
    """Make a call that leaves the fast path fail the test."""
    def fail(*a, **k):
        raise AssertionError("the call took the general path")
    monkeypatch.setattr(f, "_call", fail)


def poly(x, y):
    return gdsl.fori_loop(0, 3, lambda i, v: v * x + y, x)


def two_results(x, k):
    return x * k, (gnp.sum(x), x[::-1])


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_fast_path_matches_general_path(backend, monkeypatch):
    f = gdsl.jit(poly, backend=backend)
    x, y = np.arange(4, dtype=np.float32), np.float32(2)
    first = f(x, y)                         # general path: traces, loads, enters the fast table
    assert len(f._fast) == 1
    reference = general_path(f, x + 1, y)
    forbid_general_path(monkeypatch, f)
    again = f(x + 1, y)                     # same signature, new values: fast path
    assert_trees_close(again, reference, exact=True)
    assert_trees_close(first, poly(x, y), rtol=1e-6, atol=1e-6)
    assert f.trace_count == 1


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_fast_path_with_statics_scalars_conversions_and_pytree_results(backend, monkeypatch):
    f = gdsl.jit(two_results, backend=backend, static_argnums=1)
    x64 = np.linspace(0, 1, 6)               # float64: converted to the traced float32 on every call
    want = general_path(f, x64, 3)
    f(x64, 3)
    assert f.trace_count == 1 and len(f._fast) == 1
    g = gdsl.jit(lambda x, s: x * s, backend=backend)
    g(np.ones(3, np.float32), 2.5)          # a Python float: weakly typed, converted per call
    scalar_want = general_path(g, np.ones(3, np.float32), 4.0)
    forbid_general_path(monkeypatch, f)
    forbid_general_path(monkeypatch, g)
    got = f(x64, 3)
    assert isinstance(got, tuple) and isinstance(got[1], tuple)
    assert_trees_close(got, want, exact=True)
    assert_trees_close(g(np.ones(3, np.float32), 4.0), scalar_want, exact=True)
    assert f.trace_count == g.trace_count == 1


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_changed_signature_retraces(backend):
    f = gdsl.jit(lambda x, n: x[:n] + 1, backend=backend, static_argnums=1)
    x = np.arange(6, dtype=np.float32)
    f(x, 2)
    f(x, 2)
    assert f.trace_count == 1
    assert f(np.arange(8, dtype=np.float32), 2).shape == (2,)        # new shape
    assert f.trace_count == 2
    assert f(np.arange(6, dtype=np.int32), 2).dtype == np.int32      # new dtype
    assert f.trace_count == 3
    assert f(x, 3).shape == (3,)                                     # new static value
    assert f.trace_count == 4
    h = gdsl.jit(lambda t: t[0] + 1 if isinstance(t, (tuple, list)) else t + 1, backend=backend)
    h(x)
    h((x,))                                                          # new pytree structure
    h([x])
    assert h.trace_count == 3
    for _ in range(3):                                               # all still cached
        f(x, 2), f(np.arange(8, dtype=np.float32), 2), h(x), h((x,)), h([x])
    assert f.trace_count == 4 and h.trace_count == 3


def test_python_scalar_types_are_distinct_signatures():
    f = gdsl.jit(lambda s: s * 2, backend="interpret")
    assert f(3).dtype == np.int32 and f(True).dtype == np.int32     # bool * 2 promotes to int
    assert f(1.5).dtype == np.float32
    assert f.trace_count == 3
    assert int(f(7)) == 14 and float(f(0.25)) == 0.5 and f.trace_count == 3


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_pytree_arguments_take_the_fast_path(backend, monkeypatch):
    def model(w, xs, none, scale):
        h = xs[0] @ w["W"] + w["b"]
        return {"h": h * scale, "rest": [x * 2 for x in xs[1:]]}
    f = gdsl.jit(model, backend=backend)
    w = {"b": np.ones(3, np.float32), "W": np.arange(6, dtype=np.float32).reshape(2, 3)}
    xs = (np.ones((1, 2), np.float32), np.arange(2.0), np.float32(3))     # a float64 leaf: converted
    f(w, xs, None, 0.5)
    assert len(f._fast) == 1
    w2 = {"W": w["W"] + 1, "b": w["b"] * 3}
    want = general_path(f, w2, xs, None, 0.25)
    forbid_general_path(monkeypatch, f)
    got = f(w2, xs, None, 0.25)
    assert_trees_close(got, want, exact=True)
    assert f.trace_count == 1


def test_pytree_changes_miss_the_fast_table():
    f = gdsl.jit(lambda t: sum(gnp.sum(v) for v in (t.values() if isinstance(t, dict) else t)),
                 backend="interpret")
    x = np.ones(2, np.float32)
    variants = [{"a": x, "b": x}, {"a": x, "c": x}, {"a": x, "b": x, "c": x}, (x, x), [x, x], (x, (x,)),
                (x, [x]), (x, x, x), (x, np.ones(3, np.float32)), (x, np.ones(2, np.int32))]
    for k, v in enumerate(variants):
        f(v)
        f(v)
        assert f.trace_count == k + 1, f"{v!r} should be a new signature"


def weighted_sum(w, xs):
    return sum(gnp.sum(v) * (k + 1) for k, v in enumerate(w[n] for n in sorted(w))) + \
        sum(gnp.sum(x) for x in xs)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_many_array_children_keyed_at_once(backend, monkeypatch):
    """A dict of many weights and a list of arrays: keyed as one entry each (jit._children_key); every change
    of one leaf's shape or dtype, or of the keys, is still a new signature, and a dict built in another key
    order is the same one, its leaves in sorted-key order."""
    rng = np.random.default_rng(0)
    w = {f"layer{k:02d}": rng.standard_normal((k % 3 + 1, 2)).astype(np.float32) for k in range(24)}
    xs = [np.ones(3, np.float32), np.arange(2, dtype=np.float32)]
    f = gdsl.jit(weighted_sum, backend=backend)
    f(w, xs)                                 # enters the key with the children keyed at once
    assert f.trace_count == 1 and len(f._fast) == 1
    reordered = dict(reversed(list(w.items())))
    want = general_path(f, reordered, xs)
    with monkeypatch.context() as m:
        forbid_general_path(m, f)
        assert_trees_close(f(reordered, xs), want, exact=True)
    np.testing.assert_allclose(f(reordered, xs), weighted_sum(w, xs), rtol=1e-5)
    changes = [
        {**w, "layer05": np.ones((7, 2), np.float32)},              # one leaf's shape
        {**w, "layer05": np.ones(w["layer05"].shape, np.int32)},    # one leaf's dtype
        {k: v for k, v in w.items() if k != "layer05"},             # a key less
        {**w, "extra": np.ones(1, np.float32)},                     # a key more
    ]
    for k, changed in enumerate(changes):
        for _ in range(2):
            got = f(changed, xs)
        assert f.trace_count == k + 2, f"change {k} should be a new signature"
        np.testing.assert_allclose(got, weighted_sum(changed, xs), rtol=1e-5)
    for _ in range(2):
        got = f(w, [xs[0], np.ones(5, np.float32)])                 # a list child's shape
    assert f.trace_count == len(changes) + 2
    np.testing.assert_allclose(got, weighted_sum(w, [xs[0], np.ones(5, np.float32)]), rtol=1e-5)


def test_input_pointers_reused_only_for_the_same_unconverted_arguments():
    """cuda's _InputPointers (no GPU needed: fake arrays): a call with the very arguments of the last one
    takes the pointers found then; a new object, or an argument that to_device converted, is looked at again."""
    from gdsl.backends.cuda import _InputPointers

    class Fake:
        def __init__(self, ptr):
            self.data = type("Pointer", (), {"ptr": ptr})()
    seen = []

    def to_device(x, aval):
        seen.append(x)
        return x if isinstance(x, Fake) else Fake(1000 + len(seen))    # a copy for anything else
    inputs = _InputPointers(to_device, [None, None])
    a, b = Fake(1), Fake(2)
    assert inputs([a, b])[0] == [1, 2] and len(seen) == 2
    assert inputs([a, b])[0] == [1, 2] and len(seen) == 2             # the same objects: not looked at
    c = Fake(3)
    assert inputs([a, c])[0] == [1, 3] and len(seen) == 4             # a new object: all looked at again
    host = np.zeros(2)
    first, arrays = inputs([a, host])
    assert arrays[0] is a and arrays[1].data.ptr == first[1]         # the copy, for the caller to hold
    again, _ = inputs([a, host])                                       # converted: copied on every call
    assert first[1] != again[1] and len(seen) == 8


def test_namedtuple_and_keyword_calls_keep_the_general_path():
    import collections
    Pair = collections.namedtuple("Pair", "a b")
    g = gdsl.jit(lambda p: p.a + p.b, backend="interpret")
    g(Pair(np.ones(2, np.float32), np.ones(2, np.float32)))
    g(Pair(np.ones(2, np.float32), np.ones(2, np.float32)))
    assert g._fast == {} and g.trace_count == 1


def test_keyword_calls_keep_the_general_path():
    f = gdsl.jit(lambda t, *, s: t["a"] * s, backend="interpret")
    x = np.ones(2, np.float32)
    f({"a": x}, s=np.float32(2))
    f({"a": x}, s=np.float32(3))
    assert f._fast == {} and f.trace_count == 1


def test_unhashable_static_still_raises():
    f = gdsl.jit(lambda x, n: x * len(n), backend="interpret", static_argnums=1)
    f(np.ones(2, np.float32), (1, 2))
    with pytest.raises(TypeError, match="hashable"):
        f(np.ones(2, np.float32), [1, 2])


def test_default_backend_is_part_of_the_fast_key(monkeypatch):
    f = gdsl.jit(lambda x: x + 1)
    x = np.ones(2, np.float32)
    monkeypatch.setenv("GDSL_BACKEND", "interpret")
    f(x), f(x)
    monkeypatch.setenv("GDSL_BACKEND", "cpu")
    f(x), f(x)
    assert f.trace_count == 2 and {key[0] for key in f._fast} == {"interpret", "cpu"}


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_results_are_fresh_arrays(backend):
    f = gdsl.jit(lambda x: x * 2, backend=backend)
    x = np.ones(4, np.float32)
    a, b = f(x), f(x)
    assert a is not b and not np.shares_memory(a, b) and not np.shares_memory(a, x)
    a[:] = 0
    np.testing.assert_array_equal(f(x), np.full(4, 2, np.float32))
    np.testing.assert_array_equal(b, np.full(4, 2, np.float32))


def test_threads_calling_a_new_signature_trace_once():
    f = gdsl.jit(lambda x: x + 1, backend="cpu")
    x = np.arange(5, dtype=np.float32)
    barrier = threading.Barrier(4)
    results = []

    def worker():
        barrier.wait()
        for _ in range(20):
            results.append(f(x))
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert f.trace_count == 1 and len(results) == 80
    for r in results:
        np.testing.assert_array_equal(r, x + 1)


# ------------------------------------------------------------- the C-family executable's fast path
@needs_cxx
@pytest.mark.parametrize("name", ["elementwise_float", "conversions", "matmuls", "structural", "tiny", "large",
                                  "loop", "recursion"])
def test_executable_fast_path_matches_call(name):
    """Executable.fast_path() (on the g++ emulator device) gives what Executable.__call__ gives, or is None
    for a plan it does not cover (host control)."""
    from gdsl.backends.cfamily.executor import Executable
    from gdsl.backends.cfamily.lower import check_options, lower_with_grid
    from gdsl.jit import _as_dtype, leaf_aval, make_ir
    from gdsl.tracing.pytree import tree_flatten
    fn, args = PROGRAMS[name]
    program = make_ir(fn)(*args)
    flat = [_as_dtype(x, leaf_aval(x)) for x in tree_flatten((tuple(args), {}))[0]]
    for control in ("device", "host"):
        opts = check_options({"control": control, "block": 64}, emulator.EmulatorDialect)
        lowering = lower_with_grid(program, opts, 4, emulator.EmulatorDialect())
        executable = Executable(lowering.plan, lowering.rendered, emulator.EmulatedDevice())
        run = executable.fast_path()
        if control == "host":
            assert run is None
            continue
        assert run is not None
        want = executable(flat)
        for _ in range(2):
            got = run(flat)
            assert len(got) == len(want)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)


@needs_cxx
def test_executable_fast_path_raises_on_recursion_overflow():
    """A recursive plan's fast path reads the kernel's error word after every launch: a call deeper than
    max_depth raises RecursionDepthError (never returns results), and a call within it returns them."""
    from gdsl.backends.cfamily.executor import Executable
    from gdsl.backends.cfamily.lower import check_options, lower_with_grid
    from gdsl.errors import RecursionDepthError
    from gdsl.jit import _as_dtype, leaf_aval, make_ir
    from gdsl.tracing.pytree import tree_flatten
    fn, deep = PROGRAMS["recursion_overflow"]
    _, shallow = PROGRAMS["recursion_depth_ok"]
    program = make_ir(fn)(*shallow)
    opts = check_options({"control": "device", "block": 64}, emulator.EmulatorDialect)
    lowering = lower_with_grid(program, opts, 4, emulator.EmulatorDialect())
    executable = Executable(lowering.plan, lowering.rendered, emulator.EmulatedDevice())
    run = executable.fast_path()
    flat = {name: [_as_dtype(x, leaf_aval(x)) for x in tree_flatten((tuple(args), {}))[0]]
            for name, args in (("deep", deep), ("shallow", shallow))}
    want = executable(flat["shallow"])
    for _ in range(2):
        with pytest.raises(RecursionDepthError):
            run(flat["deep"])
        for g, w in zip(run(flat["shallow"]), want):
            np.testing.assert_array_equal(g, w)


def test_executable_fast_path_when_an_output_is_an_input():
    """A result that is an argument or a constant as is still comes back as a fresh array."""
    pytest.importorskip("ctypes")
    if emulator.cxx() is None:
        pytest.skip("the CPU emulator needs g++ (C++20)")
    from gdsl.backends.cfamily.executor import Executable
    from gdsl.backends.cfamily.lower import check_options, lower_with_grid
    from gdsl.jit import make_ir
    const = np.arange(3, dtype=np.float32)

    def fn(x, y):
        return x, y + 1, gnp.asarray(const)
    x, y = np.arange(4, dtype=np.float32), np.ones(2, np.float32)
    program = make_ir(fn)(x, y)
    opts = check_options({"control": "device", "block": 64}, emulator.EmulatorDialect)
    lowering = lower_with_grid(program, opts, 2, emulator.EmulatorDialect())
    executable = Executable(lowering.plan, lowering.rendered, emulator.EmulatedDevice())
    run = executable.fast_path()
    want = executable([x, y])
    got = run([x, y])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert not np.shares_memory(got[0], x)


# ------------------------------------------------------------------------------------------ bound arguments
def layer(w, x, k):
    return gnp.tanh(x @ w["a"]) * k + w["b"]


def _weights(n=6):
    rng = np.random.default_rng(n)
    return {"a": rng.standard_normal((n, n)).astype(np.float32), "b": rng.standard_normal(n).astype(np.float32)}


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_bound_calls_are_the_unbound_calls(backend, monkeypatch):
    """f.bind(w)(x, k) is f(w, x, k): results, signatures (a new shape traces once more), Python scalars converted;
    from the second call of a signature on it never enters f's key or general path."""
    f = gdsl.jit(layer, backend=backend)
    w, x = _weights(), np.ones((2, 6), np.float32)
    g = f.bind(w)
    assert_trees_close(g(x, 2.0), general_path(f, w, x, 2.0), exact=True)
    x3 = np.linspace(0, 1, 18, dtype=np.float32).reshape(3, 6)
    want3 = general_path(f, w, x3, 0.5)
    assert_trees_close(g(x3, 0.5), want3, exact=True)
    assert f.trace_count == 2 and len(g._table) == 2
    forbid_general_path(monkeypatch, f)
    monkeypatch.setattr(f, "_fast_signature", lambda args, start=0, real=f._fast_signature:
                        real(args, start) if start else pytest.fail("f keyed the bound weights"))
    assert_trees_close(g(x3, 0.5), want3, exact=True)
    assert_trees_close(g.lower(x3, 0.5).plan, f.lower(w, x3, 0.5).plan)


def test_bound_arrays_share_values_and_keep_their_shapes():
    """Values written in place after bind are seen; the bound arguments' shapes are the ones at bind time
    (views), so an in-place reshape of the caller's array does not reach them; keyword calls and statics
    among the rest take f's path."""
    f = gdsl.jit(layer, backend="interpret", static_argnums=2)
    w, x = _weights(), np.ones((2, 6), np.float32)
    g = f.bind(w)
    g(x, 3)
    w["a"][0, 0] += 1.0
    assert_trees_close(g(x, 3), general_path(f, w, x, 3), exact=True)
    shape = w["b"].shape
    w["b"].shape = (2, 3)
    assert g._args[0]["b"].shape == shape
    w["b"].shape = shape
    assert_trees_close(g(x, k=3), general_path(f, w, x, k=3), exact=True)
    assert_trees_close(g(x, 4), general_path(f, w, x, 4), exact=True)
    assert len(g._table) == 2            # (3 and 4: two static values)


# ------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["elementwise_float", "conversions", "reductions", "matmuls", "large", "loop",
                                  "recursion", "heads"])
@pytest.mark.parametrize("control", ["device", "host"])
def test_gpu_fast_path_matches_general_path(name, control, monkeypatch):
    import cupy
    fn, args = PROGRAMS[name]
    f = gdsl.jit(fn, backend="cuda", control=control)
    dev_args = [cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
    first = gdsl.to_numpy(f(*dev_args))
    general = gdsl.to_numpy(general_path(f, *dev_args))
    if f._fast:
        forbid_general_path(monkeypatch, f)
    fast = [f(*dev_args) for _ in range(3)]
    for out in fast:
        assert_trees_close(gdsl.to_numpy(out), general, exact=True)
    assert_trees_close(first, general, exact=True)
    assert f.trace_count == 1


@pytest.mark.gpu
def test_gpu_fast_path_raises_on_recursion_overflow(monkeypatch):
    """cuda's fast path of a recursive plan reads the error word (word_reader) after every launch."""
    import cupy

    from gdsl.errors import RecursionDepthError
    fn, deep = PROGRAMS["recursion_overflow"]
    _, shallow = PROGRAMS["recursion_depth_ok"]
    on_gpu = [[cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in args] for args in (deep, shallow)]
    f = gdsl.jit(fn, backend="cuda")
    want = gdsl.to_numpy(f(*on_gpu[1]))
    f(*on_gpu[1])
    forbid_general_path(monkeypatch, f)
    for _ in range(2):
        with pytest.raises(RecursionDepthError):
            f(*on_gpu[0])
        assert_trees_close(gdsl.to_numpy(f(*on_gpu[1])), want, exact=True)


@pytest.mark.gpu
def test_gpu_results_fresh_and_launch_from_a_new_thread():
    import cupy
    f = gdsl.jit(lambda x: x * 2, backend="cuda")
    x = cupy.arange(8, dtype=cupy.float32)
    a, b = f(x), f(x)
    assert a.data.ptr != b.data.ptr
    a[:] = 0
    np.testing.assert_array_equal(gdsl.to_numpy(b), np.arange(8, dtype=np.float32) * 2)
    got = []
    t = threading.Thread(target=lambda: got.append(gdsl.to_numpy(f(x))))
    t.start()
    t.join()
    np.testing.assert_array_equal(got[0], np.arange(8, dtype=np.float32) * 2)


@pytest.mark.gpu
def test_gpu_results_recycled_only_when_dropped():
    """cuda's OutputRecycler on real CuPy arrays: a dropped result's memory comes back, a kept one, a viewed
    one or one of another stream never does, and every result holds its own values."""
    import cupy
    f = gdsl.jit(lambda x: x * 2, backend="cuda")
    x = cupy.arange(8, dtype=cupy.float32)
    want = np.arange(8, dtype=np.float32) * 2
    f(x)                                            # the general path: traces, loads
    kept = f(x)
    dropped = f(x).data.ptr                         # this result is dropped at once
    again = f(x)
    assert again.data.ptr == dropped != kept.data.ptr
    view = again[2:]
    del again
    fresh = f(x)
    assert fresh.data.ptr not in (kept.data.ptr, dropped)
    with cupy.cuda.Stream() as stream:
        del fresh
        on_stream = f(x)                            # another stream: never a set written on the old one
        stream.synchronize()
    assert on_stream.data.ptr not in (kept.data.ptr, dropped)
    np.testing.assert_array_equal(gdsl.to_numpy(kept), want)
    np.testing.assert_array_equal(gdsl.to_numpy(view), want[2:])
    np.testing.assert_array_equal(gdsl.to_numpy(on_stream), want)
    y = x
    for _ in range(5):                              # a result fed back as the input
        y = f(y)
    np.testing.assert_array_equal(gdsl.to_numpy(y), np.arange(8, dtype=np.float32) * 32)


@pytest.mark.gpu
def test_gpu_dispatch_bench_measures_the_breakdown(tmp_path):
    """benchmarks/dispatch_bench.py --backends cuda --json OUT runs and records every case and each step of
    the flat case's call."""
    import importlib.util
    import json
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "dispatch_bench.py"
    spec = importlib.util.spec_from_file_location("dispatch_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "dispatch.json"
    assert bench.main(["--backends", "cuda", "--calls", "200", "--repeats", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"flat", "two-args", "static", "pytree", "numpy-in"} <= {r["case"] for r in data["rows"]
                                                                  if r["backend"] == "cuda"}
    steps = {row["step"]: row for row in data["breakdown"]}
    assert steps["f(x): the whole call"]["host_us"] > steps["bare driver launch"]["host_us"] > 0
    assert steps["GPU time per launch"]["event_us"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("control", ["device", "host"])
def test_gpu_bound_calls_are_the_unbound_calls(control, monkeypatch):
    import cupy
    f = gdsl.jit(layer, backend="cuda", control=control)
    w = {k: cupy.asarray(v) for k, v in _weights().items()}
    x = cupy.ones((2, 6), cupy.float32)
    g = f.bind(w)
    want = gdsl.to_numpy(general_path(f, w, x, 2.0))
    assert_trees_close(gdsl.to_numpy(g(x, 2.0)), want, exact=True)
    forbid_general_path(monkeypatch, f)
    for _ in range(3):
        assert_trees_close(gdsl.to_numpy(g(x, 2.0)), want, exact=True)
    w["a"][0, 0] += 1.0
    assert not np.array_equal(gdsl.to_numpy(g(x, 2.0)), want)
