"""Is BlockDrop's bimodality the GPU's clock? The same jit instance timed with CUDA events per call in three
states: right after an idle pause (the clocks may have dropped), after a short warm-up like the bench's
(3 calls), and after ~1 s of back-to-back calls, twice over; the SM clock (nvidia-smi) read beside, and the
host time of each call until it returns (an event pair around one call also times the host's launch). Device control,
cuda: `python benchmarks/clock_ramp.py [--model blockdrop] [--batch 1] [--idle 2.0]`."""
import argparse
import subprocess
import time

import cupy as cp
import numpy as np

from gdsl.tracing.pytree import tree_map
from models import common, load


def sm_clock() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,power.draw", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = "?"
    return out


def timed(f, w, x, n, host=None) -> list[float]:
    """Event-timed calls (ms); `host` collects each call's host time until it returns (ms)."""
    times = []
    for _ in range(n):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        start = time.perf_counter()
        f(w, x)
        if host is not None:
            host.append(1e3 * (time.perf_counter() - start))
        e1.record()
        e1.synchronize()
        times.append(cp.cuda.get_elapsed_time(e0, e1))
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="blockdrop")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--idle", type=float, default=2.0, help="seconds of idle before each state")
    args = p.parse_args()
    m = load(args.model)
    prob = common.build_problem(m, args.batch)
    w = tree_map(cp.asarray, prob.weights)
    x = tree_map(cp.asarray, prob.batches[0])
    f = m.make_forward(prob.cfg, backend="cuda")
    f(w, x)
    cp.cuda.Device().synchronize()
    for state in ("after idle", "after 3 calls", "after 1 s of calls") * 2:
        time.sleep(args.idle)
        if state == "after 3 calls":
            timed(f, w, x, 3)
        elif state == "after 1 s of calls":
            end = time.perf_counter() + 1.0
            while time.perf_counter() < end:
                timed(f, w, x, 10)
        clock = sm_clock()
        host: list[float] = []
        t = timed(f, w, x, 20, host)
        print(f"{state:20s} clock (sm MHz, mem MHz, W) {clock:28s} first 5 calls "
              + " ".join(f"{v:.3f}" for v in t[:5]) + f" | median of 20 {np.median(t):.3f} ms"
              + f" | host per call median {np.median(host):.3f} ms", flush=True)


if __name__ == "__main__":
    main()
