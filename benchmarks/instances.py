"""One model's forward in several jit instances of one process (each its own module and workspace), timed with
CUDA events in rounds that visit every instance in turn (so a machine that speeds up or slows down shows in
every instance alike), with each workspace's address (its place in the L2 partitions) beside. Is the same
compiled code two speeds in two instances? BlockDrop bs1 in session 6 (then `blockdrop_instances.py`);
Attention bs1 in session 12 (0.119 ms in one instance, 0.149 in another of the same process and source).
Device control, cuda:

    python benchmarks/instances.py [--model attention] [--batch 1] [--instances 8] [--rounds 3] [--runs 20] [--place]

The instances are made with the jit option place_workspace=False (the workspace where CuPy put it); --place
leaves it on, so each instance's first call moves its workspace to the fastest of its places. In session 13 every
place measured the same at each instance's first call and the instances still differed afterwards (0.116-0.146
ms): the workspace is not the cause; the output arrays the loop reads every step are the next suspect.
"""
import argparse

import cupy as cp
import numpy as np

from gdsl.tracing.pytree import tree_map
from models import common, load


def workspace_address(f) -> int | None:
    """The device address of the workspace of `f`'s (one) compiled signature, None when none is loaded."""
    for entry in getattr(f, "_cache", {}).values():
        ws = getattr(entry.get("executable"), "ws", None)
        if ws is not None and hasattr(ws, "data"):
            return ws.data.ptr
    return None


def timed(f, w, x, runs: int) -> list[float]:
    """`runs` event-timed calls of `f(w, x)` (ms)."""
    times = []
    for _ in range(runs):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        f(w, x)
        e1.record()
        e1.synchronize()
        times.append(cp.cuda.get_elapsed_time(e0, e1))
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="blockdrop")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--instances", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--place", action="store_true", help="jit option place_workspace on (default: off)")
    args = ap.parse_args()
    model = load(args.model)
    prob = common.build_problem(model, args.batch)
    w = tree_map(cp.asarray, prob.weights)
    x = tree_map(cp.asarray, prob.batches[0])
    instances = []
    for _ in range(args.instances):
        f = model.make_forward(prob.cfg, backend="cuda", place_workspace=args.place)
        f(w, x)
        instances.append(f)
    cp.cuda.Device().synchronize()
    medians = [[] for _ in instances]
    for _ in range(args.rounds):
        for i, f in enumerate(instances):
            medians[i].append(float(np.median(timed(f, w, x, args.runs))))
    for i, f in enumerate(instances):
        addr = workspace_address(f)
        where = "?" if addr is None else f"{addr:#x} (mod 2 MiB {addr % (2 << 20):#x})"
        print(f"{args.model} bs{args.batch} instance {i}: medians by round " +
              ", ".join(f"{m:.3f}" for m in medians[i]) + f" ms; workspace {where}", flush=True)


if __name__ == "__main__":
    main()
