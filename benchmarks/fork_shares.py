"""RAE on the GPU with the scheduler option fork=True at several FORK_MIN_SHARE values, each in a bench run of
its own beside the default (calls one after the other), to choose the share (docs/schedule.md, "Parallel
recursion": a barrier against rounds of GEMV uTasks).

    python benchmarks/fork_shares.py [--shares 0.01,0.25,0.5,1.0] [--overhead] [more models.bench arguments]

Each share prints the bench's table: the rows gdsl-device and gdsl-device[fork=True] (with --overhead, the
control-flow overhead over the traced tree, Figure 18).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: gdsl/, models/

from gdsl.schedule import scheduler
from models import bench


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/fork_shares.py", description=__doc__.split("\n")[0])
    p.add_argument("--shares", default="0.01,0.25,0.5,1.0")
    args, rest = p.parse_known_args(argv)
    for share in (float(s) for s in args.shares.split(",")):
        scheduler.FORK_MIN_SHARE = share           # read when a plan is made: every compile below uses it
        print(f"\n===== FORK_MIN_SHARE = {share}", flush=True)
        bench.main(["--models", "rae", "--systems", "gdsl-device", "--ablate", "fork=True", "--no-floor", *rest])


if __name__ == "__main__":
    main()
