"""Host time of a repeated call of a jitted function: what gdsl does per call besides the kernel.

    python benchmarks/dispatch_bench.py [--backends interpret,cpu,cuda] [--calls 5000] [--repeats 7]
                                        [--json out.json]

The function is trivial (`x + 1` on 4 float32 elements), so the time is the dispatch: the signature
lookup, argument conversion, output allocation and the launch. Each case is timed as `repeats` batches of
`calls` back-to-back calls after warm-up; the per-call time of a batch is its host time (perf_counter)
divided by `calls`, and the median batch is reported (min too). On cuda the same batches are also timed
with CUDA events on the stream (device time per call: equal to the host time when the host is the
bottleneck) and the references a user would compare with are timed the same way: a CuPy `x + 1` (one
elementwise kernel launch) and, when torch is installed, a torch `x + 1` and the replay of a CUDA graph
holding it. Cases:

    flat          f(x): one positional array (the fast path)
    two-args      f(x, y): two positional arrays
    static        f(x, 3) with the 3 static (static_argnums=1)
    pytree        f((x, {"y": y})): a nested argument (the general path)
    numpy-in      cuda only: a numpy argument (copied to the GPU on every call)

On cuda the flat case is then taken apart (`breakdown`): the host time of each step of its call, each
timed alone the same way (the jit's signature and table lookup, the executable's whole `run`, the input
check, reading the current stream, the results from the recycler and, for comparison, a newly allocated
result, the prepared launch and the bare driver call under it), and the GPU's own time per launch of the
kernel (launches queued behind a busy kernel, timed by CUDA events): the host time of a call can go no
lower than that without the GPU becoming the bottleneck.

Timings on a machine shared with other work vary: compare rows of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gdsl  # noqa: E402


def add_one(x):
    return x + 1


def add_two(x, y):
    return x + y


def add_static(x, k):
    return x + k


def add_tree(t):
    x, d = t
    return x + d["y"]


def cases(backend: str, array) -> dict:
    """name -> a zero-argument callable doing one call of that case (already traced and loaded)."""
    x, y = array(np.arange(4, dtype=np.float32)), array(np.ones(4, dtype=np.float32))
    flat = gdsl.jit(add_one, backend=backend)
    two = gdsl.jit(add_two, backend=backend)
    static = gdsl.jit(add_static, backend=backend, static_argnums=1)
    tree = gdsl.jit(add_tree, backend=backend)
    out = {
        "flat": lambda: flat(x),
        "two-args": lambda: two(x, y),
        "static": lambda: static(x, 3),
        "pytree": lambda: tree((x, {"y": y})),
    }
    if backend == "cuda":
        host_x = np.arange(4, dtype=np.float32)
        out["numpy-in"] = lambda: flat(host_x)
    return out


def host_batches(call, calls: int, repeats: int, sync=None) -> np.ndarray:
    """Host microseconds per call of each batch (the device synchronised between batches, outside the
    timed region, so a queue filled by one batch does not slow the next)."""
    per_call = np.empty(repeats)
    for r in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        per_call[r] = (time.perf_counter() - t0) / calls * 1e6
    if sync:
        sync()
    return per_call


def event_batches(call, calls: int, repeats: int) -> np.ndarray:
    """Device microseconds per call of each batch: CUDA events on the current stream around the batch."""
    import cupy
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    per_call = np.empty(repeats)
    for r in range(repeats):
        cupy.cuda.runtime.deviceSynchronize()
        start.record()
        for _ in range(calls):
            call()
        end.record()
        end.synchronize()
        per_call[r] = cupy.cuda.get_elapsed_time(start, end) * 1e3 / calls
    return per_call


def measure(call, calls: int, repeats: int, on_gpu: bool) -> dict:
    for _ in range(max(10, calls // 10)):        # warm-up (the first call traces and compiles)
        call()
    sync = None
    if on_gpu:
        import cupy
        sync = cupy.cuda.runtime.deviceSynchronize
    host = host_batches(call, calls, repeats, sync)
    row = {"host_us": float(np.median(host)), "host_min_us": float(host.min())}
    if on_gpu:
        events = event_batches(call, calls, repeats)
        row.update(event_us=float(np.median(events)), event_min_us=float(events.min()))
    return row


def gpu_references() -> dict:
    """name -> call: what a user would compare a trivial jitted call with on the GPU."""
    import cupy
    refs = {}
    x = cupy.arange(4, dtype=cupy.float32)
    refs["cupy x+1"] = lambda: x + 1
    try:
        import torch
    except ImportError:
        return refs
    if not torch.cuda.is_available():
        return refs
    t = torch.arange(4, dtype=torch.float32, device="cuda")
    refs["torch x+1"] = lambda: t + 1
    graph, static_in = torch.cuda.CUDAGraph(), t.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):            # warm-up off the capture, as torch's docs ask
        static_in + 1
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        static_in + 1
    refs["torch graph replay"] = graph.replay
    return refs


def breakdown(calls: int, repeats: int) -> list[dict]:
    """Host microseconds of each step of the flat case's repeated call on cuda (see the module docstring),
    and the GPU's microseconds per launch of its kernel."""
    import cupy
    f = gdsl.jit(add_one, backend="cuda")
    x = cupy.arange(4, dtype=cupy.float32)
    f(x), f(x)
    (entry,) = f._cache.values()
    executable = entry["executable"]
    device, run = executable.device, executable.fast_path()
    launcher, outputs = run.launcher, run.outputs
    in_aval, out_aval = executable.args[0].aval, executable.plan.outputs[0].aval
    stream = cupy.cuda.get_current_stream().ptr
    out = device.new_array(out_aval)
    values = [x.data.ptr, out.data.ptr]

    def prepared_launch():
        with launcher.lock:
            launcher.launch(stream, values)
    steps = {
        "f(x): the whole call": lambda: f(x),
        "jit: signature + table": lambda: f._fast.get(f._fast_signature((x,))[0]),
        "executable run([x])": lambda: run([x]),
        "input check (to_device)": lambda: device.to_device(x, in_aval),
        "current stream pointer": lambda: cupy.cuda.get_current_stream().ptr,
        "results from the recycler": lambda: outputs(stream),
        "(a newly allocated result)": lambda: device.new_array(out_aval),
        "prepared launch": prepared_launch,
        "bare driver launch": lambda: launcher.call_driver(stream),
    }
    rows = []
    for name, call in steps.items():
        rows.append({"step": name, **measure(call, calls, repeats, on_gpu=True)})
    rows.append({"step": "GPU time per launch", "event_us": gpu_time_per_launch(launcher, stream)})
    return rows


def gpu_time_per_launch(launcher, stream: int, launches: int = 1000) -> float:
    """Microseconds of GPU time per launch: launches queued behind a kernel that spins for ~0.1 s, so
    that the GPU runs them back to back, between two CUDA events."""
    import cupy
    spin = cupy.RawKernel(r'''extern "C" __global__ void spin(long long cycles) {
        long long t0 = clock64(); while (clock64() - t0 < cycles) {} }''', "spin")
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    per_launch = []
    for _ in range(3):
        spin((1,), (1,), (np.int64(2 * 10 ** 8),))
        start.record()
        for _ in range(launches):
            launcher.call_driver(stream)
        end.record()
        end.synchronize()
        per_launch.append(cupy.cuda.get_elapsed_time(start, end) * 1e3 / launches)
    return float(np.median(per_launch))


def describe() -> dict:
    info = {"python": platform.python_version(), "machine": platform.processor() or platform.machine()}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except OSError:
        info["commit"] = "?"
    if "cuda" in gdsl.backends():
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())
        info["gpu"] = props["name"].decode()
        info["driver"] = cupy.cuda.runtime.driverGetVersion()
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="interpret,cpu,cuda")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    usable = gdsl.backends()
    rows, steps = [], []
    for backend in args.backends.split(","):
        if backend not in usable:
            print(f"{backend}: not usable here, skipped")
            continue
        on_gpu = backend == "cuda"
        if on_gpu:
            import cupy
            array = cupy.asarray
        else:
            array = np.asarray
        for name, call in cases(backend, array).items():
            rows.append({"backend": backend, "case": name, **measure(call, args.calls, args.repeats, on_gpu)})
        if on_gpu:
            for name, call in gpu_references().items():
                rows.append({"backend": "reference", "case": name,
                             **measure(call, args.calls, args.repeats, on_gpu=True)})
            steps = breakdown(args.calls, args.repeats)
    info = describe()
    print(f"dispatch_bench: {info}  ({args.repeats} batches of {args.calls} calls, median / min per call)")
    print(f"{'backend':<10} {'case':<20} {'host us':>9} {'min':>7} {'event us':>9} {'min':>7}")
    for row in rows:
        events = (f"{row['event_us']:9.2f} {row['event_min_us']:7.2f}" if "event_us" in row else "")
        print(f"{row['backend']:<10} {row['case']:<20} {row['host_us']:9.2f} {row['host_min_us']:7.2f} {events}")
    if steps:
        print("\nbreakdown of the flat case on cuda (each step timed alone; median / min per call)")
        print(f"{'step':<30} {'host us':>9} {'min':>7} {'event us':>9}")
        for row in steps:
            host = f"{row['host_us']:9.2f} {row['host_min_us']:7.2f}" if "host_us" in row else f"{'':9} {'':7}"
            print(f"{row['step']:<30} {host} {row['event_us']:9.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"info": info, "calls": args.calls, "repeats": args.repeats, "rows": rows,
                       "breakdown": steps}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
