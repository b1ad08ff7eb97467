"""Waves and grid barriers executed with and without contraction epilogues (docs/schedule.md, "Epilogues").

    python benchmarks/epilogue_counts.py [--models blockdrop,skipnet,seq2seq,attention] [--batch 1,64]

Each model at its full size (`Config()`) is lowered for CUDA (no GPU needed: the source is rendered, not
compiled) with the option epilogue=False and with epilogues (the default), and its plan is run by the
bench's wave counter (benchmarks/branch_counts.py) on the model's inputs; the gated models on the inputs
of the executed-ratio sweep with every gate on (ratio 1). Printed per row: the epilogues in the plan, the
waves and the grid barriers executed (plan / rendered), and the uTasks run.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: gdsl/, models/

from branch_counts import WaveCounter  # (this directory is on sys.path: the script's own)

from models import floor, load


def inputs_of(model, cfg, batch: int) -> dict:
    """The model's inputs; a gated model's with every gate on."""
    if "ratio" in inspect.signature(model.make_inputs).parameters:
        return model.make_inputs(cfg, batch, ratio=1.0)
    return model.make_inputs(cfg, batch)


def count(model, cfg, weights, batch: int, epilogue: bool):
    forward = model.make_forward(cfg, backend="cuda", **({} if epilogue else {"epilogue": False}))
    inputs = inputs_of(model, cfg, batch)
    lowered = forward.lower(weights, inputs)
    plan = floor.plan_of(lowered)
    counter = WaveCounter(plan, floor.rendered_grid_syncs(lowered), all_values=False)
    counter.run(floor.flat_arguments(weights, inputs))
    return plan.stats.get("epilogues", 0), counter


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/epilogue_counts.py", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="blockdrop,skipnet,seq2seq,attention")
    p.add_argument("--batch", default="1,64")
    args = p.parse_args(argv)
    print("model      bs   epilogues  waves  grid barriers (plan / rendered)  uTasks")
    for name in args.models.split(","):
        model = load(name)
        cfg = model.Config()
        weights = model.init_weights(cfg)
        for batch in (int(b) for b in args.batch.split(",")):
            for epilogue in (False, True):
                n, c = count(model, cfg, weights, batch, epilogue)
                print(f"{name:10s} {batch:<4d} {n:9d}  {c.waves:6d}  {c.count.plan_grid_barriers:13d} / "
                      f"{c.count.grid_barriers:<16d} {c.utasks:7d}", flush=True)


if __name__ == "__main__":
    main()
