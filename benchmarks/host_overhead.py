"""Where a zoo model's repeated call spends its host time on cuda (no GPU work is timed here): the fast
key of its arguments, the table lookup, the input checks and pointers, the result arrays, the driver's launch
alone (the prepared parameter block launched again), and the whole call without waiting for the GPU (so the
host's own rate).

    python benchmarks/host_overhead.py blockdrop skipnet attention [--calls 2000]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cupy as cp  # noqa: E402  (after the path: run from a checkout)

from gdsl.tracing.pytree import tree_map  # noqa: E402
from models import common, load  # noqa: E402


def per_call_us(fn, calls: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def breakdown(name: str, calls: int) -> str:
    model = load(name)
    prob = common.build_problem(model, 1)
    w, x = tree_map(cp.asarray, prob.weights), tree_map(cp.asarray, prob.batches[0])
    f = model.make_forward(prob.cfg, backend="cuda")
    for _ in range(3):                       # traced, loaded, its fast keys entered
        f(w, x)
    cp.cuda.Device().synchronize()
    key, leaves = f._fast_signature((w, x))
    entry = next(iter(f._cache.values()))
    run = entry.get("fast_run")
    parts = {"key": per_call_us(lambda: f._fast_signature((w, x)), calls),
             "table lookup": per_call_us(lambda: f._fast.get(key), calls)}
    inputs = getattr(run, "inputs", None)
    if inputs is not None:
        parts["input pointers (same arguments)"] = per_call_us(lambda: inputs(leaves), calls)
    outputs = getattr(run, "outputs", None)
    if outputs is not None:
        stream = cp.cuda.get_current_stream().ptr
        parts["result arrays"] = per_call_us(lambda: outputs(stream), calls)
    launcher = getattr(run, "launcher", None)
    if launcher is not None:      # the parameter block as the last call left it: the driver's launch alone
        stream = cp.cuda.get_current_stream().ptr
        parts["driver launch" + (" (cooperative)" if launcher.cooperative else "")] = \
            per_call_us(lambda: launcher.call_driver(stream), max(1, calls // 10))
    parts["whole call, not waiting for the GPU"] = per_call_us(lambda: f(w, x), max(1, calls // 10))
    cp.cuda.Device().synchronize()
    return f"{name}: {len(leaves)} leaves; " + ", ".join(f"{k} {v:.1f} us" for k, v in parts.items())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    for name in args.models:
        print(breakdown(name, args.calls), flush=True)


if __name__ == "__main__":
    main()
