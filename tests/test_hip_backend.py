"""The HIP backend.

Without an AMD GPU (CI): every program of backend_programs.PROGRAMS, in both placements, lowers to a source that
hiprtc compiles for gfx90a (CI installs Debian's libamdhip64-5) and clang-19 for gfx942 (hiprtc 5.2 crashes on
gfx942, see toolchain-findings); the wavefront size follows the arch; and the loader (gdsl.backends.hip.load:
device properties, hiprtc for the device's arch, the co-residency check, cooperative launches, DLPack) runs
against a fake CuPy-for-ROCm and a fake HIP library, so every call it makes is exercised. The generated HIP
code itself runs in tests/test_hip_emulated.py (CPU emulator, NVIDIA through a compatibility header).
"""
import ctypes
import sys
import types

import numpy as np
import pytest
from backend_programs import PROGRAMS

import gdsl
import gdsl.backends
from gdsl.backends import hip
from gdsl.backends.hip import runtime as hip_runtime
from gdsl.backends.hip import toolchain as hip_toolchain
from gdsl.backends.hip.dialect import HIPDialect, wave_size
from gdsl.jit import make_ir

needs_hiprtc = pytest.mark.skipif(hip_toolchain.hiprtc_available() is not None,
                                  reason=str(hip_toolchain.hiprtc_available()))
needs_clang = pytest.mark.skipif(hip_toolchain.clang_available() is not None,
                                 reason=str(hip_toolchain.clang_available()))
CASES = [(name, control) for name in PROGRAMS for control in ("device", "host")]


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("GDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "gdsl-cache"))


# ------------------------------------------------------------------------------------ compiles
@needs_hiprtc
@pytest.mark.parametrize("name,control", CASES)
def test_hip_source_compiles_for_gfx90a(name, control):
    fn, args = PROGRAMS[name]
    source = gdsl.jit(fn, backend="hip", control=control).lower(*args).source
    assert "__shfl_xor(" in source and "GDSL_WARP 64" in source
    assert hip_toolchain.compile_hip(source, "gfx90a")[:4] == b"\x7fELF"


@needs_clang
@pytest.mark.parametrize("name,control", CASES)
def test_hip_source_compiles_for_gfx942_with_clang(name, control):
    fn, args = PROGRAMS[name]
    lowering = hip.lower(make_ir(fn)(*args), {"control": control, "arch": "gfx942"})
    assert "GDSL_WARP 64" in lowering.source
    code = hip_toolchain.compile_hip_clang(lowering.source, "gfx942")
    assert code[:4] == b"\x7fELF" and code[18] == 0xE0         # e_machine EM_AMDGPU


# ------------------------------------------------------------------------------------ wavefront size
@pytest.mark.parametrize("arch,wave", [("gfx90a", 64), ("gfx942", 64), ("gfx942:sramecc+:xnack-", 64),
                                       ("gfx908", 64), ("gfx1030", 32), ("gfx1100", 32), ("gfx1201", 32)])
def test_wave_size_of_arch(arch, wave):
    assert wave_size(arch) == wave == HIPDialect(arch=arch).warp_size


def test_wave_option_and_arch_render_the_wavefront():
    fn, args = PROGRAMS["gemv_batch1"]
    program = make_ir(fn)(*args)
    assert "#define GDSL_WARP 32" in hip.lower(program, {"arch": "gfx1100"}).source
    assert "#define GDSL_WARP 32" in hip.lower(program, {"wave": 32}).source
    assert "#define GDSL_WARP 64" in hip.lower(program, {}).source
    with pytest.raises(ValueError, match="does not match"):
        hip.lower(program, {"arch": "gfx942", "wave": 32})
    with pytest.raises(ValueError, match="from 64 to 1024"):
        hip.lower(program, {"block": 32})
    with pytest.raises(ValueError, match="not an AMD GPU"):
        wave_size("sm_90")


# ------------------------------------------------------------------------------------ availability
def test_hip_is_not_runnable_here_but_lowers():
    assert "hip" not in gdsl.backends()
    assert "ROCm" in gdsl.backends.unavailable_reason("hip")
    fn, args = PROGRAMS["recursion"]
    lowered = gdsl.jit(fn, backend="hip").lower(*args)
    assert "gdsl_main" in lowered.source and "control=device" in lowered.plan
    with pytest.raises(gdsl.BackendUnavailableError):
        gdsl.jit(fn, backend="hip")(*args)


class FailingImport:
    """A meta-path finder making `import cupy` fail as CuPy for ROCm does without ROCm's libraries."""
    def __init__(self, message):
        self.message = message

    def find_spec(self, name, path=None, target=None):
        if name == "cupy":
            raise ImportError(self.message)
        return None


def test_unavailable_reason_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert hip_runtime.unavailable_reason().startswith("no CuPy for ROCm")


def test_unavailable_reason_without_rocm_libraries(monkeypatch):
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(sys, "meta_path", [FailingImport("libamdhip64.so.7: cannot open shared object file"),
                                           *sys.meta_path])
    assert hip_runtime.unavailable_reason().startswith("no ROCm runtime")


def test_unavailable_reason_with_cupy_for_cuda(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(is_hip=False))
    assert "built for CUDA, not ROCm" in hip_runtime.unavailable_reason()


def test_unavailable_reason_without_a_device(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(devices=0))
    assert hip_runtime.unavailable_reason().startswith("no AMD GPU")

    def no_device():
        raise RuntimeError("hipErrorNoDevice")
    broken = fake_cupy()
    broken.cuda.runtime.getDeviceCount = no_device
    monkeypatch.setitem(sys.modules, "cupy", broken)
    assert "hipErrorNoDevice" in hip_runtime.unavailable_reason()


@needs_hiprtc
def test_backends_lists_hip_exactly_when_an_amd_gpu_is_usable(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy())
    gdsl.backends.unavailable_reason.cache_clear()
    try:
        assert "hip" in gdsl.backends() and "cuda" not in gdsl.backends()
    finally:
        gdsl.backends.unavailable_reason.cache_clear()


# ------------------------------------------------------------------------------------ the loader
class FakeArray(np.ndarray):
    """A CuPy array stand-in in host memory: `.data.ptr` is its address, `.get()` a numpy copy."""
    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)

    def get(self):
        return np.array(self)

    def __dlpack_device__(self):
        return (10, 0)                      # kDLROCM


def fake_cupy(*, is_hip=True, devices=1, arch=b"gfx942:sramecc+:xnack-", wave=64, cus=4):
    """A CuPy-for-ROCm stand-in recording module loads and ordinary launches."""
    calls = []

    class Kernel:
        def __init__(self, name):
            self.name, self.ptr = name, 0x1000 + len(calls)

        def __call__(self, grid, block, args, **kw):
            calls.append(("hipModuleLaunchKernel", self.name, grid, block, args, kw))

    class Module:
        def load(self, code):
            calls.append(("hipModuleLoadData", code))

        def get_function(self, name):
            return Kernel(name)

    def as_fake(x, dtype=None):
        return np.ascontiguousarray(np.asarray(x, dtype=dtype)).view(FakeArray)

    runtime = types.SimpleNamespace(
        is_hip=is_hip, getDeviceCount=lambda: devices, getDevice=lambda: 0,
        getDeviceProperties=lambda dev: {"gcnArchName": arch, "warpSize": wave, "multiProcessorCount": cus,
                                         "name": b"AMD Instinct MI300X"})
    return types.SimpleNamespace(
        calls=calls, ndarray=FakeArray, uint8=np.uint8,
        cuda=types.SimpleNamespace(runtime=runtime, function=types.SimpleNamespace(Module=Module),
                                   get_current_stream=lambda: types.SimpleNamespace(ptr=0)),
        asarray=as_fake, ascontiguousarray=as_fake,
        empty=lambda shape, dtype: np.empty(shape, dtype).view(FakeArray),
        zeros=lambda n, dtype: np.zeros(n, dtype).view(FakeArray),
        from_dlpack=lambda x: calls.append(("from_dlpack",)) or as_fake(np.from_dlpack(x)))


class FakeHip:
    """The two HIP calls gdsl makes through ctypes, with `per_cu` blocks of every kernel fitting on a CU."""
    def __init__(self, cupy, per_cu):
        self.cupy, self.per_cu = cupy, per_cu

    def hipModuleOccupancyMaxActiveBlocksPerMultiprocessor(self, n, fn, block, smem):
        n._obj.value = self.per_cu
        self.cupy.calls.append(("hipModuleOccupancyMaxActiveBlocksPerMultiprocessor", fn.value, block))
        return 0

    def hipModuleLaunchCooperativeKernel(self, fn, gx, gy, gz, bx, by, bz, smem, stream, params):
        values = [ctypes.cast(params[i], ctypes.POINTER(ctypes.c_void_p))[0] for i in range(len(params))]
        self.cupy.calls.append(("hipModuleLaunchCooperativeKernel", fn.value, (gx, gy, gz), (bx, by, bz), values))
        return 0

    def hipGetErrorString(self, status):
        return b"error"


@pytest.fixture
def amd_gpu(monkeypatch):
    """A fake MI300X (gfx942, 4 CUs, 2 blocks of any kernel per CU): fake CuPy, fake HIP, a recording hiprtc."""
    cupy = fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(hip_runtime, "hip_library", lambda: FakeHip(cupy, per_cu=2))
    monkeypatch.setattr(hip, "hiprtc_available", lambda: None)

    def fake_hiprtc(source, arch):
        cupy.calls.append(("hiprtc", arch, source))
        return b"\x7fELF code object for " + arch.encode()
    monkeypatch.setattr(hip_runtime, "compile_hip", fake_hiprtc)
    return cupy


def calls_named(cupy, name):
    return [c for c in cupy.calls if c[0] == name]


def test_load_compiles_for_the_devices_arch_and_launches_cooperatively(amd_gpu):
    fn, args = PROGRAMS["loop"]
    lowering = hip.lower(make_ir(fn)(*args), {"grid": 8})
    assert lowering.options["arch"] == "gfx942:sramecc+:xnack-" and lowering.plan.grid == 8
    executable = hip.load(lowering)
    (_, arch, source), = calls_named(amd_gpu, "hiprtc")
    assert arch == "gfx942:sramecc+:xnack-" and "#define GDSL_WARP 64" in source
    assert calls_named(amd_gpu, "hipModuleLoadData") == [("hipModuleLoadData", b"\x7fELF code object for " +
                                                          arch.encode())]
    assert calls_named(amd_gpu, "hipModuleOccupancyMaxActiveBlocksPerMultiprocessor")[0][2] == 256
    flat = [np.asarray(a) for a in args]
    outs = executable(flat)
    (_, _, grid, block, values), = [c[:2] + c[2:] for c in calls_named(amd_gpu, "hipModuleLaunchCooperativeKernel")]
    assert grid == (8, 1, 1) and block == (256, 1, 1)
    # each pointer parameter is the device address of the array the spec names, in order
    spec = executable.rendered.kernels[0]
    assert len(values) == len(spec.params)
    assert executable.ws.ctypes.data in values and outs[0].ctypes.data in values


def test_load_reschedules_a_grid_that_cannot_be_coresident(amd_gpu):
    fn, args = PROGRAMS["loop"]
    lowering = hip.lower(make_ir(fn)(*args), {})        # a vEU per CU at first: 4
    assert lowering.plan.grid == 4
    big = hip.lower(make_ir(fn)(*args), {"grid": 50})   # 50 > 2 blocks x 4 CUs
    executable = hip.load(big)
    assert executable.plan.grid == 8
    assert len(calls_named(amd_gpu, "hiprtc")) == 2


def test_load_rerenders_for_the_devices_wavefront(amd_gpu, monkeypatch):
    rdna = fake_cupy(arch=b"gfx1100", wave=32)
    monkeypatch.setitem(sys.modules, "cupy", rdna)
    monkeypatch.setattr(hip_runtime, "hip_library", lambda: FakeHip(rdna, per_cu=2))
    monkeypatch.setattr(hip_runtime, "compile_hip", lambda source, arch: rdna.calls.append(("hiprtc", arch, source))
                        or b"\x7fELF")
    fn, args = PROGRAMS["reductions"]
    lowering = hip.lower(make_ir(fn)(*args), {"arch": "gfx90a", "grid": 4})
    assert "#define GDSL_WARP 64" in lowering.source
    executable = hip.load(lowering)
    (_, arch, source), = calls_named(rdna, "hiprtc")
    assert arch == "gfx1100" and "#define GDSL_WARP 32" in source and executable.plan.grid == 4


def test_arrays_move_through_dlpack(amd_gpu):
    x = np.arange(6, dtype=np.float32).view(FakeArray)
    assert hip.to_device(x) is x                          # already a device array
    theirs = np.arange(4, dtype=np.float32)
    moved = hip.to_device(theirs)
    assert isinstance(moved, FakeArray) and not calls_named(amd_gpu, "from_dlpack")

    class RocmTensor:                                      # a torch-on-ROCm tensor, say
        def __dlpack__(self, stream=None):
            return theirs.__dlpack__()

        def __dlpack_device__(self):
            return (10, 0)
    assert np.array_equal(hip.to_device(RocmTensor()), theirs)
    assert calls_named(amd_gpu, "from_dlpack")


@needs_clang
@pytest.mark.parametrize("arch", ["gfx942", "gfx1100"])
def test_instrumented_source_compiles_with_the_archs_clock(arch):
    """gfx11 has no s_memrealtime: the profile clock there is the REALTIME message."""
    fn, args = PROGRAMS["loop"]
    lowering = hip.lower(make_ir(fn)(*args), {"arch": arch, "profile": True})
    clock = "s_sendmsg_rtnl(0x83)" if arch == "gfx1100" else "s_memrealtime()"
    assert clock in lowering.source
    assert hip_toolchain.compile_hip_clang(lowering.source, arch)[:4] == b"\x7fELF"
