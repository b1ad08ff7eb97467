"""What RAE's recursion executes per forward, against the same tree traced straight-line.

    python benchmarks/recursion_counts.py [--trees 20] [--backend cuda] [--cpu-runs 0] [--fork] [--resident]
                                          [--spread] [--aside] [--thin]

RAE at its full size (`Config()`, hidden 512) is lowered once (no GPU needed: the CUDA source is rendered,
not compiled) and its plan is run by models/floor.py's counter (only the ops that steer control flow are
computed) on the fixed 65-node tree of the overhead test, and on `--trees` random trees of the bench
(mean per forward). The traced row is the fixed tree written out at trace time (`known_tree`, no recurse).
Printed per row: calls, waves, grid barriers (every grid Sync of the plan / those the C-family renderer
emits), copy ops and their uTasks, all uTasks, and the same per call; then the critical path by the cost
model ("path us"): between two grid barriers every vEU runs its uTasks one after the other and the barrier
waits for the busiest, so the path is, over the intervals between executed grid barriers, the sum of the
busiest vEU's estimated uTask time (plan.Op.cost) plus partition.BARRIER_NS per barrier (calls and uniform
ops count nothing), and "path uTasks", the same sum of the busiest vEU's uTask count per interval (the waves
on the critical path). With `--cpu-runs N` the cpu
backend's median time per forward (ms) on the fixed tree is printed too, recursion and traced.

Then what each call does, per executed call: the push (return site, depth, frame step: one each, always),
argument Assigns (uniforms), argument copy ops (buffers copied into the callee's frame), block syncs and grid
barriers, and the matmuls' weight bytes read from memory (GEMV tiles of B from L2; 0 for a tile resident in
shared memory). With `--resident` the same with the scheduler option resident_calls=True (a recursive
function's GEMV weights staged in shared memory once per forward; the staged bytes are counted apart).

With `--spread` the first table also has the rows of the scheduler option spread_frames=True (a call's
callees' frames past its later siblings': a left child's last barrier a block sync), with `--aside` those of
aside=True (the leaf's wave beside the matmul's vEUs), with both both together too. With `--thin` those of
thin_gemv=True (the node's GEMV in tiles of 8 columns on 64 vEUs, its whole k staged at once), the traced
tree's too: what the overhead view compares with the option on both sides.

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

from gdsl.primitives.linalg import matmul_p
from gdsl.schedule.partition import BARRIER_NS
from gdsl.schedule.plan import COPY
from gdsl.schedule.resident import RESIDENT, function_resident_tasks, tile_bytes
from gdsl.schedule.simulate import FORK_BARRIER
from models import floor, rae


class _Counter(WaveCounter):
    """The bench's plan counter, also counting calls, waves, copy ops and uTasks, and with Forks group
    barriers and the critical path (`path`: waves and barriers along the longer half of each Fork)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.group_barriers = 0
        self.assigns = 0                # uniform Assigns (a call's scalar arguments and results)
        self.block_syncs = 0
        self.arg_copies = 0             # copy ops into a callee's frame (its buffer arguments)
        self.weight_bytes = 0           # matmul B tiles read from memory (not resident)
        self.staged_bytes = sum(tile_bytes(t.op) * t.op.n_utasks for f in self.plan.functions
                                for t in function_resident_tasks(f.body))
        self.path = {"waves": 0, "barriers": 0, "rounds": 0}
        self.busy: dict = {}            # vEU -> estimated ns of its uTasks since the last grid barrier
        self.busy_utasks: dict = {}     # vEU -> its uTasks since the last grid barrier
        self.path_ns = 0.0              # the cost model's critical path (module docstring; no Forks)
        self.path_utasks = 0            # the busiest vEU's uTasks, summed over the intervals
        self._forks = []            # per running Fork: (the path at its start, the path at each half's end)

    def run_call(self, stmt):
        self.calls += 1
        super().run_call(stmt)

    def run_assign(self, stmt):
        self.assigns += 1
        super().run_assign(stmt)

    def run_wave(self, stmt):
        self.arg_copies += sum(t.op.kind == COPY.name and t.op.outputs[0].frame_offset > 0 for t in stmt.tasks)
        self.weight_bytes += sum(tile_bytes(t.op) * t.op.n_utasks for t in stmt.tasks
                                 if t.op.kind == matmul_p.name and RESIDENT not in t.op.params)
        _, lo, hi = self.group
        for t in stmt.tasks:
            for u in range(t.op.n_utasks):
                veu = lo + (t.first + u % t.count) % (hi - lo)
                self.busy[veu] = self.busy.get(veu, 0.0) + t.op.cost
                self.busy_utasks[veu] = self.busy_utasks.get(veu, 0) + 1
        self.path["waves"] += 1
        self.path["rounds"] += max(-(-t.op.n_utasks // min(t.op.n_utasks, t.count, hi - lo)) for t in stmt.tasks)
        super().run_wave(stmt)

    def run_sync(self, stmt):
        before = self.count.grid_barriers
        if not self.grid_here(stmt):
            self.block_syncs += 1
        super().run_sync(stmt)
        if stmt is FORK_BARRIER:                        # (not in the plan: rendered by the Fork)
            self.count.grid_barriers += 1
        if self.count.grid_barriers > before:           # rendered as a barrier of the running group
            self.path_ns += max(self.busy.values(), default=0.0) + BARRIER_NS
            self.path_utasks += max(self.busy_utasks.values(), default=0)
            self.busy, self.busy_utasks = {}, {}
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
                "path_rounds": self.path["rounds"], "assigns": self.assigns, "block_syncs": self.block_syncs,
                "arg_copies": self.arg_copies, "weight_mb": self.weight_bytes / 1e6,
                "staged_mb": self.staged_bytes / 1e6,
                "path_us": (self.path_ns + max(self.busy.values(), default=0.0)) / 1e3,
                "path_utasks": self.path_utasks + max(self.busy_utasks.values(), default=0)}


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
    print(f"{label:26s} {row['calls']:6.1f} {row['waves']:7.1f} {row['grid']:7.1f} / {row['rendered']:<7.1f} "
          f"{row['copy_ops']:8.1f} {row['copy_utasks']:11.1f} {row['utasks']:8.1f}   "
          f"{row['waves'] / calls:5.2f} {row['rendered'] / calls:5.2f} {row['copy_ops'] / calls:5.2f}"
          f"   {row['path_us']:7.1f} {row['path_utasks']:7.1f}", flush=True)


def show_paths(label: str, row: dict):
    print(f"{label:32s} {row['rendered']:7.1f} {row['group']:8.1f}   {row['path_waves']:7.1f} "
          f"{row['path_rounds']:7.1f} {row['path_barriers']:9.1f}", flush=True)


def show_calls(label: str, row: dict):
    """What each executed call does, on average (see the module docstring)."""
    calls = row["calls"] or 1
    print(f"{label:32s} {1.0 if row['calls'] else 0.0:5.2f} {row['assigns'] / calls:8.2f} "
          f"{row['arg_copies'] / calls:7.2f} {row['block_syncs'] / calls:6.2f} {row['rendered'] / calls:6.2f}   "
          f"{row['weight_mb']:8.2f} {row['staged_mb']:7.2f}", flush=True)


def mean_row(rows) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/recursion_counts.py", description=__doc__.split("\n")[0])
    p.add_argument("--trees", type=int, default=20)
    p.add_argument("--backend", default="cuda")
    p.add_argument("--cpu-runs", type=int, default=0)
    p.add_argument("--fork", action="store_true", help="also count the recursion with fork=True")
    p.add_argument("--resident", action="store_true", help="also count the recursion with resident_calls=True")
    p.add_argument("--spread", action="store_true", help="also count the recursion with spread_frames=True")
    p.add_argument("--aside", action="store_true", help="also count the recursion with aside=True (and both)")
    p.add_argument("--thin", action="store_true", help="also count both programs with thin_gemv=True")
    args = p.parse_args(argv)
    cfg = rae.Config()
    weights = rae.init_weights(cfg)
    fixed = rae.make_inputs(cfg, tree="fixed")
    recursive = rae.make_forward(cfg, backend=args.backend)
    traced = rae.make_forward(rae.overhead_test(cfg).programs["trace"], backend=args.backend)
    print("row                         calls   waves    grid barriers    copies copy uTasks   uTasks"
          "   per call: waves barriers copies   path us  uTasks")
    print("                                            (plan / rendered)")
    show("fixed tree, recursion", count(recursive, weights, fixed))
    show("fixed tree, traced", count(traced, weights, fixed))
    rows = [count(recursive, weights, rae.make_inputs(cfg, seed=s)) for s in range(args.trees)]
    show(f"{args.trees} random trees (mean)", mean_row(rows))
    variants = [("spread", {"spread_frames": True})] if args.spread else []
    variants += [("aside", {"aside": True})] if args.aside else []
    variants += [("spread + aside", {"spread_frames": True, "aside": True})] if args.spread and args.aside else []
    if args.thin:
        thin_traced = rae.make_forward(rae.overhead_test(cfg).programs["trace"], backend=args.backend, thin_gemv=True)
        show("fixed tree, traced, thin", count(thin_traced, weights, fixed))
    variants += [("thin", {"thin_gemv": True})] if args.thin else []
    for label, options in variants:
        forward = rae.make_forward(cfg, backend=args.backend, **options)
        show(f"fixed tree, {label}", count(forward, weights, fixed))
        show(f"{args.trees} trees, {label}",
             mean_row([count(forward, weights, rae.make_inputs(cfg, seed=s)) for s in range(args.trees)]))
    print("\nper executed call                push  assigns  copies  block   grid    weights from memory, staged")
    print("                                                        syncs   barriers  (MB per forward)")
    show_calls("fixed tree, recursion", count(recursive, weights, fixed))
    show_calls(f"{args.trees} random trees, recursion", mean_row(rows))
    if args.resident:
        resident = rae.make_forward(cfg, backend=args.backend, resident_calls=True)
        show_calls("fixed tree, resident_calls", count(resident, weights, fixed))
        show_calls(f"{args.trees} random trees, resident_calls",
                   mean_row([count(resident, weights, rae.make_inputs(cfg, seed=s)) for s in range(args.trees)]))
    show_calls("fixed tree, traced (per forward)", count(traced, weights, fixed))
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
