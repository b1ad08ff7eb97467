"""Limits and guarantees (issue 14, docs/guide.md "Limits and guarantees"): deep recursion, loops at the
edge of the integer range, unsupported dtypes, validation of options and arguments. Programs that used to
crash the process or hang run in a subprocess with a time limit, so such a failure is a failed test."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from strategies import requires_backend

import gdsl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_isolated(code: str, timeout: float = 240) -> str:
    """Run `code` in a fresh Python from the repository root; its stdout (asserting a clean exit)."""
    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not finish within {timeout} s")
    assert done.returncode == 0, f"exit status {done.returncode}\n{done.stderr[-3000:]}"
    return done.stdout


# -- item 2: the interpreter's recursion is bounded by max_depth and memory, not by the C stack -----------

_COUNT_DOWN = """
    import numpy as np
    import gdsl

    def count_down(max_depth):
        @gdsl.recurse(result=gdsl.ShapeDtype((), gdsl.int32), max_depth=max_depth)
        def g(k):
            return gdsl.cond(k > 0, lambda: g(k - 1) + 1, lambda: k)
        return g
"""


def test_interpreter_raises_recursion_depth_error_past_max_depth_instead_of_crashing():
    out = run_isolated(_COUNT_DOWN + """
    g = count_down(5000)
    f = gdsl.jit(lambda n: g(n), backend="interpret")
    for _ in range(3):
        try:
            f(np.int32(5001))
        except gdsl.RecursionDepthError:
            print("raised")
    print(int(f(np.int32(4999))))   # 5000 frames: exactly max_depth
    """)
    assert out.split() == ["raised"] * 3 + ["4999"]


def test_interpreter_and_eager_calls_recurse_deeper_than_the_python_stack():
    out = run_isolated(_COUNT_DOWN + """
    g = count_down(10**6)
    print(int(gdsl.jit(lambda n: g(n), backend="interpret")(np.int32(30000))))
    print(int(g(np.int32(20000))))  # eager: the same interpreter
    """)
    assert out.split() == ["30000", "20000"]


# -- item 3: unrolled fori_loop next to the integer maximum ---------------------------------------------


@pytest.mark.parametrize("backend", ["interpret", pytest.param("cpu", marks=requires_backend("cpu"))])
def test_unrolled_fori_loop_ends_next_to_the_integer_maximum(backend):
    out = run_isolated(f"""
    import numpy as np
    import gdsl
    for unroll in (2, 3, 8):
        f = gdsl.jit(lambda lo, hi: gdsl.fori_loop(lo, hi, lambda i, c: c + 1, 0), unroll=unroll,
                     backend={backend!r})
        print(int(f(2**31 - 6, 2**31 - 1)), int(f(-2**31, -2**31 + 1)), int(f(-2**31, -2**31 + 7)),
              int(f(np.int64(2**63 - 6), np.int64(2**63 - 1))), int(f(5, 3)))
    """, timeout=300)
    assert out.split() == ["5", "1", "7", "5", "0"] * 3


# -- item 20: validation and clear errors -----------------------------------------------------------------


def test_interpret_results_never_alias_the_arguments():
    x = np.arange(4, dtype=np.float32)
    same, reshaped = gdsl.jit(lambda x: (x, x.reshape(2, 2)), backend="interpret")(x)
    assert same is not x and not np.shares_memory(same, x)
    assert not np.shares_memory(reshaped, x)
    same[0] = 42.0
    assert x[0] == 0.0


# -- item 8: unsigned integers that do not fit a signed one are refused, never wrapped --------------------


@pytest.mark.parametrize("backend", ["interpret", pytest.param("cpu", marks=requires_backend("cpu"))])
@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_uint32_and_uint64_inputs_are_refused_naming_the_dtype(backend, dtype):
    f = gdsl.jit(lambda x: x + 0, backend=backend)
    with pytest.raises(TypeError, match=f"unsigned dtype {np.dtype(dtype).name}"):
        f(np.array([3_000_000_000], dtype))
    with pytest.raises(TypeError, match=np.dtype(dtype).name):
        f(dtype(5))


def test_narrow_unsigned_and_big_endian_inputs_convert_exactly():
    f = gdsl.jit(lambda x: x + 0, backend="interpret")
    assert f(np.array([255, 65535], np.uint16)).tolist() == [255, 65535]
    assert f(np.array([1.5, -2.0], ">f4")).tolist() == [1.5, -2.0]
    assert f(np.array([7, -2], ">i4")).tolist() == [7, -2]
    assert f(np.array([2**40], ">i8")).tolist() == [2**40]


# -- item 9: integer powers with a negative exponent ------------------------------------------------------


def test_integer_power_with_a_negative_literal_exponent_raises_as_numpy():
    x = np.array([2, 3], np.int32)
    for fn in (lambda x: x ** -1, lambda x: gdsl.numpy.power(x, np.array([1, -2]))):
        with pytest.raises(ValueError, match="negative integer powers.*test_limits.py"):
            gdsl.jit(fn, backend="interpret")(x)
    with pytest.raises(ValueError, match="negative integer powers"):
        gdsl.numpy.power(x, -2)  # eager
    assert gdsl.jit(lambda x: x ** -1, backend="interpret")(x.astype(np.float32)).tolist() == [0.5, 1 / np.float32(3)]


@pytest.mark.parametrize("backend", ["interpret", pytest.param("cpu", marks=requires_backend("cpu"))])
def test_integer_power_with_a_negative_traced_exponent_is_one_on_every_backend(backend):
    # Compiled code cannot raise; the documented result is x ** max(e, 0) (docs/guide.md).
    f = gdsl.jit(lambda x, e: x ** e, backend=backend)
    assert f(np.array([2, -1, 0, 5], np.int32), np.int32(-1)).tolist() == [1, 1, 1, 1]


# -- item 10: a Python scalar as a loop's initial carry is weakly typed -----------------------------------


@pytest.mark.parametrize("backend", ["interpret", pytest.param("cpu", marks=requires_backend("cpu"))])
def test_python_scalar_loop_carry_takes_the_dtype_the_body_gives_it(backend):
    sum_to = gdsl.jit(lambda n: gdsl.fori_loop(0, n, lambda i, t: t + i, 0), backend=backend)(np.int64(6))
    assert sum_to.dtype == np.int64 and sum_to == 15
    count = gdsl.jit(lambda inc: gdsl.while_loop(lambda v: v < 2, lambda v: v + inc, 0),
                     backend=backend)(np.int64(1))
    assert count.dtype == np.int64 and count == 2
    total = gdsl.jit(lambda h: gdsl.fori_loop(0, 1000, lambda i, v: v + h, 0.0), backend=backend)(np.float16(0.1))
    expected = np.float16(0.0)
    for _ in range(1000):
        expected = np.float16(expected + np.float16(0.1))  # float16 accumulation, as numpy does it
    assert total.dtype == np.float16 and total == expected  # 105.2, where a float32 carry gives 99.98


def test_python_scalar_carry_keeps_its_default_dtype_when_the_body_does():
    out = gdsl.jit(lambda x: gdsl.fori_loop(0, 3, lambda i, v: (v[0] + 1, v[1] * 2.0), (0, 1.0)),
                   backend="interpret")(np.float32(0))
    assert [o.dtype for o in out] == [np.int32, np.float32] and [o.item() for o in out] == [3, 8.0]
    # a float carry does not become an integer one
    with pytest.raises(TypeError, match="fori_loop: body_fun must keep init_val's types"):
        gdsl.jit(lambda n: gdsl.fori_loop(0, n, lambda i, v: i, 0.0), backend="interpret")(np.int32(3))


def test_fori_loop_body_type_errors_name_fori_loop_without_the_counter():
    with pytest.raises(TypeError, match=r"fori_loop: body_fun must keep init_val's types \(f32\[\]\), got "
                                        r"\(i32\[\]\) \(at .*test_limits.py"):
        gdsl.jit(lambda x: gdsl.fori_loop(0, 3, lambda i, v: v.astype(gdsl.int32), x), backend="interpret")(
            np.float32(1))
    with pytest.raises(TypeError, match="fori_loop: body_fun must return the structure of init_val"):
        gdsl.jit(lambda x: gdsl.fori_loop(0, 3, lambda i, v: (v, v), x), backend="interpret")(np.float32(1))


@pytest.mark.parametrize("options, error", [
    (dict(grid=0), ValueError), (dict(block=0), ValueError), (dict(grid=-3), ValueError),
    (dict(block=-1), ValueError), (dict(unroll=0), ValueError), (dict(unroll=-2), ValueError),
    (dict(grid=2.0), TypeError), (dict(block="64"), TypeError), (dict(unroll=True), TypeError),
    (dict(control="bogus"), ValueError), (dict(partition="yes"), ValueError), (dict(autotune="x"), ValueError),
])
@pytest.mark.parametrize("backend", ["interpret", "cpu", "cuda", "hip"])
def test_bad_option_values_are_refused_on_every_backend(options, error, backend):
    (name,) = options
    with pytest.raises(error, match=f"gdsl.jit: {name} must be"):
        gdsl.jit(lambda x: x, backend=backend, **options)


def test_good_option_values_are_accepted():
    f = gdsl.jit(lambda x: x + 1, backend="interpret", grid=np.int64(2), block=64, unroll=3, control="host",
                 partition=np.bool_(True), autotune=False)
    assert f(np.int32(1)) == 2


@pytest.mark.parametrize("max_depth, error", [(1.5, TypeError), ("8", TypeError), (True, TypeError),
                                              (0, ValueError)])
def test_max_depth_must_be_a_positive_int(max_depth, error):
    with pytest.raises(error, match="max_depth"):
        gdsl.recurse(lambda k: k, result=gdsl.ShapeDtype((), gdsl.int32), max_depth=max_depth)


@pytest.mark.parametrize("index", [1.0, np.float32(1), (0, 1.5), np.array([0.0, 1.0])])
def test_float_indices_are_refused_as_numpy_refuses_them(index):
    with pytest.raises(IndexError, match=r"valid indices.*test_limits.py"):
        gdsl.jit(lambda x: x[index], backend="interpret")(np.ones((3, 2), np.float32))
    with pytest.raises(IndexError, match="valid indices"):
        gdsl.jit(lambda x: x.at[index].set(0.0), backend="interpret")(np.ones((3, 2), np.float32))


def test_traced_index_into_more_than_int32_elements_is_widened_to_int64():
    big = gdsl.ShapeDtype((2**31 + 10,), gdsl.float32)  # traced only: nothing of that size is allocated
    for fn in (lambda x, i: x[i], lambda x, i: x.at[i].set(1.0), lambda x, i: x.at[i].get()):
        ir = str(gdsl.make_ir(fn)(big, np.int32(3)))
        assert "convert_element_type[new_dtype=i64]" in ir and " 2147483658:i64[]" in ir, ir
    ir = str(gdsl.make_ir(lambda x: x[2**31 + 3])(big))
    assert "start=(2147483651,)" in ir, ir


@pytest.mark.parametrize("method", ["item", "tolist"])
def test_item_and_tolist_of_a_tracer_are_concretization_errors(method):
    with pytest.raises(gdsl.ConcretizationError, match=rf"\.{method}\(\) on a traced value at .*test_limits"):
        gdsl.jit(lambda x: getattr(x, method)(), backend="interpret")(np.float32(1))


def test_numpy_reductions_of_a_tracer_trace_the_gdsl_reduction():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    f = gdsl.jit(lambda x: (np.sum(x), np.sum(x, axis=1), np.max(x, axis=0), np.mean(x), np.argmax(x, axis=1)),
                 backend="interpret")
    got = f(x)
    for g, e in zip(got, (x.sum(), x.sum(axis=1), x.max(axis=0), x.mean(), x.argmax(axis=1))):
        np.testing.assert_array_equal(g, e)
    with pytest.raises(TypeError, match=r"initial is not supported \(at .*test_limits.py"):
        gdsl.jit(lambda x: np.min(x, initial=3.0), backend="interpret")(x)


@pytest.mark.parametrize("call, words", [
    (lambda x: gdsl.cond(None, lambda: x, lambda: x), "cond: pred must be"),
    (lambda x: gdsl.cond("abc", lambda: x, lambda: x), "cond: pred must be"),
    (lambda x: gdsl.cond(len, lambda: x, lambda: x), "cond: pred must be"),
    (lambda x: gdsl.switch(len, [lambda: x]), "switch: index must be"),
    (lambda x: gdsl.cond(x > 0, 1, lambda: x), "cond: true_fun must be a function"),
    (lambda x: gdsl.switch(1, [lambda: x, 3]), r"switch: branches\[1\] must be a function"),
    (lambda x: gdsl.switch(1, lambda: x), "switch: branches must be a sequence"),
])
def test_cond_and_switch_name_themselves_for_a_bad_predicate_or_branch(call, words):
    with pytest.raises(TypeError, match=rf"{words}.*\(at .*test_limits.py"):
        gdsl.jit(call, backend="interpret")(np.float32(1))


def test_concurrent_first_calls_trace_a_signature_once():
    import threading
    import time

    def slow_to_trace(x):
        time.sleep(0.05)  # runs while tracing: the threads overlap there
        return x * 2
    f = gdsl.jit(slow_to_trace, backend="interpret")
    start = threading.Barrier(8)
    results = []

    def call():
        start.wait()
        results.append(f(np.float32(1.5)))
    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [3.0] * 8 and f.trace_count == 1
