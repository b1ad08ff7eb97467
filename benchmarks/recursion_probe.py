"""RAE's recursion overhead test on the GPU, split into kernel and host: both programs of its overhead view.

    python benchmarks/recursion_probe.py [--runs 300] [--ncu] [--profile DIR] [--option NAME=VALUE ...]

For each program of `models/rae.py`'s overhead test (the fixed 65-node tree by `gdsl.recurse`, and the same tree
written out at trace time), under device control: the result checked against the reference, then the host wall
time of a call and its device synchronisation, and the time between CUDA events recorded around the call (what
the GPU's stream spent, the kernel and any copy after it), medians over the last two thirds of `--runs` calls.
When the two agree the host adds nothing to a call, and the difference between the programs is their kernels'.
`--ncu`: 20 calls each and no event timing, for `ncu --metrics gpu__time_duration.sum -k regex:gdsl` around it.
`--profile DIR`: the recursive program's per-vEU timeline too (gdsl.profile: DIR/rae_fixed.{json,txt,png}).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: models/

import gdsl  # noqa: E402
from models import common, load  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--ncu", action="store_true")
    parser.add_argument("--profile", default=None, metavar="DIR")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    import cupy

    options = dict(common.parse_option(text) for text in args.option)
    model = load("rae")
    test = model.overhead_test(model.Config())
    put, sync = common._device_put_for("cuda")
    runs = 20 if args.ncu else args.runs
    for name, cfg in test.programs.items():
        prob = common.build_problem(model, 1, seed=0, n_inputs=1, cfg=cfg, **test.inputs)
        fn = model.make_forward(prob.cfg, backend="cuda", control="device", **options)
        weights = common.tree_map(put, prob.weights)
        inputs = common.tree_map(put, prob.batches[0])
        bound = fn.bind(weights)
        want = model.reference(prob.weights, prob.batches[0], prob.cfg)
        error = float(np.max(np.abs(cupy.asnumpy(bound(inputs)) - want)))
        wall = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sync(bound(inputs))
            wall.append((time.perf_counter() - t0) * 1e3)
        line = f"{name}: max error {error:.2e}; host wall {np.median(wall[runs // 3:]):.4f} ms"
        if not args.ncu:
            events = []
            for _ in range(runs):
                start, end = cupy.cuda.Event(), cupy.cuda.Event()
                start.record()
                bound(inputs)
                end.record()
                end.synchronize()
                events.append(cupy.cuda.get_elapsed_time(start, end))
            line += f", events around the call {np.median(events[runs // 3:]):.4f} ms"
        print(line, flush=True)
        if args.profile and name == "control flow":
            p = gdsl.profile(fn, weights, inputs)
            os.makedirs(args.profile, exist_ok=True)
            stem = os.path.join(args.profile, "rae_fixed")
            p.save(stem + ".json")
            with open(stem + ".txt", "w") as f:
                f.write(p.summary() + "\n")
            p.plot(stem + ".png")
            print(p.summary())


if __name__ == "__main__":
    main()
