"""Arguments of recursive calls passed by reference (Scheduler._shared_arguments): a parameter that every call
passes on unchanged from one program input is that input, read in place by every call, with no copy into
each callee's frame. Arguments the callee changes, functions called from two places, and parameters passed
on through a loop keep their frame copies.

Checked against the interpreter on the plan simulator (its race checks included; device and host control,
several grids), the cpu backend, the C-family CPU emulator (vEUs as threads) and NVRTC; with an argument
the callee modifies, a result that is the argument itself, depth 0 (a leaf at once) and an overflow."""
import numpy as np
import pytest
from strategies import needs_cxx, needs_nvrtc
from test_schedule_recursion import check_simulated, copies_in_functions, flat_args

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import emulator
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.interpreter import run_program
from gdsl.schedule import schedule

H = 64


def passed_on(max_depth=8):
    """f(v, k) = v at k <= 0, else tanh(f(v, k - 1) @ W) + v: v passed on unchanged, and the leaf's result
    is v itself (copied into the result, as before)."""
    def program(x, W, n):
        @gdsl.recurse(result=gdsl.ShapeDtype((H,), gdsl.float32), max_depth=max_depth)
        def f(v, k):
            return gdsl.cond(k <= 0, lambda: v, lambda: gnp.tanh(f(v, k - 1) @ W) + v)
        return f(x, n)
    return program


def modified(max_depth=8):
    """The callee's argument is changed before it is passed on: every call has its own v."""
    def program(x, W, n):
        @gdsl.recurse(result=gdsl.ShapeDtype((H,), gdsl.float32), max_depth=max_depth)
        def f(v, k):
            return gdsl.cond(k <= 0, lambda: v, lambda: gnp.tanh(f(v * 0.5, k - 1) @ W) + v)
        return f(x, n)
    return program


def called_twice(max_depth=8):
    """Two calls from the program with different inputs (each call of a gdsl.recurse function from the
    program defines a function of its own): each shares its own input, the second a static view of W."""
    def program(x, W, n):
        @gdsl.recurse(result=gdsl.ShapeDtype((H,), gdsl.float32), max_depth=max_depth)
        def f(v, k):
            return gdsl.cond(k <= 0, lambda: v, lambda: gnp.tanh(f(v, k - 1) @ W) + v)
        return f(x, n) + f(W[0], n - 1)
    return program


def mixed(max_depth=8):
    """Two calls in the body, one passing v on and one changing it: every call has its own v."""
    def program(x, W, n):
        @gdsl.recurse(result=gdsl.ShapeDtype((H,), gdsl.float32), max_depth=max_depth)
        def f(v, k):
            return gdsl.cond(k <= 0, lambda: v, lambda: gnp.tanh(f(v, k - 1) @ W) + f(v * 0.5, k - 2))
        return f(x, n)
    return program


def through_a_loop(max_depth=8):
    """v passed on from inside a loop of the body: the loop's binders are not followed (copied)."""
    def program(x, W, n):
        @gdsl.recurse(result=gdsl.ShapeDtype((H,), gdsl.float32), max_depth=max_depth)
        def f(v, k):
            def inner():
                return gdsl.fori_loop(0, 1, lambda i, acc: acc + gnp.tanh(f(v, k - 1) @ W), v)
            return gdsl.cond(k <= 0, lambda: v, inner)
        return f(x, n)
    return program


def two_arguments(max_depth=8):
    """Two buffer arguments: `a` passed on unchanged, `b` changed before it is passed on."""
    def program(x, y, W, n):
        @gdsl.recurse(result=gdsl.ShapeDtype((H,), gdsl.float32), max_depth=max_depth)
        def f(a, b, k):
            return gdsl.cond(k <= 0, lambda: a - b, lambda: gnp.tanh(f(a, b * 0.9, k - 1) @ W) + a * b)
        return f(x, y, n)
    return program


def args_of(depth, with_y=False):
    rng = np.random.default_rng(depth)
    x = rng.uniform(-1, 1, H).astype(np.float32)
    W = (rng.standard_normal((H, H)) / np.sqrt(H)).astype(np.float32)
    if with_y:
        return x, rng.uniform(-1, 1, H).astype(np.float32), W, np.int32(depth)
    return x, W, np.int32(depth)


def function_params(plan):
    (f,) = plan.functions
    return [p.storage for p in f.params]


def argument_copies(plan):
    """Copies into a callee's frame (a parameter's storage one or more frames deeper; not a base case's result
    written at its call site into the callee's result, peel.py)."""
    params = {id(p.storage) for f in plan.functions for p in f.params}
    return [op for op in copies_in_functions(plan)
            if op.outputs[0].frame_offset > 0 and id(op.outputs[0].storage) in params]


# ------------------------------------------------------------------------------------------ the plan

def test_an_argument_passed_on_unchanged_is_the_input_itself():
    program = gdsl.make_ir(passed_on())(*args_of(3))
    plan = schedule(program, grid=8)
    v, k = function_params(plan)
    assert v is plan.inputs[0].storage and v.kind == "input"
    assert not argument_copies(plan)
    assert "function f(in0, " in str(plan)
    assert all(op.inputs[0].storage is v for op in copies_in_functions(plan))   # the leaf's result: v itself


@pytest.mark.parametrize("fn", [modified, mixed, through_a_loop])
def test_other_arguments_keep_their_frame_copies(fn):
    program = gdsl.make_ir(fn())(*args_of(3))
    plan = schedule(program, grid=8)
    v, _ = function_params(plan)
    assert v.kind == "frame" and argument_copies(plan)


def test_each_call_from_the_program_shares_its_own_input():
    program = gdsl.make_ir(called_twice())(*args_of(3))
    plan = schedule(program, grid=8)
    assert [f.params[0].storage for f in plan.functions] == [plan.inputs[0].storage, plan.inputs[1].storage]
    assert not argument_copies(plan)


def test_only_the_argument_passed_on_is_shared():
    program = gdsl.make_ir(two_arguments())(*args_of(3, with_y=True))
    a, b, _ = function_params(schedule(program, grid=8))
    assert a.kind == "input" and b.kind == "frame"


# ------------------------------------------------------------------------------------------ results

@pytest.mark.parametrize("depth", [0, 1, 5])
@pytest.mark.parametrize("fn", [passed_on, modified, called_twice, mixed, through_a_loop])
def test_simulated(fn, depth):
    check_simulated(fn(), args_of(depth), grids=(1, 3, 16))


@pytest.mark.parametrize("depth", [0, 4])
def test_two_arguments_simulated(depth):
    check_simulated(two_arguments(), args_of(depth, with_y=True), grids=(1, 3))


def test_overflow_simulated():
    check_simulated(passed_on(max_depth=3), args_of(5), grids=(1, 3))


@pytest.mark.parametrize("fn", [passed_on, two_arguments])
def test_cpu_backend(fn):
    args = args_of(4, with_y=fn is two_arguments)
    got = gdsl.to_numpy(gdsl.jit(fn(), backend="cpu", grid=3)(*args))
    np.testing.assert_allclose(got, run_program(gdsl.make_ir(fn())(*args), flat_args(args))[0],
                               rtol=1e-5, atol=1e-6)


@needs_cxx
@pytest.mark.parametrize("fn", [passed_on, two_arguments])
def test_emulated(fn):
    for depth in (0, 1, 4):
        args = args_of(depth, with_y=fn is two_arguments)
        expected = run_program(gdsl.make_ir(fn())(*args), flat_args(args))[0]
        for grid in (1, 4):
            np.testing.assert_allclose(emulator.emulate(fn(), *args, grid=grid, block=32), expected,
                                       rtol=1e-5, atol=1e-6)


@needs_cxx
def test_emulated_overflow():
    with pytest.raises(gdsl.RecursionDepthError):
        emulator.emulate(passed_on(max_depth=3), *args_of(5), grid=4, block=32)


@needs_nvrtc
def test_cuda_source_compiles():
    source = gdsl.jit(passed_on(), backend="cuda", grid=8).lower(*args_of(3)).source
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"
