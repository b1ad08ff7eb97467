"""Running the CPU backend's compiled modules: the Executable of one plan.

`Executable` owns the workspace of one plan (temps, frame buffers: (max_depth + 2) copies each, the
recursion workspace of site stacks and frame uniforms (storage.py), consts, packed copies of matmul weights:
gemm.pack_columns), allocated once with numpy, cache-line aligned, zeroed by the OS page by page (memory is
taken only for the recursion depths used); each call writes the argument and fresh output addresses into the
buffer table, runs the kernel (device control) or drives the host program (host control) with an explicit
stack in Python, and then forgets them (the caller's arrays are not kept alive). Calls of one Executable
from several Python threads take turns (the workspace is shared).

A kernel runs on the caller's thread alone or, with `threads` > 1, also on the worker pool's threads
(pool.py, which also picks the count per call); a kernel with loops stops on Ctrl-C (interrupts.py).
"""
from __future__ import annotations

import ctypes
import threading
import time

import numpy as np

from gdsl.backends.cpu.gemm import pack_columns
from gdsl.backends.cpu.interrupts import ctrl_c
from gdsl.backends.cpu.kernel import INTERRUPTED
from gdsl.backends.cpu.pool import ThreadChoice, worker_pool
from gdsl.core.ir import Lit
from gdsl.errors import RecursionDepthError
from gdsl.profiling.sites import HEADER_WORDS
from gdsl.schedule.plan import Branch, Call, Launch, Loop, plan_statements

KERNEL_TYPE = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                               ctypes.c_void_p)


class Executable:
    """A compiled plan: `executable(flat_args)` -> the flat results (fresh numpy arrays)."""
    def __init__(self, plan, module, symbols, threads=1, packed=(), trace=None, region_bytes=0):
        self.plan = plan
        self.module = module          # the CompiledModule: its machine code lives as long as this executable
        self.threads = threads
        self.trace = trace            # TraceSites of an instrumented build: each call fills `last_trace`
        self.last_trace = None        # (uint64 array of `threads` regions, threads that ran)
        self.choice = ThreadChoice(threads)
        self.lock = threading.Lock()
        self.barrier = np.zeros(4, dtype=np.int32)    # count, sense, sleepers (lowerings._BARRIER), interrupt
        self.barrier_ptr = self.barrier.ctypes.data
        self.addresses = [module[s] for s in symbols]
        self.kernels = [KERNEL_TYPE(a) for a in self.addresses]
        self.functions = list(plan.functions)
        self.fn_index = {f.name: i for i, f in enumerate(self.functions)}
        index = {id(b): i for i, b in enumerate(plan.buffers)}
        stack_slot = len(plan.buffers) + (1 if trace else 0)     # the trace buffer's slot comes first
        first_packed = stack_slot + 1
        self.table = np.zeros(first_packed + len(packed), dtype=np.uint64)
        self.depths = np.zeros(max(len(self.functions), 1), dtype=np.int64)
        self.arrays: dict = {}        # id(buffer) -> numpy array (the workspace; frames have a depth axis)
        const_values = iter(plan.consts)
        self.input_slots, self.output_slots = [], []
        for value in plan.inputs:
            buf = value.buffer
            if buf.kind == "const":
                arr = _aligned(np.asarray(next(const_values), dtype=buf.aval.dtype))
                self.arrays[id(buf)] = arr
                self.table[index[id(buf)]] = arr.ctypes.data
            else:
                self.input_slots.append((index[id(buf)], buf))
        for value in plan.outputs:
            self.output_slots.append((index[id(value.buffer)], value.buffer))
        for buf in plan.buffers:
            if buf.kind in ("temp", "frame"):
                shape = buf.aval.shape
                if buf.frame_of is not None:
                    shape = (self.functions[self.fn_index[buf.frame_of]].frames,) + tuple(shape)
                what = f"the frames of recursive function {buf.frame_of!r}" if buf.frame_of else "a temporary"
                arr = _zeros(shape, buf.aval.dtype, what)
                self.arrays[id(buf)] = arr
                self.table[index[id(buf)]] = arr.ctypes.data
        self.stacks = _zeros((threads * region_bytes,), np.uint8, "the recursive functions' call stacks")
        self.table[stack_slot] = self.stacks.ctypes.data
        self.packed = [_aligned(pack_columns(self.arrays[id(buf)].reshape(shape), tile)) for buf, shape, tile in packed]
        for k, arr in enumerate(self.packed):
            self.table[first_packed + k] = arr.ctypes.data
        self.table_ptr = self.table.ctypes.data
        self.depths_ptr = self.depths.ctypes.data
        self.program = _flatten_host(plan) if plan.control == "host" else None
        self.loops = plan.control == "device" and any(isinstance(stmt, Loop) for stmt in plan_statements(plan))
        self.call_slots = self.input_slots + self.output_slots

    def __call__(self, flat_args):
        with self.lock:
            return self._call(flat_args)

    def _call(self, flat_args):
        try:
            return self._run(flat_args)
        finally:     # forget the call's arrays: the caller owns them (and frees them when it drops them)
            for slot, buf in self.call_slots:
                self.arrays.pop(id(buf), None)
                self.table[slot] = 0

    def _run(self, flat_args):
        args = []
        for (slot, buf), x in zip(self.input_slots, flat_args):
            arr = np.ascontiguousarray(to_numpy(x), dtype=buf.aval.dtype)
            if arr.shape != buf.aval.shape:
                arr = arr.reshape(buf.aval.shape)
            args.append(arr)
            self.arrays[id(buf)] = arr
            self.table[slot] = arr.ctypes.data
        outs = []
        for slot, buf in self.output_slots:
            arr = np.empty(buf.aval.shape, dtype=buf.aval.dtype)
            outs.append(arr)
            self.table[slot] = arr.ctypes.data
            self.arrays[id(buf)] = arr
        if self.program is None:
            threads = self.choice.pick()
            if self.trace:
                threads = self._trace_buffer()
            t0 = time.perf_counter()
            self.barrier[:] = 0
            if threads > 1:
                codes = self._interruptible(lambda: worker_pool.run(self.addresses[0], threads, self.table_ptr,
                                                                    self.depths_ptr, self.barrier_ptr))
            else:
                codes = self._interruptible(lambda: [self.kernels[0](self.table_ptr, self.depths_ptr, 0, 1,
                                                                     self.barrier_ptr)])
            self.choice.record(threads, time.perf_counter() - t0)
            for code in codes:
                self._check(code)
        else:
            self._run_host()
        return outs

    def _interruptible(self, call):
        """call(), stopped by Ctrl-C when the kernel has loops (they check the interrupt word)."""
        return ctrl_c.run(self.barrier, call) if self.loops else call()

    def _trace_buffer(self) -> int:
        """The trace buffer in its table slot, one region per thread, its counters zeroed (the records
        past them are never read); every thread runs (a profile shows the kernel as the plan places it)."""
        if self.last_trace is None:
            trace = np.empty((self.threads, self.trace.region_words), dtype=np.uint64)
            self.table[len(self.plan.buffers)] = trace.ctypes.data
            self.last_trace = (trace, self.threads)
        self.last_trace[0][:, :HEADER_WORDS] = 0
        return self.threads

    def _check(self, code):
        if code == INTERRUPTED:
            raise KeyboardInterrupt
        if code:
            raise RecursionDepthError.of(self.functions[code - 1])

    def _check_depth(self, k, depths):
        """A call of function number `k` from here (a Call, or a Branch that stands for one) would go past
        its max_depth?"""
        if depths[k] + 1 > self.functions[k].max_depth:
            self._check(k + 1)

    # --------------------------------------------------------------------------- host control
    def _scalar(self, value):
        storage = value.storage
        if isinstance(storage, Lit):
            return storage.val.item()
        arr = self.arrays[id(storage)]
        if storage.frame_of is not None:
            arr = arr[self.depths[self.fn_index[storage.frame_of]] + value.frame_offset]
        return arr.reshape(-1)[0].item()

    def _run_host(self):
        """The host program as flat instructions with an explicit return stack (no Python recursion)."""
        code, depths, kernels = self.program, self.depths, self.kernels
        depths[:] = 0
        returns: list = []
        pc = 0
        while True:
            ins = code[pc]
            op = ins[0]
            if op == "launch":
                self._check(kernels[ins[1]](self.table_ptr, self.depths_ptr, 0, 1, self.barrier_ptr))
                pc += 1
            elif op == "jump_unless":
                pc = pc + 1 if self._scalar(ins[1]) else ins[2]
            elif op == "jump":
                pc = ins[1]
            elif op == "switch":
                n = len(ins[2])
                pc = ins[2][min(max(int(self._scalar(ins[1])), 0), n - 1)]
            elif op == "check_depth":
                self._check_depth(self.fn_index[ins[1]], depths)
                pc += 1
            elif op == "call":
                k = self.fn_index[ins[1]]
                self._check_depth(k, depths)
                depths[k] += 1
                returns.append(pc + 1)
                pc = ins[2]
            elif op == "return":
                depths[self.fn_index[ins[1]]] -= 1
                pc = returns.pop()
            else:   # halt
                return


def _zeros(shape, dtype, what, align=64):
    """A zeroed array starting on an `align`-byte boundary whose pages the OS zeroes on first touch (calloc:
    a frame buffer of max_depth + 2 copies costs memory only for the depths used). MemoryError says `what`
    the memory is for and how much was asked."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    try:
        raw = np.zeros(nbytes + align, np.uint8)
    except MemoryError:
        raise MemoryError(f"cannot allocate {nbytes} bytes for {what} (recursion takes max_depth + 2 copies of "
                          f"each frame: lower max_depth in @gdsl.recurse(...) if it is the cause)") from None
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _aligned(arr, align=64):
    """A copy of `arr` starting on an `align`-byte boundary (numpy's large arrays start 16 bytes into a
    page: every cache line of a vector loop would be split)."""
    raw = np.empty(arr.nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    out = raw[start:start + arr.nbytes].view(arr.dtype).reshape(arr.shape)
    out[...] = arr
    return out


def to_numpy(x):
    """`x` (a numpy array, anything with __array__, a CuPy array, a DLPack tensor) as a numpy array."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__array__"):
        return np.asarray(x)
    if hasattr(x, "get"):
        return x.get()
    return np.from_dlpack(x)


def _flatten_host(plan):
    """The host statement tree (and recursive function bodies) as a list of instructions:
    ("launch", k) ("jump_unless", pred, target) ("jump", target) ("switch", index, targets)
    ("call", fn, entry) ("check_depth", fn) ("return", fn) ("halt",)."""
    code: list = []
    entries: dict = {}
    calls: list = []

    def emit(block):
        for stmt in block:
            if isinstance(stmt, Launch):
                code.append(("launch", stmt.kernel))
            elif isinstance(stmt, Loop):
                head = len(code)
                emit(stmt.cond)
                exit_at = len(code)
                code.append(None)
                emit(stmt.body)
                code.append(("jump", head))
                code[exit_at] = ("jump_unless", stmt.pred, len(code))
            elif isinstance(stmt, Branch):
                if stmt.depth_of:
                    code.append(("check_depth", stmt.depth_of))
                at = len(code)
                code.append(None)
                targets, ends = [], []
                for branch in stmt.branches:
                    targets.append(len(code))
                    emit(branch)
                    ends.append(len(code))
                    code.append(None)
                for e in ends:
                    code[e] = ("jump", len(code))
                code[at] = ("switch", stmt.index, tuple(targets))
            elif isinstance(stmt, Call):
                calls.append(len(code))
                code.append(("call", stmt.fn, None))
            else:
                raise TypeError(f"unexpected host statement {stmt!r}")
    emit(plan.host)
    code.append(("halt",))
    for f in plan.functions:
        entries[f.name] = len(code)
        emit(f.body)
        code.append(("return", f.name))
    for at in calls:
        code[at] = ("call", code[at][1], entries[code[at][1]])
    return code
