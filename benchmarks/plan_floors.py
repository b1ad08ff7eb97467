"""The floor of each zoo row's default CUDA plan, counted without a GPU (docs/performance.md, session 10).

    python benchmarks/plan_floors.py [--models lstm,nasrnn] [--barrier-us 132=1.76,264=1.85] [--copy-tbps 4.06]
                                     [--fp32-tflops 51]

Each model at its full size is lowered for CUDA (rendered, not compiled) and its plan counted by
models/floor.py on the model's first input set: the dependent grid barriers the renderer keeps, the compulsory
bytes and the flops. The floor is the largest of barriers x barrier cost, bytes / copy bandwidth and flops / fp32
peak, against ceilings given here (defaults: measured on the H200 in sessions 3-6, models/floor.Ceilings); the
bench (`python -m models.bench` without `--no-floor`) measures them on its own device instead.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: gdsl/, models/

from models import common, floor, load  # noqa: E402  (after the path)

MODELS = ["lstm", "nasrnn", "attention", "seq2seq", "blockdrop", "skipnet", "rae"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--barrier-us", default="132=1.76,264=1.85",
                    help="grid barrier cost per grid size, µs (the nearest grid's for others)")
    ap.add_argument("--copy-tbps", type=float, default=4.06)
    ap.add_argument("--fp32-tflops", type=float, default=51.0)
    args = ap.parse_args(argv)
    barrier = {int(g): float(us) for g, us in (item.split("=") for item in args.barrier_us.split(","))}
    for name in args.models.split(","):
        model = load(name)
        for batch in getattr(model, "BATCHES", (1,)):
            prob = common.build_problem(model, batch)
            lowered = model.make_forward(prob.cfg, backend="cuda").lower(prob.weights, prob.batches[0])
            plan = floor.plan_of(lowered)
            count = floor.mean_count([floor.count_plan(plan, floor.flat_arguments(prob.weights, prob.batches[0]),
                                                       floor.rendered_grid_syncs(lowered))])
            nearest = min(barrier, key=lambda g: abs(g - plan.grid))
            result = floor.floor_terms(count, {"barrier_us": barrier[nearest], "copy_gbps": args.copy_tbps * 1e3,
                                               "fp32_tflops": args.fp32_tflops})
            terms = result["terms_ms"]
            flags = f"  flag syncs {count['flag_syncs']:.0f} (no term)" if count["flag_syncs"] else ""
            print(f"{name:10s} bs {batch:3d}  grid {plan.grid:3d}  dependent barriers {count['dependent_steps']:6.0f}  "
                  f"barriers {terms['barriers']:.3f}  bytes {terms['bytes']:.4f}  flops {terms['flops']:.4f} ms  "
                  f"floor {result['floor_ms']:.3f} ms ({result['binding']}, {count['flops'] / 1e9:.2f} GFLOP){flags}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
