"""Window stores (docs/schedule.md, "Window stores"): a model with and without them, counted, timed and checked.

    python benchmarks/window_store.py [--models attention,seq2seq] [--batch 1,64] [--runs 50] [--counts-only]

Per model and batch size, the forward is lowered for cuda with the option window_store=False and with window
stores (the default): the stores in the plan and its top-level loops' waves, block syncs and grid barriers per
step. Unless --counts-only (which needs no GPU: the source is rendered, not compiled), each is also run: the
median time in ms (the bench's timer, models/common.time_runner) and the relative error of each output
against the model's float64 reference (models/common.rel_error). Timing needs a GPU (cuda backend and CuPy).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: gdsl/, models/

from rows_attention import per_step  # (benchmarks/ is on the path when a script there runs)

from models import common, load

SETTINGS = ((False, "window_store=False"), (None, "window stores"))


def counts(model, problem, window_store) -> str:
    """The plan's window stores and per-step counts, lowered for cuda without a GPU."""
    forward = model.make_forward(problem.cfg, backend="cuda", window_store=window_store)
    plan = forward.lower(problem.weights, problem.batches[0]).lowering.plan
    return f"{plan.stats.get('window_stores', 0)} window stores; {per_step(plan)}"


def timed(model, problem, window_store, runs: int) -> str:
    """Median ms and the outputs' relative errors against the float64 reference, on the GPU."""
    reference = common.tree_leaves(common.to_numpy(problem.references()[0]))
    runner = common.gdsl_runner(model, problem.weights, problem.cfg, problem.batches, backend="cuda",
                                window_store=window_store)
    outputs = common.tree_leaves(common.to_numpy(runner.output(0)))
    errors = ", ".join(f"{common.rel_error(o, r):.2e}" for o, r in zip(outputs, reference))
    median = common.stats(common.time_runner(runner, 1, runs=runs))["median_ms"]
    return f"{median:.4f} ms; rel. errors {errors}"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/window_store.py", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="attention,seq2seq")
    p.add_argument("--batch", default="1,64")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--counts-only", action="store_true", help="plans only (no GPU needed)")
    args = p.parse_args(argv)
    for name in args.models.split(","):
        model = load(name)
        for batch in (int(b) for b in args.batch.split(",")):
            problem = common.build_problem(model, batch)
            for window_store, label in SETTINGS:
                line = f"{name} bs{batch} {label:18s}: {counts(model, problem, window_store)}"
                if not args.counts_only:
                    line += f"; {timed(model, problem, window_store, args.runs)}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
