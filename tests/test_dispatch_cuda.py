"""The cuda backend's host path of a repeated call without a GPU: gdsl.jit's fast path over the cuda
CupyDevice's fast_runner and KernelLauncher, with CuPy and the CUDA driver replaced by stand-ins in host
memory. The stand-in driver reads the kernel's parameter block as cuLaunchKernel would, so these tests see
exactly which pointers reach a launch; the kernels themselves do not run (their results here are
uninitialised memory: tests/test_dispatch.py's GPU tests check values).
"""
import ctypes
import sys
import threading
import types
import weakref

import numpy as np
import pytest

import gdsl
import gdsl.backends
from gdsl.backends import cuda
from gdsl.backends.cfamily import executor


class Memory:
    """Stands for CuPy's Memory: what a MemoryPointer (and every pointer made from it) refers to."""


class MemoryPointer:
    def __init__(self, ptr):
        self.ptr, self.mem = ptr, Memory()


class DeviceArray(np.ndarray):
    """A CuPy array stand-in in host memory: `.data` is one MemoryPointer per array (as CuPy's), `.data.ptr`
    the array's address. `DeviceArray(shape, dtype)` is an allocation and is counted."""
    allocations = 0

    def __new__(cls, shape, dtype):
        DeviceArray.allocations += 1
        return super().__new__(cls, shape, dtype)

    @property
    def data(self):
        if "_pointer" not in self.__dict__:
            self.__dict__["_pointer"] = MemoryPointer(self.ctypes.data)
        return self.__dict__["_pointer"]

    @property
    def _c_contiguous(self):
        return self.flags.c_contiguous

    def get(self):
        return np.array(self)


def as_device(x, dtype=None):
    """A copy in "device" memory, as cupy.asarray of host data makes."""
    return np.array(x, dtype=dtype, order="C").view(DeviceArray)


class Driver:
    """cuLaunchKernel / cuLaunchCooperativeKernel recording each launch with the parameter values it reads
    through `kernelParams`; `refuse` makes the next launches fail as on a thread without a CUDA context."""

    class CUDADriverError(RuntimeError):
        def __init__(self, status):
            super().__init__(f"CUDA driver error {status}")
            self.status = status

    def __init__(self):
        self.launches, self.params_of, self.refuse = [], {}, 0

    def launchKernel(self, kernel, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        self._launch(kernel, (gx, gy, gz), (bx, by, bz), stream, params, cooperative=False)

    def launchCooperativeKernel(self, kernel, gx, gy, gz, bx, by, bz, smem, stream, params):
        self._launch(kernel, (gx, gy, gz), (bx, by, bz), stream, params, cooperative=True)

    def _launch(self, kernel, grid, block, stream, params, cooperative):
        if self.refuse:
            self.refuse -= 1
            raise self.CUDADriverError(cuda.CUDA_ERROR_INVALID_CONTEXT)
        slots = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
        values = [ctypes.cast(slots[i], ctypes.POINTER(ctypes.c_uint64))[0] for i in range(self.params_of[kernel])]
        self.launches.append(types.SimpleNamespace(kernel=kernel, grid=grid, block=block, stream=stream,
                                                   values=values, cooperative=cooperative))


def fake_cupy(driver):
    """The part of CuPy the cuda backend's executor uses, over host memory."""
    kernels = {}

    class Module:
        def load(self, code):
            pass

        def get_function(self, name):
            kernel = kernels.setdefault(name, types.SimpleNamespace(name=name, ptr=0x1000 + len(kernels)))
            return kernel

    stream = types.SimpleNamespace(ptr=0)
    cuda_ns = types.SimpleNamespace(
        runtime=types.SimpleNamespace(is_hip=False, getDeviceCount=lambda: 0),
        function=types.SimpleNamespace(Module=Module), Device=lambda: types.SimpleNamespace(compute_capability="90"),
        get_current_stream=lambda: stream)
    return types.SimpleNamespace(
        ndarray=DeviceArray, uint8=np.uint8, cuda=cuda_ns, kernels=kernels, stream=stream,
        asarray=as_device, ascontiguousarray=as_device, from_dlpack=lambda x: as_device(np.from_dlpack(x)),
        empty=lambda shape, dtype: np.empty(shape, dtype).view(DeviceArray),
        zeros=lambda n, dtype: np.zeros(n, dtype).view(DeviceArray))


@pytest.fixture
def gpu(monkeypatch):
    """A stand-in CUDA GPU for gdsl.jit(..., backend="cuda"): fake CuPy and driver, no NVRTC call, every
    grid co-resident. Yields the fake CuPy module; `.driver.launches` lists the launches."""
    driver = Driver()
    cupy = fake_cupy(driver)
    cupy.driver = driver
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(cuda, "cuda_driver", lambda: driver)
    monkeypatch.setattr(cuda.CupyDevice, "compile_code", lambda self, source: b"cubin")
    monkeypatch.setattr(cuda.CupyDevice, "max_grid", lambda self, spec, block: 1 << 20)
    monkeypatch.setattr(gdsl.backends, "unavailable_reason", lambda name: None)
    bound = []
    monkeypatch.setattr(cuda, "_bind_primary_context", lambda: bound.append(threading.get_ident()))
    cupy.bound_contexts = bound
    DeviceArray.allocations = 0
    yield cupy


def jit_on(cupy, fn, *args, **options):
    """gdsl.jit(fn, backend="cuda") with the stand-in driver told each kernel's parameter count. Workspace
    placement is off unless asked for: its timed calls on the first call would join the launches counted."""
    f = gdsl.jit(fn, backend="cuda", **{"place_workspace": False, **options})
    lowered = f.lower(*args)
    for spec in lowered.lowering.rendered.kernels:
        kernel = cupy.cuda.function.Module().get_function(spec.name)
        cupy.driver.params_of[kernel.ptr] = len(spec.params)
    return f, lowered


def executable_of(f):
    (entry,) = f._cache.values()
    return entry["executable"]


def expected_values(executable, pointer_of):
    """The parameter values a launch of the executable's kernel must see: each buffer's array pointer."""
    values = []
    for kind, obj in executable.rendered.kernels[0].params:
        values.append(executable.ws.data.ptr if kind == "ws" else pointer_of[obj.name])
    return values


def forbid_general_path(monkeypatch, f):
    def fail(*a, **k):
        raise AssertionError("the call took the general path")
    monkeypatch.setattr(f, "_call", fail)


def test_fast_path_passes_input_output_and_workspace_pointers(gpu, monkeypatch):
    x, y = as_device(np.arange(4, dtype=np.float32)), as_device(np.ones(4, np.float32))
    f, lowered = jit_on(gpu, lambda a, b: a * b + 1, x, y)
    first = f(x, y)                                     # general path: loads, enters the fast table
    forbid_general_path(monkeypatch, f)
    second = f(x, y)
    general, fast = gpu.driver.launches
    ex = executable_of(f)
    for launch, out in ((general, first), (fast, second)):
        buffers = {"in0": x.data.ptr, "in1": y.data.ptr, "out0": out.data.ptr}
        assert launch.values == expected_values(ex, buffers)
        assert launch.grid == (ex.plan.grid, 1, 1) and launch.block == (ex.plan.block, 1, 1)
        assert launch.cooperative == ex.cooperative[0] and launch.stream == 0
    assert isinstance(second, DeviceArray) and second.shape == (4,) and second.dtype == np.float32
    assert f.trace_count == 1


def test_the_fast_path_launches_with_the_placed_workspace(gpu, monkeypatch):
    """With place_workspace on, the first call times the kernel at each workspace place (here a scripted clock
    on which place 2 is fastest); the fast path then launches with the workspace where it was left
    (Executable.ws, at its ws_offset in its allocation)."""
    from gdsl import autotune
    monkeypatch.setattr(DeviceArray, "__cuda_array_interface__", {}, raising=False)   # (results on the GPU)
    fastest = 2 * executor.WORKSPACE_STEP
    monkeypatch.setattr(autotune, "timer", lambda run, flat, outs: lambda: 1.0 - 0.5 * (ex_ws_offset() == fastest))
    x, y = as_device(np.arange(4, dtype=np.float32)), as_device(np.ones(4, np.float32))
    f, _ = jit_on(gpu, lambda a, b: a * b + 1, x, y, place_workspace=True)

    def ex_ws_offset():
        return executable_of(f).ws_offset
    f(x, y)
    assert executable_of(f).ws_offset == fastest
    forbid_general_path(monkeypatch, f)
    out = f(x, y)
    ex = executable_of(f)
    buffers = {"in0": x.data.ptr, "in1": y.data.ptr, "out0": out.data.ptr}
    assert gpu.driver.launches[-1].values == expected_values(ex, buffers)
    assert ex.ws.data.ptr == ex._ws_pool.data.ptr + ex.ws_offset


def test_constants_are_fixed_and_arguments_follow_the_pytree(gpu, monkeypatch):
    table = np.arange(3, dtype=np.float32)

    def fn(t, k):
        x, d = t
        return x[:3] * k + d["y"][:3] + gdsl.numpy.asarray(table)
    x, y = as_device(np.arange(4, dtype=np.float32)), as_device(np.ones(4, np.float32))
    f, lowered = jit_on(gpu, fn, (x, {"y": y}), 2, static_argnums=1)
    f((x, {"y": y}), 2)
    forbid_general_path(monkeypatch, f)
    out = f((x, {"y": y}), 2)
    ex = executable_of(f)
    consts = {v.buffer.name: array.data.ptr for v, array in zip(ex.plan.inputs, ex.consts.values())}
    buffers = {"in0": x.data.ptr, "in1": y.data.ptr, "out0": out.data.ptr, **consts}
    assert gpu.driver.launches[-1].values == expected_values(ex, buffers)


def test_numpy_inputs_and_scalars_are_copied_to_the_device(gpu, monkeypatch):
    host = np.arange(4, dtype=np.float32)
    f, _ = jit_on(gpu, lambda a, s: a * s, host, 2.5)
    f(host, 2.5)
    forbid_general_path(monkeypatch, f)
    f(host, 4.0)
    launch = gpu.driver.launches[-1]
    assert host.ctypes.data not in launch.values     # a device copy went to the kernel, not the host array
    assert len(set(launch.values)) == len(launch.values)


def test_a_changed_signature_takes_the_general_path(gpu):
    x = as_device(np.arange(4, dtype=np.float32))
    f, _ = jit_on(gpu, lambda a: a + 1, x)
    f(x), f(x)
    wider = as_device(np.arange(6, dtype=np.float32))
    jit_on(gpu, lambda a: a + 1, wider)                 # registers the new kernel's parameter count
    taken = []
    general = f._call
    f._call = lambda args, kwargs: taken.append(args) or general(args, kwargs)
    assert f(wider).shape == (6,)
    assert len(taken) == 1 and f.trace_count == 2
    assert f(wider).shape == (6,) and len(taken) == 1   # then fast again


def test_results_are_fresh_and_recycled_only_when_dropped(gpu, monkeypatch):
    x = as_device(np.arange(4, dtype=np.float32))
    f, _ = jit_on(gpu, lambda a: a * 2, x)
    f(x)
    forbid_general_path(monkeypatch, f)
    a = f(x)
    b = f(x)
    assert a is not b and not np.shares_memory(a, b)    # both kept: two allocations
    assert DeviceArray.allocations == 2
    a_ptr = a.data.ptr
    del a
    c = f(x)                                            # a was dropped: its array comes back
    assert DeviceArray.allocations == 2 and c.data.ptr == a_ptr
    assert gpu.driver.launches[-1].values.count(a_ptr) == 1
    del c
    for _ in range(5):                                  # results dropped at once: no allocation at all
        f(x)
    assert DeviceArray.allocations == 2


def test_a_result_fed_back_as_input_is_never_the_output(gpu, monkeypatch):
    x = as_device(np.arange(4, dtype=np.float32))
    f, _ = jit_on(gpu, lambda a: a * 2, x)
    y = f(x)
    forbid_general_path(monkeypatch, f)
    for _ in range(4):                                  # y = f(y): two arrays take turns
        y = f(y)
        launch = gpu.driver.launches[-1]
        assert launch.values[0] != launch.values[1]     # gdsl_main(in0, out0, ws)
    assert DeviceArray.allocations == 2


@pytest.mark.parametrize("hold", ["view", "weakref", "memory pointer", "memory", "other stream"])
def test_results_still_referred_to_are_not_recycled(gpu, monkeypatch, hold):
    x = as_device(np.arange(4, dtype=np.float32))
    f, _ = jit_on(gpu, lambda a: a * 2, x)
    f(x)
    forbid_general_path(monkeypatch, f)
    keep = []
    for _ in range(3):
        out = f(x)
        if hold == "view":
            keep.append(out[1:])
        elif hold == "weakref":
            keep.append(weakref.ref(out))
        elif hold == "memory pointer":
            keep.append(out.data)
        elif hold == "memory":
            keep.append(out.data.mem)
        del out
        if hold == "other stream":
            gpu.stream.ptr += 1
    assert DeviceArray.allocations == 3
    assert len({launch.values[1] for launch in gpu.driver.launches[-3:]}) == 3    # gdsl_main(in0, out0, ws)


def test_large_results_are_allocated_every_call(gpu, monkeypatch):
    monkeypatch.setattr(executor, "RECYCLE_MAX_BYTES", 8)
    x = as_device(np.arange(4, dtype=np.float32))
    f, _ = jit_on(gpu, lambda a: a * 2, x)
    f(x)
    for _ in range(3):
        f(x)
    assert DeviceArray.allocations == 3


def test_a_thread_without_a_context_binds_one_and_launches_again(gpu):
    x = as_device(np.arange(4, dtype=np.float32))
    f, _ = jit_on(gpu, lambda a: a + 1, x)
    f(x)
    gpu.driver.refuse = 1
    worker = threading.Thread(target=f, args=(x,))
    worker.start()
    worker.join()
    assert len(gpu.bound_contexts) == 1 and gpu.bound_contexts[0] != threading.get_ident()
    assert len(gpu.driver.launches) == 2
    gpu.driver.refuse = 2                               # refused again after binding: the error stands
    with pytest.raises(gpu.driver.CUDADriverError):
        f(x)


def test_host_control_launches_with_the_same_launcher(gpu):
    x = as_device(np.arange(4, dtype=np.float32))
    f, lowered = jit_on(gpu, lambda a: a * 3, x, control="host")
    out = f(x)
    ex = executable_of(f)
    assert ex.fast_path() is None
    assert gpu.driver.launches[-1].values == expected_values(ex, {"in0": x.data.ptr, "out0": out.data.ptr})


def test_kernel_launcher_packs_scalars_at_their_width(gpu):
    driver = gpu.driver
    kernel = types.SimpleNamespace(ptr=0x42)
    driver.params_of[0x42] = 4
    ws, x = as_device(np.zeros(8, np.uint8)), as_device(np.ones(2, np.float32))
    slots = [cuda.slot_of(a) for a in (x, np.int32(-2), ws, np.float32(1.5))]
    assert slots == [cuda.POINTER, np.dtype(np.int32), cuda.POINTER, np.dtype(np.float32)]
    launcher = cuda.KernelLauncher(driver, kernel, 3, 64, True, slots, fixed={2: ws})
    with launcher.lock:
        launcher.launch(7, [x.data.ptr, np.int32(5), np.float32(0.5)])
    launch = driver.launches[-1]
    assert launch.cooperative and launch.grid == (3, 1, 1) and launch.block == (64, 1, 1) and launch.stream == 7
    assert launch.values[0] == x.data.ptr and launch.values[2] == ws.data.ptr
    assert np.uint64(launch.values[1]).astype(np.uint32).view(np.int32) == 5
    assert np.uint32(launch.values[3] & 0xFFFFFFFF).view(np.float32) == 0.5
    with pytest.raises(TypeError, match="neither a CuPy array nor a numpy scalar"):
        cuda.slot_of(3)


def _bound_run(g):
    """The run behind the one signature in Bound `g`'s table."""
    (call,) = g._table.values()
    return call.parts[0]


def test_bound_arrays_are_fixed_parameters(gpu, monkeypatch):
    """f.bind(w): the bound device arrays' pointers are written once into a launcher of the bound run's own;
    a call packs only the rest's (and the result's) and launches with every pointer where it belongs."""
    w, b = as_device(np.arange(4, dtype=np.float32)), as_device(np.ones(4, np.float32))
    x = as_device(np.full(4, 2.0, np.float32))
    f, _ = jit_on(gpu, lambda w, b, x: w * x + b, w, b, x)
    g = f.bind(w, b)
    first = g(x)                                       # general path: loads, enters both tables
    forbid_general_path(monkeypatch, f)
    out = g(x)
    ex = executable_of(f)
    for launch, result in zip(gpu.driver.launches, (first, out)):
        buffers = {"in0": w.data.ptr, "in1": b.data.ptr, "in2": x.data.ptr, "out0": result.data.ptr}
        assert launch.values == expected_values(ex, buffers)
    run = _bound_run(g)
    assert run.launcher.given_pointer == [True, True]    # x and the result: w and b are fixed
    y = as_device(np.zeros(4, np.float32))             # another argument object: its own pointer
    out = g(y)
    buffers = {"in0": w.data.ptr, "in1": b.data.ptr, "in2": y.data.ptr, "out0": out.data.ptr}
    assert gpu.driver.launches[-1].values == expected_values(ex, buffers)


def test_bound_host_arrays_are_copied_at_every_call(gpu, monkeypatch):
    """A bound numpy array is converted on the way (a device copy per call, so that an update in place is
    seen): it cannot be a fixed parameter, and the bound call passes every leaf as f's fast path does."""
    w = np.arange(4, dtype=np.float32)
    x = as_device(np.full(4, 2.0, np.float32))
    f, _ = jit_on(gpu, lambda w, x: w * x, w, x)
    g = f.bind(w)
    g(x)
    forbid_general_path(monkeypatch, f)
    g(x)
    (call,) = g._table.values()
    assert not hasattr(call, "parts")         # the fallback: f's fast caller with the bound leaves in front
    launch = gpu.driver.launches[-1]
    assert w.ctypes.data not in launch.values and x.data.ptr in launch.values
