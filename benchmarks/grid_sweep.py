"""Time one model of the zoo on the CUDA backend at several grid sizes (vEU counts), checking each result.

    python benchmarks/grid_sweep.py --model attention --batch 1 --grids 8,16,32,66,132
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: models/


def main():
    from models import common, load
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="attention")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--grids", default="8,16,32,66,132")
    p.add_argument("--runs", type=int, default=50)
    args = p.parse_args()
    model = load(args.model)
    prob = common.build_problem(model, args.batch, n_inputs=1)
    ref = prob.references()[0]
    for grid in [int(g) for g in args.grids.split(",")]:
        runner = common.gdsl_runner(model, prob.weights, prob.cfg, prob.batches, backend="cuda",
                                    control="device", grid=grid)
        problems = common.compare(runner.output(0), ref)
        times = common.time_runner(runner, 1, runs=args.runs) if not problems else None
        print(f"{args.model} bs{args.batch} grid {grid:4d}: "
              + (f"{statistics.median(times):.3f} ms" if times is not None else f"MISMATCH {problems}"),
              flush=True)


if __name__ == "__main__":
    main()
