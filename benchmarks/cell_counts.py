"""Ops, waves and barriers per loop step with and without cell chains (docs/schedule.md, "Cell chains").

    python benchmarks/cell_counts.py [--models lstm,nasrnn,seq2seq] [--batch 1,64] [--owner]

Each model at its full size (`Config()`) is lowered for CUDA (no GPU needed: the source is rendered, not
compiled) with the option cells=False and with cell chains (the default); with `--owner`, both again with
owner-computes placement (owner=True: docs/schedule.md, "Owner-computes placement"). Printed per row, for
the body of the model's loop (the outermost Loop of the kernel), per step (a body unrolled twice by
owner=True runs two steps: its counts are halved): the ops, the waves, the grid barriers and block syncs,
and the ops one vEU runs one after another (the most any vEU runs in each wave, summed over the waves: what
a step waits for). The plan is also run by the bench's wave counter (benchmarks/branch_counts.py) on the
model's first batch: the steps run and the waves, uTasks and grid barriers executed in the whole forward.
The last column predicts the time a forward saves on the H200 from the serial ops that cell chains remove
per step (against cells=False with the same owner setting), at 0.6-0.9 us each (docs/performance.md,
session 6 profiles).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: gdsl/, models/

from gdsl.schedule.plan import Loop, Sync, Wave
from models import common, floor, load

OP_US = (0.6, 0.9)      # what one more elementwise op of a cell costs per step on the H200 (session 6)


def step_counts(plan) -> dict:
    """The counts of one step of the plan's first loop (its body, the condition excluded; a body of two steps,
    owner=True's, halved)."""
    (loop,) = [s for s in plan.kernels[0].body if isinstance(s, Loop)][:1]
    counts = Counter()
    for stmt in loop.body:
        if isinstance(stmt, Wave):
            counts["waves"] += 1
            counts["ops"] += len(stmt.tasks)
            per_veu = Counter()
            for task in stmt.tasks:
                for veu in range(task.first, task.first + task.count):
                    per_veu[veu] += 1
            counts["serial ops"] += max(per_veu.values())
        elif isinstance(stmt, Sync):
            counts["grid" if stmt.scope == "grid" else "block"] += 1
    steps = plan.stats.get("steps_per_iteration", 1)
    return {key: value / steps for key, value in counts.items()}


def executed(weights, inputs, lowered):
    """The bench's wave counter after running the plan, with `steps`: the body runs of the first loop."""
    from branch_counts import WaveCounter  # (this directory is on sys.path: the script's own)

    plan = floor.plan_of(lowered)
    (loop,) = [s for s in plan.kernels[0].body if isinstance(s, Loop)][:1]

    class StepCounter(WaveCounter):
        steps = 0

        def block(self, stmts):
            if stmts is loop.body:
                self.steps += 1
            return super().block(stmts)

    counter = StepCounter(plan, floor.rendered_grid_syncs(lowered), all_values=False)
    counter.run(floor.flat_arguments(weights, inputs))
    return counter


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/cell_counts.py", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="lstm,nasrnn,seq2seq")
    p.add_argument("--batch", default="1,64")
    p.add_argument("--owner", action="store_true", help="also with owner=True (owner-computes placement)")
    args = p.parse_args(argv)
    print("model    bs  owner cells | per step: ops waves grid block serial-ops | steps | executed: waves uTasks"
          " grid | predicted saving (us)")
    for name in args.models.split(","):
        model = load(name)
        for batch in (int(b) for b in args.batch.split(",")):
            prob = common.build_problem(model, batch)
            for owner in (False, True) if args.owner else (False,):
                serial = {}
                for cells in (False, True):
                    options = ({} if cells else {"cells": False}) | ({"owner": True} if owner else {})
                    forward = model.make_forward(prob.cfg, backend="cuda", **options)
                    lowered = forward.lower(prob.weights, prob.batches[0])
                    plan = floor.plan_of(lowered)
                    c = Counter(step_counts(plan))
                    run = executed(prob.weights, prob.batches[0], lowered)
                    steps = run.steps * plan.stats.get("steps_per_iteration", 1)
                    serial[cells] = c["serial ops"]
                    saved = (serial[False] - serial[True]) * steps if cells else 0
                    print(f"{name:8s} {batch:<3d} {'on' if owner else 'off':5s} {'on' if cells else 'off':5s} | "
                          f"{c['ops']:13g} {c['waves']:5g} {c['grid']:4g} {c['block']:5g} {c['serial ops']:10g} | "
                          f"{steps:5d} | {run.waves:15d} {run.utasks:6d} {run.count.plan_grid_barriers:4d} | "
                          f"{saved * OP_US[0]:.0f} - {saved * OP_US[1]:.0f}", flush=True)


if __name__ == "__main__":
    main()
