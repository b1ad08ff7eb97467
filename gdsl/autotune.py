"""`jit(..., autotune=True)`: search the schedule knobs on the first call — compile each candidate, check it
against the reference interpreter, time it — and keep the fastest, but only when it is faster than the
default schedule beyond the noise of the measurement.

- Candidates: the default (what jit runs without autotune) always comes first; a backend adds its own with
  `autotune_candidates(program, options) -> list[dict]`, else the search covers `control` (device / host).
  Trace-time options (`unroll`) are not searched.
- Timing: CUDA events around each call when the outputs are CuPy arrays (the device's own clock, no host
  jitter), else a monotonic host clock around the call and the copy back. Each candidate runs until the 95 %
  confidence interval of its median time is within TARGET_REL_CI of the median (so candidates a few percent
  apart separate), at least MIN_RUNS and at most MAX_RUNS times, and for at most TIME_CAP_S seconds.
- Choice: a candidate replaces the best so far only when its whole confidence interval lies below the best's
  (and its median by at least MIN_GAIN): ties and noise keep the default. A winner other than the default must
  then win again, timed alternately with the default in CONFIRM_ROUNDS rounds (default first, then the winner
  first, ...): the search times each candidate once, one after the other, and a machine that speeds up while it
  runs (clocks ramping, the host's caches warming: the default, timed first, looked 10-14 % slower than it is
  on the H200 in session 12) would otherwise crown a candidate that is no faster. So the winner is never slower
  than the default measured in the same run.
- Progress: a search that runs longer than a couple of seconds shows a status line on a terminal (a log record
  on the `gdsl` logger otherwise), as a slow compile does (gdsl.backends.toolchain.Progress).
- Workspace placement (`place_workspace`, on by default): where a GPU kernel's workspace lies in the L2 may
  change its speed (NASRNN bs1 on the H200: 3 % in two rounds; docs/performance.md, session 13). On the first
  call of a signature, a device-control executable that can move its workspace (cfamily Executable.move_workspace)
  and returns GPU arrays is timed at each place; the fastest is kept when it beats the first place by MIN_GAIN
  in PLACE_ROUNDS alternating re-timings, as a winner of the search must.
- Cache: winners are kept in `$GDSL_CACHE_DIR/autotune.json` (default ~/.cache/gdsl), keyed by program text,
  backend, device name and the candidate list, so a later process starts with the winner at once. The file is
  updated under a lock file and replaced by a rename, so concurrent tuners keep each other's entries. An
  unusable or untrusted cache directory (see gdsl.backends.toolchain) means "no cache" with a CacheWarning; a
  file or entry of the wrong shape, or a cached winner that is not one of today's candidates or no longer
  builds, is ignored with a CacheWarning and the search runs again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass

import numpy as np

from gdsl.backends.toolchain import CacheWarning, Progress, trusted_dir, write_atomically
from gdsl.debug import debug
from gdsl.host import to_numpy
from gdsl.interpreter import run_program

CACHE_FILE = "autotune.json"
MIN_RUNS = 10            # calls per candidate before its spread is judged
MAX_RUNS = 1000
TIME_CAP_S = 2.0         # per candidate, after warm-up
TARGET_REL_CI = 0.01     # stop when the median's 95 % interval is within +-1 % of it
MIN_GAIN = 0.01          # and a challenger's median must be at least 1 % below the best's
WARMUP = 3
CONFIRM_ROUNDS = 4       # alternating re-timings of a winner against the default (default first in even rounds)
PLACE_RUNS = 15          # event-timed calls per workspace place (after WARMUP), their median compared
PLACE_ROUNDS = 2         # alternating re-timings of the fastest place against the first


# ---- the cache file ----

def _cache_path():
    folder = trusted_dir()
    return None if folder is None else folder / CACHE_FILE


@contextlib.contextmanager
def _locked(path):
    """Hold an exclusive lock on `path`.lock, so two tuners' read-modify-write cycles do not interleave."""
    try:
        import fcntl
    except ImportError:   # no flock (Windows): the rename still keeps the file whole, an entry may be lost
        yield
        return
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_cache(path) -> dict:
    """The cache file's entries; {} (with a CacheWarning when the file exists) when it cannot be used."""
    try:
        with open(path) as f:
            cache = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"autotune cache {path} ignored ({type(e).__name__}: {e})", CacheWarning, stacklevel=2)
        return {}
    if not isinstance(cache, dict):
        warnings.warn(f"autotune cache {path} ignored: it holds a {type(cache).__name__}, not an object",
                      CacheWarning, stacklevel=2)
        return {}
    return cache


def _cached_winner(key: str, space: list[dict]) -> dict | None:
    path = _cache_path()
    if path is None:
        return None
    entry = _read_cache(path).get(key)
    if entry is None:
        return None
    if entry not in space:
        # The key covers the candidate list, so a real winner is always one of them: this one was edited or
        # damaged (e.g. `grid: 0`), and lowering it could fail in any way.
        warnings.warn(f"autotune cache entry {entry!r} in {path} is not one of the candidates; searching again",
                      CacheWarning, stacklevel=2)
        return None
    return entry


def _store(key: str, options: dict) -> None:
    """Record `options` as the winner for `key`; a cache that cannot be written only costs a warning."""
    path = _cache_path()
    if path is None:
        return
    try:
        with _locked(path):
            cache = _read_cache(path)
            cache[key] = options
            write_atomically(path, json.dumps(cache, indent=1, sort_keys=True).encode())
    except OSError as e:
        warnings.warn(f"autotune could not save its result in {path} ({type(e).__name__}: {e})", CacheWarning,
                      stacklevel=2)


# ---- the candidates ----

def default_candidate(options: dict) -> dict:
    """What jit runs without autotune: the user's options as given. `control` is spelled out (its default is
    "device") so the default compares equal to a backend's own candidate for the same schedule."""
    base = {k: v for k, v in options.items() if k != "autotune"}
    return {"control": "device", **base}


def candidates(module, program, options) -> list[dict]:
    """The default first, then the backend's candidates (or device / host control), without repeats."""
    default = default_candidate(options)
    base = {k: v for k, v in options.items() if k != "autotune"}
    if hasattr(module, "autotune_candidates"):
        proposed = [dict(base, **c) for c in module.autotune_candidates(program, base)]
    else:
        proposed = [dict(base, control=c) for c in ("device", "host")]
    space = [default]
    for opts in proposed:
        if opts not in space:
            space.append(opts)
    return space


def device_name(module, backend: str) -> str:
    """The device the timings belong to: the backend's own name for it, else this machine's CPU."""
    if hasattr(module, "device_name"):
        return module.device_name()
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return f"{backend}: {cpu} x{os.cpu_count()}"


# ---- measuring ----

@dataclass(frozen=True)
class Measurement:
    """A candidate's median call time (seconds) with the 95 % confidence interval [low, high] of the median."""
    median: float
    low: float
    high: float
    runs: int

    def clearly_faster_than(self, other: Measurement) -> bool:
        return self.high < other.low and self.median < (1 - MIN_GAIN) * other.median


def summarize(times: list[float]) -> Measurement:
    """Median and its distribution-free 95 % confidence interval (order statistics n/2 -+ 0.98 sqrt(n))."""
    s = sorted(times)
    n = len(s)
    half = 1.96 * math.sqrt(n) / 2
    lo = max(0, math.floor(n / 2 - half) - 1)
    hi = min(n - 1, math.ceil(n / 2 + half))
    mid = n // 2
    median = s[mid] if n % 2 else (s[mid - 1] + s[mid]) / 2
    return Measurement(median, s[lo], s[hi], n)


def measure(timed_call, *, time_cap_s: float = TIME_CAP_S) -> Measurement:
    """Call `timed_call()` (it returns one call's seconds) until the median is known to within TARGET_REL_CI,
    or MAX_RUNS calls, or time_cap_s seconds have passed (at least MIN_RUNS calls)."""
    for _ in range(WARMUP):
        timed_call()
    times = []
    start = time.monotonic()
    while True:
        times.append(timed_call())
        if len(times) < MIN_RUNS:
            continue
        m = summarize(times)
        precise = (m.high - m.low) / 2 <= TARGET_REL_CI * m.median
        if precise or len(times) >= MAX_RUNS or time.monotonic() - start > time_cap_s:
            return m


def timer(executable, flat_args, outputs):
    """A function timing one call of `executable`: CUDA events when it returns CuPy arrays, else the host's
    monotonic clock around the call and the copy of its results (which waits for the device)."""
    if any(hasattr(o, "__cuda_array_interface__") for o in outputs):
        import cupy
        start, end = cupy.cuda.Event(), cupy.cuda.Event()

        def on_device() -> float:
            start.record()
            executable(flat_args)
            end.record()
            end.synchronize()
            return cupy.cuda.get_elapsed_time(start, end) / 1e3
        return on_device

    def on_host() -> float:
        t0 = time.perf_counter()
        to_numpy(executable(flat_args))
        return time.perf_counter() - t0
    return on_host


def _close(got, expected) -> bool:
    for g, e in zip(got, expected):
        g, e = np.asarray(g), np.asarray(e)
        if g.shape != e.shape or g.dtype != e.dtype:
            return False
        if e.dtype.kind == "f" or e.dtype.name == "bfloat16":
            if not np.allclose(g.astype(np.float64), e.astype(np.float64), rtol=1e-3, atol=1e-4,
                               equal_nan=True):
                return False
        elif not np.array_equal(g, e):
            return False
    return True


def _try(module, program, opts, flat_args, expected, time_cap_s):
    """(lowering, executable, Measurement, its timed call) of one candidate, or None when it fails to build or
    run or disagrees with the interpreter."""
    try:
        lowering = module.lower(program, opts)
        executable = module.load(lowering)
        outputs = executable(flat_args)
        if not _close([to_numpy(o) for o in outputs], expected):
            debug(1, "autotune", f"{opts}: wrong results, skipped")
            return None
        timed_call = timer(executable, flat_args, outputs)
        measured = measure(timed_call, time_cap_s=time_cap_s)
    except Exception as e:  # noqa: BLE001 - a candidate that fails to build or run is skipped
        debug(1, "autotune", f"{opts}: {type(e).__name__}: {e}")
        return None
    debug(1, "autotune", f"{opts}: {1e3 * measured.median:.3f} ms "
                         f"[{1e3 * measured.low:.3f}, {1e3 * measured.high:.3f}] over {measured.runs} calls")
    return lowering, executable, measured, timed_call


def _confirmed(winner, default, time_cap_s) -> bool:
    """Does `winner` beat `default` again in each of CONFIRM_ROUNDS rounds that time both, in alternating order
    (each a `_try` result plus its options), its median at least MIN_GAIN below the default's?"""
    def timed(candidate) -> Measurement:
        return measure(candidate[3], time_cap_s=time_cap_s / 2)
    for r in range(CONFIRM_ROUNDS):
        if r % 2 == 0:
            lost = timed(default)
            won = timed(winner)
        else:
            won = timed(winner)
            lost = timed(default)
        debug(1, "autotune", f"confirm round {r + 1}: {winner[4]} {1e3 * won.median:.3f} ms, default "
                             f"{1e3 * lost.median:.3f} ms")
        if not won.median < (1 - MIN_GAIN) * lost.median:
            return False
    return True


# ---- the search ----

def autotune(module, backend: str, program, options: dict, flat_args, *, time_cap_s: float = TIME_CAP_S):
    """(lowering, executable, chosen options): the cached winner, else the result of a search in which the
    default (the first candidate) wins unless another candidate is clearly faster."""
    space = candidates(module, program, options)
    key = hashlib.sha256(f"{program}\n{backend}\n{device_name(module, backend)}\n{space!r}".encode()).hexdigest()
    cached = _cached_winner(key, space)
    if cached is not None:
        try:
            lowering = module.lower(program, cached)
            return lowering, module.load(lowering), cached
        except Exception as e:  # noqa: BLE001 - any failure of a cached winner means: search again
            warnings.warn(f"the cached autotune winner {cached!r} failed ({type(e).__name__}: {e}); searching "
                          f"again", CacheWarning, stacklevel=2)
    expected = run_program(program, [np.asarray(to_numpy(a)) for a in flat_args])
    best = default = None   # (lowering, executable, Measurement, timer, options)
    with Progress(f"autotune on {backend}") as progress:
        for i, opts in enumerate(space):
            progress.update(f"candidate {i + 1}/{len(space)}: {opts}")
            result = _try(module, program, opts, flat_args, expected, time_cap_s)
            if result is not None and (best is None or result[2].clearly_faster_than(best[2])):
                best = (*result, opts)
            if i == 0:
                default = best
        if default is not None and best is not default:
            progress.update(f"confirming {best[4]} against the default")
            if not _confirmed(best, default, time_cap_s):
                best = default
    debug(1, "autotune", f"chosen: {best[4] if best else None}")
    if best is None:
        raise RuntimeError(f"autotune: no candidate of {space} compiled, ran and matched the interpreter")
    _store(key, best[4])
    return best[0], best[1], best[4]


# ---- where the workspace lies ----

def place_workspace(executable, flat_args) -> int | None:
    """Move `executable`'s workspace to its fastest place (module docstring), the place kept; None (nothing
    tried) for an executable that cannot move it or whose results are not GPU arrays."""
    move = getattr(executable, "move_workspace", None)
    if move is None or getattr(executable, "fast_path", lambda: None)() is None:
        return None
    from gdsl.backends.cfamily.executor import WORKSPACE_PLACES
    outputs = executable(flat_args)
    if not any(hasattr(o, "__cuda_array_interface__") for o in outputs):
        return None

    def median_at(place) -> float:
        move(place)
        timed = timer(executable.fast_path(), flat_args, outputs)
        for _ in range(WARMUP):
            timed()
        return float(np.median([timed() for _ in range(PLACE_RUNS)]))
    times = [median_at(place) for place in range(WORKSPACE_PLACES)]
    best = int(np.argmin(times))
    debug(1, "place_workspace", "medians (ms) by place: " + ", ".join(f"{1e3 * t:.3f}" for t in times))
    for r in range(PLACE_ROUNDS if best else 0):
        order = (0, best) if r % 2 == 0 else (best, 0)
        got = {place: median_at(place) for place in order}
        if not got[best] < (1 - MIN_GAIN) * got[0]:
            best = 0
            break
    move(best)
    debug(1, "place_workspace", f"kept place {best}")
    return best
