"""Step preloads on and off (gdsl.schedule.preload.PRELOAD_STEP_READS), one process, CUDA events, alternating.

    python benchmarks/preload_ab.py nasrnn lstm seq2seq [--batch 1] [--rounds 6] [--launches 10] [--hand]

For each model: its device-control plan lowered twice (the switch off, then on), both executables loaded in this
process and checked against the reference, then `rounds` rounds of `launches` timed launches each (CUDA events
around each launch; the order alternating between rounds); prints each variant's median, min and max ms. With
--hand, NASRNN also gets the hand edit this lever was first measured with (session 17): the source without
preloads, its cells' loads of the input projection and the carry `c` moved by hand into registers before the
GEMV (the first form of the measurement; what preload.py now does for any plan).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cupy as cp  # noqa: E402  (after the path: run from a checkout)

from gdsl.backends import cuda  # noqa: E402
from gdsl.schedule import preload  # noqa: E402
from gdsl.tracing.pytree import tree_flatten, tree_map  # noqa: E402
from models import common, load  # noqa: E402


def lowering(prob, switch: bool):
    preload.PRELOAD_STEP_READS = switch
    try:
        f = prob.model.make_forward(prob.cfg, backend="cuda", control="device")
        w, x = tree_map(cp.asarray, prob.weights), tree_map(cp.asarray, prob.batches[0])
        return f.lower(w, x).lowering
    finally:
        preload.PRELOAD_STEP_READS = True


def hand_edited(low):
    """NASRNN bs1's source without preloads, the cells' step-invariant loads (and the carry in memory) moved by
    hand before the GEMV of their half step (the cells' function takes the values as `pre[k]`)."""
    src = low.source
    fn = re.search(r"GDSL_DEV void op5_row_chain_mul_tanh_add\(.*?\n}\n", src, re.S).group(0)
    new = fn.replace("op5_row_chain_mul_tanh_add(", "op5p(const float* pre, ")
    for k, name in enumerate(["i0", "i2", "i5", "i7", "i9", "i11", "i13", "i15", "i4"]):
        new = new.replace(f"{name}[i]", f"pre[{k}]")
    src = src.replace(fn, fn + new)

    def early(var, u, carry):
        c = f"((long long)({u}) < 0 ? 0LL : ((long long)({u}) > 999 ? 999LL : (long long)({u})))"
        loads = " ".join(f"{var}[{g}] = b[{g * 256} + i];" for g in range(8))
        return (f"float {var}[9] = {{0, 0, 0, 0, 0, 0, 0, 0, 0}};\n    if (blockIdx.x < 256 && threadIdx.x == 0) {{ "
                f"const int i = (int)blockIdx.x; const float* b = t1 + {c} * 2048; {loads} {var}[8] = {carry}[i]; }}"
                "\n    ")
    for var, u, carry, call in (("pa", "u9", "t4", "op4_matmul(t10, t3"), ("pb", "u16", "t11", "op4_matmul(t17, t12")):
        site = f"if (blockIdx.x < 256) {call}"
        src = src.replace(site, early(var, u, carry) + site, 1)
    first, second, third = src.split("if (blockIdx.x < 256) op5_row_chain_mul_tanh_add(")
    src = first + "if (blockIdx.x < 256) op5p(pa, " + second + "if (blockIdx.x < 256) op5p(pb, " + third
    return dataclasses.replace(low, rendered=dataclasses.replace(low.rendered, source=src))


def compare(name: str, batch: int, rounds: int, launches: int, hand: bool) -> dict:
    prob = common.build_problem(load(name), batch)
    off = lowering(prob, False)
    variants = {"off": off, "on": lowering(prob, True)}
    if hand and name == "nasrnn" and batch == 1:
        variants["hand"] = hand_edited(off)
    w, x = tree_map(cp.asarray, prob.weights), tree_map(cp.asarray, prob.batches[0])
    flat = tree_flatten(((w, x), {}))[0]
    exes = {k: cuda.load(v) for k, v in variants.items()}
    ref = prob.references()[0]
    for k, exe in exes.items():
        outs = exe(flat)
        got = tree_map(cp.asnumpy, outs[0] if len(outs) == 1 else tuple(outs))
        problems = common.compare(got, ref)
        if problems:
            raise SystemExit(f"{name} {k}: mismatch {problems[:3]}")
    times: dict = {k: [] for k in exes}
    start, end = cp.cuda.Event(), cp.cuda.Event()
    for r in range(rounds):
        for k in (list(exes) if r % 2 == 0 else list(exes)[::-1]):
            for _ in range(3):
                exes[k](flat)
            for _ in range(launches):
                start.record()
                exes[k](flat)
                end.record()
                end.synchronize()
                times[k].append(cp.cuda.get_elapsed_time(start, end))
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "launches": len(v),
                "preloaded_inputs": variants[k].plan.stats.get("preloaded_inputs", 0)} for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--launches", type=int, default=10)
    p.add_argument("--hand", action="store_true")
    args = p.parse_args(argv)
    for name in args.models:
        for k, r in compare(name, args.batch, args.rounds, args.launches, args.hand).items():
            print(f"{name} bs{args.batch} {k:5s}: median {r['median_ms']:.4f} ms, min {r['min_ms']:.4f}, "
                  f"max {r['max_ms']:.4f} ({r['launches']} launches, {r['preloaded_inputs']} inputs preloaded)",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
