"""Is a jit instance's speed set by where its workspace lies? One model's forward in several jit instances of one
process whose workspaces are placed by hand at chosen byte offsets of one large pool (the same low address bits
in two 2 MiB pages, in a shuffled order of creation), timed with CUDA events in rounds that visit every instance
in turn (the jit option place_workspace off: each workspace stays at the first place of its allocation). If the
time follows the offset (the same in both pages, whatever the order of creation), the
workspace's place in the L2 decides it; if it follows the order of creation or nothing, it does not.
Device control, cuda:

    python benchmarks/workspace_offsets.py [--model attention] [--batch 1] [--step 12800] [--count 6] [--rounds 3]
"""
import argparse
import random

import cupy as cp
import numpy as np

from benchmarks.instances import timed
from gdsl.backends.cfamily.executor import CupyDevice
from gdsl.tracing.pytree import tree_map
from models import common, load

PAGE = 2 << 20


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="attention")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--step", type=int, default=0x3200, help="bytes between offsets (default: one Attention "
                                                               "bs1 workspace, as CuPy placed them)")
    ap.add_argument("--count", type=int, default=6, help="offsets per page")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = load(args.model)
    prob = common.build_problem(model, args.batch)
    w = tree_map(cp.asarray, prob.weights)
    x = tree_map(cp.asarray, prob.batches[0])
    pool = cp.zeros(4 * PAGE + args.count * args.step + (1 << 20), dtype=np.uint8)
    base = (-pool.data.ptr) % PAGE               # the pool's first byte on a 2 MiB boundary
    offsets = [page * PAGE + i * args.step for page in (1, 2) for i in range(args.count)]
    order = list(range(len(offsets)))
    random.Random(args.seed).shuffle(order)
    zeros = CupyDevice.zeros
    instances = {}
    for k in order:
        start = base + offsets[k]

        def placed(self, nbytes, start=start):      # the workspace's allocation at its chosen offset, zeroed
            view = pool[start:start + max(nbytes, 16)]
            view.fill(0)
            return view
        CupyDevice.zeros = placed
        try:
            f = model.make_forward(prob.cfg, backend="cuda", place_workspace=False)
            f(w, x)
        finally:
            CupyDevice.zeros = zeros
        instances[k] = f
    cp.cuda.Device().synchronize()
    medians = {k: [] for k in instances}
    for _ in range(args.rounds):
        for k in order:
            medians[k].append(float(np.median(timed(instances[k], w, x, args.runs))))
    for k in range(len(offsets)):
        print(f"{args.model} bs{args.batch} offset {offsets[k]:#x} (created {order.index(k)}): medians by round "
              + ", ".join(f"{m:.3f}" for m in medians[k]) + " ms", flush=True)


if __name__ == "__main__":
    main()
