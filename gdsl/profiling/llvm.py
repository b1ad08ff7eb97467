"""The CPU backend's trace helpers, as LLVM IR text appended to an instrumented module (sites.py has the
record format). The clock is clock_gettime(CLOCK_MONOTONIC): nanoseconds, one clock for every thread."""
from __future__ import annotations

from gdsl.profiling.sites import HEADER_WORDS

CLOCK_MONOTONIC = 1     # Linux

_TRACE_IR = """
define internal void @gdsl_trace_event(ptr %region, i64 %code) nounwind noinline {{
entry:
  %ts = alloca [2 x i64], align 8
  %rc = call i32 @clock_gettime(i32 {clock}, ptr %ts)
  %sec = load i64, ptr %ts
  %nsec_at = getelementptr inbounds i64, ptr %ts, i64 1
  %nsec = load i64, ptr %nsec_at
  %sec_ns = mul i64 %sec, 1000000000
  %now = add i64 %sec_ns, %nsec
  %n = load i64, ptr %region
  %full = icmp uge i64 %n, {capacity}
  br i1 %full, label %drop, label %record
record:
  %twice = shl i64 %n, 1
  %at = add i64 %twice, {header}
  %stamp_at = getelementptr inbounds i64, ptr %region, i64 %at
  store i64 %now, ptr %stamp_at
  %code_at = getelementptr inbounds i64, ptr %stamp_at, i64 1
  store i64 %code, ptr %code_at
  %n1 = add i64 %n, 1
  store i64 %n1, ptr %region
  ret void
drop:
  %dropped_at = getelementptr inbounds i64, ptr %region, i64 1
  %d = load i64, ptr %dropped_at
  %d1 = add i64 %d, 1
  store i64 %d1, ptr %dropped_at
  ret void
}}

; the event of a task, on the threads that run one of its vEUs first..first+count-1 (vEU v is thread
; v % nthreads): every thread when count >= nthreads, else those with (thread - first) mod nthreads < count
define internal void @gdsl_trace_task(ptr %region, i64 %code, i64 %thread, i64 %nthreads, i64 %first,
                                      i64 %count) nounwind noinline {{
entry:
  %every = icmp sge i64 %count, %nthreads
  %first_mod = urem i64 %first, %nthreads
  %shifted = add i64 %thread, %nthreads
  %diff = sub i64 %shifted, %first_mod
  %rel = urem i64 %diff, %nthreads
  %some = icmp ult i64 %rel, %count
  %mine = or i1 %every, %some
  br i1 %mine, label %record, label %skip
record:
  call void @gdsl_trace_event(ptr %region, i64 %code)
  ret void
skip:
  ret void
}}

declare i32 @clock_gettime(i32, ptr)
"""


def trace_support(capacity: int) -> str:
    """Definitions of gdsl_trace_event / gdsl_trace_task for regions of `capacity` records."""
    return _TRACE_IR.format(clock=CLOCK_MONOTONIC, capacity=int(capacity), header=HEADER_WORDS)
