"""Where a zoo model's repeated call spends its host time on cuda (no GPU work is timed here): the fast
key of its arguments, the table lookup, the input checks and pointers, the result arrays, the driver's launch
alone (the prepared parameter block launched again), and the whole call without waiting for the GPU (so the
host's own rate), also with the weights bound (`f.bind(weights)`: keyed once). With --leaves, what each part
of the fast key costs over the model's weights as CuPy arrays (one pass of a C loop over all of them per part:
type, shape, dtype, ...; the key reads the type, shape and dtype of every leaf, hashes the key and compares it
with the table's), and the same over numpy arrays.

    python benchmarks/host_overhead.py blockdrop skipnet attention [--calls 2000] [--leaves] [--batch 64]
        [--switch module.NAME=value]
"""
from __future__ import annotations

import argparse
import operator
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cupy as cp  # noqa: E402  (after the path: run from a checkout)

from gdsl.tracing.pytree import tree_map  # noqa: E402
from models import common, load  # noqa: E402


def per_call_us(fn, calls: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def breakdown(name: str, calls: int, batch: int = 1) -> str:
    model = load(name)
    prob = common.build_problem(model, batch)
    w, x = tree_map(cp.asarray, prob.weights), tree_map(cp.asarray, prob.batches[0])
    f = model.make_forward(prob.cfg, backend="cuda")
    for _ in range(3):                       # traced, loaded, its fast keys entered
        f(w, x)
    cp.cuda.Device().synchronize()
    key, leaves = f._fast_signature((w, x))
    entry = next(iter(f._cache.values()))
    run = entry.get("fast_run")
    parts = {"key": per_call_us(lambda: f._fast_signature((w, x)), calls),
             "table lookup": per_call_us(lambda: f._fast.get(key), calls)}
    inputs = getattr(run, "inputs", None)
    if inputs is not None:
        parts["input pointers (same arguments)"] = per_call_us(lambda: inputs(leaves), calls)
    outputs = getattr(run, "outputs", None)
    if outputs is not None:
        stream = cp.cuda.get_current_stream().ptr
        parts["result arrays"] = per_call_us(lambda: outputs(stream), calls)
    launcher = getattr(run, "launcher", None)
    if launcher is not None:      # the parameter block as the last call left it: the driver's launch alone
        stream = cp.cuda.get_current_stream().ptr
        parts["driver launch" + (" (cooperative)" if launcher.cooperative else "")] = \
            per_call_us(lambda: launcher.call_driver(stream), max(1, calls // 10))
    parts["whole call, not waiting for the GPU"] = per_call_us(lambda: f(w, x), max(1, calls // 10))
    bound = f.bind(w)                        # the weights keyed once (gdsl.jit's bind)
    bound(x)
    parts["whole call with the weights bound"] = per_call_us(lambda: bound(x), max(1, calls // 10))
    cp.cuda.Device().synchronize()
    return f"{name} bs{batch}: {len(leaves)} leaves; " + ", ".join(f"{k} {v:.1f} us" for k, v in parts.items())


def leaf_costs(name: str, calls: int) -> str:
    """µs per call of each part of the fast key over the model's weights, CuPy and numpy arrays."""
    weights = common.build_problem(load(name), 1).weights
    return "\n".join(f"{name} {lib}, {len(weights)} weights: " + ", ".join(
        f"{part} {per_call_us(f, calls):.1f}" for part, f in _key_parts(w).items()) + " us"
        for lib, w in (("cupy", tree_map(cp.asarray, weights)), ("numpy", weights)))


def _key_parts(w: dict) -> dict:
    """The parts of a dict of arrays' fast key (gdsl/jit.py, _children_key), each a call over all values."""
    values = list(w.values())
    shape_of, dtype_of = operator.attrgetter("shape"), operator.attrgetter("dtype")
    key = (tuple(map(type, values)), tuple(map(shape_of, values)), tuple(map(dtype_of, values)))
    same = (key[0], tuple(map(shape_of, values)), key[2])      # equal, not the same tuples
    parts = {"values": lambda: operator.itemgetter(*w)(w), "types": lambda: tuple(map(type, values)),
             "shapes": lambda: tuple(map(shape_of, values)), "dtypes": lambda: tuple(map(dtype_of, values)),
             "hash": lambda: hash(key), "compare": lambda: key == same,
             "same objects": lambda: all(map(operator.is_, values, list(values)))}
    if isinstance(values[0], cp.ndarray):
        parts["data.ptr"] = lambda: [a.data.ptr for a in values]
    return parts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--leaves", action="store_true", help="also the fast key's parts per weight")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--switch", action="append", default=[], metavar="module.NAME=VALUE",
                        help="set a module switch first (benchmarks/switches.py), e.g. "
                             "gdsl.backends.cfamily.executor.RECYCLE_MAX_BYTES=0")
    args = parser.parse_args(argv)
    common.set_switches(args.switch)
    for name in args.models:
        print(breakdown(name, args.calls, args.batch), flush=True)
        if args.leaves:
            print(leaf_costs(name, args.calls), flush=True)


if __name__ == "__main__":
    main()
