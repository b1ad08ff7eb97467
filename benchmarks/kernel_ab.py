"""Kernel-time A/B of module switches under Nsight Compute: what one forward's kernel takes, variant by variant.

On the GPU machine:

    python benchmarks/kernel_ab.py --models seq2seq,attention --batch 1 --variant base \
        --variant lane8:gdsl.backends.cfamily.reductions.LANE_LOAD_BATCH=8 [--rounds 2] [--launches 15] [--json F]

A variant is `name` or `name:module.NAME=value[,module.NAME=value...]` (switches as benchmarks/switches.py sets
them); an item without a dot in its name is a jit option of the forward instead (`grid=132`, as models.bench's
`gdsl-device[grid=132]`). Each (round, model, variant) runs in a process of its own under `ncu --clock-control
none --metrics gpu__time_duration.sum` (the GPU's own clocks, the kernel alone, `--launches` launches after
`--skip`), the variants' order reversed every other round; the child checks the model's result against its
reference first. Prints each variant's median, min and max kernel µs over all its launches. Why: a batch-1 row's
end-to-end median moves by 15-65 µs from one process to the next (host side; docs/performance.md, session 15) while
its kernel's time holds to about a microsecond, so a microsecond lever is measured here, not with models.bench.
Each child compiles what the cache lacks (precompile_cuda.py --render renders a switched variant ahead).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo root: gdsl/, models/

METRIC = "gpu__time_duration.sum"
TO_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}


def parse_variant(text: str) -> tuple[str, list[str]]:
    """`name` or `name:switch=value,...` -> (name, ["module.NAME=value", ...])."""
    name, _, switches = text.partition(":")
    return name, [s for s in switches.split(",") if s]


def split_switches(items: list[str]) -> tuple[list[str], dict]:
    """A variant's items -> (its module switches "module.NAME=value", its jit options {name: value})."""
    from models import common
    dotted = [s for s in items if "." in s.split("=", 1)[0]]
    return dotted, dict(common.parse_option(s) for s in items if s not in dotted)


def runs(models: list[str], variants: list[str], rounds: int) -> list[tuple[int, str, str]]:
    """(round, model, variant) in the order they run: each round every model, the variants forward in even
    rounds and backward in odd ones (a variant is not always the first process after another)."""
    out = []
    for r in range(rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        out += [(r, model, v) for model in models for v in order]
    return out


def kernel_us(ncu_csv: str) -> list[float]:
    """The kernel durations (µs) in ncu's --csv output (other lines, e.g. the program's own, are skipped)."""
    out = []
    for row in csv.reader(io.StringIO(ncu_csv)):
        if len(row) >= 3 and row[-3] == METRIC:
            out.append(float(row[-1].replace(",", "")) * TO_US[row[-2]])
    return out


def child(model_name: str, batch: int, calls: int, switches: list[str]) -> int:
    """One process's work under ncu: the model's forward `calls` times (device control, CUDA), checked first."""
    from models import common, load
    module_switches, options = split_switches(switches)
    common.set_switches(module_switches)
    import gdsl
    model = load(model_name)
    prob = common.build_problem(model, batch)
    fn = model.make_forward(prob.cfg, backend="cuda", control="device", **options)
    put, sync = common._device_put_for("cuda")
    weights, inputs = common.tree_map(put, prob.weights), common.tree_map(put, prob.batches[0])
    problems = common.compare(gdsl.to_numpy(fn(weights, inputs)), prob.references()[0])
    if problems:
        print(f"mismatch: {problems[:3]}", file=sys.stderr)
        return 1
    for _ in range(calls):
        out = fn(weights, inputs)
    sync(out)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="seq2seq")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--variant", action="append", default=[], help="name[:module.NAME=value,...] (repeat)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--launches", type=int, default=15)
    p.add_argument("--skip", type=int, default=3, help="launches not measured first (the checked call is one)")
    p.add_argument("--ncu", default="ncu")
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        model_name, batch, calls, *switches = args.child
        return child(model_name, int(batch), int(calls), switches)
    variants = dict(parse_variant(v) for v in (args.variant or ["base"]))
    times: dict = {}
    for r, model, name in runs(args.models.split(","), list(variants), args.rounds):
        cmd = [args.ncu, "--clock-control", "none", "--csv", "--print-units", "base", "--metrics", METRIC,
               "-k", "regex:gdsl", "--launch-skip", str(args.skip), "--launch-count", str(args.launches),
               sys.executable, os.path.abspath(__file__), "--child", model, str(args.batch),
               str(args.skip + args.launches), *variants[name]]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        got = kernel_us(done.stdout)
        if done.returncode or not got:
            print(f"round {r} {model} {name}: failed (exit {done.returncode})\n{done.stderr[-2000:]}", flush=True)
            return 1
        times.setdefault((model, name), []).extend(got)
        print(f"round {r} {model:10s} {name:12s} median {statistics.median(got):9.2f} us over {len(got)}", flush=True)
    print(f"\nkernel µs, {args.rounds} processes x {args.launches} launches each (batch {args.batch})")
    for (model, name), got in times.items():
        print(f"{model:10s} {name:12s} median {statistics.median(got):9.2f}  min {min(got):9.2f}  max {max(got):9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "variants": variants,
                       "kernel_us": {f"{m}/{n}": t for (m, n), t in times.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
