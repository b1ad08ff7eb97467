"""From a traced program to a Lowering in a C-family dialect, shared by the CUDA and HIP backends and the CPU
emulator: the options they all accept, checked against the dialect, then schedule + render.

    opts = check_options(options, dialect)                 # control, block, barrier, grid, partition
    lowering = lower_with_grid(program, opts, grid, dialect)
"""
from __future__ import annotations

from gdsl.backends.cfamily import gemm
from gdsl.backends.cfamily.executor import Lowering
from gdsl.backends.cfamily.render import render_plan
from gdsl.core.ir import walk_eqns
from gdsl.profiling.sites import trace_sites
from gdsl.schedule import local, schedule
from gdsl.schedule.plan import Fork, Wave, plan_statements

KNOWN_OPTIONS = frozenset({"control", "grid", "block", "unroll", "partition", "wavefront", "hoist", "autotune",
                           "barrier", "resident", "tensor_cores", "owner", "epilogue",
                           "balance", "rows", "cells", "fork", "window_store", "resident_calls", "narrow",
                           "spread_frames", "aside", "uniform_reductions", "resident_partitioned",
                           "index_ranges", "concat_k", "thin_gemv", "row_views", "siblings", "flags", "double_temps",
                           "smem_temps", "split_k", "place_workspace", "peel"})
DEFAULT_BLOCK = 256
# The C family indexes arrays with 32-bit ints (element numbers, offsets, loop bounds, a thread's next element one
# block further): a program with an array of more elements than that leaves room for is refused, not run with
# indices that wrap (session 35's sweep: a table of 2**32 elements read at wrapped rows, a segfault on the emulator;
# an elementwise op over 2**31 + 64 elements whose bound wrapped). The margin covers strides and padded tiles.
MAX_ELEMENTS = 2**31 - 2**24
# The jit option smem_temps when not given (local.py): block-local temps of loop bodies only; True (every temp)
# is a switch for measuring what the straight-line ones give.
SMEM_TEMPS = local.LOOPS


def check_options(options, dialect) -> dict:
    """The options of a C-family lowering with their defaults; ValueError on any the dialect cannot run
    (a block that is not a power of two from the dialect's warp size to 1024, a barrier it lacks)."""
    control = options.get("control") or "device"
    if control not in ("device", "host"):
        raise ValueError(f"control must be 'device' or 'host', got {control!r}")
    block = int(options.get("block") or DEFAULT_BLOCK)
    if block < dialect.warp_size or block > 1024 or block & (block - 1):
        raise ValueError(f"block must be a power of two from {dialect.warp_size} to 1024, got {block}")
    barrier = options.get("barrier") or "atomic"
    if barrier not in dialect.barriers:
        raise ValueError(f"barrier must be one of {dialect.barriers} for {dialect.name}, got {barrier!r}")
    grid = options.get("grid")
    if grid is not None and int(grid) < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    return {"control": control, "block": block, "barrier": barrier, "grid": None if grid is None else int(grid),
            "partition": options.get("partition"),
            "wavefront": options.get("wavefront"), "hoist": options.get("hoist"), "profile": options.get("profile"),
            "resident": options.get("resident"), "tensor_cores": options.get("tensor_cores"),
            "owner": options.get("owner"), "epilogue": options.get("epilogue"), "balance": options.get("balance"),
            "rows": options.get("rows"), "cells": options.get("cells"), "fork": options.get("fork"),
            "window_store": options.get("window_store"), "resident_calls": options.get("resident_calls"),
            "narrow": options.get("narrow"), "spread_frames": options.get("spread_frames"),
            "aside": options.get("aside"), "uniform_reductions": options.get("uniform_reductions"),
            "resident_partitioned": options.get("resident_partitioned"), "index_ranges": options.get("index_ranges"),
            "concat_k": options.get("concat_k"),
            "thin_gemv": options.get("thin_gemv"), "row_views": options.get("row_views"),
            "siblings": options.get("siblings"), "flags": options.get("flags"),
            "double_temps": options.get("double_temps"), "smem_temps": options.get("smem_temps"),
            "split_k": options.get("split_k"), "peel": options.get("peel")}


def smem_share(opts, grid: int, sms: int, dialect) -> int:
    """Shared memory per vEU for loop-invariant weights and the uTasks' scratch: the dialect's share per SM
    (resident_smem_per_sm) over the vEUs one SM holds; 0 with the option resident=False."""
    smem_per_sm = dialect.resident_smem_per_sm
    if opts.get("resident") is False or smem_per_sm <= 0:
        return 0
    return smem_per_sm // -(-grid // max(1, sms))


def resident_budget(opts, grid: int, sms: int, dialect, staged_b: bool = True) -> int:
    """Shared memory per vEU for loop-invariant weights (gdsl/schedule/resident.py): smem_share less what a
    pipelined tensor-core tile stages where the lowering's program takes one (gemm.pipelined_scratch: with B
    staged, or with `staged_b` False only A, B read in place from its resident tile)."""
    return max(0, smem_share(opts, grid, sms, dialect) - gemm.pipelined_scratch(dialect, staged_b))


def lower_with_grid(program, opts, grid: int, dialect, sms: int | None = None) -> Lowering:
    """Schedule `program` for `grid` vEUs with checked options `opts` and render it in `dialect` (`sms`: the
    device's multiprocessors, for the resident-weight budget; None: one vEU per multiprocessor). Where the
    program takes the pipelined tensor-core tile, the weights first get the budget its stages of A alone leave
    (the tiles of resident B stage nothing else); if the kernel then needs more shared memory than the share
    (a tile whose B is not resident staging it too), it is scheduled again with the budget of B staged."""
    check_sizes(program, dialect)
    if opts.get("tensor_cores") is False:       # (the dialect object is this lowering's own)
        dialect.tensor_cores = False
    dialect.pipelined_tiles = gemm.pipelined_program(dialect, program)
    share = smem_share(opts, grid, sms or grid, dialect)
    if dialect.pipelined_tiles and share:
        lowering = _lower(program, opts, grid, dialect, sms, resident_budget(opts, grid, sms or grid, dialect, False))
        if max((spec.dynamic_smem for spec in lowering.rendered.kernels), default=0) <= share:
            return lowering
    return _lower(program, opts, grid, dialect, sms, resident_budget(opts, grid, sms or grid, dialect))


def check_sizes(program, dialect) -> None:
    """Refuse `program` when one of its arrays (arguments, constants, results, any intermediate, in loops and
    branches too) has more than MAX_ELEMENTS elements: the generated code's int indices would wrap."""
    avals = [v.aval for v in program.jaxpr.in_binders]
    avals += [v.aval for eqn in walk_eqns(program.jaxpr) for v in eqn.outs]
    big = max(avals, key=lambda a: a.size, default=None)
    if big is not None and big.size > MAX_ELEMENTS:
        raise ValueError(f"the {dialect.name} backend indexes arrays with 32-bit ints: {big} has {big.size} elements, "
                         f"more than it can address (at most {MAX_ELEMENTS}); split the array or use the cpu backend")


def _lower(program, opts, grid: int, dialect, sms: int | None, resident: int) -> Lowering:
    epilogues = () if opts.get("epilogue") is False else dialect.lowering_chain
    rows = () if opts.get("rows") is False else dialect.lowering_chain
    # (a contraction storing into an in-place update's window: off with the epilogues, or on its own)
    window_stores = () if opts.get("window_store") is False else epilogues
    plan = schedule(program, control=opts["control"], grid=grid, block=opts["block"], partition=opts["partition"],
                    wavefront=opts.get("wavefront"), hoist=opts.get("hoist"), resident_bytes=resident,
                    owner=opts.get("owner"), epilogues=epilogues, views=dialect.lowering_chain,
                    balance=opts.get("balance"), rows=rows, fork=opts.get("fork"), window_stores=window_stores,
                    resident_calls=opts.get("resident_calls"), cells=opts.get("cells"),
                    spread_frames=opts.get("spread_frames"), aside=opts.get("aside"),
                    uniform_reductions=opts.get("uniform_reductions") is not False,      # (on unless False)
                    resident_partitioned=opts.get("resident_partitioned"),
                    index_ranges=opts.get("index_ranges") is not False,                  # (on unless False)
                    concat_k=opts.get("concat_k"), k_parts=dialect.lowering_chain,
                    thin_gemv=opts.get("thin_gemv"),
                    row_gathers=() if opts.get("row_views") is False else dialect.lowering_chain,  # (on unless False)
                    siblings=() if opts.get("siblings") is False else dialect.lowering_chain,
                    row_blocks=dialect.lowering_chain,
                    flags=dialect.flag_syncs if opts.get("flags") is None else opts["flags"],
                    double_temps=opts.get("double_temps"),
                    smem_temps=SMEM_TEMPS if opts.get("smem_temps") is None else opts["smem_temps"],
                    split_k=opts.get("split_k"), peel=opts.get("peel"), preloads=True,
                    resident_pad=gemm.TC_RESIDENT_PAD if dialect.pipelined_tiles else 0)
    rendered = render_plan(plan, dialect, barrier=opts["barrier"], trace=trace_sites(plan, opts.get("profile")),
                           veus_per_sm=-(-grid // (sms or grid)))
    return Lowering(program, plan, rendered, dict(opts, grid=grid))


def used_veus(lowering) -> int:
    """One past the highest vEU on which a wave of the plan runs a uTask (ops the renderer reads as views
    do no work); 0 when none does."""
    return max((task.first + min(task.count, task.op.n_utasks)
                for stmt in plan_statements(lowering.plan) if isinstance(stmt, Wave) for task in stmt.tasks
                if task.op not in lowering.rendered.views), default=0)


def narrowed(program, opts, lowering, lower_at) -> Lowering:
    """With the option narrow=True: `lowering` scheduled again for only the vEUs its waves use, when they are
    fewer than its grid (`lower_at(program, opts, grid)` lowers; a recursive plan like RAE's runs every
    wave on its first 32 vEUs of 132, and a grid barrier of fewer blocks is cheaper: fewer arrivals at its
    counter). The vEUs left out only followed the control flow and met the barriers. Not for a plan with
    Forks (they split the whole grid between a node's calls). Else `lowering` itself."""
    if not opts.get("narrow") or any(isinstance(s, Fork) for s in plan_statements(lowering.plan)):
        return lowering
    used = used_veus(lowering)
    if not 0 < used < lowering.plan.grid:
        return lowering
    return lower_at(program, opts, used)
