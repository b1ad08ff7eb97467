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
    executable.fast_path()    for a device-control plan, `run(flat_args) -> outs` (CupyDevice.fast_runner),
                              what gdsl.jit calls on a repeated signature. Per call it does only this:
                              check each input (a C-contiguous CuPy array of the traced dtype, else
                              to_device), read the current stream, take the results from an OutputRecycler
                              (the arrays of an earlier call that nothing refers to any more, written on
                              this stream; else new ones), pack the input and output pointers into the
                              parameter block (workspace and constants were written once) and call
                              cuLaunchKernel (cuLaunchCooperativeKernel for grid barriers). Results are
                              never an array the caller still holds, a view of one, or an input

Options: control ("device" | "host"), grid, block (a power of two, 32..1024), partition (loops run as
independent pipelines: None = when estimated faster, True, False; gdsl/schedule/partition.py), barrier
("atomic": gdsl's own counter barrier; "coop": cooperative_groups grid.sync(), needs the CCCL headers CuPy
ships).
"""
from __future__ import annotations

import ctypes
import functools
import operator
import os
import struct
import threading

import numpy as np

from gdsl.backends.cfamily import executor
from gdsl.backends.cfamily import lower as cfamily_lower
from gdsl.backends.cfamily.executor import Lowering
from gdsl.backends.cfamily.lower import check_options
from gdsl.backends.cuda import runtime
from gdsl.backends.cuda.dialect import CUDADialect
from gdsl.backends.cuda.toolchain import compile_cuda, nvrtc_available
from gdsl.schedule.plan import Loop, Wave, parts_of_tasks, plan_statements, walk
from gdsl.schedule.resident import RESIDENT

KNOWN_OPTIONS = cfamily_lower.KNOWN_OPTIONS
LOWERING_CHAIN = CUDADialect.lowering_chain     # where this backend's lowering rules are looked up
ELEMENTWISE_TABLE = CUDADialect().elementwise   # the elementwise family: one C expression per primitive
DEFAULT_SMS = 132           # an H100's SMs: assumed when no GPU is here to ask
MAX_THREADS_PER_SM = 2048   # (sm_90: the most threads of co-resident blocks an SM holds)
# Without a `grid` option, a partitioned loop with more partitions than vEUs may take more vEUs per SM
# (partitions_in_flight; False: one or two vEUs per SM as before).
PARTITIONS_IN_FLIGHT = True


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
    """Without a `grid` option: one vEU per SM, or two when some wave has more uTasks than SMs; with
    narrow=True then only as many as the waves use (cfamily.lower.narrowed). Every grid
    barrier gets dearer with more blocks (1.1 us at 132, 1.3 us at 264 on the H100), so a second resident
    block per SM pays only where there is more parallel work than SMs (measured: batch 64 of LSTM, NASRNN
    and Attention ran 1.3-1.5x faster with 264 vEUs, batch 1 5-10% slower)."""
    opts = check_options(options, CUDADialect)
    if opts["grid"]:
        return lower_with_grid(program, opts, opts["grid"])
    sms = _sm_count() or DEFAULT_SMS
    lowering = lower_with_grid(program, opts, sms)
    if _most_utasks(lowering) > sms:
        lowering = partitions_in_flight(program, opts, lower_with_grid(program, opts, 2 * sms), sms)
    return cfamily_lower.narrowed(program, opts, lowering, lower_with_grid)


def partitions_in_flight(program, opts, lowering, sms: int) -> Lowering:
    """A plan with a partitioned loop of more partitions than vEUs runs them in rounds, one after another on
    each vEU, with no grid barrier inside the loop to grow dearer with more vEUs: take more vEUs per SM where
    that leaves fewer rounds, the fewest such (each has fewer registers a thread) that still keeps every weight
    resident that `lowering` keeps (the SM's shared memory is split among more vEUs). Attention at batch 64,
    768 (batch, head) partitions: 264 vEUs, 3 rounds -> 396 vEUs, 2 rounds (H200, session 31: kernel 295.5 ->
    274.1 µs; on 528 vEUs or more its heads' weights no longer fit). Else `lowering`."""
    def rounds(lo):
        return max((-(-s.parts // lo.plan.grid) for s in plan_statements(lo.plan) if isinstance(s, Loop)),
                   default=0)

    def resident_ops(lo):
        return sum(RESIDENT in t.op.params for s in plan_statements(lo.plan) if isinstance(s, Wave)
                   for t in parts_of_tasks(s.tasks))
    if not PARTITIONS_IN_FLIGHT:
        return lowering
    best, kept = lowering, resident_ops(lowering)
    for per_sm in range(lowering.plan.grid // sms + 1, MAX_THREADS_PER_SM // opts["block"] + 1):
        if rounds(best) <= 1:
            break
        wider = lower_with_grid(program, opts, per_sm * sms)
        if resident_ops(wider) < kept:
            break               # (a vEU's share of the shared memory only shrinks from here on)
        if rounds(wider) < rounds(best):
            best = wider
    return best


def _most_utasks(lowering) -> int:
    """The most uTasks of any wave, over its Ops that do work (slices rendered as views do none)."""
    plan = lowering.plan
    stmts = [s for k in plan.kernels for s in walk(k.body)] + [s for f in plan.functions for s in walk(f.body)]
    return max((sum(t.op.n_utasks for t in s.tasks if t.op not in lowering.rendered.views)
                for s in stmts if isinstance(s, Wave)), default=0)


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
    """The executor's Device on a CUDA GPU: NVRTC for the device's own sm_XY, launches through the driver
    with parameter blocks prepared once (KernelLauncher), and the fast path of a repeated call
    (fast_runner)."""
    name = "cuda"

    def __init__(self, barrier="atomic"):
        super().__init__()
        self.barrier = barrier
        self.arch = f"sm_{self.cupy.cuda.Device().compute_capability}"
        self.driver = cuda_driver()
        self.launchers = {}     # kernel name -> KernelLauncher of the loaded module (general path)

    def compile_code(self, source: str) -> bytes:
        return compile_cuda(source, self.arch, options=compile_options(self.barrier))

    def compile(self, rendered) -> None:
        super().compile(rendered)
        self.launchers = {}

    def max_grid(self, spec, block) -> int:
        """The most blocks of this kernel that fit on the GPU at once (a cooperative grid's limit)."""
        return runtime.max_coresident_blocks(self.kernels[spec.name], block, spec.dynamic_smem)

    def to_device(self, x, aval):
        # The common case first and cheapest: CuPy's `_c_contiguous` is what `flags.c_contiguous` reads,
        # without building a flags object (0.25 us on the H200's host).
        if type(x) is self.cupy.ndarray and x.dtype == aval.dtype and x._c_contiguous:
            return x
        return super().to_device(x, aval)

    def new_array(self, aval):
        """An uninitialised device array (cupy.empty without its Python wrapper)."""
        return self.cupy.ndarray(aval.shape, aval.dtype)

    def launch(self, spec, grid, block, args, cooperative):
        launcher = self.launchers.get(spec.name)
        if launcher is None or not launcher.fits(grid, block, args, cooperative):
            launcher = self.launchers[spec.name] = KernelLauncher(self.driver, self.kernels[spec.name], grid,
                                                                  block, cooperative, [slot_of(a) for a in args],
                                                                  smem=spec.dynamic_smem)
        launcher.launch_args(self.cupy.cuda.get_current_stream().ptr, args)

    def word_reader(self, array, byte_offset: int):
        """`read() -> int`: the int32 at `byte_offset` of device `array` once the current stream's work is
        done, through one asynchronous copy into pinned host memory and a wait on the stream (the
        executor's error word after a launch; CuPy's slice-and-get costs several times the host time)."""
        cp = self.cupy
        host = np.frombuffer(cp.cuda.alloc_pinned_memory(4), np.int32, 1)
        source, nbytes = array.data.ptr + byte_offset, host.nbytes
        copy, device_to_host = cp.cuda.runtime.memcpyAsync, cp.cuda.runtime.memcpyDeviceToHost
        lock = threading.Lock()         # one host word: threads read it one at a time

        def read() -> int:
            stream = cp.cuda.get_current_stream()
            with lock:
                copy(host.ctypes.data, source, nbytes, device_to_host, stream.ptr)
                stream.synchronize()
                return int(host[0])
        return read

    def fast_runner(self, spec, grid, block, cooperative, in_avals, out_avals, sources):
        """Executable.fast_path's `run(flat_args) -> outs` on this GPU. Per call: the inputs checked (CuPy
        arrays of the traced dtype, C-contiguous, else to_device) and their pointers read, or, for the very
        argument objects of the last call, the pointers found then (_InputPointers), the current stream
        read once, the results from an OutputRecycler, and one KernelLauncher.launch writing only the input
        and output pointers (the workspace's and constants' were written when `run` was made).

        Measured on the H200's host (2026-12-01, benchmarks/dispatch_bench.py's breakdown of `x + 1`, two
        runs): a whole repeated call 7.7-8.2 us, of which the jit's key and table 0.7, the input check 0.1,
        the stream 0.1, the recycled results 0.5 (a new allocation would be 1.6-1.7), the launch 4.2-4.5,
        and the bare driver call inside it 3.8-3.9; the GPU itself needs 1.65-1.77 us per launch of this
        kernel, so the host still sets the pace."""
        fixed = {i: value for i, (kind, value) in enumerate(sources) if kind == "fixed"}
        launcher = KernelLauncher(self.driver, self.kernels[spec.name], grid, block, cooperative,
                                  [POINTER] * len(sources), fixed=fixed, smem=spec.dynamic_smem)
        order = [i for i in executor.pool_order(sources, len(in_avals), len(out_avals))
                 if i < len(in_avals) + len(out_avals)]
        outputs = executor.OutputRecycler(self.new_array, out_avals)
        inputs = _InputPointers(self.to_device, in_avals)
        current_stream, lock = self.cupy.cuda.get_current_stream, launcher.lock

        def run(flat_args):
            in_pointers, ins = inputs(flat_args)    # ins: held until the launch (converted copies)
            stream = current_stream().ptr
            with lock:
                outs = outputs(stream)
                pool = in_pointers + [o.data.ptr for o in outs]
                launcher.launch(stream, [pool[i] for i in order])
            del ins
            return outs
        run.launcher, run.outputs, run.inputs = launcher, outputs, inputs    # for the benchmarks breakdowns
        return run


class _InputPointers:
    """The device pointers of a fast-path call's inputs: `pointers = inputs(flat_args)`.

    Each call checks and converts its arguments (to_device) and reads their pointers, a few hundred
    nanoseconds per argument: a model passing its few hundred weights would pay more host time for
    them than the GPU needs for a small forward. So when every argument of a call is used as it is (a
    CuPy array of the traced dtype, C-contiguous: no copy), their pointers are kept with the arguments
    themselves, and a later call with the very same argument objects takes those pointers without
    looking at them again. That is safe because gdsl.jit's fast path has already checked each argument's
    type, shape and dtype for this signature, and under the same CuPy array object its memory and dtype
    cannot change and its strides only with its shape. An argument converted on the way (numpy, another
    dtype, a strided view) is copied on every call, never remembered: its contents may change between
    calls. The last such argument list stays referenced here until a call with other arguments replaces it.
    """

    def __init__(self, to_device, avals):
        self.to_device, self.avals = to_device, avals
        self.last = (None, None)        # (the argument objects, their pointers): one tuple, swapped whole

    def __call__(self, flat_args) -> tuple[list, list]:
        """(the inputs' pointers, the device arrays they point into). The caller holds the arrays until its
        launch is queued: a converted argument's copy, dropped earlier, could be handed out again by the
        memory pool as a result array of the same launch."""
        last_args, last_pointers = self.last
        if last_args is not None and len(flat_args) == len(last_args) and \
                all(map(operator.is_, flat_args, last_args)):
            return list(last_pointers), last_args
        ins = [self.to_device(x, a) for x, a in zip(flat_args, self.avals, strict=True)]
        pointers = [x.data.ptr for x in ins]
        used_as_they_are = all(map(operator.is_, ins, flat_args))
        self.last = (tuple(flat_args), tuple(pointers)) if used_as_they_are else (None, None)
        return pointers, ins


def cuda_driver():
    """CuPy's binding of the CUDA driver API (cuLaunchKernel, cuLaunchCooperativeKernel, ...)."""
    from cupy_backends.cuda.api import driver
    return driver


# How each kernel parameter's value sits in its 8-byte slot of a KernelLauncher's value block (struct
# format, little-endian, padded to 8 bytes): device pointers, and the numpy scalars passed by value.
POINTER = "pointer"
_SLOT_FORMATS = {POINTER: "Q", np.dtype(np.int32): "i4x", np.dtype(np.int64): "q", np.dtype(np.uint32): "I4x",
                 np.dtype(np.uint64): "Q", np.dtype(np.float32): "f4x", np.dtype(np.float64): "d"}
CUDA_ERROR_INVALID_CONTEXT = 201


class KernelLauncher:
    """One kernel's launch, with what does not change between its launches prepared once.

    cuLaunchKernel reads the kernel's parameters through an array of pointers to their values. Here the
    values live in one block of 8-byte slots and the pointer array is built once: the slots of the
    parameters given per launch come first, in parameter order, then those of the `fixed` parameters (the
    workspace and constants on the fast path), written once. A launch packs the given values into the
    front of the block with one precompiled struct call and calls the driver; no occupancy or device query
    (the grid's co-residency was checked at load), no per-argument boxing as in CuPy's
    `Function.__call__` (measured on the H200's host, 2026-12-01, a 3-argument kernel: 6.0 us per CuPy
    launch, 7.3 cooperative; 5.1 and 5.4 us through the driver with ctypes slots filled per launch, most of
    it the driver's own cuLaunchKernel). The block is shared: the caller holds `lock` from packing to the driver's
    return (the driver copies the values at the launch), so threads launching at once cannot mix their
    arguments. A thread that has made no CUDA call yet has no current context: the driver refuses the
    launch with CUDA_ERROR_INVALID_CONTEXT, and the launch binds the device's primary context (as CuPy's
    own launch does) and is made again.

        launcher = KernelLauncher(driver, kernel, grid, block, cooperative, [POINTER, POINTER, POINTER],
                                  fixed={2: ws})
        with launcher.lock:
            launcher.launch(stream_ptr, [x.data.ptr, out.data.ptr])     # the given parameters' values
        launcher.launch_args(stream_ptr, args)      # all of them as arrays and numpy scalars; locks

    slots: per parameter, POINTER or the numpy dtype of a scalar passed by value (slot_of(an argument));
    fixed: parameter position -> its value for every launch; smem: bytes of dynamic shared memory.
    """

    def __init__(self, driver, kernel, grid: int, block: int, cooperative: bool, slots, fixed=None, smem=0):
        self.driver, self.kernel = driver, kernel       # the kernel keeps its CUmodule loaded
        if smem:                                        # (dynamic shared memory: resident weights)
            runtime.allow_dynamic_smem(kernel, smem)
        self.kernel_ptr, self.grid, self.block, self.cooperative = kernel.ptr, grid, block, cooperative
        self.fixed = fixed = fixed or {}                # kept: the fixed arrays live as long as their pointers
        self.n_params = len(slots)
        given = [i for i in range(self.n_params) if i not in fixed]
        stored = given + sorted(fixed)                  # the parameter whose value is in slot 0, 1, ...
        self.values = (ctypes.c_uint64 * max(self.n_params, 1))()
        address = ctypes.addressof(self.values)
        slot_index = {param: k for k, param in enumerate(stored)}
        self.params = (ctypes.c_void_p * max(self.n_params, 1))(
            *[address + 8 * slot_index[i] for i in range(self.n_params)])
        self.params_ptr = ctypes.addressof(self.params) if slots else 0
        struct.pack_into(_struct_format(slots[i] for i in sorted(fixed)), self.values, 8 * len(given),
                         *[fixed[i].data.ptr if slots[i] == POINTER else fixed[i] for i in sorted(fixed)])
        self.pack_given = struct.Struct(_struct_format(slots[i] for i in given)).pack_into
        self.given_pointer = [slots[i] == POINTER for i in given]
        self.lock = threading.Lock()
        # The driver call with every argument but the stream bound now: one C call per launch.
        fixed_args = (self.kernel_ptr, grid, 1, 1, block, 1, 1, smem)
        if cooperative:
            self.driver_call = functools.partial(driver.launchCooperativeKernel, *fixed_args)
            self.after_stream = (self.params_ptr,)
        else:
            self.driver_call = functools.partial(driver.launchKernel, *fixed_args)
            self.after_stream = (self.params_ptr, 0)        # no `extra` launch options

    def fits(self, grid, block, args, cooperative) -> bool:
        return (grid, block, cooperative, len(args)) == (self.grid, self.block, self.cooperative, self.n_params)

    def launch(self, stream: int, values) -> None:
        """Launch with `values` (ints: device pointers and scalars) for the given parameters, in order;
        the caller holds self.lock."""
        self.pack_given(self.values, 0, *values)
        try:
            self.call_driver(stream)
        except self.driver.CUDADriverError as e:
            if e.status != CUDA_ERROR_INVALID_CONTEXT:
                raise
            _bind_primary_context()
            self.call_driver(stream)

    def launch_args(self, stream: int, args) -> None:
        """Launch a launcher without fixed parameters with `args` (CuPy arrays, numpy scalars)."""
        values = [a.data.ptr if pointer else a for a, pointer in zip(args, self.given_pointer)]
        with self.lock:
            self.launch(stream, values)

    def call_driver(self, stream: int) -> None:
        """cuLaunchKernel (cuLaunchCooperativeKernel) with the parameter block as it is now."""
        self.driver_call(stream, *self.after_stream)


def _struct_format(slots) -> str:
    return "<" + "".join(_SLOT_FORMATS[s] for s in slots)


def _bind_primary_context() -> None:
    """Make the current device's primary context current on this thread (cudaFree(0) does, as any first
    CUDA runtime call does): where CuPy loaded the modules."""
    from cupy_backends.cuda.api import runtime as cuda_runtime
    cuda_runtime.free(0)


def slot_of(a):
    """The slot of kernel argument `a`: POINTER for a device array, else the dtype of the numpy scalar."""
    if not isinstance(a, np.generic) and hasattr(a, "data"):
        return POINTER
    dtype = getattr(a, "dtype", None)
    if dtype not in _SLOT_FORMATS:
        scalars = ", ".join(str(d) for d in _SLOT_FORMATS if d != POINTER)
        raise TypeError(f"kernel argument {a!r} ({type(a).__name__}) is neither a CuPy array nor a numpy scalar "
                        f"of a kernel parameter type ({scalars})")
    return dtype


def load(lowering: Lowering):
    """Compile, check co-residency (re-scheduling with a smaller grid if needed) and build the executable."""
    device = CupyDevice(lowering.options["barrier"])
    return executor.load_coresident(lowering, device, lower_with_grid, backend="cuda")


def to_device(x):
    return executor.to_device(x, "cuda")
