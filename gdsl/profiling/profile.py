"""`gdsl.profile(f, *args, **kwargs)`: a per-vEU timeline of one run of a jitted function.

    p = gdsl.profile(f, x, n)      # f(x, n) once as a warm-up, then once with the instrumented build
    p.save("f.json")               # Chrome trace / Perfetto: one track per vEU
    print(p.summary())             # per op, per barrier, per loop
    p.plot("f.png")                # a PNG timeline (matplotlib)

The instrumented build is the same plan rendered with trace code (backend option `profile`, a separate
compile-cache entry: the normal build has no trace code). docs/profile.md says what the events mean.
"""
from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from gdsl.profiling.sites import HEADER_WORDS

KIND_COLOURS = {"barrier": "#000000", "loop": "#dddddd", "iteration": "#bbbbbb", "case": "#9edae5",
                "call": "#c5b0d5"}


@dataclass
class Event:
    """One slice of a track: [begin, end) in ns from the first stamp of the run; depth 0 is outermost."""
    track: int
    site: int
    kind: str            # "op", "barrier", "loop", "iteration", "case", "call"
    name: str
    begin: float
    end: float
    depth: int
    args: dict = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.end - self.begin


class Profile:
    """The events of one instrumented run. `events` (Event list, by track then begin), `tracks` (vEUs; on
    the CPU backend threads), `kernel_ns` (first to last stamp), `truncated` (a vEU's buffer filled up and
    later events were not recorded; `dropped` counts them), `note` (what the summary's first line adds: that
    the instrumented plan ran on another grid than the normal build's)."""

    def __init__(self, sites, regions, n_tracks: int, *, backend: str, clock: str, ns_per_tick: float = 1.0,
                 track_names=None, plan: str = "", note: str = ""):
        self.sites = sites
        self.backend, self.clock, self.plan, self.note = backend, clock, plan, note
        self.tracks = list(range(n_tracks))
        self.track_names = list(track_names or [f"vEU {k}" for k in self.tracks])
        words = np.asarray(regions, dtype=np.uint64)     # a region per track: its counters, then records
        if words.ndim == 1:
            words = words.reshape(n_tracks, sites.region_words)
        counts = np.minimum(words[:, 0], sites.capacity).astype(np.int64)
        self.dropped = int(words[:, 1].sum())
        self.truncated = self.dropped > 0
        stamps = [words[k, HEADER_WORDS:HEADER_WORDS + 2 * counts[k]].reshape(-1, 2) for k in self.tracks]
        firsts = [int(s[0, 0]) for s in stamps if len(s)]
        origin = min(firsts) if firsts else 0
        self.events: list[Event] = []
        self.unmatched = 0
        for k, records in enumerate(stamps):
            self.events += self._decode(k, records, origin, ns_per_tick)
        ends = [e.end for e in self.events]
        self.kernel_ns = max(ends) if ends else 0.0
        if self.truncated:
            warnings.warn(f"gdsl.profile: the trace buffer filled up ({sites.capacity} records per vEU); "
                          f"{self.dropped} later events were not recorded (Profile.truncated)", stacklevel=3)

    def _decode(self, track, records, origin, ns_per_tick) -> list[Event]:
        """Begin/end records to nested slices; a begin left open (a full buffer, a recursion error) ends at
        the track's last stamp."""
        events, stack = [], []
        last = 0.0
        for stamp, code in records.tolist():
            t = (stamp - origin) * ns_per_tick
            last = max(last, t)
            site, end, arg = (code & 0xFFFFFFFF) >> 1, code & 1, code >> 32
            if not end:
                stack.append((site, t, arg))
                continue
            if not stack or stack[-1][0] != site:
                self.unmatched += 1
                continue
            _, begin, arg = stack.pop()
            events.append(self._event(track, site, begin, t, len(stack), arg))
        while stack:
            site, begin, arg = stack.pop()
            events.append(self._event(track, site, begin, last, len(stack), arg, open_end=True))
        return sorted(events, key=lambda e: (e.begin, e.depth))

    def _event(self, track, site, begin, end, depth, arg, open_end=False) -> Event:
        s = self.sites.sites[site]
        args = dict(s.args)
        if s.kind == "op" and self.backend != "cpu":
            args["uTask"] = arg
        if open_end:
            args["unfinished"] = True
        return Event(track, site, s.kind, s.name, begin, end, depth, args)

    # -------------------------------------------------------------------------------- Chrome trace
    def chrome_trace(self) -> dict:
        """The trace as a Chrome-trace / Perfetto JSON object (times in µs)."""
        meta = [{"ph": "M", "pid": 0, "tid": 0, "name": "process_name",
                 "args": {"name": f"gdsl kernel ({self.backend}, clock {self.clock})"}}]
        meta += [{"ph": "M", "pid": 0, "tid": k, "name": "thread_name", "args": {"name": self.track_names[k]}}
                 for k in self.tracks]
        meta += [{"ph": "M", "pid": 0, "tid": k, "name": "thread_sort_index", "args": {"sort_index": k}}
                 for k in self.tracks]
        slices = [{"ph": "X", "pid": 0, "tid": e.track, "name": e.name, "cat": e.kind, "ts": e.begin / 1e3,
                   "dur": e.duration / 1e3, "args": e.args} for e in self.events]
        return {"traceEvents": meta + slices, "displayTimeUnit": "ns",
                "otherData": {"backend": self.backend, "clock": self.clock, "truncated": self.truncated,
                              "dropped_events": self.dropped, "kernel_us": self.kernel_ns / 1e3}}

    def save(self, path) -> None:
        """Write the Chrome-trace JSON (open it in https://ui.perfetto.dev or chrome://tracing)."""
        with open(path, "w") as f:
            json.dump(self.chrome_trace(), f)

    # -------------------------------------------------------------------------------- summary
    def op_totals(self) -> dict:
        """{op name: (calls, total ns over all vEUs)}."""
        return self._totals("op")

    def barrier_totals(self) -> dict:
        """{barrier name: (waits, total ns waited over all vEUs)}."""
        return self._totals("barrier")

    def _totals(self, kind) -> dict:
        out: dict = defaultdict(lambda: [0, 0.0])
        for e in self.events:
            if e.kind == kind:
                out[e.name][0] += 1
                out[e.name][1] += e.duration
        return {name: tuple(v) for name, v in out.items()}

    def loop_totals(self) -> dict:
        """{loop name: (iterations per vEU, ns per iteration)}: the mean over the vEUs that ran the loop."""
        time, iterations, tracks = defaultdict(float), defaultdict(int), defaultdict(set)
        for e in self.events:
            if e.kind == "loop":
                time[e.name] += e.duration
                tracks[e.name].add(e.track)
            elif e.kind == "iteration":
                iterations[e.name.removesuffix(" iteration")] += 1
        out = {}
        for name in time:
            n = len(tracks[name])
            per_veu = iterations[name] / n
            out[name] = (per_veu, time[name] / n / per_veu if per_veu else 0.0)
        return out

    def summary(self) -> str:
        """A table: per op (calls, total, share of all vEU time, mean per call), per barrier (waits, mean
        wait), per loop (iterations, time per iteration), and the rest (uniforms, control flow, idle)."""
        veu_time = self.kernel_ns * len(self.tracks) or 1.0
        lines = [f"gdsl profile ({self.backend}, clock {self.clock}): kernel {self.kernel_ns / 1e3:.1f} us on "
                 f"{len(self.tracks)} vEUs = {veu_time / 1e3:.1f} vEU-us"
                 + ("  [TRUNCATED: the trace buffer filled up]" if self.truncated else "")
                 + (f"  [{self.note}]" if self.note else ""),
                 f"{'op':<40} {'calls':>7} {'total us':>10} {'share':>7} {'mean us':>9}"]
        ops, barriers = self.op_totals(), self.barrier_totals()
        for name, (calls, total) in sorted(ops.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"{name:<40} {calls:>7} {total / 1e3:>10.2f} {total / veu_time:>7.1%} "
                         f"{total / calls / 1e3:>9.3f}")
        lines.append(f"{'barrier':<40} {'waits':>7} {'total us':>10} {'share':>7} {'mean us':>9}")
        for name, (calls, total) in sorted(barriers.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"{name:<40} {calls:>7} {total / 1e3:>10.2f} {total / veu_time:>7.1%} "
                         f"{total / calls / 1e3:>9.3f}")
        busy = sum(t for _, t in ops.values()) + sum(t for _, t in barriers.values())
        other = veu_time - busy
        lines.append(f"{'other (uniforms, control flow, idle)':<40} {'':>7} {other / 1e3:>10.2f} "
                     f"{other / veu_time:>7.1%}")
        loops = self.loop_totals()
        if loops:
            lines.append(f"{'loop':<40} {'iters':>7} {'us/iter':>10}")
            for name, (iterations, per) in loops.items():
                lines.append(f"{name:<40} {iterations:>7.0f} {per / 1e3:>10.3f}")
        return "\n".join(lines)

    # -------------------------------------------------------------------------------- picture
    def plot(self, path, max_tracks: int = 64, window_us: tuple[float, float] | None = None) -> None:
        """A PNG timeline: a row per vEU (the first `max_tracks`), uTasks coloured by op, barrier waits black,
        loop iterations as the grey band under them; `window_us` (start, end) zooms in (needs matplotlib).
        The bars are drawn one call per track and colour, so a profile of millions of events plots in seconds."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        tracks = self.tracks[:max_tracks]
        shown = set(tracks)
        lo, hi = window_us or (-math.inf, math.inf)
        ops = sorted({e.name for e in self.events if e.kind == "op"})
        palette = plt.get_cmap("tab20")
        colour = {name: palette(k % 20) for k, name in enumerate(ops)}
        bars = defaultdict(list)      # (track, colour, inner, iteration) -> [(start, width)] in µs
        for e in self.events:
            begin, width = e.begin / 1e3, max(e.duration / 1e3, 1e-4)
            if e.track not in shown or begin + width < lo or begin > hi:
                continue
            face = colour.get(e.name) if e.kind == "op" else KIND_COLOURS.get(e.kind, "#eee")
            bars[e.track, face, e.kind in ("op", "barrier"), e.kind == "iteration"].append((begin, width))
        fig, ax = plt.subplots(figsize=(14, 1.5 + 0.3 * len(tracks)))
        for (track, face, inner, iteration), spans in bars.items():
            height = 0.8 if inner else 0.95
            ax.broken_barh(spans, (track - height / 2, height), facecolors=face,
                           edgecolor="black" if iteration else "none", linewidth=0.3, zorder=2 if inner else 1)
        if window_us:
            ax.set_xlim(*window_us)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colour[n]) for n in ops[:20]]
        handles.append(plt.Rectangle((0, 0), 1, 1, color=KIND_COLOURS["barrier"]))
        ax.legend(handles, ops[:20] + ["barrier wait"], loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
        ax.set_yticks(tracks, [self.track_names[k] for k in tracks], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("µs")
        ax.set_title(f"gdsl profile ({self.backend}): {self.kernel_ns / 1e3:.1f} µs"
                     + (" (truncated)" if self.truncated else ""))
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


# ------------------------------------------------------------------------------------ running

def profile(f, *args, **kwargs) -> Profile:
    """Run jitted `f(*args, **kwargs)` once as a warm-up and once with the instrumented build of the same
    plan; the Profile of that second run (device control only). Where the instrumented kernel's grid cannot be
    co-resident (it takes more registers), loading re-schedules it for a smaller grid, and the Profile is of
    that plan (Profile.note says so)."""
    return run_profile(f, args, kwargs)


def run_profile(f, args, kwargs=None, *, capacity: int | None = None) -> Profile:
    """`profile` with its knobs: `capacity` records per vEU instead of the bound computed from the plan."""
    lowering, executable, flat = _instrumented(f, args, kwargs or {}, capacity)
    executable(flat)
    entry = f._entry(args, kwargs or {})[0]
    normal = getattr(entry["executable"], "plan", None)
    return _collect(executable, lowering, entry["backend"], normal_grid=normal.grid if normal is not None else None)


def overhead(f, args, kwargs=None, runs: int = 20) -> tuple[float, float]:
    """(normal, instrumented) median seconds of one call of the executables of jitted `f(*args, **kwargs)`:
    what recording costs. Each time is taken after the device finished; the instrumented call includes
    zeroing the trace counters and copying the trace back."""
    import time
    kwargs = kwargs or {}
    _, executable, flat = _instrumented(f, args, kwargs, None)
    entry = f._entry(args, kwargs)[0]
    sync = _synchronizer(entry["backend"])

    def median(call):
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sync(call())
            times.append(time.perf_counter() - t0)
        return float(np.median(times))
    normal = entry["executable"]        # the same arguments, the same call path: only the build differs
    return median(lambda: normal(flat)), median(lambda: executable(flat))


def _synchronizer(backend):
    if backend != "cuda":
        return lambda out: None
    import cupy
    return lambda out: cupy.cuda.runtime.deviceSynchronize()


def _instrumented(f, args, kwargs, capacity):
    """(lowering, executable, flat arguments) of the instrumented build of `f` for these arguments, after
    a warm-up call of the normal build; built once per capacity and kept in f's cache entry."""
    from gdsl.backends import usable_backend
    from gdsl.jit import Jitted, _as_dtype
    if not isinstance(f, Jitted):
        raise TypeError(f"gdsl.profile needs a function decorated with @gdsl.jit, got {f!r}")
    f(*args, **kwargs)                          # the warm-up: compiles and runs the normal build
    entry, flat = f._entry(args, kwargs)
    backend = entry["backend"]
    if backend not in ("cpu", "cuda", "hip"):
        raise ValueError(f"gdsl.profile: backend {backend!r} runs no kernel to profile (use cpu, cuda or hip)")
    options = {k: v for k, v in f.options.items() if k != "autotune"}
    if options.get("control", "device") != "device":
        raise ValueError("gdsl.profile instruments the persistent kernel: it needs control='device'")
    options["profile"] = capacity or True
    module = usable_backend(backend)
    builds = entry.setdefault("profiled", {})     # the instrumented builds: their own cache entries
    if options["profile"] not in builds:
        lowering = module.lower(entry["program"], options)
        builds[options["profile"]] = (lowering, module.load(lowering))
    lowering, executable = builds[options["profile"]]
    return lowering, executable, [_as_dtype(x, a) for x, a in zip(flat, entry["avals"])]


def _collect(executable, lowering, backend, dialect=None, normal_grid=None) -> Profile:
    """The Profile of an instrumented executable's last call (`dialect`: the C-family dialect it was
    rendered in, by default the backend's). A C-family executable may run another plan than `lowering`'s:
    loading re-schedules a plan whose grid cannot be co-resident (the instrumented kernel takes more
    registers), so its plan and trace sites are the ones read; the summary says so when its grid differs
    from `normal_grid`, the uninstrumented build's."""
    trace, n_tracks = executable.last_trace
    trace = np.array(trace)                     # a copy: the next call reuses the buffer
    plan = getattr(executable, "plan", lowering.plan)
    if backend == "cpu":
        sites = lowering.trace
        names = [f"thread {k} (vEUs {k}, {k} + {n_tracks}, ...)" if n_tracks < plan.grid else f"vEU {k}"
                 for k in range(n_tracks)]
        return Profile(sites, trace, n_tracks, backend=backend, clock="CLOCK_MONOTONIC", track_names=names,
                       plan=str(plan))
    if dialect is None:
        from gdsl.backends.cuda.dialect import CUDADialect
        from gdsl.backends.hip.dialect import HIPDialect
        dialect = {"cuda": CUDADialect, "hip": HIPDialect}[backend]
    note = "" if normal_grid in (None, plan.grid) else (
        f"re-scheduled for {plan.grid} vEUs, the instrumented kernel's co-resident grid; the normal build runs "
        f"{normal_grid}")
    rendered = getattr(executable, "rendered", lowering.rendered)
    return Profile(rendered.trace, trace, n_tracks, backend=backend, clock=dialect.trace_clock_name,
                   ns_per_tick=dialect.trace_ns_per_tick, plan=str(plan), note=note)
