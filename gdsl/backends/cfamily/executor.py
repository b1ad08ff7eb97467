"""Running a rendered plan: buffers, launches, host control, and the recursion error flag, over a Device.

A Device (CuPy on a GPU: gdsl.backends.cuda.device; numpy on the CPU: emulator.EmulatedDevice) provides

    load(rendered)                       compile and load the translation unit
    to_device(x, aval) / empty(aval) / zeros(nbytes)
    launch(spec, grid, block, args, cooperative)
    read(array, byte_offset, dtype)      one scalar back to the host (host control reads predicates)

Device control: one launch of the single kernel; if the plan recurses, the error flag is read back and a
set flag raises RecursionDepthError. Host control: the plan's `host` statements run here in Python,
launching one kernel per straight-line block, reading loop predicates and branch indices back, and
keeping the recursion depth counters (passed to every kernel to address frame storage).
"""
from __future__ import annotations

import functools
import sys
import weakref
from dataclasses import dataclass

import numpy as np

from gdsl.backends.cfamily.render import ERROR_OFFSET, Rendered
from gdsl.core.ir import Lit
from gdsl.errors import RecursionDepthError
from gdsl.profiling.sites import HEADER_WORDS
from gdsl.schedule.plan import Branch, Call, Launch, Loop, Sync, walk


@dataclass
class Lowering:
    """What a C-family backend's `lower` returns: `.plan` (the Plan) and `.source` (the translation unit)."""
    program: object
    plan: object
    rendered: Rendered
    options: dict

    @property
    def source(self) -> str:
        return self.rendered.source


# The places the workspace may take in its allocation (Executable.move_workspace): WORKSPACE_PLACES offsets
# WORKSPACE_STEP bytes apart, which gdsl.autotune.place_workspace times on the first call, keeping a confirmed
# faster one. Measured on the H200 (session 13): NASRNN bs1 3 % faster in two rounds, the other rows within
# their noise; Attention bs1's instances, whose speed differs (0.114-0.146 ms for one source), measured the
# same at every place, so the workspace is not what sets their speed (docs/performance.md).
WORKSPACE_PLACES = 8
WORKSPACE_STEP = 256


class Executable:
    def __init__(self, plan, rendered: Rendered, device):
        self.plan, self.rendered, self.device = plan, rendered, device
        self.fns = {f.name: f for f in plan.functions}
        device.load(rendered)
        self._ws_pool = device.zeros(rendered.layout.size + (WORKSPACE_PLACES - 1) * WORKSPACE_STEP)
        self.ws_offset = 0
        self.ws = self._ws_pool[:max(rendered.layout.size, 16)]
        nconsts = len(plan.consts)
        self.consts = {v.buffer: device.to_device(c, v.aval) for v, c in zip(plan.inputs[:nconsts], plan.consts)}
        self.args = plan.inputs[nconsts:]
        self.last_trace = None        # instrumented builds: (trace words of every vEU, vEUs) of the last call
        self.lowering = None          # the Lowering whose plan this runs, where the loader kept it (load_coresident)
        self.cooperative = []
        for spec, kernel in zip(rendered.kernels, plan.kernels):
            # Grid barriers need every block resident at once: a cooperative launch checks that it is so.
            self.cooperative.append(spec.grid_syncs > 0 or any(isinstance(s, Sync) and s.scope == "grid"
                                                                for s in walk(kernel.body)))

    def __call__(self, flat_args):
        device, plan = self.device, self.plan
        arrays = dict(self.consts)
        for value, x in zip(self.args, flat_args, strict=True):
            arrays[value.buffer] = device.to_device(x, value.aval)
        outs = [device.empty(v.aval) for v in plan.outputs]
        arrays.update((v.buffer, o) for v, o in zip(plan.outputs, outs))
        depths = {f.name: 0 for f in plan.functions}
        if plan.control == "device":
            self.launch(0, arrays, depths)
            if plan.functions:
                self._check_depth(int(device.read(self.ws, ERROR_OFFSET, np.dtype(np.int32))))
        else:
            self.run_host(plan.host, arrays, depths)
        return outs

    def move_workspace(self, place: int) -> None:
        """Put the workspace at place `place` (0 .. WORKSPACE_PLACES - 1) of its allocation, zeroed (as a new
        one starts). Between calls only: a runner from fast_path() keeps the workspace it was made with."""
        if not 0 <= place < WORKSPACE_PLACES:
            raise ValueError(f"workspace place must be in [0, {WORKSPACE_PLACES}), got {place}")
        self.ws_offset = place * WORKSPACE_STEP
        self.ws = self._ws_pool[self.ws_offset:self.ws_offset + max(self.rendered.layout.size, 16)]
        self.ws.fill(0)

    def _check_depth(self, flag: int) -> None:
        """Raise the RecursionDepthError that the kernel's error word `flag` reports (0: none)."""
        if flag:
            raise RecursionDepthError.of(self.plan.functions[min(flag, len(self.plan.functions)) - 1])

    def fast_path(self):
        """`run(flat_args) -> outs`, the same as `self(flat_args)` for the most common plan (device control,
        one kernel, no profile trace), with where each kernel argument comes from worked out once: the
        workspace and constants fixed, inputs and outputs by position. None for any other plan. gdsl.jit's
        fast path calls it once per signature and `run` on every call of it.

        A device with `fast_runner(spec, grid, block, cooperative, in_avals, out_avals, sources)` builds
        `run` itself (the cuda backend: arguments written into a parameter block prepared once, outputs
        recycled); any other device gets `run` below, made of its to_device, empty and launch. A plan with
        recursive functions reads the kernel's error word after each launch, as __call__ does (a call
        deeper than max_depth raises, never returns results): through the device's `word_reader(array,
        byte_offset)` when it has one (cuda: one copy into pinned memory), else its `read`."""
        plan, rendered = self.plan, self.rendered
        if plan.control != "device" or rendered.trace or len(rendered.kernels) != 1:
            return None
        spec = rendered.kernels[0]
        sources = self._param_sources(spec)
        if sources is None:
            return None
        in_avals = [v.aval for v in self.args]
        out_avals = [v.aval for v in plan.outputs]
        return self._runner(spec, plan.grid, plan.block, self.cooperative[0], in_avals, out_avals, sources)

    def _runner(self, *launch):
        """fast_path's `run` for `launch` (spec, grid, block, cooperative, in_avals, out_avals, sources), with
        `run.bind_leading(leading)`: the `run` of the same kernel for the arguments after `leading`."""
        fast_runner = getattr(self.device, "fast_runner", None)
        run = fast_runner(*launch) if fast_runner is not None else _device_runner(self.device, *launch)
        run = self._checking_depth(run) if self.plan.functions else run
        run.bind_leading = functools.partial(self._bound_runner, launch)
        return run

    def _bound_runner(self, launch, leading):
        """`rest_run` with `rest_run(rest) == run(leading + rest)` for these very argument objects (gdsl.jit's
        Bound): each of them a fixed parameter of its own launcher, written once, so that a call reads and
        packs only the rest's pointers (SkipNet: 2 arguments a call instead of 594). None when one of them
        would be converted on the way (to_device copies it; its copy must be made at every call)."""
        spec, grid, block, cooperative, in_avals, out_avals, sources = launch
        n = len(leading)
        if n > len(in_avals) or any(self.device.to_device(x, a) is not x for x, a in zip(leading, in_avals)):
            return None
        shifted = [("fixed", leading[k]) if kind == "in" and k < n else (kind, k - n) if kind == "in" else
                   (kind, k) for kind, k in sources]
        return self._runner(spec, grid, block, cooperative, in_avals[n:], out_avals, shifted)

    def _checking_depth(self, run):
        """`run` followed by the read of the kernel's error word (plans with recursive functions)."""
        word_reader = getattr(self.device, "word_reader", None)
        if word_reader is not None:
            read_error = word_reader(self.ws, ERROR_OFFSET)
        else:
            def read_error():
                return int(self.device.read(self.ws, ERROR_OFFSET, np.dtype(np.int32)))
        check = self._check_depth

        def run_checked(flat_args):
            outs = run(flat_args)
            check(read_error())
            return outs
        return run_checked

    def _param_sources(self, spec):
        """Where each argument of the kernel comes from: ("in", k) the k-th flat argument, ("out", k) the
        k-th result, ("fixed", array) the workspace or a constant; None if some parameter is none of them.
        A buffer that is more than one of them resolves as __call__ resolves it: outputs before inputs
        before constants."""
        where = {v.buffer: ("out", k) for k, v in enumerate(self.plan.outputs)}
        for k, v in enumerate(self.args):
            where.setdefault(v.buffer, ("in", k))
        for buf, array in self.consts.items():
            where.setdefault(buf, ("fixed", array))
        sources = []
        for kind, obj in spec.params:
            if kind == "ws":
                sources.append(("fixed", self.ws))
            elif kind == "buffer" and obj in where:
                sources.append(where[obj])
            else:
                return None
        return sources

    def launch(self, k, arrays, depths):
        spec = self.rendered.kernels[k]
        args = []
        for kind, obj in spec.params:
            if kind == "buffer":
                args.append(arrays[obj])
            elif kind == "ws":
                args.append(self.ws)
            elif kind == "trace":
                args.append(self._trace_buffer())
            elif kind == "variant":     # kernels merged into one (render.MERGE_KERNELS): which one this is
                args.append(np.int32(obj))
            else:
                args.append(np.int32(depths[obj]))
        self.device.launch(spec, self.plan.grid, self.plan.block, args, self.cooperative[k])
        if self.rendered.trace:
            self.last_trace = (self._fetch_trace(), self.plan.grid)

    def _trace_buffer(self):
        """The trace buffer, one region per vEU (gdsl/profiling/sites.py), allocated once; its counters
        are zeroed before each launch (the records past them are never read)."""
        if getattr(self, "trace_words", None) is None:
            words = self.plan.grid * self.rendered.trace.region_words
            self.trace_words = self.device.zeros(8 * words).view(np.uint64).reshape(self.plan.grid, -1)
        self.trace_words[:, :HEADER_WORDS] = 0
        return self.trace_words

    def _fetch_trace(self):
        """The filled part of every vEU's region, on the host (the counters first, then the records)."""
        counts = self.device.fetch(self.trace_words[:, 0])
        used = HEADER_WORDS + 2 * min(int(counts.max(initial=0)), self.rendered.trace.capacity)
        return self.device.fetch(self.trace_words[:, :used])

    def run_host(self, block, arrays, depths):
        for stmt in block:
            if isinstance(stmt, Launch):
                self.launch(stmt.kernel, arrays, depths)
            elif isinstance(stmt, Loop):
                while True:
                    self.run_host(stmt.cond, arrays, depths)
                    if not self.read(stmt.pred, arrays, depths):
                        break
                    self.run_host(stmt.body, arrays, depths)
            elif isinstance(stmt, Branch):
                if stmt.depth_of and depths[stmt.depth_of] >= self.fns[stmt.depth_of].max_depth:
                    raise RecursionDepthError.of(self.fns[stmt.depth_of])
                index = int(self.read(stmt.index, arrays, depths))
                self.run_host(stmt.branches[min(max(index, 0), len(stmt.branches) - 1)], arrays, depths)
            elif isinstance(stmt, Call):
                fn = self.fns[stmt.fn]
                if depths[fn.name] >= fn.max_depth:
                    raise RecursionDepthError.of(fn)
                depths[fn.name] += 1
                try:
                    self.run_host(fn.body, arrays, depths)
                finally:
                    depths[fn.name] -= 1
            else:
                raise TypeError(f"unexpected host statement {stmt!r}")

    def read(self, value, arrays, depths):
        """A scalar Value read back to the host (a loop predicate or a branch index)."""
        if isinstance(value.storage, Lit):
            return value.storage.val
        buf = value.buffer
        if buf in arrays:
            return self.device.read(arrays[buf], 0, value.aval.dtype)
        offset = self.rendered.layout.offsets[buf]
        if buf.kind == "frame":
            offset += (depths[buf.frame_of] + value.frame_offset) * buf.aval.size * buf.aval.dtype.itemsize
        return self.device.read(self.ws, offset, value.aval.dtype)


def _device_runner(device, spec, grid, block, cooperative, in_avals, out_avals, sources):
    """Executable.fast_path's `run` on any Device: its to_device, empty and launch, the kernel's argument
    list picked by precomputed positions out of inputs + outputs + fixed arrays."""
    fixed = [value for kind, value in sources if kind == "fixed"]
    order = pool_order(sources, len(in_avals), len(out_avals))

    def run(flat_args):
        ins = [device.to_device(x, a) for x, a in zip(flat_args, in_avals, strict=True)]
        outs = [device.empty(a) for a in out_avals]
        pool = ins + outs + fixed
        device.launch(spec, grid, block, [pool[i] for i in order], cooperative)
        return outs
    return run


def pool_order(sources, n_in: int, n_out: int) -> list[int]:
    """Each kernel argument's index in `ins + outs + fixed`, where `fixed` lists the sources' fixed arrays
    in parameter order (sources as Executable._param_sources gives them)."""
    order, n_fixed = [], 0
    for kind, value in sources:
        if kind == "in":
            order.append(value)
        elif kind == "out":
            order.append(n_in + value)
        else:
            order.append(n_in + n_out + n_fixed)
            n_fixed += 1
    return order


# ------------------------------------------------------------------------------ a GPU through CuPy
# DLPack device types of GPU memory: kDLCUDA, kDLCUDAHost, kDLCUDAManaged (NVIDIA); kDLROCM, kDLROCMHost (AMD).
DLPACK_GPU_DEVICES = {"cuda": (2, 3, 13), "hip": (10, 11)}


class CupyDevice:
    """The executor's Device on a GPU through CuPy, shared by the CUDA and HIP backends (a CuPy build for CUDA
    or for ROCm: the same Python API). A backend subclasses it with what differs:

        compile_code(source) -> bytes          the code object for this device (NVRTC CUBIN, hiprtc ELF)
        max_grid(spec, block) -> int           the most co-resident blocks of a loaded kernel
        launch(spec, grid, block, args, cooperative)
    """
    name = "gpu"

    def __init__(self):
        import cupy
        self.cupy = cupy
        self.kernels = {}
        self.loaded = None

    def compile_code(self, source: str) -> bytes:
        raise NotImplementedError

    def compile(self, rendered) -> None:
        module = self.cupy.cuda.function.Module()
        module.load(bytes(self.compile_code(rendered.source)))       # cuModuleLoadData / hipModuleLoadData
        self.kernels = {spec.name: module.get_function(spec.name) for spec in rendered.kernels}
        self.module, self.loaded = module, rendered

    def load(self, rendered) -> None:
        if self.loaded is not rendered:
            self.compile(rendered)

    def to_device(self, x, aval):
        """CuPy arrays as they are; GPU `__dlpack__` objects (torch tensors on this GPU) without a copy;
        anything else through numpy, copied in. A dtype other than the traced one is converted on the device."""
        cp = self.cupy
        if not isinstance(x, cp.ndarray):
            if self.on_gpu(x):
                x = cp.from_dlpack(x)
            else:
                return cp.asarray(np.ascontiguousarray(np.asarray(x), dtype=aval.dtype))
        if x.dtype != aval.dtype:
            x = x.astype(aval.dtype)
        return cp.ascontiguousarray(x)

    def on_gpu(self, x) -> bool:
        return on_gpu(x, self.name)

    def empty(self, aval):
        return self.cupy.empty(aval.shape, dtype=aval.dtype)     # CuPy 14 holds bfloat16 (ml_dtypes)

    def zeros(self, nbytes):
        return self.cupy.zeros(max(nbytes, 16), dtype=np.uint8)

    def fetch(self, array):
        """A device array as numpy (waits for the launch)."""
        return array.get()

    def read(self, array, byte_offset, dtype):
        raw = array.reshape(-1).view(self.cupy.uint8)[byte_offset:byte_offset + dtype.itemsize].get()
        return raw.view(dtype)[0]


# OutputRecycler: larger result sets are allocated anew on every call. 64 MiB: a jitted signature then holds at
# most two spare sets, 128 MiB, while a new set costs the host far more than the launch: Attention bs64's three
# results (25 MB) took 14.0 us a call from CuPy's pool against 1.9 recycled (H200 host, session 31,
# benchmarks/host_overhead.py --batch 64; 16 MiB before).
RECYCLE_MAX_BYTES = 64 << 20


class OutputRecycler:
    """The result arrays of one kernel's repeated launches: fresh arrays for every call, most of the time
    without asking the allocator for them.

    Allocating a CuPy array costs about as much host time as the launch itself (~2.5-4 us on the H200's
    host: the memory pool's lookup, then the ndarray). So the result sets of the last `keep` calls stay
    here, and a call gets one of them back when nothing outside this object refers to any of its arrays
    any more: no reference to the array (so no view of it either: views hold their base), no weak
    reference, no other reference to its MemoryPointer or Memory (an array made on `a.data`, `a.data + k`),
    and it was last written on the stream the call launches on, so the new kernel runs after all the work
    queued with it (the rule of CuPy's own memory pool, which hands freed memory out again only on the
    stream it was allocated on, without waiting for other streams). Otherwise the call gets newly
    allocated arrays.
    A result the caller keeps is therefore never handed out again while it is kept: `y = f(x)` in a loop
    alternates between two sets.

    Result sets of more than RECYCLE_MAX_BYTES are allocated anew on every call: two spare sets would hold memory
    the pool could give to other arrays.

        outputs = OutputRecycler(allocate, avals)     # allocate(aval) -> a new device array
        outs = outputs(stream_ptr)                    # a list of arrays of `avals`, no one else's

    Not thread-safe by itself: the caller holds a lock around the call and the launch that writes `outs`.
    """
    def __init__(self, allocate, avals, keep: int = 2):
        self.allocate, self.avals, self.keep = allocate, list(avals), keep
        self.recycle = sum(a.size * a.dtype.itemsize for a in self.avals) <= RECYCLE_MAX_BYTES
        self.sets = []          # (stream, arrays, their reference counts when new): the last `keep` sets
        self.oldest = 0         # which of them a new set replaces

    def __call__(self, stream: int) -> list:
        if not self.recycle:
            return [self.allocate(a) for a in self.avals]
        for written_on, arrays, counts_when_new in self.sets:
            if written_on == stream and reference_counts(arrays) == counts_when_new:
                return list(arrays)
        arrays = tuple(self.allocate(a) for a in self.avals)
        entry = (stream, arrays, reference_counts(arrays))      # measured while only `arrays` holds them
        if len(self.sets) < self.keep:
            self.sets.append(entry)
        else:
            self.sets[self.oldest] = entry
            self.oldest = (self.oldest + 1) % self.keep
        return list(arrays)


def reference_counts(arrays) -> list[tuple]:
    """Per array: the references to it, the weak references to it, and the references to its
    MemoryPointer and to that pointer's Memory. Equal to the counts taken when the arrays were new and held
    by the recycler alone means no one else refers to them: a view holds its base, an array made on
    `a.data` holds the MemoryPointer, a pointer `a.data + k` holds the Memory."""
    return [(sys.getrefcount(a), weakref.getweakrefcount(a), sys.getrefcount(a.data), sys.getrefcount(a.data.mem))
            for a in arrays]


def on_gpu(x, backend: str) -> bool:
    """Is `x` a `__dlpack__` object in the memory of `backend`'s GPUs ("cuda" or "hip")?"""
    if isinstance(x, np.ndarray) or not hasattr(x, "__dlpack__"):
        return False
    try:
        return x.__dlpack_device__()[0] in DLPACK_GPU_DEVICES[backend]
    except Exception:  # noqa: BLE001 - no device query: treat as host memory
        return False


def to_device(x, backend: str):
    """An argument on `backend`'s GPU as CuPy: CuPy arrays as they are, GPU `__dlpack__` objects without a
    copy, anything else copied in through numpy."""
    import cupy
    if isinstance(x, cupy.ndarray):
        return x
    if on_gpu(x, backend):
        return cupy.from_dlpack(x)
    return cupy.asarray(np.asarray(x))


def load_coresident(lowering, device, relower, *, backend: str, attempts: int = 4) -> Executable:
    """Compile `lowering` on `device` and check that its grid can be co-resident, re-scheduling with
    `relower(program, options, grid)` at the grid that fits (a persistent grid that does not fit would wait at
    its first grid barrier forever); the Executable of the first lowering that fits."""
    from gdsl.debug import debug
    opts = lowering.options
    for attempt in range(attempts):
        device.compile(lowering.rendered)
        needs = [spec for spec in lowering.rendered.kernels if spec.grid_syncs]
        limit = min([device.max_grid(spec, opts["block"]) for spec in needs], default=lowering.plan.grid)
        if limit < 1:
            raise RuntimeError(f"a block of {opts['block']} threads of this kernel does not fit on the GPU; "
                               f"use a smaller block")
        if lowering.plan.grid <= limit:
            executable = Executable(lowering.plan, lowering.rendered, device)
            executable.lowering = lowering        # (the one re-scheduled below, where it was)
            return executable
        if attempt == attempts - 1:
            break
        debug(1, backend, f"grid {lowering.plan.grid} cannot be co-resident (at most {limit} blocks of "
                          f"{opts['block']} threads): re-scheduling with grid={limit}")
        lowering = relower(lowering.program, opts, limit)
    # Never launch a grid that cannot be co-resident: its grid barriers would wait forever (CuPy would even
    # shrink a cooperative grid silently, leaving vEUs' uTasks unrun).
    raise RuntimeError(f"no co-resident grid found for this kernel (last: {lowering.plan.grid} > {limit})")
