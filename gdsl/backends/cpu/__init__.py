"""The `cpu` backend: the Plan rendered to LLVM IR and compiled with llvmlite's MCJIT (the default backend
when no GPU is usable).

    lower(program, options) -> Lowering(plan, source)   plan: the Plan (str() prints it); source: LLVM IR
    load(lowering) -> callable(flat_args) -> flat results (fresh numpy arrays)

Options:
- `control`: "device" (default): the whole program, loops, branches and recursion included, is one
  native function; "host": one native function per straight-line kernel, the control flow driven from
  Python (the paper's CocktailerBase).
- `grid`: vEUs. Each vEU is a CPU thread (at most one per core; with fewer cores, a thread runs several
  vEUs' uTasks), all running the kernel at once like a GPU's persistent thread blocks, with barriers
  between waves. Default: one vEU per core when the operands of the program's matmuls/convolutions add
  up to more than half a core's L2 cache (then they fit the cores' caches together: the LSTM, NASRNN and
  RAE benchmarks run 1.2-3.6x faster on two idle cores), else 1: a single thread runs every uTask, no
  barrier costs anything, and each operator gets its largest tiles. A multi-vEU executable times itself
  on all its threads and on one (same results) and keeps the faster, since on a machine whose cores are
  busy with other work every barrier waits for a descheduled thread. Host control uses one thread.
- `block`: threads per vEU on a GPU; here it only sizes uTasks (default 1024: 4096 elements per
  elementwise uTask, see gdsl/schedule/utasks.py).
- `partition`: loops whose body is independent pipelines run partitioned (gdsl/schedule/partition.py):
  None (default) when estimated faster, True whenever possible, False never.
- `unroll` acts when tracing (gdsl.fori_loop runs k steps per iteration) and `autotune` in gdsl.jit (it
  searches `control`); this backend accepts both.

How the plan maps to LLVM, and how the result runs:

    render.py       the module: each op's uTask / row-band / run functions, packed constants, symbols
    kernel.py       each kernel: the walk of its statements (waves, lazy barriers, loops, branches, the
                    recursion stack machine, interrupt checks, trace records)
    storage.py      the kernel's signature and where its values live (%table, frames, uniforms, the
                    recursion workspace)
    ir.py           writing LLVM IR text (`Function`), gdsl dtypes as LLVM types
    compiler.py     llvmlite: O3, one MCJIT engine per module, the compile cache
    runtime.py      the Executable: workspace, buffer table, device call or host-program driver
    pool.py         the worker threads that run a kernel's copies, and how many a call uses
    interrupts.py   Ctrl-C for kernels that loop (a native SIGINT handler)

What each op kind computes is its lowering rules (gdsl.primitives.registry.register_lowering, backend
"cpu"; operands.py says how they are called), one module per family:

    affine.py       fused elementwise chains (lowerings.py: the elementwise table, `LOWERINGS`) and data
                    movement: copy, reshape, broadcast_to, iota, transpose, slice, dynamic_slice
    gather.py       take, concatenate, dynamic_update_slice
    window.py       avg_pool2d, max_pool2d
    reductions.py   reduce_sum / max / min, argmax, argmin
    gemm.py         matmul: tiles, row bands, packed weights, the register-blocked micro-kernel
    conv.py         conv2d: implicit GEMM (im2col panels through the micro-kernel)
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from gdsl.backends.cpu import affine, conv, gather, gemm, reductions, window
from gdsl.backends.cpu.lowerings import LOWERINGS
from gdsl.primitives.registry import CONTRACTION, CONVOLUTION
from gdsl.profiling.sites import trace_sites

# The rules of this backend are registered under "cpu" by the modules of RULE_MODULES, on import.
LOWERING_CHAIN = ("cpu",)
ELEMENTWISE_TABLE = LOWERINGS      # the elementwise family: one LLVM lowering per primitive
RULE_MODULES = (affine, gather, window, reductions, gemm, conv)

# (`resident` is accepted and has no effect: the CPU's caches keep loop-invariant weights close by themselves;
# nor has `tensor_cores`: the CPU has none; nor `balance` (gdsl/schedule/balance.py): its cost model counts
# GPU memory round trips per uTask, while a CPU thread runs its rounds of uTasks back to back from cache; nor
# `fork`: its calls run one after the other, as a plan without Forks has them; nor `window_store`: its matmuls
# have no rule to store into a dynamic_update_slice's window, the updates stay ops; nor `resident_calls`, as
# `resident`; nor `narrow`: its threads are not a GPU's blocks; nor `spread_frames` and `aside`: its barriers
# are paid when owed, at run time, already; nor `uniform_reductions`: a grid barrier of CPU threads costs too
# little to trade for the loads of every thread; nor `resident_partitioned`, as `resident`; nor `index_ranges`:
# an index wrap is one more elementwise op on the CPU's threads; nor `thin_gemv`: a CPU thread's GEMV tile is not
# a GPU block's round trips; nor `row_views`: its matmuls have no rule to read gathered rows in place, the
# take stays an op; nor `siblings`: its matmuls have no rule to compute sibling matmuls as one op; nor `flags`:
# its barriers wait for the vEU threads of one process, no flags; nor `double_temps`, which serves `flags`; nor
# `smem_temps`: its vEU threads have no shared memory of their own, the plan mark is ignored)
KNOWN_OPTIONS = frozenset({"control", "grid", "block", "unroll", "partition", "wavefront", "hoist", "resident",
                           "tensor_cores", "owner", "epilogue", "balance", "rows", "fork", "window_store",
                           "resident_calls", "narrow", "spread_frames", "aside", "autotune", "uniform_reductions",
                           "resident_partitioned", "index_ranges", "concat_k", "thin_gemv",
                           "row_views", "siblings", "flags", "double_temps", "smem_temps",
                           "split_k", "place_workspace", "peel"})
DEFAULT_BLOCK = 1024


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def l2_bytes() -> int:
    """One core's L2 cache (1 MiB when the system does not say)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as f:
            text = f.read().strip().upper()
        return int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
    except (OSError, ValueError):
        return 1 << 20


def default_grid(program) -> int:
    """One vEU per core when the GEMM operands outgrow half an L2 cache, else one (see the docstring)."""
    from gdsl.core.ir import Var, walk_eqns
    seen, total = set(), 0
    for eqn in walk_eqns(program.jaxpr):
        if eqn.primitive.family in (CONTRACTION, CONVOLUTION):
            for v in eqn.inputs:
                if isinstance(v, Var) and id(v) not in seen:
                    seen.add(id(v))
                    total += v.aval.size * v.aval.dtype.itemsize
    return cpu_count() if total > l2_bytes() // 2 else 1


def unavailable_reason():
    try:
        import llvmlite.binding  # noqa: F401
    except ImportError as e:
        return f"llvmlite is not installed ({e}); install it with `pip install llvmlite`"
    return None


@dataclass
class Lowering:
    plan: object            # gdsl.schedule.plan.Plan
    source: str             # the LLVM IR module
    symbols: list = field(default_factory=list)   # kernel entry points, in plan.kernels order
    threads: int = 1
    packed: list = field(default_factory=list)    # (const buffer, shape, tile): packed copies, see render.py
    trace: object = None    # gdsl.profiling.sites.TraceSites of an instrumented build (option "profile")
    region_bytes: int = 0   # one thread's region of the recursion workspace (storage.py)


def lower(program, options) -> Lowering:
    from gdsl.backends.cpu.render import ModuleWriter
    from gdsl.schedule import schedule
    control = options.get("control", "device")
    grid = int(options["grid"]) if "grid" in options else default_grid(program)
    plan = schedule(program, control=control, grid=grid, block=options.get("block", DEFAULT_BLOCK),
                    partition=options.get("partition"), wavefront=options.get("wavefront"),
                    hoist=options.get("hoist"), owner=options.get("owner"), concat_k=options.get("concat_k"),
                    epilogues=() if options.get("epilogue") is False else LOWERING_CHAIN, balance=False,
                    split_k=options.get("split_k"), peel=options.get("peel"))
    threads = max(1, min(grid, cpu_count())) if control == "device" and sys.platform.startswith("linux") else 1
    trace = trace_sites(plan, options.get("profile"))     # None: the normal build
    writer = ModuleWriter(plan, threads, trace)
    text, symbols = writer.render()
    return Lowering(plan, text, symbols, threads, writer.packed_operands(), trace, writer.region_bytes)


def load(lowering: Lowering):
    from gdsl.backends.cpu import compiler, runtime
    module = compiler.compile_module(lowering.source, lowering.symbols)
    return runtime.Executable(lowering.plan, module, lowering.symbols, lowering.threads, lowering.packed,
                              lowering.trace, lowering.region_bytes)


def to_device(x):
    from gdsl.backends.cpu.runtime import to_numpy
    return to_numpy(x)
