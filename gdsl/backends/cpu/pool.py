"""Running a kernel on several threads at once: the process's pool of vEU worker threads, and the choice,
per executable, of how many threads a call runs on.

With `threads` > 1 (device control) the kernel runs as that many persistent threads at once, like the
vEUs of a GPU kernel: the caller's thread is thread 0 and a process-wide pool of worker threads, which
wait for jobs in native code (_POOL_IR), runs the others; the kernel's barriers synchronise them. The
same kernel also runs on one thread (nthreads = 1: every vEU's uTasks in turn, no barrier); ThreadChoice
picks per call, by measured time.
"""
from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from gdsl.backends.cpu import cpu_count
from gdsl.backends.cpu.compiler import compile_module

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


class WorkerPool:
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


class ThreadChoice:
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


worker_pool = WorkerPool()
os.register_at_fork(after_in_child=worker_pool.__init__)     # a forked child has none of the worker threads
