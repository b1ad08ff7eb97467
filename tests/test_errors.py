"""Every error of SPEC §1, raised at trace time with the right type and a message naming the user's
file:line. The expected line is the one marked `# <- error` in the function's source."""
import inspect
import os

import numpy as np
import pytest

import gdsl
import gdsl.numpy as gnp

THIS_FILE = os.path.basename(__file__)


def error_line(fn) -> int:
    """The line number of the line marked `# <- error` in `fn`'s source."""
    lines, start = inspect.getsourcelines(fn)
    marked = [start + k for k, line in enumerate(lines) if "# <- error" in line]
    assert len(marked) == 1, f"{fn.__name__} must mark exactly one line"
    return marked[0]


def assert_names_line(exc, fn):
    message = str(exc)
    line = error_line(fn)
    assert f"{THIS_FILE}:{line}" in message, f"expected {THIS_FILE}:{line} in: {message}"


def jit_call(fn, *args):
    return gdsl.jit(fn, backend="interpret")(*args)


X = np.ones(3, np.float32)
S = np.float32(1.5)

# ----------------------------------------------------------------------------------------------------------
# Python control flow on traced values


def python_if(x):
    if gnp.sum(x) > 0:  # <- error
        return x
    return -x


def python_while(x):
    while gnp.sum(x) < 10:  # <- error
        x = x * 2
    return x


def python_bool(x):
    return bool(x)  # <- error


def python_int(x):
    return gnp.zeros(3) * int(x)  # <- error


def python_float(x):
    return x * float(x)  # <- error


def python_and(x):
    return (x > 0) and (x < 2)  # <- error


def python_if_in_loop_body(x):
    def body(i, v):
        if v > i:  # <- error
            return v
        return v + 1
    return gdsl.fori_loop(0, 3, body, x)


def python_range(n):
    total = 0
    for i in range(n):  # <- error
        total = total + i
    return total


@pytest.mark.parametrize("fn, arg, hint", [
    (python_if, X, "gdsl.cond"),
    (python_while, X, "gdsl.while_loop"),
    (python_bool, S, "gdsl.cond"),
    (python_int, S, "gdsl.cond"),
    (python_float, S, "gdsl.while_loop"),
    (python_and, S, "gdsl.cond"),
    (python_if_in_loop_body, S, "gdsl.cond"),
    (python_range, np.int32(3), "gdsl.while_loop"),
], ids=lambda v: getattr(v, "__name__", "") if callable(v) else "")
def test_python_control_flow_on_a_tracer(fn, arg, hint):
    with pytest.raises(gdsl.ConcretizationError) as info:
        jit_call(fn, arg)
    assert isinstance(info.value, TypeError)
    message = str(info.value)
    assert "gdsl.cond" in message and "gdsl.while_loop" in message and hint in message
    assert_names_line(info.value, fn)


def test_concretization_error_when_converting_to_numpy():
    def fn(x):
        return np.sin(np.asarray(x))  # <- error
    with pytest.raises(gdsl.ConcretizationError) as info:
        jit_call(fn, X)
    assert_names_line(info.value, fn)


# ----------------------------------------------------------------------------------------------------------
# type errors: control flow


def branches_differ_in_dtype(x):
    return gdsl.cond(x > 0, lambda: x, lambda: x.astype(gdsl.int32))  # <- error


def branches_differ_in_shape(x):
    return gdsl.cond(x > 0, lambda: gnp.stack([x, x]), lambda: gnp.stack([x, x, x]))  # <- error


def branches_differ_in_structure(x):
    return gdsl.cond(x > 0, lambda: (x, x), lambda: [x, x])  # <- error


def switch_branches_differ(x):
    return gdsl.switch(2, [lambda v: v, lambda v: v, lambda v: v > 0], x)  # <- error


def body_changes_carry_dtype(x):
    return gdsl.while_loop(lambda v: v < 10, lambda v: v.astype(gdsl.float16) * 2, x)  # <- error


def body_changes_carry_shape(x):
    return gdsl.while_loop(lambda v: gnp.sum(v) < 10, lambda v: gnp.broadcast_to(v, (2,)), x)  # <- error


def body_changes_carry_structure(x):
    return gdsl.while_loop(lambda s: s[0] < 10, lambda s: [s[0] + 1, s[1]], (x, x))  # <- error


def fori_body_changes_carry(x):
    return gdsl.fori_loop(0, 3, lambda i, v: v * 0.5, x.astype(gdsl.int32))  # <- error


def cond_fun_not_bool(x):
    return gdsl.while_loop(lambda v: v, lambda v: v - 1, x)  # <- error


def cond_fun_not_scalar(x):
    return gdsl.while_loop(lambda v: v > 0, lambda v: v - 1, gnp.stack([x, x]))  # <- error


@pytest.mark.parametrize("fn, words", [
    (branches_differ_in_dtype, ["cond", "same types", "i32[]", "f32[]"]),
    (branches_differ_in_shape, ["cond", "f32[2]", "f32[3]"]),
    (branches_differ_in_structure, ["cond"]),
    (switch_branches_differ, ["switch", "bool[]"]),
    (body_changes_carry_dtype, ["while_loop", "carry", "f16[]"]),
    (body_changes_carry_shape, ["while_loop", "f32[2]"]),
    (body_changes_carry_structure, ["while_loop", "structure"]),
    (fori_body_changes_carry, ["fori_loop", "init_val", "(i32[]), got (f32[])"]),
    (cond_fun_not_bool, ["cond_fun", "bool"]),
    (cond_fun_not_scalar, ["cond_fun", "bool"]),
], ids=lambda v: getattr(v, "__name__", "") if callable(v) else "")
def test_control_flow_type_errors(fn, words):
    with pytest.raises(TypeError) as info:
        jit_call(fn, S)
    assert not isinstance(info.value, gdsl.ConcretizationError)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
    assert_names_line(info.value, fn)


# ----------------------------------------------------------------------------------------------------------
# type errors: shapes and dtypes


def bad_matmul(x):
    w = gnp.ones((4, 2))
    return gnp.matmul(x, w)  # <- error


def bad_matmul_in_loop_body(x):
    w = gnp.ones((2, 2))
    return gdsl.fori_loop(0, 2, lambda i, v: gnp.tanh(
        gnp.matmul(v, w)), x)  # <- error


def impossible_broadcast(x):
    y = gnp.ones((4,))
    return gnp.add(x, y)  # <- error


def impossible_broadcast_to(x):
    return gnp.broadcast_to(x, (2, 4))  # <- error


def bad_reshape(x):
    return gnp.reshape(x, (4, 2))  # <- error


def bad_concatenate(x):
    return gnp.concatenate([x, gnp.ones((2, 2))])  # <- error


def float_bitwise(x):
    return gnp.bitwise_and(x, x)  # <- error


def bad_einsum(x):
    return gnp.einsum("ij,jk->ik", gnp.reshape(x, (1, 3)), gnp.ones((2, 2)))  # <- error


def bad_axis(x):
    return gnp.sum(x, axis=3)  # <- error


@pytest.mark.parametrize("fn, words", [
    (bad_matmul, ["matmul", "f32[4,2]"]),
    (bad_matmul_in_loop_body, ["matmul"]),
    (impossible_broadcast, ["broadcast", "(3,)", "(4,)"]),
    (impossible_broadcast_to, ["broadcast", "(2, 4)"]),
    (bad_reshape, ["reshape"]),
    (bad_concatenate, ["concatenate"]),
    (float_bitwise, ["bool or integer"]),
    (bad_einsum, ["einsum"]),
    (bad_axis, ["axis"]),
], ids=lambda v: getattr(v, "__name__", "") if callable(v) else "")
@pytest.mark.parametrize("mode", ["jit", "eager"])
def test_shape_and_dtype_errors(fn, words, mode):
    """gdsl.numpy functions raise the same errors eagerly (on numpy arrays) and traced."""
    with pytest.raises(TypeError) as info:
        jit_call(fn, X) if mode == "jit" else fn(X)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
    assert_names_line(info.value, fn)


def operator_matmul(x):
    return x @ gnp.ones((4, 2))  # <- error


def operator_broadcast(x):
    return x * gnp.ones((2, 2))  # <- error


def method_reshape(x):
    return x.reshape(2, 2)  # <- error


def operator_bitwise(x):
    return x | x  # <- error


@pytest.mark.parametrize("fn, word", [(operator_matmul, "matmul"), (operator_broadcast, "broadcast"),
                                      (method_reshape, "reshape"), (operator_bitwise, "bool or integer")],
                         ids=lambda v: getattr(v, "__name__", "") if callable(v) else "")
def test_traced_operator_errors(fn, word):
    with pytest.raises(TypeError, match=word) as info:
        jit_call(fn, X)
    assert_names_line(info.value, fn)


def test_static_index_out_of_range_names_the_line():
    def fn(x):
        return x[7]  # <- error
    with pytest.raises(IndexError) as info:
        jit_call(fn, X)
    assert_names_line(info.value, fn)


# ----------------------------------------------------------------------------------------------------------
# recursion


def make_recursive(result, body):
    return gdsl.recurse(result=result, max_depth=4)(body)


def recursive_wrong_dtype(n):
    f = make_recursive(gdsl.ShapeDtype((), gdsl.float32), lambda k: k * 2)
    return f(n)  # <- error


def recursive_wrong_shape(n):
    f = make_recursive(gdsl.ShapeDtype((2,), gdsl.int32), lambda k: gnp.stack([k, k, k]))
    return f(n)  # <- error


def recursive_wrong_structure(n):
    f = make_recursive((gdsl.ShapeDtype((), gdsl.int32), gdsl.ShapeDtype((), gdsl.int32)), lambda k: k)
    return f(n)  # <- error


def recursive_call_with_wrong_argument_type(n):
    @gdsl.recurse(result=gdsl.ShapeDtype((), gdsl.int32), max_depth=4)
    def f(k):
        return gdsl.cond(k <= 0, lambda: k,
                         lambda: f(gnp.ones(2, gdsl.int32)))  # <- error
    return f(n)


def recursive_call_with_wrong_argument_count(n):
    @gdsl.recurse(result=gdsl.ShapeDtype((), gdsl.int32), max_depth=4)
    def f(k):
        return gdsl.cond(k <= 0, lambda: k,
                         lambda: f(k - 1, k))  # <- error
    return f(n)


@pytest.mark.parametrize("fn, words", [
    (recursive_wrong_dtype, ["result", "f32[]", "i32[]"]),
    (recursive_wrong_shape, ["result", "i32[2]", "i32[3]"]),
    (recursive_wrong_structure, ["result"]),
    (recursive_call_with_wrong_argument_type, ["recursive call", "i32[2]"]),
    (recursive_call_with_wrong_argument_count, ["recursive call"]),
], ids=lambda v: getattr(v, "__name__", "") if callable(v) else "")
def test_recursion_type_errors(fn, words):
    with pytest.raises(TypeError) as info:
        jit_call(fn, np.int32(2))
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
    assert_names_line(info.value, fn)


def test_recurse_result_must_be_shape_dtypes():
    with pytest.raises(TypeError, match="ShapeDtype"):
        gdsl.recurse(result=(np.float32, 3), max_depth=4)(lambda k: k)
    with pytest.raises(ValueError, match="max_depth"):
        gdsl.recurse(result=gdsl.ShapeDtype((), gdsl.int32), max_depth=0)(lambda k: k)


def test_recursion_depth_error_is_a_runtime_error():
    @gdsl.recurse(result=gdsl.ShapeDtype((), gdsl.int32), max_depth=3)
    def down(k):
        return gdsl.cond(k <= 0, lambda: k, lambda: down(k - 1))
    with pytest.raises(gdsl.RecursionDepthError) as info:
        jit_call(lambda n: down(n), np.int32(3))
    assert isinstance(info.value, RuntimeError) and not isinstance(info.value, TypeError)
    assert "max_depth=3" in str(info.value) and "down" in str(info.value)


def test_error_classes():
    assert issubclass(gdsl.ConcretizationError, TypeError)
    assert issubclass(gdsl.RecursionDepthError, RuntimeError)
    assert issubclass(gdsl.BackendUnavailableError, RuntimeError)
    err = gdsl.CompileError("nvrtc failed", log="kernel.cu(3): error: x", source="a\nb", line="b")
    assert isinstance(err, RuntimeError) and (err.log, err.source, err.line) == ("kernel.cu(3): error: x",
                                                                                "a\nb", "b")


@pytest.mark.parametrize("dialect", ["cuda", "hip", "emulator"])
def test_arrays_past_32_bit_indices_are_refused_by_the_c_family(dialect):
    """The C family indexes arrays with 32-bit ints: an array (an input here, a gathered table, an intermediate)
    of more elements than they address is refused before anything is rendered, not read at wrapped indices
    (ShapeDtype: nothing is allocated)."""
    from gdsl.backends.cfamily.emulator import EmulatorDialect
    from gdsl.backends.cfamily.lower import MAX_ELEMENTS, check_options, lower_with_grid
    from gdsl.backends.cuda.dialect import CUDADialect
    from gdsl.backends.hip.dialect import HIPDialect
    d = {"cuda": CUDADialect, "hip": HIPDialect, "emulator": EmulatorDialect}[dialect]()
    opts = check_options({"control": "device", "block": 256, "barrier": "atomic"}, d)

    def lower(fn, *shapes):
        return lower_with_grid(gdsl.make_ir(fn)(*shapes), opts, 8, d)
    table = gdsl.ShapeDtype((2**20 + 8, 4096), gdsl.float32)         # 2**32 + 32768 elements
    rows, w = gdsl.ShapeDtype((64,), gdsl.int32), gdsl.ShapeDtype((4096, 64), gdsl.float32)
    with pytest.raises(ValueError, match=r"32-bit ints: f32\[1048584,4096\] has 4295000064 elements"):
        lower(lambda E, idx, W: E[idx] @ W, table, rows, w)
    with pytest.raises(ValueError, match="use the cpu backend"):            # an intermediate, from a small input
        lower(lambda x: gnp.broadcast_to(x, (2**16, 2**16))[0] * 2.0, gdsl.ShapeDtype((2**16,), gdsl.float32))
    assert lower(lambda x: x * 2.0, gdsl.ShapeDtype((MAX_ELEMENTS,), gdsl.float32)).plan is not None
