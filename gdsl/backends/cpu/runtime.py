"""Compiling and running the CPU backend's modules.

One MCJIT engine per compiled module (llvmlite's engine owns its target machine, so each gets its own), host
CPU and features, new-pass-manager O3. Modules are cached by the hash of their text while some executable
uses them: a second `compile_module` of the same IR returns the same machine code without recompiling, and
the code is freed (weakly cached engine) once no executable needs it.

`Executable` owns the workspace of one plan (temps, frame buffers: (max_depth + 2) copies each, the
recursion workspace of site stacks and frame uniforms (render.py), consts, packed copies of matmul weights:
gemm.pack_columns), allocated once with numpy, cache-line aligned, zeroed by the OS page by page (memory is
taken only for the recursion depths used); each call writes the argument and fresh output addresses into the
buffer table, runs the kernel (device control) or drives the host program (host control) with an explicit
stack in Python, and then forgets them (the caller's arrays are not kept alive). Calls of one Executable
from several Python threads take turns (the workspace is shared).

Ctrl-C: while a device-control kernel with loops runs on the main thread, a native SIGINT handler
(_INTERRUPT_IR) replaces Python's: it sets the executable's interrupt word, every loop back-edge and
barrier wait sees it and returns, and the call raises KeyboardInterrupt; Python's handler is restored after.

With `threads` > 1 (device control) the kernel runs as that many persistent threads at once, like the
vEUs of a GPU kernel: the caller's thread is thread 0 and a process-wide pool of worker threads, which
wait for jobs in native code (_POOL_IR), runs the others; the kernel's barriers synchronise them. The
same kernel also runs on one thread (nthreads = 1: every vEU's uTasks in turn, no barrier); _ThreadChoice
picks per call, by measured time.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import signal
import sys
import threading
import time
import weakref

import numpy as np

from gdsl.backends.cpu import cpu_count
from gdsl.backends.cpu.gemm import pack_columns
from gdsl.backends.cpu.kernel import INTERRUPTED
from gdsl.core.ir import Lit
from gdsl.errors import CompileError, RecursionDepthError
from gdsl.profiling.sites import HEADER_WORDS
from gdsl.schedule.plan import Branch, Call, Launch, Loop, plan_statements

_lock = threading.Lock()
_target_machine = None     # optimises and prints modules; each engine owns a target machine of its own
_cache = weakref.WeakValueDictionary()     # sha256 of the module text -> its live CompiledModule
stats = {"compiles": 0, "cache_hits": 0, "last_compile_s": 0.0}

KERNEL_TYPE = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                               ctypes.c_void_p)


def _llvm():
    import llvmlite.binding as llvm
    return llvm


def _host_target_machine():
    """A new target machine for the host CPU and its features (O3)."""
    llvm = _llvm()
    target = llvm.Target.from_triple(llvm.get_process_triple())
    return target.create_target_machine(cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(),
                                        opt=3, reloc="default", codemodel="jitdefault")


def _ensure_target():
    global _target_machine
    if _target_machine is None:
        llvm = _llvm()
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        _target_machine = _host_target_machine()
    return _target_machine


def _compile_error(text, message):
    line = None
    m = re.search(r":(\d+):(\d+): error", message)
    if m:
        lines = text.splitlines()
        k = int(m.group(1)) - 1
        line = lines[k] if 0 <= k < len(lines) else None
    return CompileError(f"LLVM rejected the generated module: {message.strip()}" +
                        (f"\n  at: {line.strip()}" if line else ""), log=message, source=text, line=line)


class CompiledModule:
    """One module's machine code: its own MCJIT engine (llvmlite's engine owns its target machine, so each
    gets a new one), freed with the engine when the last Executable that uses it is collected."""
    def __init__(self, engine, addresses: dict):
        self.engine = engine
        self.addresses = addresses      # {symbol: address}

    def __getitem__(self, symbol):
        return self.addresses[symbol]

    def global_address(self, name) -> int:
        return self.engine.get_global_value_address(name)


def compile_module(text: str, symbols) -> CompiledModule:
    """The module's machine code and entry points (`module[symbol]`: an address); compiled once per distinct
    text while some holder of the result is alive (the cache holds it weakly)."""
    key = hashlib.sha256(text.encode()).hexdigest()
    with _lock:
        cached = _cache.get(key)
        if cached is not None:
            stats["cache_hits"] += 1
            return cached
        llvm = _llvm()
        _ensure_target()
        t0 = time.perf_counter()
        try:
            mod = llvm.parse_assembly(text)
            mod.verify()
        except RuntimeError as e:
            raise _compile_error(text, str(e)) from None
        _optimize(mod)
        engine = llvm.create_mcjit_compiler(mod, _host_target_machine())
        engine.finalize_object()
        addresses = {s: engine.get_function_address(s) for s in symbols}
        missing = [s for s, a in addresses.items() if not a]
        if missing:
            raise CompileError(f"LLVM module lacks entry points {missing}", source=text)
        stats["compiles"] += 1
        stats["last_compile_s"] = time.perf_counter() - t0
        module = _cache[key] = CompiledModule(engine, addresses)
        return module


def _optimize(mod) -> None:
    """New-pass-manager O3 for the host CPU (vectorisers on)."""
    llvm = _llvm()
    mod.triple = _target_machine.triple
    mod.data_layout = str(_target_machine.target_data)
    tuning = llvm.create_pipeline_tuning_options(speed_level=3)
    tuning.loop_vectorization = True
    tuning.slp_vectorization = True
    passes = llvm.create_pass_builder(_target_machine, tuning)
    passes.getModulePassManager().run(mod, passes)


def optimized_ir(text: str) -> str:
    """The module after O3, as text (to read what LLVM made of it; adds nothing to the engine)."""
    with _lock:
        _ensure_target()
        mod = _llvm().parse_assembly(text)
        _optimize(mod)
        return str(mod)


def assembly(text: str) -> str:
    """The host assembly of the optimised module."""
    optimized = optimized_ir(text)
    with _lock:
        return _target_machine.emit_assembly(_llvm().parse_assembly(optimized))


# ------------------------------------------------------------------------------------------ executable

# The process's vEU workers, in native code. Control block (i64 words): 0 job counter (its low i32 is the
# futex word), 1 sleeping workers (i32), 2 workers done with the job, 3 kernel, 4 table, 5 depths,
# 6 threads, 7 barrier, 8 + k the return code of kernel copy k. A worker spins a while on the job counter,
# then sleeps on it (futex); seq_cst on the counter and the sleeper count means no wake-up is lost (as in
# lowerings._BARRIER). Linux x86-64: syscall 202 = futex (128: private; +1: wake), 24 = sched_yield.
_CONTROL_FIELDS = ("sleepers", "done", "kernel_at", "table_at", "depths_at", "threads_at", "barrier_at")
_POOL_IR = r"""
define void @gdsl_pool_worker(ptr %ctl, i64 %k, i32 %first) nounwind {
entry:
@CONTROL_BLOCK@
  %k8 = add i64 %k, 8
  %code_at = getelementptr inbounds i64, ptr %ctl, i64 %k8
  br label %spin
spin:
  %seen = phi i32 [%first, %entry], [%seen, %again], [%seen, %woke], [%job, %run], [%job, %work]
  %i = phi i32 [0, %entry], [%i1, %again], [0, %woke], [0, %run], [0, %work]
  %job = load atomic i32, ptr %ctl acquire, align 8
  %new = icmp ne i32 %job, %seen
  br i1 %new, label %run, label %again
again:
  %i1 = add i32 %i, 1
  %patient = icmp ult i32 %i, 200000
  br i1 %patient, label %spin, label %sleep
sleep:
  %s0 = atomicrmw add ptr %sleepers, i32 1 seq_cst, align 8
  %now = load atomic i32, ptr %ctl seq_cst, align 8
  %same = icmp eq i32 %now, %seen
  br i1 %same, label %futex, label %woke
futex:
  %r = call i64 (i64, ...) @syscall(i64 202, ptr %ctl, i32 128, i32 %seen, ptr null, ptr null, i32 0)
  br label %woke
woke:
  %s1 = atomicrmw sub ptr %sleepers, i32 1 seq_cst, align 8
  br label %spin
run:
  %n = load atomic i64, ptr %threads_at monotonic, align 8
  %mine = icmp slt i64 %k, %n
  br i1 %mine, label %work, label %spin
work:
  %kernel = load ptr, ptr %kernel_at
  %table = load ptr, ptr %table_at
  %depths = load ptr, ptr %depths_at
  %barrier = load ptr, ptr %barrier_at
  %code = call i32 %kernel(ptr %table, ptr %depths, i64 %k, i64 %n, ptr %barrier)
  %code64 = sext i32 %code to i64
  store i64 %code64, ptr %code_at
  %d = atomicrmw add ptr %done, i64 1 release, align 8
  br label %spin
}

define i32 @gdsl_pool_run(ptr %ctl, ptr %kernel, ptr %table, ptr %depths, i64 %n, ptr %barrier) nounwind {
entry:
@CONTROL_BLOCK@
  store ptr %kernel, ptr %kernel_at
  store ptr %table, ptr %table_at
  store ptr %depths, ptr %depths_at
  store atomic i64 %n, ptr %threads_at monotonic, align 8
  store ptr %barrier, ptr %barrier_at
  store atomic i64 0, ptr %done monotonic, align 8
  %job = atomicrmw add ptr %ctl, i32 1 seq_cst, align 8
  %waiting = load atomic i32, ptr %sleepers seq_cst, align 8
  %wake = icmp ne i32 %waiting, 0
  br i1 %wake, label %wakeup, label %go
wakeup:
  %w = call i64 (i64, ...) @syscall(i64 202, ptr %ctl, i32 129, i32 2147483647, ptr null, ptr null, i32 0)
  br label %go
go:
  %code = call i32 %kernel(ptr %table, ptr %depths, i64 0, i64 %n, ptr %barrier)
  %others = sub i64 %n, 1
  br label %join
join:
  %i = phi i32 [0, %go], [%i1, %more], [%i1, %yield]
  %d = load atomic i64, ptr %done acquire, align 8
  %all = icmp eq i64 %d, %others
  br i1 %all, label %out, label %more
more:
  %i1 = add i32 %i, 1
  %patient = icmp ult i32 %i, 200000
  br i1 %patient, label %join, label %yield
yield:
  %y = call i64 (i64, ...) @syscall(i64 24)
  br label %join
out:
  ret i32 %code
}

declare i64 @syscall(i64, ...)
""".replace("@CONTROL_BLOCK@", "\n".join(      # pointers to the control block's words 1-7
    f"  %{name} = getelementptr inbounds i64, ptr %ctl, i64 {k}" for k, name in enumerate(_CONTROL_FIELDS, 1)))
POOL_RUN_TYPE = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_int64, ctypes.c_void_p)
POOL_WORKER_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32)


class _Pool:
    """Persistent worker threads that run kernel copies 1..threads-1 (one job at a time per process). Each
    worker is a Python thread that calls gdsl_pool_worker once and stays in native code (the GIL released),
    so handing out a job takes no Python thread switch."""
    def __init__(self):
        self.lock = threading.Lock()
        self.control = np.zeros(8 + cpu_count(), np.int64)
        self.workers: list = []
        self.run_job = None

    def run(self, kernel, threads, table, depths, barrier):
        """kernel(table, depths, k, threads, barrier) for k in range(threads) at once; the return codes."""
        with self.lock:
            if self.run_job is None:
                self.module = compile_module(_POOL_IR, ["gdsl_pool_worker", "gdsl_pool_run"])   # kept for good:
                self.run_job = POOL_RUN_TYPE(self.module["gdsl_pool_run"])       # the workers run its code
                self.worker = POOL_WORKER_TYPE(self.module["gdsl_pool_worker"])
            while len(self.workers) < threads - 1:    # a new worker waits for the jobs after the last one
                args = (self.control.ctypes.data, len(self.workers) + 1, int(self.control[:1].view(np.int32)[0]))
                self.workers.append(threading.Thread(target=self.worker, args=args, daemon=True,
                                                     name="gdsl-cpu-veu"))
                self.workers[-1].start()
            code = self.run_job(self.control.ctypes.data, kernel, table, depths, threads, barrier)
            return [code, *self.control[9:8 + threads].tolist()]


class _ThreadChoice:
    """How many threads to run a multi-vEU kernel on: all of them pays on idle cores, one pays when other
    work holds the cores (every barrier then waits for a descheduled thread). Both give the same results,
    so the executable measures: it tries each count a few times, then runs the faster one, and every
    RETRY calls times the other again (the machine's load changes)."""
    TRIES, RETRY, KEEP = 3, 40, 5

    def __init__(self, most):
        self.options = (most, 1) if most > 1 else (1,)
        self.times: dict = {k: [] for k in self.options}
        self.calls = 0

    def pick(self) -> int:
        self.calls += 1
        if len(self.options) == 1:
            return 1
        for k in self.options:
            if len(self.times[k]) < self.TRIES:
                return k
        best = min(self.options, key=lambda k: min(self.times[k]))
        if self.calls % self.RETRY == 0:
            return next(k for k in self.options if k != best)
        return best

    def record(self, threads, seconds):
        if len(self.options) > 1:
            self.times[threads] = (self.times[threads] + [seconds])[-self.KEEP:]


_pool = _Pool()
os.register_at_fork(after_in_child=_pool.__init__)     # a forked child has none of the worker threads


# The native SIGINT handler: the Python-level handler cannot run while the main thread is in a kernel (ctypes
# holds it in native code until the kernel returns). It sets the interrupt word (i32 3) of the barrier block
# that @gdsl_interrupt_target points at, adds 2 to the barrier's sense word (so no barrier wait can complete
# and a thread about to sleep on it does not) and wakes its sleepers (futex is async-signal-safe).
_INTERRUPT_IR = r"""
@gdsl_interrupt_target = global ptr null, align 8

define void @gdsl_on_sigint(i32 %signal) nounwind {
entry:
  %bar = load atomic ptr, ptr @gdsl_interrupt_target seq_cst, align 8
  %none = icmp eq ptr %bar, null
  br i1 %none, label %out, label %stop
stop:
  %word = getelementptr inbounds i32, ptr %bar, i64 3
  store atomic volatile i32 1, ptr %word seq_cst, align 4
  %sense = getelementptr inbounds i32, ptr %bar, i64 1
  %old = atomicrmw add ptr %sense, i32 2 seq_cst, align 4
  %w = call i64 (i64, ...) @syscall(i64 202, ptr %sense, i32 129, i32 2147483647, ptr null, ptr null, i32 0)
  br label %out
out:
  ret void
}

declare i64 @syscall(i64, ...)
"""


class _SigAction(ctypes.Structure):
    """glibc's struct sigaction on Linux (x86-64, aarch64)."""
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16), ("flags", ctypes.c_int),
                ("restorer", ctypes.c_void_p)]


class _Interrupts:
    """Ctrl-C for kernels that loop: `run(barrier, call)` calls call() with the native SIGINT handler in
    place of Python's (main thread only, and only while Python's own handler is the default one that raises
    KeyboardInterrupt); raises KeyboardInterrupt if SIGINT came during the call."""
    def __init__(self):
        self.module = None

    def _setup(self) -> None:
        if self.module is None:
            self.module = compile_module(_INTERRUPT_IR, ["gdsl_on_sigint"])
            self.target = ctypes.c_void_p.from_address(self.module.global_address("gdsl_interrupt_target"))
            self.action = _SigAction(self.module["gdsl_on_sigint"])
            self.libc = ctypes.CDLL(None, use_errno=True)

    def run(self, barrier, call):
        if (not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            return call()
        self._setup()
        barrier[3] = 0
        previous = _SigAction()
        self.target.value = barrier.ctypes.data
        if self.libc.sigaction(signal.SIGINT, ctypes.byref(self.action), ctypes.byref(previous)) != 0:
            self.target.value = None
            return call()
        try:
            result = call()
        finally:
            self.libc.sigaction(signal.SIGINT, ctypes.byref(previous), None)
            self.target.value = None
        if barrier[3]:
            raise KeyboardInterrupt
        return result


_interrupts = _Interrupts()


class Executable:
    def __init__(self, plan, module, symbols, threads=1, packed=(), trace=None, region_bytes=0):
        self.plan = plan
        self.module = module          # the CompiledModule: its machine code lives as long as this executable
        self.threads = threads
        self.trace = trace            # TraceSites of an instrumented build: each call fills `last_trace`
        self.last_trace = None        # (uint64 array of `threads` regions, threads that ran)
        self.choice = _ThreadChoice(threads)
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
                    shape = (self.functions[self.fn_index[buf.frame_of]].max_depth + 2,) + tuple(shape)
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
                codes = self._interruptible(lambda: _pool.run(self.addresses[0], threads, self.table_ptr,
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
        return _interrupts.run(self.barrier, call) if self.loops else call()

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
            f = self.functions[code - 1]
            raise RecursionDepthError(
                f"recursive function {f.name!r} went deeper than max_depth={f.max_depth}; "
                f"raise max_depth in @gdsl.recurse(...) if the data needs it")

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
            elif op == "call":
                k = self.fn_index[ins[1]]
                if depths[k] + 1 > self.functions[k].max_depth:
                    self._check(k + 1)
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
    ("call", fn, entry) ("return", fn) ("halt",)."""
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
