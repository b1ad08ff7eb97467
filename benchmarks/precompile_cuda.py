"""Compile the CUDA kernels of the model zoo ahead of time into the compile cache (no GPU needed).

    GDSL_CACHE_DIR=.gdsl_cache python benchmarks/precompile_cuda.py [--models lstm,rae] [--jobs 2] [--overhead]
        [--render ROLL_REPEATS=False,MERGE_KERNELS=False] [--render CALL_IN_LARGE_KERNELS=False,PTXAS_THREADS=None]
        [--render SEPARATE_MIN_CALLED=None] [--phases]

NVRTC takes a while on the largest models (SkipNet's plan has hundreds of ops); compiling here and carrying
the cache folder to the GPU machine keeps the benchmark's device time for measuring. Each line gives one
source's size and its NVRTC wall and CPU time (the CPU time of this process: on a shared machine the wall time
also counts the waits for a core; a compile already in the cache takes no time). The cache key holds the
source, the arch (sm_90) and the NVRTC version (and nvJitLink's for a program compiled separately and linked:
gdsl/backends/cuda/toolchain.py, SEPARATE_MIN_CALLED), so the GPU machine must use the same NVRTC and nvJitLink.
`--phases` adds where NVRTC's time went (its --time report: C++ front end, NVVM optimizer, "PTX Translation"
= ptxas), compiling with that option (a cache entry of its own: use a scratch GDSL_CACHE_DIR).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: models/


def compile_one(name, batch, control, grid=None, program=None, options=(), switches=(), phases=False):
    """Lower and compile one model at full size; `program` names one of its overhead test's programs;
    `switches`: (name, value) of the module switches of gdsl/backends/cfamily/render.py, cfamily/gemm.py
    (WIDE_MAX_REGISTERS) or gdsl/backends/cuda/toolchain.py (PTXAS_THREADS) to set first, or (module.NAME,
    value) of any module's switch (gdsl.backends.cfamily.reductions.PRELOAD_ROW_LEAVES)."""
    from gdsl.backends.cfamily import gemm, render
    from gdsl.backends.cuda import toolchain
    from gdsl.backends.cuda.toolchain import compile_cuda
    from models import common, load
    for switch, value in switches:
        if "." in switch:  # a dotted module.NAME, as benchmarks/switches.py takes it
            path, switch = switch.rsplit(".", 1)
            module = importlib.import_module(path)
            module = module if hasattr(module, switch) else None
        else:
            module = next((m for m in (render, gemm, toolchain) if hasattr(m, switch)), None)
        if module is None:
            raise SystemExit(f"--render: no switch {switch} in render.py, gemm.py, cuda/toolchain.py "
                             f"or the module named")
        setattr(module, switch, value)
    model = load(name)
    cfg, inputs = None, {}
    if program:
        test = model.overhead_test(model.Config())
        cfg, inputs = test.programs[program], test.inputs
    prob = common.build_problem(model, batch, seed=0, n_inputs=1, cfg=cfg, **inputs)
    fn = model.make_forward(prob.cfg, backend="cuda", control=control, **{"grid": grid, **dict(options)})
    t0 = time.perf_counter()
    source = fn.lower(prob.weights, prob.batches[0]).source
    with tempfile.TemporaryDirectory() as folder:
        report = os.path.join(folder, "time.csv")
        t1, cpu = time.perf_counter(), time.process_time()
        compile_cuda(source, "sm_90", options=(f"--time={report}",) if phases else ())
        line = f"{name} bs{batch} {f'{program!r} ' if program else ''}{control} grid {grid or 'default'} " \
               f"{dict(options) or ''}: " \
               f"{len(source) // 1024} KiB source, lower {t1 - t0:.1f} s, NVRTC {time.perf_counter() - t1:.1f} s " \
               f"(cpu {time.process_time() - cpu:.1f} s)"
        return line + (f" [{_phases(report)}]" if phases else "")


def _phases(report: str) -> str:
    """NVRTC's --time CSV ("file, phase, metric, unit" rows) as "phase N ms, ..." (no report: the compile was
    found in the cache)."""
    if not os.path.exists(report):
        return "cached: no phases"
    with open(report) as f:
        rows = [[cell.strip() for cell in line.split(",")] for line in f.read().splitlines()[1:] if line.strip()]
    return ", ".join(f"{row[1]} {row[2]} {row[3]}" for row in rows if len(row) >= 4)


def main():
    from models import MODELS, common, load
    p = argparse.ArgumentParser()
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--controls", default="device,host")
    p.add_argument("--grids", default="", help="also these grids (device control), e.g. the autotuner's 33,66,264")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--ablate", default="", help="also these jit options, one at a time, device control "
                                                "(models.bench --ablate), e.g. wavefront=False,hoist=False; "
                                                "options joined by + together, resident_calls=True+narrow=True")
    p.add_argument("--render", default="", help="set these switches of gdsl/backends/cfamily/render.py (or "
                                                 "gemm.py, gdsl/backends/cuda/toolchain.py) first, e.g. "
                                                 "ROLL_REPEATS=False,MERGE_KERNELS=False (the form before them), "
                                                 "CALL_IN_LARGE_KERNELS=False,PTXAS_THREADS=None, "
                                                 "SEPARATE_MIN_CALLED=None (whole-program compiles only) or "
                                                 "WIDE_VECTOR_LOADS=False; or any module's switch by its dotted "
                                                 "name, gdsl.backends.cfamily.reductions.PRELOAD_ROW_LEAVES=32")
    p.add_argument("--phases", action="store_true", help="also NVRTC's time per phase (front end, NVVM, ptxas)")
    p.add_argument("--overhead", action="store_true",
                   help="instead, every program of the overhead tests at batch 1 (models.bench --overhead)")
    args = p.parse_args()
    models, controls = args.models.split(","), args.controls.split(",")
    if args.overhead:
        work = [(m, 1, c, None, program) for m in models
                for program in load(m).overhead_test(load(m).Config()).programs for c in controls]
    else:
        work = [(m, b, c, None, None) for m in models for b in load(m).BATCHES for c in controls]
        work += [(m, b, "device", int(g), None) for m in models for b in load(m).BATCHES
                 for g in filter(None, args.grids.split(","))]
        for option in filter(None, args.ablate.split(",")):
            work += [(m, b, "device", None, None, tuple(common.parse_option(o) for o in option.split("+")))
                     for m in models for b in load(m).BATCHES]
    switches = tuple(_switch(s) for s in filter(None, args.render.split(",")))
    work = [w + ((),) * (6 - len(w)) + (switches, args.phases) for w in work]
    with cf.ProcessPoolExecutor(args.jobs) as pool:
        for line in pool.map(compile_one, *zip(*work)):
            print(line, flush=True)


def _switch(text: str) -> tuple:
    """("NAME", value) of "NAME=value" (a Python literal)."""
    import ast
    name, value = text.split("=", 1)
    return name.strip(), ast.literal_eval(value.strip())


if __name__ == "__main__":
    main()
