"""What RAE's recursion executes per forward, against the same tree traced straight-line.

    python benchmarks/recursion_counts.py [--trees 20] [--backend cuda] [--cpu-runs 0] [--fork]

RAE at its full size (`Config()`, hidden 512) is lowered once (no GPU needed: the CUDA source is rendered,
not compiled) and its plan is run by models/floor.py's counter (only the ops that steer control flow are
computed) on the fixed 65-node tree of the overhead test, and on `--trees` random trees of the bench
(mean per forward). The traced row is the fixed tree written out at trace time (`known_tree`, no recurse).
Printed per row: calls, waves, grid barriers (every grid Sync of the plan / those the C-family renderer
emits), copy ops and their uTasks, all uTasks, and the same per call. With `--cpu-runs N` the cpu
backend's median time per forward (ms) on the fixed tree is printed too, recursion and traced.

With `--fork` the recursion is also counted with the scheduler option fork=True (plan.Fork: a node's two
children on the two halves of its vEU group), in a second table: the barriers the C-family code executes
split into grid barriers (every vEU) and group barriers (a group of two vEUs or more; a group of one only
syncs its threads), and along the critical path (the longer half of every Fork): waves and barriers of
either kind. The fork kernel's first grid barrier (it clears the group counters) is not in the plan and not
counted.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: gdsl/, models/

import numpy as np
from branch_counts import WaveCounter  # (this directory is on sys.path: the script's own)

from gdsl.schedule.simulate import FORK_BARRIER
from models import floor, rae


class _Counter(WaveCounter):
    """The bench's plan counter, also counting calls, waves, copy ops and uTasks, and with Forks group
    barriers and the critical path (`path`: waves and barriers along the longer half of each Fork)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.group_barriers = 0
        self.path = {"waves": 0, "barriers": 0, "rounds": 0}
        self._forks = []            # per running Fork: (the path at its start, the path at each half's end)

    def run_call(self, stmt):
        self.calls += 1
        super().run_call(stmt)

    def run_wave(self, stmt):
        _, lo, hi = self.group
        self.path["waves"] += 1
        self.path["rounds"] += max(-(-t.op.n_utasks // min(t.op.n_utasks, t.count, hi - lo)) for t in stmt.tasks)
        super().run_wave(stmt)

    def run_sync(self, stmt):
        before = self.count.grid_barriers
        super().run_sync(stmt)
        if stmt is FORK_BARRIER:                        # (not in the plan: rendered by the Fork)
            self.count.grid_barriers += 1
        if self.count.grid_barriers > before:           # rendered as a barrier of the running group
            _, lo, hi = self.group
            if hi - lo < self.plan.grid:
                self.count.grid_barriers = before       # (a group's: counted apart)
                self.group_barriers += hi - lo >= 2
            self.path["barriers"] += hi - lo >= 2

    def run_fork(self, stmt):
        self._forks.append((dict(self.path), []))
        super().run_fork(stmt)
        start, ends = self._forks.pop()
        if ends:                                        # (a group of one vEU ran the calls one after the other)
            self.path = {k: max(end[k] for end in ends) for k in start}

    def fork_half(self, *args):
        start, ends = self._forks[-1]
        self.path = dict(start)
        super().fork_half(*args)
        ends.append(self.path)

    def row(self) -> dict:
        return {"calls": self.calls, "waves": self.waves, "grid": self.count.plan_grid_barriers,
                "rendered": self.count.grid_barriers, "copy_ops": self.copy_ops,
                "copy_utasks": self.copy_utasks, "utasks": self.utasks, "group": self.group_barriers,
                "path_waves": self.path["waves"], "path_barriers": self.path["barriers"],
                "path_rounds": self.path["rounds"]}


def count(forward, weights, inputs) -> dict:
    lowered = forward.lower(weights, inputs)
    counter = _Counter(floor.plan_of(lowered), floor.rendered_grid_syncs(lowered), all_values=False)
    counter.run(floor.flat_arguments(weights, inputs))
    return counter.row()


def cpu_ms(forward, weights, inputs, runs: int) -> float:
    forward(weights, inputs)                         # compile
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        np.asarray(forward(weights, inputs))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def show(label: str, row: dict):
    calls = row["calls"] or 1
    print(f"{label:22s} {row['calls']:6.1f} {row['waves']:7.1f} {row['grid']:7.1f} / {row['rendered']:<7.1f} "
          f"{row['copy_ops']:8.1f} {row['copy_utasks']:11.1f} {row['utasks']:8.1f}   "
          f"{row['waves'] / calls:5.2f} {row['rendered'] / calls:5.2f} {row['copy_ops'] / calls:5.2f}", flush=True)


def show_paths(label: str, row: dict):
    print(f"{label:32s} {row['rendered']:7.1f} {row['group']:8.1f}   {row['path_waves']:7.1f} "
          f"{row['path_rounds']:7.1f} {row['path_barriers']:9.1f}", flush=True)


def mean_row(rows) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/recursion_counts.py", description=__doc__.split("\n")[0])
    p.add_argument("--trees", type=int, default=20)
    p.add_argument("--backend", default="cuda")
    p.add_argument("--cpu-runs", type=int, default=0)
    p.add_argument("--fork", action="store_true", help="also count the recursion with fork=True")
    args = p.parse_args(argv)
    cfg = rae.Config()
    weights = rae.init_weights(cfg)
    fixed = rae.make_inputs(cfg, tree="fixed")
    recursive = rae.make_forward(cfg, backend=args.backend)
    traced = rae.make_forward(rae.overhead_test(cfg).programs["trace"], backend=args.backend)
    print("row                     calls   waves    grid barriers    copies copy uTasks   uTasks"
          "   per call: waves barriers copies")
    print("                                        (plan / rendered)")
    show("fixed tree, recursion", count(recursive, weights, fixed))
    show("fixed tree, traced", count(traced, weights, fixed))
    rows = [count(recursive, weights, rae.make_inputs(cfg, seed=s)) for s in range(args.trees)]
    show(f"{args.trees} random trees (mean)", mean_row(rows))
    if args.fork:
        forked = rae.make_forward(cfg, backend=args.backend, fork=True)
        print("\nrow                              barriers executed   critical path")
        print("                                    grid    group     waves  rounds  barriers")
        show_paths("fixed tree, recursion", count(recursive, weights, fixed))
        show_paths("fixed tree, fork=True", count(forked, weights, fixed))
        show_paths("fixed tree, traced", count(traced, weights, fixed))
        show_paths(f"{args.trees} random trees, recursion", mean_row(rows))
        show_paths(f"{args.trees} random trees, fork=True",
                   mean_row([count(forked, weights, rae.make_inputs(cfg, seed=s)) for s in range(args.trees)]))
    if args.cpu_runs:
        rec_cpu = rae.make_forward(cfg, backend="cpu")
        traced_cpu = rae.make_forward(rae.overhead_test(cfg).programs["trace"], backend="cpu")
        rec, tr = cpu_ms(rec_cpu, weights, fixed, args.cpu_runs), cpu_ms(traced_cpu, weights, fixed, args.cpu_runs)
        print(f"cpu backend, fixed tree: recursion {rec:.3f} ms, traced {tr:.3f} ms, ratio {rec / tr:.2f}")


if __name__ == "__main__":
    main()
