"""The `cuda` backend: the whole jitted function as one persistent kernel (control="device"), or one fused
wavefront kernel per straight-line block launched from Python (control="host"), compiled with NVRTC.

    lower(program, options)   schedule (grid = options["grid"] or the device's SM count, 132 without a GPU;
                              block = options["block"], 256) and render the CUDA dialect: needs no GPU
    load(lowering)            compile (NVRTC, arch of the device), check that the grid can be co-resident
                              (else re-schedule with the co-resident size: a cooperative grid that does not
                              fit would deadlock), allocate the workspace once, and return the executable
    executable(flat_args)     CuPy arrays as they are, numpy copied in, `__dlpack__` objects through
                              cupy.from_dlpack (no copy for torch CUDA tensors); results are fresh CuPy arrays.
                              Each kernel is launched through the driver with a parameter block prepared at
                              its first launch (KernelLauncher): no occupancy or device query per call

Options: control ("device" | "host"), grid, block (a power of two, 32..1024), partition (loops run as
independent pipelines: None = when estimated faster, True, False; gdsl/schedule/partition.py), barrier
("atomic": gdsl's own counter barrier; "coop": cooperative_groups grid.sync(), needs the CCCL headers CuPy
ships).
"""
from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from gdsl.backends.cfamily import executor
from gdsl.backends.cfamily import lower as cfamily_lower
from gdsl.backends.cfamily.executor import Lowering
from gdsl.backends.cfamily.lower import check_options
from gdsl.backends.cuda import runtime
from gdsl.backends.cuda.dialect import CUDADialect
from gdsl.backends.cuda.toolchain import compile_cuda, nvrtc_available
from gdsl.schedule.plan import Wave, walk

KNOWN_OPTIONS = cfamily_lower.KNOWN_OPTIONS
LOWERING_CHAIN = CUDADialect.lowering_chain     # where this backend's lowering rules are looked up
ELEMENTWISE_TABLE = CUDADialect().elementwise   # the elementwise family: one C expression per primitive
DEFAULT_SMS = 132           # an H100's SMs: assumed when no GPU is here to ask


def unavailable_reason() -> str | None:
    missing = nvrtc_available()
    if missing:
        return missing
    if not runtime.cuda_usable():
        return "no CUDA GPU is usable here (CuPy sees no device); .lower(...).source still works"
    return None


def _sm_count() -> int | None:
    if not runtime.cuda_usable():
        return None
    from cupy.cuda import runtime as rt
    return rt.deviceGetAttribute(rt.cudaDevAttrMultiProcessorCount, rt.getDevice())


def autotune_candidates(program, options) -> list[dict]:
    """What `jit(..., autotune=True)` tries: a quarter, half, one and two vEUs per SM with device control,
    partitioned loops forced on and off at one vEU per SM, and host control. Measured on an H100:
    BlockDrop at batch 1 ran 2x faster on 33 vEUs than on 132 (its small convolutions get larger tiles and
    barriers cost less), while the RNNs want every SM. (Identical plans compile once: the NVRTC cache is
    keyed by source.)"""
    sms = _sm_count() or DEFAULT_SMS
    grids = sorted({max(1, sms // 4), max(1, sms // 2), sms, 2 * sms})
    return [{"control": "device", "grid": g} for g in grids] + \
        [{"control": "device", "grid": sms, "partition": p} for p in (True, False)] + [{"control": "host"}]


def device_name() -> str:
    if not runtime.cuda_usable():
        return "no-gpu"
    import cupy
    return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())["name"].decode()


def lower_with_grid(program, opts, grid: int) -> Lowering:
    """Schedule for `grid` vEUs and render the CUDA dialect (options already checked)."""
    dialect = CUDADialect()
    if runtime.cuda_usable():           # (never more than this GPU has, less what each block needs besides)
        dialect.resident_smem_per_sm = min(dialect.resident_smem_per_sm, runtime.smem_per_sm() - 36 * 1024)
    return cfamily_lower.lower_with_grid(program, opts, grid, dialect, sms=_sm_count() or DEFAULT_SMS)


def lower(program, options) -> Lowering:
    """Without a `grid` option: one vEU per SM, or two when some op has more uTasks than SMs. Every grid
    barrier gets dearer with more blocks (1.1 us at 132, 1.3 us at 264 on the H100), so a second resident
    block per SM pays only where there is more parallel work than SMs (measured: batch 64 of LSTM, NASRNN
    and Attention ran 1.3-1.5x faster with 264 vEUs, batch 1 5-10% slower)."""
    opts = check_options(options, CUDADialect)
    if opts["grid"]:
        return lower_with_grid(program, opts, opts["grid"])
    sms = _sm_count() or DEFAULT_SMS
    lowering = lower_with_grid(program, opts, sms)
    if _most_utasks(lowering) > sms:
        lowering = lower_with_grid(program, opts, 2 * sms)
    return lowering


def _most_utasks(lowering) -> int:
    """The most uTasks of any Op that does work (slices rendered as views do none)."""
    plan = lowering.plan
    stmts = [s for k in plan.kernels for s in walk(k.body)] + [s for f in plan.functions for s in walk(f.body)]
    return max((t.op.n_utasks for s in stmts if isinstance(s, Wave) for t in s.tasks
                if t.op not in lowering.rendered.views), default=0)


def compile_options(barrier: str) -> tuple:
    """NVRTC options: cooperative_groups.h needs CCCL's libcu++ headers, which CuPy ships."""
    if barrier != "coop":
        return ()
    return tuple(f"-I{d}" for d in [cccl_include_dir()] if d)


def cccl_include_dir() -> str | None:
    try:
        import cupy
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(cupy.__file__), "_core", "include", "cupy", "_cccl", "libcudacxx")
    return path if os.path.isdir(path) else None


class CupyDevice(executor.CupyDevice):
    """The executor's Device on a CUDA GPU: NVRTC for the device's own sm_XY, CuPy's cooperative launch."""
    name = "cuda"

    def __init__(self, barrier="atomic"):
        super().__init__()
        self.barrier = barrier
        self.arch = f"sm_{self.cupy.cuda.Device().compute_capability}"

    def compile_code(self, source: str) -> bytes:
        return compile_cuda(source, self.arch, options=compile_options(self.barrier))
        self.launchers = {}     # kernel name -> KernelLauncher of the loaded module

    def compile(self, rendered) -> None:
        super().compile(rendered)
        self.launchers = {}

    def max_grid(self, spec, block) -> int:
        """The most blocks of this kernel that fit on the GPU at once (a cooperative grid's limit)."""
        return runtime.max_coresident_blocks(self.kernels[spec.name], block, spec.dynamic_smem)

    def to_device(self, x, aval):
        cp = self.cupy
        if type(x) is cp.ndarray and x.dtype == aval.dtype and x.flags.c_contiguous:
            return x                                        # the common case, first and cheapest
        return super().to_device(x, aval)

    def launch(self, spec, grid, block, args, cooperative):
        launcher = self.launchers.get(spec.name)
        if launcher is None or not launcher.fits(grid, block, args, cooperative):
            launcher = self.launchers[spec.name] = KernelLauncher(self.kernels[spec.name], grid, block, args,
                                                                  cooperative, spec.dynamic_smem)
        launcher(args)


# numpy scalar kernel arguments (passed by value) -> the ctypes slot of the same width.
_SCALAR_SLOTS = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.int64): ctypes.c_int64,
                 np.dtype(np.uint32): ctypes.c_uint32, np.dtype(np.uint64): ctypes.c_uint64,
                 np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}


class KernelLauncher:
    """One kernel's launch, with what does not change between its launches prepared once.

    cuLaunchKernel reads the kernel's parameters through an array of pointers to their values: here that
    array and the value slots are ctypes objects built at the first launch, so a launch writes each
    argument's device pointer (or scalar) into its slot and calls the driver. CuPy's `Function.__call__`
    instead boxes every argument anew and, for a cooperative launch, asks the driver for the kernel's
    occupancy each time; the co-residency of the grid was checked once, at load (`load` below). Measured
    on the H200's host (2026-12-01, a 3-argument kernel): 6.0 us per CuPy launch (7.3 cooperative), 5.1 us
    (5.4) this way, of which the driver's cuLaunchKernel is most. The slots are shared: a lock makes
    filling them and launching one step, so that threads launching the same kernel at once cannot mix
    their arguments (the driver copies the values at the launch).
    """

    def __init__(self, kernel, grid: int, block: int, args, cooperative: bool, smem: int = 0):
        import cupy
        from cupy_backends.cuda.api import driver
        self.cupy, self.driver = cupy, driver
        self.kernel = kernel            # keeps the CUmodule loaded
        self.grid, self.block, self.cooperative, self.smem = grid, block, cooperative, smem
        runtime.allow_dynamic_smem(kernel, smem)
        self.pointer = [isinstance(a, cupy.ndarray) for a in args]
        self.slots = [ctypes.c_void_p() if p else _scalar_slot(a) for a, p in zip(args, self.pointer)]
        self.params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(s) for s in self.slots])
        self.params_ptr = ctypes.addressof(self.params) if args else 0
        self.lock = threading.Lock()

    def fits(self, grid, block, args, cooperative) -> bool:
        return (grid, block, cooperative, len(args)) == (self.grid, self.block, self.cooperative, len(self.slots))

    def __call__(self, args):
        _ensure_context()
        stream = self.cupy.cuda.get_current_stream().ptr
        with self.lock:
            for slot, a, pointer in zip(self.slots, args, self.pointer):
                slot.value = a.data.ptr if pointer else a.item()
            if self.cooperative:
                self.driver.launchCooperativeKernel(self.kernel.ptr, self.grid, 1, 1, self.block, 1, 1, self.smem,
                                                    stream, self.params_ptr)
            else:
                self.driver.launchKernel(self.kernel.ptr, self.grid, 1, 1, self.block, 1, 1, self.smem, stream,
                                         self.params_ptr, 0)


_thread = threading.local()


def _ensure_context() -> None:
    """Make a CUDA context current on this thread before its first driver-API launch, as CuPy's own launch
    does: a thread that has made no CUDA runtime call yet has none (cudaFree(0) binds the current device's
    primary context, where the modules were loaded)."""
    if getattr(_thread, "has_context", False):
        return
    from cupy_backends.cuda.api import driver, runtime
    if driver.ctxGetCurrent() == 0:
        runtime.free(0)
    _thread.has_context = True


def _scalar_slot(a):
    """The ctypes slot of a scalar kernel argument (a numpy scalar of the C parameter's width)."""
    slot = _SCALAR_SLOTS.get(getattr(a, "dtype", None))
    if slot is None:
        raise TypeError(f"kernel argument {a!r} ({type(a).__name__}) is neither a CuPy array nor a numpy scalar "
                        f"of a kernel parameter type ({', '.join(str(d) for d in _SCALAR_SLOTS)})")
    return slot()


def load(lowering: Lowering):
    """Compile, check co-residency (re-scheduling with a smaller grid if needed) and build the executable."""
    device = CupyDevice(lowering.options["barrier"])
    return executor.load_coresident(lowering, device, lower_with_grid, backend="cuda")


def to_device(x):
    return executor.to_device(x, "cuda")
