"""Benchmark of the model zoo: gdsl (device and host control) against PyTorch and JAX, side by side.

    python -m models.bench [--models lstm,rae] [--batch 1,64] [--systems gdsl-device,torch-eager,...]
                           [--runs 50] [--warmup 10] [--json out.json] [--plot out.png] [--small]
                           [--sweep | --overhead]

Every system's output is checked against the numpy reference on every input set before it is timed; a
system that mismatches or cannot run here gets a row with the reason instead of a time. All systems of a
row run in this one process, one after the other, on the same weights and inputs. A time is the host
clock around one forward, taken after a full device synchronisation (cudaDeviceSynchronize for PyTorch
and CuPy, block_until_ready for JAX); the table shows the median and the 10th–90th percentiles, and each
system's ratio to the fastest system of its row.

Floors (models/floor.py; on by default, `--no-floor` skips them): every gdsl system that passed its
check gets the floor of its own lowered plan on this card, max(grid barriers per forward × measured
barrier cost, compulsory bytes / measured copy bandwidth, flops / measured fp32 peak), the term that binds,
and time / floor; the ceilings are measured once in this process on the gdsl backend's device. Barriers,
bytes and flops are counted by running the plan with numpy on the row's own inputs (at most
`--floor-inputs` input sets), so data-dependent trip counts and branches are those of the data.

`--overhead` is the paper's control-flow overhead view (Figures 15, 16, 18; batch 1 unless --batch): each
model's `overhead_test` writes one computation as several programs, the model with its control flow and
the same without it (loops unrolled, branches decided or all run, the tree traced), each a row whose
`variant` names the program; the control-flow row gets `overhead[program][system]` = time(control flow) /
time(program) − 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
import traceback

from models import MODELS, common, floor, load

SYSTEMS = ("gdsl-device", "gdsl-host", "gdsl-autotune", "torch-eager", "torch-cudagraph", "torch-compile", "jax",
           "torch-cudnn", "torch-cudnn-graph")
BASELINE_FUNCS = {"torch-eager": "torch_eager", "torch-cudagraph": "torch_cudagraph",
                  "torch-compile": "torch_compile", "jax": "jax_jit",
                  "torch-cudnn": "torch_cudnn", "torch-cudnn-graph": "torch_cudnn_graph"}


def model_systems(model, systems) -> list[str]:
    """The systems of `systems` this model has (the cuDNN peers exist for the LSTM only)."""
    return [s for s in systems if s.startswith("gdsl-") or hasattr(model, BASELINE_FUNCS[s])]


def ablation(text: str) -> tuple[str, dict]:
    """`gdsl-device[wavefront=False]` -> ("device", {"wavefront": False}): a gdsl system with one jit option
    set, measured beside the default to show what a lever gives in the same run (--ablate); several
    options joined by "+" (`gdsl-device[resident_calls=True+narrow=True]`) are set together."""
    control, _, rest = text[len("gdsl-"):].partition("[")
    return control, dict(common.parse_option(item) for item in rest.rstrip("]").split("+"))


def make_runner(system: str, model, prob: common.Problem, backend: str | None) -> common.Runner:
    if "[" in system:
        control, option = ablation(system)
        return common.gdsl_runner(model, prob.weights, prob.cfg, prob.batches, backend=backend,
                                  control=control, system=system, **option)
    if system == "gdsl-autotune":   # the schedule knobs searched on the first call (gdsl.jit autotune=True)
        return common.gdsl_runner(model, prob.weights, prob.cfg, prob.batches, backend=backend,
                                  system=system, autotune=True)
    if system.startswith("gdsl-"):
        return common.gdsl_runner(model, prob.weights, prob.cfg, prob.batches, backend=backend,
                                  control=system.split("-", 1)[1], system=system)
    return getattr(model, BASELINE_FUNCS[system])(prob.weights, prob.cfg, prob.batches)


def row_variants(model, sweep: bool) -> list[dict]:
    """The input variants of one model: the default data, plus the executed-ratio sweep or fixed tree."""
    out = [{}]
    if sweep and hasattr(model, "RATIOS"):
        out += [{"ratio": r} for r in model.RATIOS]
    if sweep and model.__name__.endswith("rae"):
        out.append({"tree": "fixed"})
    return out


def variant_name(variant: dict) -> str:
    if "ratio" in variant:
        return f"{round(variant['ratio'] * 100)}% run"
    if "tree" in variant:
        return f"{variant['tree']} tree"
    return "-"


def sweep_rows(model, batch: int, args) -> list[dict]:
    """The rows of one model at one batch size: its default data, plus the sweep's variants, and after the
    0 % row the ungated part of the network alone (the blocks that run at 0 % traced, no branch: what
    issue 12 compares the 0 % row against)."""
    rows = []
    for variant in row_variants(model, args.sweep):
        n_inputs = args.inputs or (1 if variant.get("tree") == "fixed" else getattr(model, "BENCH_INPUTS", 1))
        prob = common.build_problem(model, batch, small=args.small, seed=args.seed, n_inputs=n_inputs, **variant)
        rows.append(bench_row(prob, variant_name(variant), args))
        if variant.get("ratio") == 0.0 and hasattr(model, "overhead_test"):
            test = model.overhead_test(prob.cfg, ratio=0.0)
            prob = common.build_problem(model, batch, seed=args.seed, n_inputs=n_inputs,
                                        cfg=test.programs["trace"], **test.inputs)
            rows.append(bench_row(prob, "0% run, ungated part traced", args))
    return rows


def overhead_rows(model, batch: int, args) -> list[dict]:
    """The model's control-flow overhead test: a row per program, the control-flow row first, holding
    overhead[program][system] = its time / the program's time − 1 (None where either is missing)."""
    test = model.overhead_test(model.small() if args.small else model.Config())
    rows = []
    for program, cfg in test.programs.items():
        prob = common.build_problem(model, batch, seed=args.seed, n_inputs=args.inputs or 1, cfg=cfg, **test.inputs)
        left_out = test.no_control_flow if program == "control flow" else ()
        rows.append(bench_row(prob, program, args, test=test.label, left_out=left_out))
    cf = rows[0]["systems"]
    rows[0]["overhead"] = {
        row["variant"]: {s: cf[s]["median_ms"] / r["median_ms"] - 1
                         if cf[s]["status"] == r["status"] == "ok" else None for s, r in row["systems"].items()}
        for row in rows[1:]}
    return rows


def bench_row(prob: common.Problem, variant: str, args, test: str | None = None, left_out=()) -> dict:
    """Check and time every system of args.systems on one problem; `left_out` systems get no runner."""
    model, n_inputs = prob.model, len(prob.batches)
    name = model.__name__.split(".")[-1]
    t0 = time.perf_counter()
    refs = prob.references()
    row = {"model": name, "batch": prob.batch, "variant": variant, "inputs": n_inputs,
           "config": dataclasses.asdict(prob.cfg), "reference_s": time.perf_counter() - t0, "systems": {}}
    if test:
        row["test"] = test
    if hasattr(model, "describe"):
        row["data"] = model.describe(refs[0], prob.batches[0], prob.cfg)
    print(f"\n== {name} bs{prob.batch} {variant}{f' ({test})' if test else ''}: {n_inputs} input set(s)"
          + (f"; {row['data']}" if "data" in row else ""), flush=True)
    for system in model_systems(model, args.systems):
        res: dict = {}
        runner = None
        try:
            if system in left_out:
                raise common.BaselineUnavailable("cannot capture this control flow")
            t0 = time.perf_counter()
            runner = make_runner(system, model, prob, args.backend)
            first = runner.output(0)
            res["first_call_ms"] = (time.perf_counter() - t0) * 1e3
            outs = [first] + [runner.output(i) for i in range(1, n_inputs)]
            problems = [f"input {i}: {p}" for i, o in enumerate(outs) for p in common.compare(o, refs[i])]
            if problems:
                res.update(status="mismatch", reason="; ".join(problems[:3]))
            else:
                times = common.time_runner(runner, n_inputs, runs=args.runs, warmup=args.warmup)
                res.update(status="ok", **common.stats(times))
                if runner.lower is not None and args.ceilings is not None:
                    res["floor"] = row_floor(runner, prob, res["median_ms"], args)
            res["note"] = runner.note
            if system == "gdsl-autotune":     # what the search chose (the default's options or another's)
                res["autotune_choice"] = runner.lower(0).autotune_choice
                res["note"] = f"chose {res['autotune_choice']}"
        except common.BaselineUnavailable as e:
            res.update(status="unavailable", reason=str(e))
        except Exception as e:  # noqa: BLE001 - a failing system is a row of the report, not a crash
            if type(e).__name__ == "BackendUnavailableError":      # gdsl backend not usable here
                res.update(status="unavailable", reason=str(e).splitlines()[0][:300])
            else:
                first_line = str(e).splitlines()[0] if str(e) else ""
                res.update(status="error", reason=f"{type(e).__name__}: {first_line}"[:300])
            if args.verbose:
                traceback.print_exc()
        row["systems"][system] = res
        line = (f"  {system:17s} {res['median_ms']:10.3f} ms" if res["status"] == "ok"
                else f"  {system:17s} {res['status']}: {res.get('reason', '')}")
        print(line, flush=True)
        if "floor" in res:
            print(f"  {'':17s} {floor_line(res['floor'])}", flush=True)
        del runner
        _free_memory()
    return row


def row_floor(runner: common.Runner, prob: common.Problem, median_ms: float, args) -> dict:
    """The floor of one gdsl system's forward (its own plan) on this card, or why there is none."""
    try:
        n = min(len(prob.batches), args.floor_inputs)
        arg_sets = [(prob.weights, prob.batches[i]) for i in range(n)]
        t0 = time.perf_counter()
        out = floor.forward_floor(runner.lower(0), args.ceilings, arg_sets)
        out.update(status="ok", time_over_floor=median_ms / out["floor_ms"], counted_inputs=n,
                   count_s=time.perf_counter() - t0)
        return out
    except floor.FloorUnavailable as e:
        return {"status": "unavailable", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - a floor that fails is reported (and fails the run), not a crash
        if args.verbose:
            traceback.print_exc()
        return {"status": "error", "reason": f"{type(e).__name__}: {e}"[:300]}


def floor_line(f: dict) -> str:
    """One line: the floor, its three terms and time / floor."""
    if f["status"] != "ok":
        return f"floor {f['status']}: {f['reason']}"
    c, t, ceil = f["count"], f["terms_ms"], f["ceilings"]
    return (f"floor {f['floor_ms']:.4f} ms ({f['binding']} binds): "
            f"{c['dependent_steps']:.0f} barriers x {ceil['barrier_us']:.3g} us = {t['barriers']:.4f} ms | "
            f"{c['bytes'] / 1e6:.3g} MB / {ceil['copy_gbps']:.3g} GB/s = {t['bytes']:.4f} ms | "
            f"{c['flops'] / 1e9:.3g} GFLOP / {ceil['fp32_tflops']:.3g} TFLOP/s = {t['flops']:.4f} ms; "
            f"time / floor {f['time_over_floor']:.2f}x")


def _free_memory():
    gc.collect()
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
def environment() -> dict:
    env = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
           "host": platform.node(), "machine": platform.machine(), "versions": {}}
    for mod in ("numpy", "gdsl", "torch", "jax", "jaxlib", "cupy", "llvmlite", "matplotlib"):
        try:
            m = __import__(mod)
            env["versions"][mod] = getattr(m, "__version__", None) or _dist_version(mod)
        except Exception:  # noqa: BLE001
            env["versions"][mod] = None
    try:
        import gdsl
        env["gdsl_backends"] = gdsl.backends()
        env["gdsl_default_backend"] = gdsl.default_backend()
    except Exception as e:  # noqa: BLE001
        env["gdsl_backends"] = f"unavailable: {e}"
    env["card"], env["driver"] = _card()
    env["git_commit"], env["git_dirty"] = _git()
    return env


def _dist_version(name):
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "source tree"


def _card():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False).stdout.strip().splitlines()
        if out:
            name, driver = (s.strip() for s in out[0].split(",", 1))
            return name, driver
    except (OSError, subprocess.SubprocessError):  # no NVIDIA driver here
        pass
    return platform.processor() or platform.machine() or "cpu", None


def _git():
    """(commit, dirty) of the checkout, or GDSL_GIT_COMMIT where it is set: a tree that travelled to another
    machine may come without its history or with an older one (the GPU machine's copy reported its session's
    first commit, dirty, for a tree that was a later commit exactly)."""
    if os.environ.get("GDSL_GIT_COMMIT"):
        return os.environ["GDSL_GIT_COMMIT"], None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*cmd):
        r = subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=20, check=False)
        return r.stdout.strip() if r.returncode == 0 else None
    try:
        commit = git("rev-parse", "HEAD")
        if commit and len(commit) == 40:
            return commit, bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):  # no git here
        pass
    return None, None


# ---------------------------------------------------------------------------------------------------------
def print_table(rows: list[dict], env: dict) -> None:
    print(f"\nmedian ms per forward ({env['card']}, driver {env['driver']}); p10–p90; x = time / fastest of the row;"
          f" gdsl rows end with time / floor (the term that binds)")
    head = (f"{'model':10s} {'bs':>3s} {'variant':12s} {'system':17s} {'median':>10s} {'p10–p90':>19s} "
            f"{'x best':>7s}  note")
    print(head)
    print("-" * len(head))
    for row in rows:
        ok = {s: r for s, r in row["systems"].items() if r["status"] == "ok"}
        best = min((r["median_ms"] for r in ok.values()), default=None)
        for system, r in row["systems"].items():
            lead = f"{row['model']:10s} {row['batch']:3d} {row['variant']:12s} {system:17s}"
            if r["status"] == "ok":
                fl = r.get("floor", {})
                over = (f"{fl['time_over_floor']:7.2f}x ({fl['binding']})" if fl.get("status") == "ok"
                        else ("  floor " + fl["status"] if fl else ""))
                print(f"{lead} {r['median_ms']:10.3f} {r['p10_ms']:9.3f}–{r['p90_ms']:<9.3f} "
                      f"{r['median_ms'] / best:6.2f}x  {r.get('note', '')}{over}")
            else:
                print(f"{lead} {'—':>10s} {'':19s} {'':7s}  {r['status']}: {r.get('reason', '')[:90]}")
        for g in ("gdsl-device", "gdsl-host", "gdsl-autotune"):
            peers = {s: r["median_ms"] for s, r in ok.items() if not s.startswith("gdsl")}
            if g in ok and peers:
                peer = min(peers, key=peers.get)
                print(f"{'':26s}{g}: {peers[peer] / ok[g]['median_ms']:.2f}x the speed of the best peer ({peer})")


def print_overhead(rows: list[dict], systems: list[str]) -> None:
    """The overhead of each control-flow program over the others, per system (as the paper's figures)."""
    print("\ncontrol-flow overhead = time(control flow) / time(program) − 1")
    head = f"{'model':10s} {'bs':>3s} {'test':18s} {'program':10s}" + "".join(f" {s:>17s}" for s in systems)
    print(head)
    print("-" * len(head))
    for row in rows:
        for program, by_system in row.get("overhead", {}).items():
            cells = "".join(f" {'—' if by_system.get(s) is None else format(by_system[s], '+.1%'):>17s}"
                            for s in systems)
            print(f"{row['model']:10s} {row['batch']:3d} {row['test']:18s} {program:10s}{cells}")


def plot(rows: list[dict], path: str, env: dict, title: str = "gdsl model zoo", quiet: bool = False) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not quiet:
            print("matplotlib is not installed: no plot")
        return
    listed = list(dict.fromkeys(s for r in rows for s in r["systems"]))
    systems = [s for s in listed if any(r["systems"].get(s, {}).get("status") == "ok" for r in rows)]
    labels = [f"{r['model']} bs{r['batch']}" + ("" if r["variant"] == "-" else f"\n{r['variant']}") for r in rows]
    width = 0.8 / max(1, len(systems))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows) + 2), 4.8))
    for k, s in enumerate(systems):
        xs, ys, err = [], [], [[], []]
        for i, r in enumerate(rows):
            res = r["systems"].get(s, {})
            if res.get("status") == "ok":
                xs.append(i + (k - (len(systems) - 1) / 2) * width)
                ys.append(res["median_ms"])
                err[0].append(res["median_ms"] - res["p10_ms"])
                err[1].append(res["p90_ms"] - res["median_ms"])
        ax.bar(xs, ys, width, yerr=err, label=s, capsize=2)
    ax.set_yscale("log")
    ax.set_ylabel("median ms per forward (log)")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_title(f"{title} — {env['card']}")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    if not quiet:
        print(f"plot written to {path}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m models.bench", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: all seven)")
    p.add_argument("--batch", default=None, help="comma-separated batch sizes (default: each model's own)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated from {', '.join(SYSTEMS)}")
    p.add_argument("--runs", type=int, default=50, help="timed runs per system (default 50)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--inputs", type=int, default=None,
                   help="input sets cycled over (default: seq2seq 10 batches, rae 100 trees, others 1)")
    p.add_argument("--backend", default=None, help="gdsl backend for the gdsl systems (default: gdsl's)")
    p.add_argument("--small", action="store_true", help="scaled-down configurations")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--sweep", action="store_true",
                      help="add executed-ratio rows 0/25/50/75/100%% (blockdrop, skipnet) and the fixed tree (rae)")
    view.add_argument("--overhead", action="store_true",
                      help="control-flow overhead: each model with its control flow vs unrolled/traced (batch 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every measurement and the environment here")
    p.add_argument("--plot", default=None, help="bar chart PNG (needs matplotlib)")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip the floors (time / floor of every gdsl row; models/floor.py)")
    p.add_argument("--floor-inputs", type=int, default=10,
                   help="input sets whose plan execution is counted for a floor (default 10)")
    p.add_argument("--ablate", default="",
                   help="comma-separated jit options, e.g. wavefront=False: each adds the system "
                        "gdsl-device[option] (gdsl with that option) beside the others, for same-run before/after; "
                        "options joined by + are set together (resident_calls=True+narrow=True)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing systems")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.systems = [s for s in args.systems.split(",") if s]
    args.systems += [f"gdsl-device[{a}]" for a in args.ablate.split(",") if a]
    for s in args.systems:
        if s not in SYSTEMS and "[" not in s:
            p.error(f"unknown system {s!r}; choose from {', '.join(SYSTEMS)}")
    args.batch = [int(b) for b in args.batch.split(",")] if args.batch else None
    return args


def floor_ceilings(args) -> floor.Ceilings | None:
    """The ceilings of the gdsl backend's device (measured lazily, at the first floor), None if off."""
    if not args.floor or not any(s.startswith("gdsl-") for s in args.systems):
        return None
    import gdsl
    return floor.Ceilings(args.backend or gdsl.default_backend())


def recorded_args(args) -> dict:
    """The command line as the JSON records it: output files by name only (an absolute path names the
    machine that ran it, e.g. the device machine's $OUT, not anything in the repository)."""
    out = {k: v for k, v in vars(args).items() if k != "ceilings"}
    for key in ("json", "plot"):
        if out.get(key):
            out[key] = os.path.basename(out[key])
    return out


def floor_errors(rows: list[dict]) -> list[str]:
    return [f"{row['model']} bs{row['batch']} {row['variant']} {system}: {r['floor']['reason']}"
            for row in rows for system, r in row["systems"].items()
            if r.get("floor", {}).get("status") == "error"]


def write_json(args, env, rows, complete: bool):
    """Every measurement so far and the environment to --json (none: nothing); `complete` False while the run
    goes on, so that a run cut short (a device time limit) still leaves its rows, marked incomplete."""
    if not args.json:
        return
    ceilings = args.ceilings.summary() if args.ceilings is not None else None
    with open(args.json, "w") as f:
        json.dump({"environment": env, "ceilings": ceilings, "args": recorded_args(args), "complete": complete,
                   "rows": rows}, f, indent=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.ceilings = floor_ceilings(args)
    env = environment()
    print(f"card {env['card']}, driver {env['driver']}, gdsl backends {env.get('gdsl_backends')}, "
          f"commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''}")
    rows = []
    for name in args.models:
        model = load(name)
        default = (1,) if args.overhead else model.BATCHES
        batches = [b for b in args.batch if b in model.BATCHES] if args.batch else list(default)
        if not batches:
            print(f"\n== {name}: no batch size of {args.batch} is one of its {model.BATCHES}; skipped")
        for batch in batches:
            rows += overhead_rows(model, batch, args) if args.overhead else sweep_rows(model, batch, args)
            write_json(args, env, rows, complete=False)     # (a run cut short keeps what it measured,
            if args.plot:                                   # and its picture of it)
                plot(rows, args.plot, env, title=_title(args) + " (so far)", quiet=True)
    print_table(rows, env)
    if args.overhead:
        print_overhead(rows, args.systems)
    if args.json:
        write_json(args, env, rows, complete=True)
        print(f"results written to {args.json}")
    if args.plot:
        plot(rows, args.plot, env, title=_title(args))
    errors = floor_errors(rows)
    if errors:
        print("FLOOR ERRORS (the timings above stand; the floors of these rows are missing):\n  "
              + "\n  ".join(errors))
        return 1
    return 0


def _title(args) -> str:
    return "control-flow overhead" if args.overhead else "gdsl model zoo"


if __name__ == "__main__":
    raise SystemExit(main())
