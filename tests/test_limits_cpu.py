"""Limits of the CPU backend (issue 14): deep max_depth, Ctrl-C in a runaway loop, long float sums,
low-precision sums and means, and memory given back (the caller's arrays, compiled code, recursion frames).

Programs that crashed or hung the process before the fixes run in a subprocess, so that a regression fails
one test instead of killing the suite."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import weakref

import ml_dtypes
import numpy as np
import pytest
from strategies import requires_backend

import gdsl
import gdsl.numpy as gnp

pytestmark = requires_backend("cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, timeout=120) -> subprocess.CompletedProcess:
    """`code` run by a fresh interpreter with this checkout's gdsl on the path."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


DEEP_RECURSION = """
    import resource
    import numpy as np
    import gdsl

    @gdsl.recurse(result=gdsl.ShapeDtype((), gdsl.int32), max_depth={max_depth})
    def g(k):
        return gdsl.cond(k > 0, lambda: g(k - 1) + 1, lambda: k)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(int(gdsl.jit(g, backend="cpu", control="{control}")(np.int32(10))))
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)   # MiB taken by the call
"""


# ------------------------------------------------------------------------------------ recursion depth

def test_max_depth_in_the_millions_runs_a_shallow_recursion():
    """Item 1: the site stack of 3,000,001 entries was an alloca on the native stack (SIGSEGV)."""
    done = run_python(DEEP_RECURSION.format(max_depth=3_000_000, control="device"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "10"


@pytest.mark.parametrize("control", ["host", "device"])
def test_huge_max_depth_takes_memory_only_for_the_depth_used(control):
    """Item 19: max_depth=10**8 with scalar frames touched 2 GB up front under host control."""
    done = run_python(DEEP_RECURSION.format(max_depth=10**8, control=control))
    assert done.returncode == 0, done.stderr
    result, grown_mib = done.stdout.split()
    assert result == "10"
    assert int(grown_mib) < 300       # compiling takes some; 10**8 frames of 4+ bytes would be 400+ MiB each


def test_recursion_depth_error_still_exact_with_the_workspace_stack():
    @gdsl.recurse(result=gdsl.ShapeDtype((), gdsl.int32), max_depth=1000)
    def g(k):
        return gdsl.cond(k > 0, lambda: g(k - 1) + 1, lambda: k)
    f = gdsl.jit(g, backend="cpu")
    assert int(f(np.int32(999))) == 999      # 1000 calls deep
    with pytest.raises(gdsl.RecursionDepthError):
        f(np.int32(1000))
    assert int(f(np.int32(998))) == 998


# ------------------------------------------------------------------------------------------ Ctrl-C

RUNAWAY_LOOP = """
    import os, signal, sys, threading, time
    print("SIGINT handler", signal.getsignal(signal.SIGINT), "blocked", signal.pthread_sigmask(signal.SIG_BLOCK, []),
          file=sys.stderr, flush=True)
    # (a child inherits an ignored SIGINT across exec, and Python then keeps it ignored: a test run started in the
    # background by a non-interactive shell has SIGINT ignored, POSIX; the test is of Python's usual Ctrl-C)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import numpy as np
    import gdsl

    f = gdsl.jit(lambda x: gdsl.while_loop(lambda v: v.reshape(-1)[0] > -1.0, lambda v: v * 1.5 + 1.0, x),
                 backend="cpu", {options})
    start, stop = np.full({shape}, 0.0, np.float32), np.full({shape}, -5.0, np.float32)
    f(stop)                         # compiled and run once (the loop ends at once)
    print("compiled", file=sys.stderr, flush=True)
    sent = []

    def interrupt():
        time.sleep(0.5)
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=interrupt, daemon=True).start()
    try:
        f(start)
        print("finished")
    except KeyboardInterrupt:
        print("interrupted", time.perf_counter() - sent[0])
    print(float(f(stop).reshape(-1)[0]))   # still usable afterwards
    print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)
"""


@pytest.mark.parametrize("options, shape", [("", "()"), ("grid=2", "()"), ("grid=2, block=64", "(1 << 16,)")])
def test_ctrl_c_stops_a_runaway_device_loop(options, shape):
    """Item 4: a device-control while_loop that never ends ignored SIGINT (the test timed out). The last
    case runs every iteration on two threads with grid barriers, which stop waiting too."""
    try:
        done = run_python(RUNAWAY_LOOP.format(options=options, shape=shape))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"SIGINT did not stop the loop; the child said: {e.stderr!r}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    word, delay = lines[0].split()
    assert word == "interrupted" and float(delay) < 2.0
    assert float(lines[1]) == -5.0
    assert lines[2] == "True"         # Python's handler is back


# ------------------------------------------------------------------------------------------------ memory

def test_arrays_of_a_call_are_not_kept_alive():
    """Item 17: the executable kept each signature's last input and output arrays (Executable.arrays)."""
    f = gdsl.jit(lambda x: x * 2.0 + 1.0, backend="cpu")
    x = np.ones(1000, np.float32)
    y = f(x)
    np.testing.assert_array_equal(y, 3.0)
    inputs, outputs = weakref.ref(x), weakref.ref(y)
    del x, y
    gc.collect()
    assert inputs() is None and outputs() is None


def test_arrays_of_a_host_control_call_are_not_kept_alive():
    f = gdsl.jit(lambda x, n: gdsl.fori_loop(0, n, lambda i, v: v * 2.0, x), backend="cpu", control="host")
    x = np.ones(100, np.float32)
    y = f(x, 3)
    np.testing.assert_array_equal(y, 8.0)
    inputs, outputs = weakref.ref(x), weakref.ref(y)
    del x, y
    gc.collect()
    assert inputs() is None and outputs() is None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_compiled_code_is_freed_with_its_functions():
    """Item 18: every distinct jitted function's machine code stayed in the process after `del f`."""
    from gdsl.backends.cpu import compiler
    x = np.ones(64, np.float32)

    def compile_and_drop(count, start):
        for k in range(start, start + count):
            f = gdsl.jit(lambda v, k=k: gnp.tanh(v * float(k)) + float(k) * 0.5, backend="cpu")
            f(x)
            module = weakref.ref(compiler.compile_module(f.lower(x).source, []))    # the cached, live one
            del f
            gc.collect()
            assert module() is None, "the compiled module outlived its function"
    compile_and_drop(10, 1000)        # warm up the allocators
    before = _rss_bytes()
    compile_and_drop(50, 2000)
    assert _rss_bytes() - before < 8 << 20     # 200-260 KB each were kept: 50 functions -> 10+ MB


# ------------------------------------------------------------------------------------------ summation

def test_float32_sum_of_many_ones_is_exact():
    """Item 5: the float32 accumulators stalled at 2**24 each (sum(ones(2**28)) gave 134217728)."""
    n = 2**26
    x = np.ones(n, np.float32)
    assert float(gdsl.jit(gnp.sum, backend="cpu")(x)) == n
    assert float(gdsl.jit(gnp.mean, backend="cpu")(x)) == 1.0


def test_float32_sum_of_ones_after_large_values_does_not_stall():
    """Every vector lane's float32 accumulator starts at 2**24 and then ignored each 1.0 added to it."""
    x = np.ones(2**22, np.float32)
    x[:64] = 2.0**24
    got = float(gdsl.jit(gnp.sum, backend="cpu")(x))
    want = float(np.sum(x, dtype=np.float64))
    assert abs(got - want) / want < 1e-4


def test_float32_sum_of_uniform_values_is_accurate():
    x = np.random.default_rng(0).random(2**25, dtype=np.float32)
    got = float(gdsl.jit(gnp.sum, backend="cpu")(x))
    want = float(np.sum(x, dtype=np.float64))
    assert abs(got - want) / want < 1e-6


def test_float32_row_sums_of_long_rows_are_accurate():
    x = np.random.default_rng(1).random((3, 2**23), dtype=np.float32)
    got = gdsl.jit(lambda v: gnp.sum(v, axis=1), backend="cpu")(x)
    np.testing.assert_allclose(got, np.sum(x, axis=1, dtype=np.float64), rtol=1e-6)


# ----------------------------------------------------------------------------------- low precision

bf16 = np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("backend", ["interpret", "cpu"])
@pytest.mark.parametrize("dtype", [np.float16, bf16])
def test_low_precision_sums_accumulate_in_float32(backend, dtype):
    """Item 7: sum(ones(1000, bfloat16)) was 256 on interpret (bf16 accumulation) and 1000 on cpu: both now
    accumulate in float32 and round the result to the input dtype, as JAX does."""
    x = np.ones(1000, dtype)
    got = gdsl.jit(gnp.sum, backend=backend)(x)
    assert got.dtype == dtype and float(got) == 1000.0
    rows = gdsl.jit(lambda v: gnp.sum(v, axis=0), backend=backend)(np.ones((1000, 3), dtype))
    assert rows.dtype == dtype and np.all(rows.astype(np.float32) == 1000.0)


@pytest.mark.parametrize("backend", ["interpret", "cpu"])
@pytest.mark.parametrize("dtype", [np.float16, bf16])
def test_low_precision_mean_of_many_elements(backend, dtype):
    """Item 6: mean of more than 65,504 float16 elements cast the count to float16 (inf): 0 or NaN."""
    x = np.full(100_000, 0.5, dtype)
    got = gdsl.jit(gnp.mean, backend=backend)(x)
    assert got.dtype == dtype and float(got) == 0.5


# ----------------------------------------------------------------------- C-family (CUDA/HIP) reductions

def _cxx_usable() -> bool:
    import shutil
    return shutil.which("g++") is not None or shutil.which("c++") is not None


@pytest.mark.skipif(not _cxx_usable(), reason="the CUDA emulator needs a C++ compiler")
def test_cfamily_float_sum_of_long_lane_runs_uses_partial_sums():
    """Item 5 on CUDA/HIP: each lane of a reduction added its whole strided run into one float; after a
    large first value a lane ignored every 1.0 (run on the g++ emulator of the generated code)."""
    from gdsl.backends.cfamily import emulator
    x = np.ones(2**21, np.float32)
    x[:64] = 2.0**24
    got = float(emulator.emulate(gnp.sum, x, grid=1, block=64))
    want = float(np.sum(x, dtype=np.float64))
    assert abs(got - want) / want < 1e-4
    rows = np.random.default_rng(2).random((2, 2**20), dtype=np.float32)
    got_rows = emulator.emulate(lambda v: gnp.sum(v, axis=1), rows, grid=1, block=64)
    np.testing.assert_allclose(got_rows, np.sum(rows, axis=1, dtype=np.float64), rtol=1e-5)
