"""Running HIP code objects on an AMD GPU through CuPy for ROCm (`pip install 'gdsl[hip]'`: cupy-rocm-7-0).

CuPy's ROCm build has the same Python API as its CUDA build and calls HIP underneath; what gdsl uses of it,
with the HIP call each one makes:

    cupy.cuda.runtime.getDeviceCount()                 hipGetDeviceCount
    cupy.cuda.runtime.getDeviceProperties(dev)         hipGetDeviceProperties: gcnArchName ("gfx942:sramecc+:
                                                       xnack-"), warpSize, multiProcessorCount
    cupy.cuda.function.Module().load(code_object)      hipModuleLoadData
    module.get_function(name)                          hipModuleGetFunction (.ptr: the hipFunction_t)
    kernel(grid, block, args)                          hipModuleLaunchKernel
    cupy.asarray / ndarray.get / cupy.from_dlpack      hipMalloc + hipMemcpy(HtoD/DtoH); DLPack kDLROCM

Two calls CuPy's ROCm build does not forward (its cupy_backends/hip/cupy_hip.h answers hipErrorUnknown for
cuOccupancyMaxActiveBlocksPerMultiprocessor and cuLaunchCooperativeKernel), so gdsl makes them itself through
ctypes on the HIP runtime library CuPy has loaded:

    hipModuleOccupancyMaxActiveBlocksPerMultiprocessor(&n, fn, block, smem)    the co-residency check
    hipModuleLaunchCooperativeKernel(fn, grid,1,1, block,1,1, smem, stream, params)
                                                       a persistent launch (HIP refuses a grid that cannot
                                                       be co-resident instead of deadlocking)

CuPy is imported inside the functions: importing this module needs neither CuPy nor ROCm.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np

from gdsl.backends.cfamily import executor
from gdsl.backends.hip.dialect import wave_size
from gdsl.backends.hip.toolchain import compile_hip

# The HIP runtime library of each ROCm CuPy supports (cupy-rocm-7-0 links libamdhip64.so.7).
HIP_LIBRARIES = ("libamdhip64.so.7", "libamdhip64.so.6", "libamdhip64.so")
INSTALL_HINT = "pip install 'gdsl[hip]' (cupy-rocm-7-0) on a machine with ROCm 7"


def unavailable_reason() -> str | None:
    """None if an AMD GPU is usable through CuPy for ROCm, else what is missing. Never raises."""
    try:
        import cupy
    except ImportError as e:
        if "libamdhip64" in str(e) or "librocm" in str(e) or "libroc" in str(e):
            return f"no ROCm runtime: CuPy for ROCm is installed but cannot load ROCm's libraries ({e})"
        return f"no CuPy for ROCm ({e}); install it with: {INSTALL_HINT}"
    except Exception as e:  # noqa: BLE001 - a broken CuPy install says so rather than breaking backends()
        return f"CuPy fails to import ({type(e).__name__}: {e})"
    if not cupy.cuda.runtime.is_hip:
        return f"the installed CuPy is built for CUDA, not ROCm; install CuPy for ROCm: {INSTALL_HINT}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - hipErrorNoDevice and friends: no usable device
        return f"no AMD GPU is usable: ROCm reports {type(e).__name__}: {e} (is /dev/kfd accessible?)"
    if count < 1:
        return "no AMD GPU: ROCm sees no device (is /dev/kfd accessible?)"
    return None


def device_properties() -> dict:
    """The current device's arch (full target id), its gfx name, wavefront size and compute units."""
    import cupy
    rt = cupy.cuda.runtime
    props = rt.getDeviceProperties(rt.getDevice())
    arch = props["gcnArchName"]
    arch = arch.decode() if isinstance(arch, bytes) else str(arch)
    wave = int(props.get("warpSize") or wave_size(arch))
    if wave != wave_size(arch):
        raise RuntimeError(f"the device reports {wave}-lane wavefronts for {arch}, gdsl expects "
                           f"{wave_size(arch)}: pass wave={wave} explicitly")
    name = props.get("name", b"")
    return {"arch": arch, "gfx": arch.split(":")[0], "wave": wave, "compute_units": int(props["multiProcessorCount"]),
            "name": name.decode() if isinstance(name, bytes) else str(name)}


@functools.cache
def hip_library():
    """The HIP runtime library (the one CuPy loaded) with the prototypes of the two calls gdsl makes itself."""
    errors = []
    for name in HIP_LIBRARIES:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError as e:
            errors.append(str(e))
    else:
        raise OSError("no HIP runtime library: " + "; ".join(errors))
    lib.hipModuleOccupancyMaxActiveBlocksPerMultiprocessor.argtypes = [
        ctypes.POINTER(ctypes.c_int), ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    lib.hipModuleLaunchCooperativeKernel.argtypes = [
        ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.hipGetErrorString.restype = ctypes.c_char_p
    return lib


def _check(lib, status: int, what: str) -> None:
    if status:
        raise RuntimeError(f"{what} failed: HIP error {status} ({lib.hipGetErrorString(status).decode()})")


def max_coresident_blocks(kernel, block: int, compute_units: int, dynamic_smem: int = 0) -> int:
    """Blocks of `kernel` that fit on the device at once: occupancy per CU times the CUs."""
    lib = hip_library()
    per_cu = ctypes.c_int()
    _check(lib, lib.hipModuleOccupancyMaxActiveBlocksPerMultiprocessor(
        ctypes.byref(per_cu), ctypes.c_void_p(kernel.ptr), block, dynamic_smem),
        "hipModuleOccupancyMaxActiveBlocksPerMultiprocessor")
    return per_cu.value * compute_units


def kernel_params(args) -> tuple:
    """The `void** kernelParams` of a launch: a pointer to each argument's value (device pointers for
    arrays, 32-bit ints for the recursion depths). Returns (params, the ctypes values they point to)."""
    values = []
    for a in args:
        if isinstance(a, np.integer):
            values.append(ctypes.c_int32(int(a)))
        else:
            values.append(ctypes.c_void_p(a.data.ptr))       # a CuPy array: its device pointer
    params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    return params, values


def launch_cooperative(kernel, grid: int, block: int, args, stream_ptr: int = 0) -> None:
    """hipModuleLaunchCooperativeKernel: every block resident at once, or an error (never a deadlock)."""
    lib = hip_library()
    params, _values = kernel_params(args)
    _check(lib, lib.hipModuleLaunchCooperativeKernel(
        ctypes.c_void_p(kernel.ptr), grid, 1, 1, block, 1, 1, 0, ctypes.c_void_p(stream_ptr), params),
        "hipModuleLaunchCooperativeKernel")


class HipDevice(executor.CupyDevice):
    """The executor's Device on an AMD GPU: hiprtc for the device's own arch, CuPy for memory, modules and
    ordinary launches, HIP itself for occupancy and cooperative launches (see the module docstring)."""
    name = "hip"

    def __init__(self, props: dict | None = None):
        super().__init__()
        self.props = props or device_properties()
        self.arch = self.props["arch"]

    def compile_code(self, source: str) -> bytes:
        return compile_hip(source, self.arch)

    def max_grid(self, spec, block) -> int:
        return max_coresident_blocks(self.kernels[spec.name], block, self.props["compute_units"])

    def launch(self, spec, grid, block, args, cooperative):
        kernel = self.kernels[spec.name]
        if cooperative:
            launch_cooperative(kernel, grid, block, args, self.cupy.cuda.get_current_stream().ptr)
        else:
            kernel((grid,), (block,), tuple(args))
