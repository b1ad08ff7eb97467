"""GPU benchmark of the CUDA backend: gdsl device control (one persistent kernel per forward) vs gdsl host
control (a kernel per straight-line block, control flow in Python) vs PyTorch eager vs PyTorch with the whole
forward captured in one CUDA graph. LSTM (10 x 256, 64 steps), NASRNN (256, 1000 steps), Attention (12 x 64,
32 steps), batch 1 and 64, the configurations of models/README.md.

Every system is first checked against the model's numpy float64 reference (relative error <= 1e-3); then
timed in this one process with CUDA events around each forward (host overhead included, as a user sees it),
after warm-up, median of --runs (>= 50). Prints a table (card, commit) and writes JSON with --json.

    python benchmarks/gpu_bench.py [--models lstm,nasrnn,attention] [--batches 1,64] [--runs 50] [--json f]
                                   [--grids 132,264] [--options 'partition=False;grid=66']
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import attention, common, lstm, nasrnn  # noqa: E402

MODELS = {"lstm": lstm, "nasrnn": nasrnn, "attention": attention}


def event_times(runner, runs: int, warmup: int) -> np.ndarray:
    """Milliseconds per forward, CUDA events on the default stream around each call."""
    import cupy
    for _ in range(warmup):
        runner(0)
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    out = np.empty(runs)
    for k in range(runs):
        start.record()
        runner.run(0)
        end.record()
        end.synchronize()
        out[k] = cupy.cuda.get_elapsed_time(start, end)
    return out


def gdsl_system(model, prob, control, **options):
    """(Runner, executable) of the model's gdsl forward on the cuda backend, inputs already on the GPU."""
    import cupy
    fn = model.make_forward(prob.cfg, backend="cuda", control=control, **options)
    w = common.tree_map(cupy.asarray, prob.weights)
    x = common.tree_map(cupy.asarray, prob.batches[0])
    name = f"gdsl-{control}" + "".join(f"-{k}{v}" for k, v in options.items())
    runner = common.Runner(name, run=lambda i: fn(w, x), sync=lambda out: cupy.cuda.runtime.deviceSynchronize())
    runner(0)                               # trace + compile + load
    entry = next(iter(fn._cache.values()))
    return runner, entry["executable"], entry["lowering"]


def count_launches(executable, runner) -> int:
    device = executable.device
    launch = device.launch
    count = [0]

    def counting(*a, **k):
        count[0] += 1
        return launch(*a, **k)
    device.launch = counting
    try:
        runner(0)
    finally:
        device.launch = launch
    return count[0]


def parse_options(text: str) -> dict:
    """'partition=False,grid=264' -> {'partition': False, 'grid': 264}."""
    options = {}
    for item in text.split(","):
        key, value = item.split("=", 1)
        options[key.strip()] = ast.literal_eval(value.strip())
    return options


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="lstm,nasrnn,attention")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--grids", default="", help="device-control grids to time besides the default one, e.g. "
                                             "132,264")
    p.add_argument("--options", default="", help="more device-control variants to time, ';'-separated, each "
                                               "comma-separated key=value jit options, e.g. 'partition=False'")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    card = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    commit = os.environ.get("GDSL_COMMIT")
    if not commit:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        commit = done.stdout.strip() if done.returncode == 0 else "unknown"
    rows = []
    for name in args.models.split(","):
        model = MODELS[name]
        for bs in [int(b) for b in args.batches.split(",")]:
            prob = common.build_problem(model, bs)
            ref = model.reference(prob.weights, prob.batches[0], prob.cfg)
            systems = []
            for control in ("device", "host"):
                t0 = time.perf_counter()
                runner, ex, lowering = gdsl_system(model, prob, control)
                compile_s = time.perf_counter() - t0
                stats = lowering.plan.stats
                systems.append((runner, count_launches(ex, runner),
                                f"compile {compile_s:.1f}s, grid {lowering.plan.grid}, "
                                f"{stats['grid_syncs']} barrier sites"))
            default_grid = systems[0][2].split("grid ")[1].split(",")[0]
            variants = [{"grid": int(g)} for g in args.grids.split(",") if g and g != default_grid]
            variants += [parse_options(v) for v in args.options.split(";") if v]
            for options in variants:
                runner, ex, lowering = gdsl_system(model, prob, "device", **options)
                systems.append((runner, count_launches(ex, runner), f"grid {lowering.plan.grid}"))
            if not args.no_torch:
                for make in (model.torch_eager, model.torch_cudagraph):
                    try:
                        runner = make(prob.weights, prob.cfg, prob.batches)
                        systems.append((runner, None, runner.note))
                    except common.BaselineUnavailable as e:
                        print(f"  {name} bs{bs}: {make.__name__} unavailable: {e}")
            # Each system is checked right before its own timing: a CUDA graph checked after the other
            # systems' timing loops gave wrong outputs once (attention bs1/64, lstm bs64), right ones alone.
            for runner, launches, note in systems:
                problems = common.compare(runner.output(0), ref)
                times = event_times(runner, args.runs, args.warmup)   # timed even when wrong (flagged)
                problems += [f"after timing: {p}" for p in common.compare(runner.output(0), ref)]
                row = {"model": name, "batch": bs, "system": runner.system, "median_ms": float(np.median(times)),
                       "p10_ms": float(np.percentile(times, 10)), "p90_ms": float(np.percentile(times, 90)),
                       "runs": int(times.size), "launches": launches, "correct": not problems,
                       "problems": problems, "note": note}
                rows.append(row)
                print(f"  {name:9s} bs{bs:<3d} {runner.system:22s} {row['median_ms']:9.3f} ms  "
                      f"{'ok' if not problems else 'WRONG: ' + '; '.join(problems)}  {note}", flush=True)
    print(f"\ncard: {card}; commit {commit}; median of {args.runs} runs (CUDA events, host overhead included)")
    head = f"{'model':10s} {'bs':>3s} | {'system':22s} | {'median ms':>10s} | {'p10-p90 ms':>17s} | launches"
    head += " | vs best torch"
    print(head)
    print("-" * len(head))
    for r in rows:
        torch_best = min([x["median_ms"] for x in rows if x["model"] == r["model"] and x["batch"] == r["batch"]
                          and x["system"].startswith("torch") and x["correct"]], default=np.nan)
        ratio = torch_best / r["median_ms"]
        spread = f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}"
        print(f"{r['model']:10s} {r['batch']:>3d} | {r['system']:22s} | {r['median_ms']:10.3f} | {spread:>17s} | "
              f"{'' if r['launches'] is None else r['launches']:>8} | {ratio:6.2f}x{'' if r['correct'] else '  WRONG'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"card": card, "commit": commit, "rows": rows}, indent=1))
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
