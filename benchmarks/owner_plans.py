"""The loop plans of the zoo's recurrent models with and without owner-computes placement (the scheduler
option `owner=True`, gdsl/schedule/owner.py; its products of a layer stacked into one, `concat_k`, by default
in the owner plan), as docs/schedule.md's table lists them: per loop step the grid
barriers (scheduler.loop_grid_barriers), the vEUs each column layout takes, its matmul uTasks' widths, their
rounds per vEU, and whether their weights stay resident in shared memory. CUDA lowering (no GPU needed):
`python -m benchmarks.owner_plans [--models lstm,nasrnn] [--batches 1,64] [--grids 264,132]`. Per step also the
cost model's estimate (scheduler.loop_step_ns) and the uTasks the busiest vEUs run one after another, and which
plan owner="auto" keeps (scheduler.pays)."""
from __future__ import annotations

import argparse
import collections

from gdsl.primitives.linalg import matmul_p
from gdsl.schedule.plan import Loop, Wave, plan_statements, walk
from gdsl.schedule.resident import RESIDENT
from gdsl.schedule.scheduler import loop_grid_barriers, loop_step_ns, loop_step_rounds
from gdsl.schedule.utasks import gathers_batch
from models import common, load


def loop_summary(plan) -> dict:
    """What the loop bodies' matmuls look like: per vEU range, its matmuls' (columns per uTask, rounds,
    resident) and the most rounds of its other ops; and the grid barriers per step."""
    ranges = collections.defaultdict(list)
    others = collections.defaultdict(int)        # vEU count -> the most rounds of another op on them
    for loop in (s for s in plan_statements(plan) if isinstance(s, Loop)):
        for stmt in walk(loop.body):
            if isinstance(stmt, Wave):
                for task in stmt.tasks:
                    op = task.op
                    if op.kind != matmul_p.name:
                        others[task.count] = max(others[task.count], -(-op.n_utasks // task.count))
                        continue
                    batch = op.outputs[0].aval.size // (op.outputs[0].aval.shape[-1] * op.outputs[0].aval.shape[-2])
                    columns = op.params["tile_n"] * (batch if gathers_batch(op.params) else 1)
                    rounds = -(-op.n_utasks // task.count)
                    ranges[task.count].append((columns, rounds, RESIDENT in op.params))
    return {"grid barriers per step": loop_grid_barriers(plan), "ranges": ranges, "others": others}


def describe(summary) -> str:
    parts = []
    for count, matmuls in sorted(summary["ranges"].items()):
        kinds = collections.Counter(matmuls)
        text = ", ".join(f"{n}x({cols} cols, {rounds} rounds, {'resident' if res else 'L2'})"
                         for (cols, rounds, res), n in sorted(kinds.items()))
        parts.append(f"{count} vEUs: {text}; other ops up to {summary['others'][count]} rounds")
    return f"{summary['grid barriers per step']:g} grid barriers/step; " + "; ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="lstm,nasrnn")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--grids", default="264,132")
    args = parser.parse_args(argv)
    for name in args.models.split(","):
        model = load(name)
        for bs in (int(b) for b in args.batches.split(",")):
            problem = common.build_problem(model, bs)
            for grid in (int(g) for g in args.grids.split(",")):
                for owner, concat_k in ((False, None), (True, False), (True, None), ("auto", False), ("auto", None)):
                    fn = model.make_forward(problem.cfg, backend="cuda", grid=grid, owner=owner, concat_k=concat_k)
                    plan = fn.lower(problem.weights, problem.batches[0]).lowering.plan
                    owned = plan.stats.get("steps_per_iteration", 1) == 2
                    print(f"{name} bs{bs} grid {grid} owner={owner} concat_k={concat_k}: "
                          f"{'owner plan' if owned else 'default plan'}; {describe(loop_summary(plan))}; per step "
                          f"{loop_step_ns(plan) / 1000:.2f} us estimated, {loop_step_rounds(plan):g} serial uTasks",
                          flush=True)


if __name__ == "__main__":
    main()
