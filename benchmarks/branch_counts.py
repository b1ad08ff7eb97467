"""What a gated network executes with every gate off and every gate on: waves, grid barriers and copies.

    python benchmarks/branch_counts.py [--models blockdrop,skipnet] [--batch 1,64] [--backend cuda]

Each model at its full size (`Config()`) is lowered once per batch size (no GPU needed: the CUDA source is
rendered, not compiled) and its plan is run by models/floor.py's counter on the inputs of the executed-ratio
sweep at 0 % and 100 % (`make_inputs(cfg, batch, ratio=...)`). Printed per row: the waves executed, the grid
barriers executed (every grid Sync of the plan, and those the C-family renderer emits), the copy ops and
their uTasks, and all uTasks. The difference between the rows is what the gated blocks cost when they run;
the 0 % row is what skipping costs (docs/schedule.md, "Branches that forward an operand").
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: gdsl/, models/

from gdsl.schedule.plan import COPY
from models import floor, load


class WaveCounter(floor._Counter):
    """The bench's plan counter, also counting waves, copy ops and uTasks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.waves = self.copy_ops = self.copy_utasks = self.utasks = 0

    def run_wave(self, stmt):
        self.waves += 1
        for task in stmt.tasks:
            self.utasks += task.op.n_utasks
            if task.op.kind == COPY.name:
                self.copy_ops += 1
                self.copy_utasks += task.op.n_utasks
        super().run_wave(stmt)


def count(model, cfg, weights, forward, batch: int, ratio: float) -> WaveCounter:
    inputs = model.make_inputs(cfg, batch, ratio=ratio)
    lowered = forward.lower(weights, inputs)
    counter = WaveCounter(floor.plan_of(lowered), floor.rendered_grid_syncs(lowered), all_values=False)
    counter.run(floor.flat_arguments(weights, inputs))
    return counter


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/branch_counts.py", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="blockdrop,skipnet")
    p.add_argument("--batch", default="1,64")
    p.add_argument("--backend", default="cuda")
    args = p.parse_args(argv)
    print("model      bs   gates  waves  grid barriers (plan / rendered)  copy ops  copy uTasks  uTasks")
    for name in args.models.split(","):
        model = load(name)
        cfg = model.Config()
        weights = model.init_weights(cfg)
        forward = model.make_forward(cfg, backend=args.backend)
        for batch in (int(b) for b in args.batch.split(",")):
            for ratio in (0.0, 1.0):
                c = count(model, cfg, weights, forward, batch, ratio)
                print(f"{name:10s} {batch:<4d} {'on' if ratio else 'off':5s} {c.waves:6d}  "
                      f"{c.count.plan_grid_barriers:13d} / {c.count.grid_barriers:<16d} {c.copy_ops:9d} "
                      f"{c.copy_utasks:12d} {c.utasks:7d}", flush=True)


if __name__ == "__main__":
    main()
