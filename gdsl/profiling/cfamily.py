"""The C-family backends' trace helper (CUDA, HIP and the g++ emulator), as source text for an
instrumented translation unit (sites.py has the record format).

Thread 0 of each vEU (thread block) records; the others skip. The clock is the dialect's `trace_clock`:
CUDA `%globaltimer` (ns, one clock for the whole GPU), HIP `s_memrealtime` (the 100 MHz constant clock
of gfx90a: 10 ns ticks), the emulator `clock_gettime(CLOCK_MONOTONIC)`.
"""
from __future__ import annotations

from gdsl.profiling.sites import HEADER_WORDS, code

_PRELUDE = """// ---------------------------------------------------------------------------------------- trace
{clock_code}
#define GDSL_TRACE_CLOCK() ({clock})
GDSL_DEV void gdsl_trace(unsigned long long* region, unsigned long long code) {{
  if ({thread_index} != 0) return;
  unsigned long long n = region[0];
  if (n < {capacity}ull) {{
    region[{header} + 2 * n] = GDSL_TRACE_CLOCK();
    region[{header} + 2 * n + 1] = code;
    region[0] = n + 1;
  }} else {{
    region[1] += 1;      // dropped: the profile says it is truncated
  }}
}}
"""


def trace_prelude(dialect, capacity: int) -> str:
    """gdsl_trace(region, code) for regions of `capacity` records, stamping with the dialect's clock."""
    return _PRELUDE.format(clock=dialect.trace_clock, clock_code=dialect.trace_clock_code,
                           thread_index=dialect.thread_index,
                           capacity=int(capacity), header=HEADER_WORDS)


def _record(site: int, end: bool, arg: str) -> str:
    argument = "" if arg == "0" else f" | ((unsigned long long)({arg}) << 32)"
    return f"gdsl_trace(gdsl_tr, {code(site, end)}ull{argument});"


def trace_begin(site: int, arg: str = "0") -> str:
    """The statement recording the begin of event `site` (arg: a C int expression, the uTask index)."""
    return _record(site, False, arg)


def trace_end(site: int, arg: str = "0") -> str:
    return _record(site, True, arg)
