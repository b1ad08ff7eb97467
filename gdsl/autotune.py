"""`jit(..., autotune=True)`: search the schedule knobs on the first call — compile each candidate, check it
against the reference interpreter, time it — and keep the fastest. Winners are cached on disk
(`$GDSL_CACHE_DIR/autotune.json`, default ~/.cache/gdsl) by program text, backend and device, so a later
process starts with the winner at once.

A backend proposes its candidates with `autotune_candidates(program, options) -> list[dict]`; without
one, the search covers `control` (device / host). Trace-time options (`unroll`) are not searched.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import time

import numpy as np

from gdsl.host import to_numpy
from gdsl.interpreter import run_program


def _cache_path() -> str:
    root = os.environ.get("GDSL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gdsl")
    return os.path.join(root, "autotune.json")


def _load_cache() -> dict:
    try:
        with open(_cache_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _store(key: str, options: dict) -> None:
    cache = _load_cache()
    cache[key] = options
    path = _cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(cache, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def candidates(module, program, options) -> list[dict]:
    base = {k: v for k, v in options.items() if k != "autotune"}
    if hasattr(module, "autotune_candidates"):
        return [dict(base, **c) for c in module.autotune_candidates(program, base)]
    return [dict(base, control=c) for c in ("device", "host")]


def _close(got, expected) -> bool:
    for g, e in zip(got, expected):
        g, e = np.asarray(g), np.asarray(e)
        if g.shape != e.shape or g.dtype != e.dtype:
            return False
        if e.dtype.kind == "f" or e.dtype.name == "bfloat16":
            if not np.allclose(g.astype(np.float64), e.astype(np.float64), rtol=1e-3, atol=1e-4,
                               equal_nan=True):
                return False
        elif not np.array_equal(g, e):
            return False
    return True


def autotune(module, backend: str, program, options: dict, flat_args, *, runs: int = 15, warmup: int = 3):
    """(lowering, executable, chosen options) for the fastest correct candidate."""
    from gdsl.debug import debug
    space = candidates(module, program, options)
    device = module.device_name() if hasattr(module, "device_name") else backend
    key = hashlib.sha256(f"{program}\n{backend}\n{device}\n{space!r}".encode()).hexdigest()
    cached = _load_cache().get(key)
    if cached is not None:
        lowering = module.lower(program, cached)
        return lowering, module.load(lowering), cached
    expected = run_program(program, [np.asarray(to_numpy(a)) for a in flat_args])
    best = None
    for opts in space:
        try:
            lowering = module.lower(program, opts)
            executable = module.load(lowering)
            if not _close([to_numpy(o) for o in executable(flat_args)], expected):
                debug(1, "autotune", f"{opts}: wrong results, skipped")
                continue
            for _ in range(warmup):
                to_numpy(executable(flat_args))
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                to_numpy(executable(flat_args))   # waits for the device
                times.append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - a candidate that fails to build or run is skipped
            debug(1, "autotune", f"{opts}: {type(e).__name__}: {e}")
            continue
        t = statistics.median(times)
        debug(1, "autotune", f"{opts}: {1e3 * t:.3f} ms")
        if best is None or t < best[0]:
            best = (t, lowering, executable, opts)
    if best is None:
        raise RuntimeError(f"autotune: no candidate of {space} compiled, ran and matched the interpreter")
    _store(key, best[3])
    return best[1], best[2], best[3]
