"""Profile one zoo model: its Chrome trace, summary and PNG timeline under an output directory.

    python benchmarks/profile_model.py lstm --out prof/ [--batch 1] [--backend cuda] [--grid N] [--small]
                                       [--overhead RUNS] [--option owner=True ...]

writes prof/<model>_bs<batch>.json (open in https://ui.perfetto.dev), .txt (the summary) and .png, and
with --overhead the median time of a call with and without instrumentation (docs/profile.md). --small
uses the model's small configuration (seconds on the CPU backend); each --option sets one jit option (the
files are then named <model>_bs<batch>_<name>-<value>, so a lever's profile sits beside the default's).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gdsl  # noqa: E402  (after the path: run from a checkout)
from gdsl.profiling.profile import overhead  # noqa: E402
from models import common, load  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--out", default="profile")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--grid", type=int, default=None)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--overhead", type=int, default=0, metavar="RUNS")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="a jit option (repeatable), e.g. owner=True")
    parser.add_argument("--window-us", default=None, metavar="START:END",
                        help="the PNG shows only this span of the kernel (µs), e.g. 0:200 for the first steps")
    args = parser.parse_args(argv)

    model = load(args.model)
    prob = common.build_problem(model, args.batch, small=args.small)
    options = {"grid": args.grid} if args.grid else {}
    options.update(common.parse_option(text) for text in args.option)
    fn = model.make_forward(prob.cfg, backend=args.backend, **options)
    put, _ = common._device_put_for(args.backend)
    weights = common.tree_map(put, prob.weights)
    inputs = common.tree_map(put, prob.batches[0])

    p = gdsl.profile(fn, weights, inputs)
    os.makedirs(args.out, exist_ok=True)
    suffixes = [option.replace("=", "-") for option in args.option]
    stem = os.path.join(args.out, "_".join([f"{args.model}_bs{args.batch}", *suffixes]))
    p.save(stem + ".json")
    summary = p.summary()
    if args.overhead:
        normal, instrumented = overhead(fn, (weights, inputs), runs=args.overhead)
        summary += (f"\ninstrumentation overhead: {1e3 * normal:.3f} ms -> {1e3 * instrumented:.3f} ms per call "
                    f"({instrumented / normal - 1:+.1%}, median of {args.overhead})")
    with open(stem + ".txt", "w") as f:
        f.write(summary + "\n")
    window = tuple(float(t) for t in args.window_us.split(":")) if args.window_us else None
    p.plot(stem + ".png", window_us=window)
    print(summary)
    print(f"wrote {stem}.json, {stem}.txt, {stem}.png")


if __name__ == "__main__":
    main()
