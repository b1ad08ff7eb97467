"""Where one timed forward of a zoo model goes on cuda: the host's launch, the GPU's time, the wait for the sync.

    python benchmarks/call_split.py attention blockdrop rae [--batch 1] [--runs 200] [--json out.json]

Each forward is timed as models.bench times it (perf_counter around the call and a device synchronise) and,
in the same forward, split: `launch` is the host time of the call itself (it returns once the kernel is
queued), `gpu` the time between CUDA events recorded on the stream before and after the call (the kernel and any
gap while the host was still launching it), `wait` the host time from the call's return to the end of the
synchronise. Then `queued`: forwards launched back to back between two events (the GPU never waits for the host),
per forward. Medians over `runs`. Why: the bench's batch-1 medians move by 15-65 µs from process to process with
the same kernels (docs/performance.md, session 15); run this in several processes to see which part moves.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cupy as cp  # noqa: E402  (after the path: run from a checkout)

import gdsl  # noqa: E402
from gdsl.tracing.pytree import tree_map  # noqa: E402
from models import common, load  # noqa: E402


def split(name: str, batch: int, runs: int) -> dict:
    model = load(name)
    prob = common.build_problem(model, batch)
    w, x = tree_map(cp.asarray, prob.weights), tree_map(cp.asarray, prob.batches[0])
    f = model.make_forward(prob.cfg, backend="cuda", control="device")
    problems = common.compare(gdsl.to_numpy(f(w, x)), prob.references()[0])
    if problems:
        raise SystemExit(f"{name}: mismatch {problems[:3]}")
    sync = cp.cuda.runtime.deviceSynchronize
    before, after = cp.cuda.Event(), cp.cuda.Event()
    parts: dict = {"total": [], "launch": [], "gpu": [], "wait": []}
    for k in range(runs + 10):
        sync()
        t0 = time.perf_counter()
        before.record()
        f(w, x)
        t1 = time.perf_counter()
        after.record()
        sync()
        t2 = time.perf_counter()
        if k >= 10:  # warm-up
            parts["total"].append((t2 - t0) * 1e3)
            parts["launch"].append((t1 - t0) * 1e3)
            parts["wait"].append((t2 - t1) * 1e3)
            parts["gpu"].append(cp.cuda.get_elapsed_time(before, after))
    queued = 20
    before.record()
    for _ in range(queued):
        f(w, x)
    after.record()
    sync()
    out = {k: statistics.median(v) for k, v in parts.items()}
    out["queued"] = cp.cuda.get_elapsed_time(before, after) / queued
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    result = {}
    for name in args.models:
        result[name] = split(name, args.batch, args.runs)
        print(f"{name:10s} " + "  ".join(f"{k} {v:.4f}" for k, v in result[name].items()) + " ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
