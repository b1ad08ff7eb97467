"""Row chains on the GPU (docs/schedule.md, "Row chains"): a model with and without them, timed and checked.

    python benchmarks/rows_attention.py [--models attention] [--batch 1,64] [--runs 50]

Per model and batch size, the forward is run on cuda with the option rows=False and with row chains (the
default): its loop's waves and block / grid barriers per step (from the plan), the median time in ms (the
bench's timer, models/common.time_runner), and the relative error of each output against the model's
float64 reference (models/common.rel_error). Needs a GPU (cuda backend and CuPy).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: gdsl/, models/

from gdsl.schedule.plan import Loop, Sync, Wave, walk
from models import common, load


def per_step(plan) -> str:
    """Waves, block syncs and grid barriers per step of the plan's top-level loops."""
    loops = [s for k in plan.kernels for s in k.body if isinstance(s, Loop)]
    body = [s for loop in loops for s in walk(loop.cond + loop.body)]
    waves = sum(isinstance(s, Wave) for s in body)
    block = sum(isinstance(s, Sync) and s.scope == "block" for s in body)
    grid = sum(isinstance(s, Sync) and s.scope == "grid" for s in body)
    return f"{waves} waves, {block} block syncs, {grid} grid barriers per step"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/rows_attention.py", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="attention")
    p.add_argument("--batch", default="1,64")
    p.add_argument("--runs", type=int, default=50)
    args = p.parse_args(argv)
    for name in args.models.split(","):
        model = load(name)
        for batch in (int(b) for b in args.batch.split(",")):
            problem = common.build_problem(model, batch)
            reference = common.tree_leaves(common.to_numpy(problem.references()[0]))
            for rows in (False, None):
                runner = common.gdsl_runner(model, problem.weights, problem.cfg, problem.batches,
                                            backend="cuda", rows=rows)
                plan = runner.lower(0).lowering.plan
                outputs = common.tree_leaves(common.to_numpy(runner.output(0)))
                errors = ", ".join(f"{common.rel_error(o, r):.2e}" for o, r in zip(outputs, reference))
                median = common.stats(common.time_runner(runner, 1, runs=args.runs))["median_ms"]
                label = "rows=False" if rows is False else "row chains"
                print(f"{name} bs{batch} {label:10s}: {median:.4f} ms; {per_step(plan)}; "
                      f"rel. errors {errors}", flush=True)


if __name__ == "__main__":
    main()
