"""A Plan -> one C-family translation unit: a device function per Op and one persistent kernel per Kernel.
Ops whose functions would be the same text (same kind, shapes, expression, split: the repeated blocks of a
ResNet, the steps of an unrolled loop) share one function. Functions are inlined at their call sites
unless that would give NVRTC more than INLINE_BUDGET of code: then the most repeated ones are compiled
once and called (GDSL_SHARED_OP), which keeps NVRTC's time down on large programs; so are the GEMM/GEMV
uTask functions with several call sites (CALL_TILED_UTASKS), and, in a program past LARGE_KERNEL_BUDGET, the
functions of the largest inlined share (CALL_IN_LARGE_KERNELS). The tasks of one wave that call the same function on
disjoint vEUs share one call site (GROUP_WAVE_TASKS): NVRTC's time goes into inlined, unrolled tiles.

Inside a kernel every vEU (thread block) walks the plan's statement tree itself:

    Wave            for each Task whose vEU range holds the vEU's index (the dialect's block_index, blockIdx.x):
                        for (t = blockIdx.x - first; t < n_utasks; t += count) op(..., t, smem)
    Sync            "grid": the dialect's grid barrier; "block": its block barrier (__syncthreads()); a grid
                    Sync with `sites` in a function's body tests the return site first:
                    if (r_f[d_f - 1] == k || ...) grid barrier; else block barrier
    Uniforms/Assign every thread computes the scalar into a register (all vEUs compute the same value)
    Loop / Branch   native while / switch on uniforms
    Call            the explicit stack machine below

Recursion (device control): per recursive function `f` a depth counter `d_f`, a return-site stack `r_f`
and the function body rendered once after the kernel's main body under the label `f_f`:

    call site k:    if (d_f >= max_depth) { error flag; goto exit; }  r_f[d_f] = k; d_f += 1; goto f_f;
                    f_f_ret_k: ;
    return:         d_f -= 1; switch (r_f[d_f]) { case k: goto f_f_ret_k; ... }

Frame storage of `f` (buffers and uniforms the scheduler put in f's frames) is addressed at frame
`d_f + frame_offset`: a buffer at `base + (d_f + offset) * size`, a uniform that must survive a call as
`u_s[d_f + offset]` (a per-thread array). Frame 0 belongs to the caller outside f, so f has max_depth + 2
frames (the last one receives the arguments of the call that overflows). A function with a Call of step
s > 1 (the callee s frames deeper, past frames holding results its caller still reads) counts frames in
`b_f` apart from the depth: the call adds `b_f += s;` after `d_f += 1;`, its return site subtracts it
again, and the frames number `f.frames`. Every vEU reaches an overflow at
the same point (control flow is uniform), so all leave together and the host raises RecursionDepthError.
All locals are declared at the top so that the gotos never skip an initialisation.

Parallel recursion (a plan with Forks, the scheduler option `fork`; docs/schedule.md "Parallel recursion"):
every vEU also keeps its group `gdsl_g` (heap number), `[gdsl_lo, gdsl_hi)`, and per function two frame
bases, `o_f` (its own frame) and `c_f` (its callees'): a frame buffer value at offset 0 is at frame
`b_f + o_f`, at offset k > 0 at `b_f + k + c_f`, and each group number has `f.frames` copies of its own.

    call site k:    ... r_f[d_f] = k; sg_f[d_f] = gdsl_g; (and lo, hi, o_f, c_f)  d_f += 1; o_f = c_f;
                    [forked half h, when each half keeps min_group vEUs: the group's half h, g = 2g + h,
                     c_f = g * frames - b_f]  goto f_f;
                    f_f_ret_k: ;  gdsl_g = sg_f[d_f]; ...            (the caller's group and bases again)
    Fork:           if (too small || vEU in the lower half) { first }  between
                    if (too small) group barrier;  if (too small || vEU in the upper half) { second }
    Wave (in f)     uTask t on the group's vEU lo + (first + t % count) % (hi - lo) (over_utasks_in_group)
    Sync "grid"     gdsl_group_sync_atomic on the group's counter; it also leaves for the exit once a call
                    overflowed (any vEU may be the one), which the kernel's first lines make safe: vEU 0
                    clears the flag and the counters, then one grid barrier (fork_prologue)

Spread frames (RecFunction.spread > 0, the scheduler option `spread_frames`, a plan without Forks): the
same two bases `o_f` and `c_f` address frame buffers, saved with the return site, and a call of step s
moves the callee's callee base `f.callee_extra(s)` further than its own frame:

    call site k:    ... r_f[d_f] = k; so_f[d_f] = o_f; sc_f[d_f] = c_f;  d_f += 1; b_f += s;
                    o_f = c_f; c_f += spread * s;  goto f_f;
                    f_f_ret_k: ;  o_f = so_f[d_f]; c_f = sc_f[d_f];  b_f -= s;

Instrumented build (`trace`: a gdsl.profiling.sites.TraceSites): the kernel takes one more parameter, the
trace buffer (one region per vEU), and thread 0 of each vEU records a stamp of the dialect's clock
(`trace_clock`) at the begin and end of every uTask, grid barrier, loop, loop iteration, branch case and
recursive call (gdsl_trace, gdsl/profiling/cfamily.py). The normal build has none of it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from gdsl.backends.cfamily import data_movement, gemm, gemv_rows, reductions, repeats  # noqa: F401 - all but repeats register rules
from gdsl.backends.cfamily import types as c_types
from gdsl.backends.cfamily.dialect import Dialect
from gdsl.backends.cfamily.elementwise import c_expression
from gdsl.backends.cfamily.ops import OpRenderer
from gdsl.backends.cfamily.views import (
    find_views,
    next_window_pointer,
    permuted_reads,
    prefetches_next_window,
    view_decl,
    view_pointer,
)
from gdsl.core.ir import Lit
from gdsl.primitives.registry import CONTRACTION, CONVOLUTION, kinds_of, lowering_rule
from gdsl.profiling.cfamily import trace_begin, trace_end, trace_prelude
from gdsl.schedule.flags import loop_flags, published_in
from gdsl.schedule.local import local_bytes
from gdsl.schedule.plan import (
    Assign,
    Branch,
    Call,
    Fork,
    Launch,
    Loop,
    Sync,
    Uniform,
    UniformOp,
    Uniforms,
    Value,
    Wave,
    parts_of_tasks,
    sibling_parts,
    walk,
)
from gdsl.schedule.preload import element_shape, next_wave
from gdsl.schedule.resident import RESIDENT, function_resident_tasks, region_bytes

PRELUDE = (Path(__file__).with_name("prelude.h")).read_text()
ALIGN = 256
# Where a buffer's pointer points, by its memory space: the workspace (every buffer), or the vEU's shared memory
# past the resident tiles (a block-local temp: local.py). Only plain loads and stores reach a block-local temp
# (generic addressing): the global-only forms are not used on temps (the read-only `ldg` is for inputs, consts
# and read-only views; flag words for published buffers, which local.py never picks).
BUFFER_SPACES = {"global": "gdsl_ws + {offset}", "shared": "gdsl_smem + GDSL_LOCAL_BASE + {offset}"}
BARRIER_OFFSET, ERROR_OFFSET, FIRST_BUFFER = 0, 128, 256
# gdsl_gemv_tile (prelude.h) ends its last k chunk with a block barrier even where the k slices' reduction brings
# one before it returns (False: not there; the partial sums go to their own shared memory, not the staged A).
GEMV_LAST_CHUNK_SYNC = False
# How many k steps of gdsl_gemv_tile's loop (a chunk whose B values it does not prefetch) are unrolled: the loads
# of one unrolled group are in flight together. Measured on the H200 (session 28, benchmarks/kernel_ab.py, 2
# processes x 6 launches, 8 -> 16): Attention's kernel bs1 88.0 -> 86.3 us (its sibling QKV GEMV, 16 k steps of
# 3 columns a thread: one group of loads instead of two), bs64 391.4 -> 386.6; Seq2seq and NASRNN bs1 within 1.5 us.
GEMV_LOOP_UNROLL = 16
# True: a plan's block barrier right after a wave of uTask functions that end with one is left out on their
# vEUs (Renderer.block_sync_after). Measured on the H200 (ncu kernel time, docs/performance.md): mixed in session
# 19 (Attention bs1 102.2 -> 99.4 µs, NASRNN bs1 2087.8 -> 2097.3 µs), faster on both in session 30's kernels
# (Attention bs1 68.85 -> 67.79, NASRNN bs1 1472.75 -> 1461.95; the only zoo kernels it changes): on since.
TAIL_BARRIERS = True
INLINE_BUDGET = 96 * 1024    # bytes of uTask function code NVRTC gets inlined at most (see not_inlined)
# Tasks of one wave that call the same uTask function on disjoint vEUs share one call site (Renderer.task_run):
# NVRTC compiles the function once per run instead of once per task. Each vEU makes the same range tests as
# with one call site per task; it then calls through arguments picked at run time (False: one call site each).
GROUP_WAVE_TASKS = True
# The uTask functions of these kinds unroll a GEMM or GEMV tile of the prelude: a few lines of source, tens of KiB
# of machine code each time NVRTC inlines one. With CALL_TILED_UTASKS such a function with more than one call
# site is compiled once and called (GDSL_SHARED_OP) whatever INLINE_BUDGET says, when its uTasks are estimated
# to take at least CALL_MIN_UTASK_NS (the scheduler's cost model); the tile routine stays inlined inside it
# (False: the budget alone). Measured on the H200 (2026-12-01, bb2c84e, against the same tree with both
# switches off, one run): LSTM bs1 0.704 -> 0.578 ms, bs64 4.420 -> 3.550, BlockDrop 0.239 -> 0.228 and
# 0.878 -> 0.781, but Attention, whose partitioned loop runs one ~0.7 us tile per vEU per op, 0.249 -> 0.292
# and 1.079 -> 1.354 with its tiles called: shorter uTasks stay inlined.
CALL_TILED_UTASKS = True
CALL_MIN_UTASK_NS = 1000.0
# The sites counted are those before repeated sequences are rolled into loops (ROLL_REPEATS) or kernels merged
# (MERGE_KERNELS): a function called from 22 repetitions stays called when the loop leaves one site, as it was
# when it was timed. 1 would call every tiled function of long enough uTasks (SkipNet's device kernel: NVRTC
# 51 and 45 s CPU against 47 and 53 s with 2 on the loaded 2-core CI machine: no gain seen; runtime unmeasured).
CALL_TILED_MIN_SITES = 2
TILED_KINDS = kinds_of(CONTRACTION, CONVOLUTION)
# A run of k >= 2 consecutive statement sequences of one body whose C text is the same up to buffer pointers,
# integer constants and the names of uniforms each sequence defines for itself (the identical blocks of a
# ResNet, SkipNet's gated blocks) is rendered once, in a loop over the k repetitions that picks each one's
# pointers and constants in a switch (gdsl/backends/cfamily/repeats.py): NVRTC then compiles the uTask calls of
# one repetition instead of k. Only where the repetitions after the first hold at least ROLL_MIN_CALLS uTask
# call sites (a loop of a few uniform statements saves nothing). Never in an instrumented build (each
# repetition has its own trace sites) nor across a recursive call (its return label is unique).
ROLL_REPEATS = True
ROLL_MIN_CALLS = 4
# Host control: kernels whose text is the same up to the same holes (one kernel per gated block) are one
# __global__ function with one more parameter, `int gdsl_variant`, that picks the arguments (False: one each).
MERGE_KERNELS = True
# A kernel's NVRTC time grows faster than its length (NVVM and ptxas work on the whole body at once, with
# hundreds of pointers live through it), while a called function is compiled once, alone: SkipNet's device
# kernel took 35 of its 40 s of NVRTC CPU with the bodies of its 15 called functions emptied, under 2 s with
# every uTask function called. So where the uTask code inlined in a program passes LARGE_KERNEL_BUDGET
# (estimated machine code, below), the functions with the largest inlined share (call sites x size) are
# called, those of a single call site too, until what stays inlined is under LARGE_KERNEL_INLINED (False:
# INLINE_BUDGET alone). The zoo's programs other than SkipNet's stay under the budget (BlockDrop bs64 device,
# the largest, ~23 KiB), so they render as before; SkipNet's (~100 KiB) keeps its smallest functions inlined.
CALL_IN_LARGE_KERNELS = True
LARGE_KERNEL_BUDGET = 32 * 1024
LARGE_KERNEL_INLINED = 8 * 1024
# The machine code of an unrolled GEMM/GEMV tile per byte of its uTask function's source, against an
# elementwise loop's: NVRTC's PTX lines per source byte on SkipNet were 0.9-3.0 for the tiled functions,
# 0.2-0.55 for the others.
TILED_CODE_WEIGHT = 3


@dataclass
class Layout:
    """Byte offsets in the workspace (one allocation per executable) of every temp and frame buffer, and of
    the barrier counters of the vEU groups of a plan with Forks (`group_barriers`, one unsigned per group)."""
    offsets: dict = field(default_factory=dict)      # Buffer -> offset
    copies: dict = field(default_factory=dict)       # Buffer -> frames (1 for temps)
    size: int = FIRST_BUFFER
    group_barriers: int = 0                          # offset of the group barrier counters (0: no Forks)
    shadows: dict = field(default_factory=dict)      # published Buffer -> offset of its flag words (flags.py)
    shadow_words: int = 0                            # how many, one region from the first shadow's offset


@dataclass
class KernelSpec:
    name: str
    params: list                 # ("buffer", Buffer) | ("ws", None) | ("depth", function name)
    grid_syncs: int
    dynamic_smem: int = 0        # bytes of dynamic shared memory to launch with (resident tiles), 0: static


@dataclass
class KernelCode:
    """One rendered kernel before it is written out: its parameters, declarations and body (C lines)."""
    spec: KernelSpec
    head: str                    # "<prefix> <name>(" without the parameters
    c_params: list
    decls: list
    body: list                   # from the first statement to the closing brace (exclusive)
    calls: list = field(default_factory=list)     # its entries of Renderer.call_log

    def text(self) -> str:
        lines = [f"{self.head}{', '.join(self.c_params)}) {{"] + ["  " + d for d in self.decls] + self.body
        return "\n".join(lines + ["}"]) + "\n"


@dataclass
class Rendered:
    source: str
    kernels: list
    layout: Layout
    smem: int
    views: frozenset = frozenset()     # Ops rendered as pointers into their source (no work)
    trace: object = None               # TraceSites of an instrumented build


def cid(name: str) -> str:
    """A C identifier for a plan name."""
    return re.sub(r"\W", "_", name, flags=re.ASCII)


def has_forks(plan) -> bool:
    """Does `plan` run calls in parallel (a Fork, device control)?"""
    return plan.control == "device" and any(isinstance(s, Fork) for s in _all_statements(plan))


def group_ids(plan) -> int:
    """How many heap numbers the vEU groups of `plan` can take: 2^(L + 1) for L splits at most (plan.Fork:
    group g's halves are 2g and 2g + 1, the grid is group 1, a group splits when each half keeps the
    Fork's min_group vEUs; the smallest min_group of the plan's Forks bounds them all)."""
    min_group = min(s.min_group for s in _all_statements(plan) if isinstance(s, Fork))

    def splits(size: int) -> int:
        if size < 2 * min_group:
            return 0
        return 1 + max(splits(size // 2), splits(size - size // 2))
    return 2 << splits(plan.grid)


def make_layout(plan) -> Layout:
    layout = Layout()
    # With Forks, each group has a frame region of its own (`frames` copies, at group number x frames).
    regions = group_ids(plan) if has_forks(plan) else 1
    frames = {f.name: f.frames * regions for f in plan.functions}
    if regions > 1:
        layout.group_barriers = layout.size
        layout.size += -(-4 * regions // ALIGN) * ALIGN
    for buf in plan.buffers:
        if buf.kind not in ("temp", "frame"):
            continue
        copies = frames[buf.frame_of] if buf.kind == "frame" else 1
        layout.offsets[buf] = layout.size
        layout.copies[buf] = copies
        nbytes = buf.aval.size * buf.aval.dtype.itemsize * copies
        layout.size += -(-max(nbytes, 1) // ALIGN) * ALIGN
    published = published_in([s for k in plan.kernels for s in k.body]) if plan.control == "device" else ()
    for buf in published:                   # flag syncs: a 64-bit word per element (value | tag << 32)
        layout.shadows[buf] = layout.size + 8 * layout.shadow_words
        layout.shadow_words += buf.aval.size
    layout.size += -(-max(8 * layout.shadow_words, 1) // ALIGN) * ALIGN if layout.shadow_words else 0
    return layout


def flag_loops(plan) -> dict:
    """Loop -> (its number, flags.LoopFlags) of each top-level loop of a kernel with flag syncs."""
    out = {}
    for kernel in plan.kernels if plan.control == "device" else ():
        for stmt in kernel.body:
            roles = loop_flags(stmt) if isinstance(stmt, Loop) else None
            if roles is not None:
                out[stmt] = (len(out), roles)
    return out


def _values_of(stmt):
    """Every Value a statement reads or writes (not those of nested statements)."""
    if isinstance(stmt, Wave):
        for task in stmt.tasks:
            yield from task.op.inputs
            yield from task.op.outputs
            # a view's run-time offset, or that of a window an op stores into
            yield from (term.index for v in task.op.inputs + task.op.outputs for term in v.terms)
    elif isinstance(stmt, Uniforms):
        for u in stmt.ops:
            yield from u.inputs
            yield u.output
    elif isinstance(stmt, Assign):
        yield stmt.dst
        yield stmt.src
    elif isinstance(stmt, Loop):
        yield stmt.pred
    elif isinstance(stmt, Branch):
        yield stmt.index


def _reads_writes(stmt):
    """(values read, values written) by one statement (not its nested ones)."""
    if isinstance(stmt, Wave):
        return [v for t in stmt.tasks for v in t.op.inputs], [v for t in stmt.tasks for v in t.op.outputs]
    if isinstance(stmt, Uniforms):
        return [v for u in stmt.ops for v in u.inputs], [u.output for u in stmt.ops]
    if isinstance(stmt, Assign):
        return [stmt.src], [stmt.dst]
    if isinstance(stmt, Loop):
        return [stmt.pred], []
    if isinstance(stmt, Branch):
        return [stmt.index], []
    return [], []


def stacked_uniforms(plan) -> set:
    """Frame uniforms that need one copy per depth: those addressed in another frame (arguments, results),
    read outside their function, or read after a call that could overwrite them (a call between their
    first definition and the read in program order, or any call inside an enclosing loop). The others stay
    plain registers."""
    stacked = set()
    for stmt in _all_statements(plan):
        for v in _values_of(stmt):
            if isinstance(v.storage, Uniform) and v.storage.frame_of and v.frame_offset:
                stacked.add(v.storage)
    bodies = [(None, k.body) for k in plan.kernels] + [(f.name, f.body) for f in plan.functions]
    for owner, body in bodies:
        calls, reads, first_def = _uniform_events(body)
        loops_with_calls = {loop for _, loops in calls for loop in loops}
        for pos, u, loops in reads:
            if u.frame_of != owner or any(loop in loops_with_calls for loop in loops) or \
                    any(first_def.get(u, -1) < c < pos for c, _ in calls):
                stacked.add(u)
    return stacked


def _uniform_events(body):
    """(calls, frame-uniform reads, first definitions) of a body in program order: calls as (position, enclosing
    loops), reads as (position, uniform, enclosing loops), first_def as uniform -> position."""
    calls, reads, first_def = [], [], {}
    position = iter(range(10**9))

    def visit(block, loops):
        for stmt in block:
            pos = next(position)
            if isinstance(stmt, Call):
                calls.append((pos, loops))
                continue
            read, written = _reads_writes(stmt)
            reads.extend((pos, v.storage, loops) for v in read
                         if isinstance(v.storage, Uniform) and v.storage.frame_of)
            for v in written:
                if isinstance(v.storage, Uniform):
                    first_def.setdefault(v.storage, pos)
            if isinstance(stmt, Loop):
                visit(stmt.cond, loops + (stmt,))
                visit(stmt.body, loops + (stmt,))
            elif isinstance(stmt, Branch):
                for b in stmt.branches:
                    visit(b, loops)
            elif isinstance(stmt, Fork):
                visit(stmt.first + stmt.between + stmt.second, loops)
    visit(body, ())
    return calls, reads, first_def


def _nodes(pieces, nested: bool = True):
    """The statements of `pieces` (statements and uniform ops) with (nested) the ones inside them, in
    program order, each Uniforms as its uniform ops."""
    for piece in walk(pieces) if nested else pieces:
        if isinstance(piece, Uniforms):
            yield from piece.ops
        else:
            yield piece


def _all_statements(plan):
    for k in plan.kernels:
        yield from walk(k.body)
    for f in plan.functions:
        yield from walk(f.body)


class Renderer:
    def __init__(self, plan, dialect: Dialect, *, barrier: str = "atomic", trace=None, veus_per_sm: int = 1):
        if barrier not in dialect.barriers:
            raise ValueError(f"barrier={barrier!r}: the {dialect.name} dialect has {', '.join(dialect.barriers)}")
        self.plan, self.dialect, self.barrier = plan, dialect, barrier
        self.veus_per_sm = veus_per_sm      # the plan's vEUs on one SM: the kernel must fit that many times
        self.fns = {f.name: f for f in plan.functions}
        self.layout = make_layout(plan)
        self.stacked = stacked_uniforms(plan)
        self.op_function: dict = {}         # Op -> the name of its uTask function
        self.functions: dict = {}           # (parameters, body) -> (name, code): identical uTasks share one
        self.call_sites: dict = {}          # function name -> call sites (a shared one is not inlined)
        self.calls_unrolled: dict = {}      # function name -> call sites before ROLL_REPEATS / MERGE_KERNELS
        self.parameters: dict = {}          # function name -> its parameter declarations, less t and smem
        self.function_kind: dict = {}       # function name -> the kind of its ops
        self.function_cost: dict = {}       # function name -> its uTask's estimated ns (the cost model's)
        self.ends_with_barrier: set = set()  # names of functions whose body ends with a block barrier
        self.smem = 16
        self.device_control = plan.control == "device"
        self.forks = has_forks(plan)        # calls run in parallel on vEU groups (see fork_lines)
        # Frame buffers addressed from two bases per function (own frame, callees'): with Forks (a group's
        # frame region) or spread frames (the callees' frames moved past a sibling's; module docstring).
        self.bases = self.forks or (self.device_control and any(f.spread for f in plan.functions))
        self.views = find_views(plan)
        self.read_only = {b for b, v in self.views.items() if v.read_only}
        self.trace = trace                  # TraceSites of an instrumented build, else None
        self.resident_bytes = region_bytes(plan)    # shared memory per vEU for resident tiles (after the scratch)
        # Block-local temps (local.py, Plan.block_local): their byte offset in the region after the resident
        # tiles; every other buffer lives in the workspace (BUFFER_SPACES).
        self.local = {buf: offset for buf, offset in plan.block_local}
        # Of those, the ones kept a slot per round (local.py, SLOTTED_TEMPS): Buffer -> (elements a slot, vEU count)
        self.slots = {buf: (size, count) for buf, size, count, _ in plan.local_slots}
        self.local_bytes = -(-local_bytes(plan) // 16) * 16
        self.call_log: list = []            # (function name, +1 per call site rendered, -1 per site rolled away)
        self.function: str | None = None    # the recursive function whose body is being rendered
        self.flag_loops = flag_loops(plan)
        self.flag_roles: dict = {}          # Op -> {"publish": {output: C tag}, "wait": {input: C tag}}
        self.sync_waits: dict = {}          # flag Sync -> ((FlagWait, C tag, wraps), ...)
        for number, roles in self.flag_loops.values():
            it = f"gdsl_it{number}"
            for sync, waits in roles.waits.items():
                self.sync_waits[sync] = tuple((w, it if wraps else f"{it} + 1u", wraps) for w, wraps in waits)
            for op, outs in roles.writers.items():
                self.flag_roles.setdefault(op, {}).setdefault("publish", {}).update((k, f"{it} + 1u") for k in outs)
            for op, ins in roles.readers.items():
                self.flag_roles.setdefault(op, {}).setdefault("wait", {}).update(
                    (k, it if wraps else f"{it} + 1u") for k, wraps in ins.items())
        # Op -> the input numbers its threads load one wave early (gdsl/schedule/preload.py, preload_lines)
        self.preloads = {t.op: t.preload for k in plan.kernels for s in walk(k.body) if isinstance(s, Wave)
                         for t in s.tasks if t.preload}
        self.pointer_types = self._pointer_types()
        self.uniform_types, self.uniform_users = self._uniform_names()

    def _pointer_types(self) -> dict:
        """C name -> C type of every buffer pointer a kernel declares once and never assigns again (not the
        permuted views, whose readers take their source's pointer): the values a rolled repetition may pick."""
        types = {}
        for buf in self.plan.buffers:
            view = self.views.get(buf)
            if view is not None and view.perm is not None:
                continue
            const = buf.kind in ("input", "const") or view is not None
            types[buf.name] = f"{'const ' if const else ''}{c_types.storage(buf.aval.dtype)}*"
        types.update((f"{buf.name}_f", "unsigned long long*") for buf in self.layout.shadows)
        return types

    def _uniform_names(self) -> tuple[dict, dict]:
        """(C name -> compute type, C name -> ids of the statements that read or write it) of every uniform."""
        types, users = {}, {}
        for node in _nodes(_all_statements(self.plan), nested=False):
            values = (*node.inputs, node.output) if isinstance(node, UniformOp) else _values_of(node)
            for v in values:
                if isinstance(v.storage, Uniform):
                    types[v.storage.name] = c_types.compute(v.storage.aval.dtype)
                    users.setdefault(v.storage.name, set()).add(id(node))
        return types, users

    def count_call(self, fn: str, sites: int = 1) -> None:
        """One more call site of uTask function `fn` (sites < 0: sites removed by a rolled loop or a merged
        kernel); `calls_unrolled` keeps the count before any was removed."""
        self.call_sites[fn] = self.call_sites.get(fn, 0) + sites
        self.calls_unrolled[fn] = self.calls_unrolled.get(fn, 0) + max(sites, 0)
        self.call_log.append((fn, sites))

    # ------------------------------------------------------------------------------------ values
    def depth(self, fn: str) -> str:
        """The index of `fn`'s current frame: its depth, or its frame counter when calls step further."""
        return f"b_{cid(fn)}" if self.steps_frames(fn) else f"d_{cid(fn)}"

    def steps_frames(self, fn: str) -> bool:
        """Does some Call of `fn` go more than one frame deeper (device control only)?"""
        return self.device_control and self.fns[fn].max_step > 1

    def ptr(self, value: Value) -> str:
        buf = value.buffer
        base = buf.name
        if buf.kind == "frame":
            frame = self.depth(buf.frame_of) + (f" + {value.frame_offset}" if value.frame_offset else "")
            if self.bases:       # the own frame where the caller put it, callees' frames from their own base
                frame += f" + {'c' if value.frame_offset else 'o'}_{cid(buf.frame_of)}"
            base = f"({buf.name} + (long long)({frame}) * {buf.aval.size})"
        return view_pointer(base, value, self.elem)     # a view: a window of the storage

    def uniform_ref(self, value: Value) -> str:
        u = value.storage
        if u in self.stacked:
            frame = self.depth(u.frame_of) + (f" + {value.frame_offset}" if value.frame_offset else "")
            return f"{u.name}_s[{frame}]"
        assert not value.frame_offset, f"uniform {u.name} addressed one frame deeper but not stacked"
        return u.name

    def elem(self, value: Value, idx: str = "0") -> str:
        """Element `idx` of a value, in the compute type (a uniform or literal is one scalar)."""
        if isinstance(value.storage, Lit):
            return c_types.literal(value.storage.val, value.aval.dtype)
        if isinstance(value.storage, Uniform):
            return self.uniform_ref(value)
        return c_types.from_storage(value.aval.dtype, f"{self.ptr(value)}[{idx}]")

    def arg(self, value: Value) -> str:
        return self.elem(value) if value.is_uniform else self.ptr(value)

    def first_thread(self) -> str:
        """The C condition that holds in one thread of the whole grid (thread 0 of vEU 0)."""
        return f"{self.dialect.block_index} == 0 && {self.dialect.thread_index} == 0"

    # ------------------------------------------------------------------------------------ statements
    # A barrier is redundant when no vEU touched memory since the last grid barrier ("quiet"): after views
    # replace slices, the scheduler's barriers around them guard nothing.
    def _touches_memory(self, stmt) -> bool:
        if isinstance(stmt, Wave):
            return any(t.op.outputs[0].buffer not in self.views for t in stmt.tasks)
        if isinstance(stmt, Uniforms):
            return not all(v.is_uniform for u in stmt.ops for v in u.inputs)
        if isinstance(stmt, Assign):
            return not stmt.src.is_uniform
        return True

    def quiet_after(self, stmts, quiet: bool) -> bool:
        demoted = self.demoted(stmts)
        for index, stmt in enumerate(stmts):
            if isinstance(stmt, Sync):         # (one by return site is a block barrier on some paths)
                quiet = (stmt.always_grid and index not in demoted) or quiet
            elif isinstance(stmt, Loop):
                quiet = self._loop_quiet(stmt, quiet)[1]
            elif isinstance(stmt, Branch):
                quiet = all([self.quiet_after(b, quiet) for b in stmt.branches])
            elif isinstance(stmt, (Wave, Uniforms, Assign)):
                quiet = quiet and not self._touches_memory(stmt)
            else:
                quiet = False
        return quiet

    def _loop_quiet(self, loop, quiet: bool) -> tuple[bool, bool]:
        """(quiet entering the condition, quiet after it) of a loop entered `quiet`: the condition is entered
        from before the loop and from the end of the body."""
        entry = quiet
        for _ in range(2):
            after_cond = self.quiet_after(loop.cond, entry)
            entry = quiet and self.quiet_after(loop.body, after_cond)
        return entry, self.quiet_after(loop.cond, entry)

    # A grid barrier whose neighbourhood (back to the previous grid barrier, on to the next) touches memory
    # from one vEU only orders nothing between vEUs: a block barrier does (chains of one-uTask ops).
    MULTI, OPEN = "multi", "open"

    def _veu_of(self, stmt):
        """The one vEU whose threads touch memory in `stmt`, None if none does, MULTI or OPEN (unknown)."""
        if isinstance(stmt, Sync):
            return None
        if isinstance(stmt, (Loop, Branch, Call, Fork)):
            return self.OPEN
        if not isinstance(stmt, Wave):
            return self.MULTI if self._touches_memory(stmt) else None
        veus = set()
        for task in stmt.tasks:
            if task.op.outputs[0].buffer in self.views:
                continue
            if min(task.op.n_utasks, task.count) != 1:
                return self.MULTI
            veus.add(task.first)
        return self.MULTI if len(veus) > 1 else (veus.pop() if veus else None)

    def demoted(self, stmts) -> set:
        """Indices of the grid Syncs of `stmts` that a block barrier can replace."""
        out, last_grid = set(), None
        # (A Sync by return site is no grid barrier on some paths: it bounds no neighbourhood, and stays.)
        grids = [i for i, s in enumerate(stmts) if isinstance(s, Sync) and s.always_grid]
        for n, i in enumerate(grids):
            nxt = grids[n + 1] if n + 1 < len(grids) else None
            if last_grid is not None and nxt is not None:
                veus = {self._veu_of(s) for s in stmts[last_grid + 1:nxt] if s is not stmts[i]} - {None}
                if len(veus) <= 1 and not veus & {self.MULTI, self.OPEN}:
                    out.add(i)
                    continue
            last_grid = i
        return out

    def block(self, stmts, ind: int, quiet: bool = False) -> list[str]:
        pad = "  " * ind
        lines: list[str] = []
        # The pieces a repeated sequence is made of (render.ROLL_REPEATS): each statement, but each uniform op
        # of a Uniforms alone (the scheduler puts the end of one repetition and the start of the next in one),
        # with where its lines and call sites begin.
        pieces, starts, calls = [], [], []
        demoted = self.demoted(stmts)
        for index, stmt in enumerate(stmts):
            for piece in stmt.ops if isinstance(stmt, Uniforms) else (stmt,):
                pieces.append(piece)
                starts.append(len(lines) if piece is stmt else None)
                calls.append(len(self.call_log))
            if isinstance(stmt, Wave):
                lines += [pad + line for line in self.preload_lines(stmts, index)]
                lines += [pad + line for line in self.wave(stmt.tasks)]
            elif isinstance(stmt, Fork):
                lines += self.fork_lines(stmt, ind)
            elif isinstance(stmt, Sync) and stmt.scope == "grid" and stmt.sites is not None:
                if not quiet:
                    lines.append(pad + self.sync_by_return_site(stmt))
                continue
            elif isinstance(stmt, Sync) and stmt in self.sync_waits:
                if not quiet:
                    lines += [pad + line for line in self.flag_wait_lines(stmt)] + [pad + self.dialect.block_barrier]
                continue
            elif isinstance(stmt, Sync):
                grid = stmt.scope == "grid" and index not in demoted
                if not grid and lines and lines[-1] == pad + self.dialect.block_barrier:
                    continue                   # nothing happened since the last one
                if not quiet:
                    sync = self.grid_sync() if grid else self.block_sync_after(stmts[index - 1] if index else None)
                    lines.append(pad + (self.traced(sync, self.trace.barrier(stmt)) if grid and self.trace
                                        else sync))
                quiet = grid or quiet
                continue
            elif isinstance(stmt, Uniforms):
                for k, u in enumerate(stmt.ops):
                    starts[len(starts) - len(stmt.ops) + k] = len(lines)
                    lines += [pad + line for line in self.uniform_op(u)]
            elif isinstance(stmt, Assign):
                lines.append(f"{pad}{self.uniform_ref(stmt.dst)} = {self.elem(stmt.src)};")
            elif isinstance(stmt, Loop):
                loop_lines, quiet = self.loop(stmt, ind, quiet)
                lines += loop_lines
                continue
            elif isinstance(stmt, Branch):
                if stmt.depth_of:
                    lines.append(pad + self.depth_check(stmt.depth_of))
                lines.append(f"{pad}switch ({self.elem(stmt.index)}) {{")
                for k, branch in enumerate(stmt.branches):
                    label = "default" if k == len(stmt.branches) - 1 else f"case {k}"
                    lines.append(f"{pad}  {label}: {{")
                    lines += self.trace_lines(pad + "    ", trace_begin, self.trace and self.trace.case(stmt, k))
                    lines += self.block(branch, ind + 2, quiet)
                    lines += self.trace_lines(pad + "    ", trace_end, self.trace and self.trace.case(stmt, k))
                    lines.append(f"{pad}  }} break;")
                lines.append(pad + "}")
                quiet = self.quiet_after([stmt], quiet)
                continue
            elif isinstance(stmt, Call):
                lines += self.call_lines(stmt, pad)
            elif isinstance(stmt, Launch):
                raise ValueError("Launch statements belong to the host program, not to a kernel")
            else:
                raise TypeError(f"unknown plan statement {stmt!r}")
            quiet = self.quiet_after([stmt], quiet)
        if ROLL_REPEATS and not self.trace:
            return self.rolled(pieces, lines, starts + [len(lines)], calls + [len(self.call_log)], ind)
        return lines

    def flag_wait_lines(self, sync) -> list[str]:
        """A flag sync's waits (plan.FlagWait): the threads of each waiting vEU load its elements' flag words,
        several at once, and spin on those without this step's tag (gdsl_flag_wait; a wait for a writer later
        in the body, the previous step's: none in the first iteration, whose reads follow the grid barrier
        before the loop); the block barrier follows."""
        d, lines = self.dialect, []
        for wait, tag, wraps in self.sync_waits[sync]:
            ran = f"{d.block_index} >= {wait.first} && {d.block_index} < {wait.first + wait.count}"
            first = f"{tag} && " if wraps else ""
            lines.append(f"if ({first}{ran}) gdsl_flag_wait({wait.buffer.name}_f, {wait.start}, {wait.stop}, {tag});")
        return lines

    def block_sync_after(self, prev) -> str:
        """A plan's block barrier after statement `prev`: left out on the vEUs whose last work in `prev`, a
        wave, was a uTask function that ends with a block barrier itself (ops.OpRenderer.ends_with_block_barrier:
        two barriers in a row, the second ordering nothing), kept on the others. Only for a wave whose tasks
        run at most one uTask a vEU on disjoint vEU ranges, every one of them such a function, and not when
        tracing (the trace's records come between)."""
        barrier = self.dialect.block_barrier
        if not TAIL_BARRIERS or not isinstance(prev, Wave) or self.trace or not prev.tasks:
            return barrier
        ranges = []
        for task in prev.tasks:
            if task.op.n_utasks > task.count or self.views.get(task.op.outputs[0].buffer) is not None or \
                    self.utask_function(task.op) not in self.ends_with_barrier:
                return barrier
            ranges.append(self._veu_range(task))
        ranges.sort()
        if any(a[1] > b[0] for a, b in zip(ranges, ranges[1:])):
            return barrier
        b = self.dialect.block_index
        ran = " || ".join(f"({lo} <= {b} && {b} < {hi})" if lo else f"{b} < {hi}" for lo, hi in ranges)
        return f"if (!({ran})) {barrier}"

    def loop(self, stmt: Loop, ind: int, quiet: bool) -> tuple[list[str], bool]:
        """A loop's lines, its resident tiles and staged slices copied in first, and whether it ends quiet."""
        pad = "  " * ind
        entry, after_cond = self._loop_quiet(stmt, quiet)
        lines = [pad + line for line in self.resident_preload(stmt) + self.staged_in(stmt)]
        ind += 2 if stmt.staged else 0          # (inside the staged slices' two scopes)
        inner = "  " * ind
        lines += self.trace_lines(inner, trace_begin, self.trace and self.trace.loop(stmt))
        lines.append(inner + "while (true) {")
        lines += self.block(stmt.cond, ind + 1, entry)
        lines.append(f"{inner}  if (!({self.elem(stmt.pred)})) break;")
        lines += self.trace_lines(inner + "  ", trace_begin, self.trace and self.trace.iteration(stmt))
        lines += self.block(stmt.body, ind + 1, after_cond)
        if stmt in self.flag_loops:     # (flag syncs: the iteration their tags count)
            lines.append(f"{inner}  gdsl_it{self.flag_loops[stmt][0]} += 1u;")
        lines += self.trace_lines(inner + "  ", trace_end, self.trace and self.trace.iteration(stmt))
        lines.append(inner + "}")
        lines += self.trace_lines(inner, trace_end, self.trace and self.trace.loop(stmt))
        lines += [pad + line for line in self.staged_out(stmt)]
        return lines, after_cond and not stmt.staged

    def depth_check(self, fn: str) -> str:
        """A call's check of `fn`'s depth (a Call's, or a Branch's that stands for one: plan.Branch.depth_of):
        past max_depth, the error flag for the host names the function, and the kernel ends."""
        code = list(self.fns).index(fn) + 1     # which function overflowed, for the host
        # (with Forks, the vEU that overflows may be any: each sets the flag the others' barriers watch)
        setter = f"{self.dialect.thread_index} == 0" if self.forks else self.first_thread()
        return f"if (d_{cid(fn)} >= {self.fns[fn].max_depth}) {{ if ({setter}) *gdsl_err = {code}; goto gdsl_exit; }}"

    def call_lines(self, stmt: Call, pad: str, half: tuple | None = None) -> list[str]:
        """The stack machine's call (module docstring); `half` (0 or 1, the Fork's min_group) for a call of a
        Fork: the vEU enters it in that half of its group, when each half has min_group vEUs or more."""
        f, name = self.fns[stmt.fn], cid(stmt.fn)
        site = self.trace and self.trace.call(stmt)
        lines = [pad + self.depth_check(stmt.fn)]
        lines += self.trace_lines(pad, trace_begin, site)
        frames = f" b_{name} += {stmt.step};" if self.steps_frames(stmt.fn) else ""
        if not self.bases:
            lines += [f"{pad}r_{name}[d_{name}] = {stmt.site}; d_{name} += 1;{frames} goto f_{name};",
                      f"{pad}f_{name}_ret_{stmt.site}: ;"]
        elif not self.forks:            # spread frames: the callee's callees past its own frame's neighbours
            lines.append(f"{pad}r_{name}[d_{name}] = {stmt.site}; " + " ".join(
                f"{s}_{name}[d_{name}] = {v};" for s, v in self.saved_bases(name)))
            lines.append(f"{pad}d_{name} += 1;{frames} o_{name} = c_{name}; c_{name} += {f.callee_extra(stmt.step)}; "
                         f"goto f_{name};")
            lines.append(f"{pad}f_{name}_ret_{stmt.site}: ;")
            lines.append(pad + " ".join(f"{v} = {s}_{name}[d_{name}];" for s, v in self.saved_bases(name)))
        else:
            lines.append(f"{pad}r_{name}[d_{name}] = {stmt.site}; " + " ".join(
                f"{s}_{name}[d_{name}] = {v};" for s, v in self.saved_state(name)))
            lines.append(f"{pad}d_{name} += 1;{frames} o_{name} = c_{name};")
            if half is not None:
                side, min_group = half
                mid = "gdsl_lo + (gdsl_hi - gdsl_lo) / 2"
                enter = f"gdsl_hi = {mid}; gdsl_g = 2 * gdsl_g;" if side == 0 else \
                    f"gdsl_lo = {mid}; gdsl_g = 2 * gdsl_g + 1;"
                region = f"c_{name} = gdsl_g * {f.frames} - {self.depth(stmt.fn)};"
                lines.append(f"{pad}if (gdsl_hi - gdsl_lo >= {2 * min_group}) {{ {enter} {region} }}  // its group, "
                             "its frames")
            lines += [f"{pad}goto f_{name};", f"{pad}f_{name}_ret_{stmt.site}: ;"]
            lines.append(pad + " ".join(f"{v} = {s}_{name}[d_{name}];" for s, v in self.saved_state(name)))
        if frames:
            lines.append(f"{pad}b_{name} -= {stmt.step};")
        lines += self.trace_lines(pad, trace_end, site)
        return lines

    @staticmethod
    def saved_state(name: str) -> list[tuple[str, str]]:
        """(stack, variable) of what a call saves with its return site when calls run in parallel: the vEU's
        group (heap number, first and end vEU) and the frame bases of function `name` (own, callees')."""
        return [("sg", "gdsl_g"), ("slo", "gdsl_lo"), ("shi", "gdsl_hi")] + Renderer.saved_bases(name)

    @staticmethod
    def saved_bases(name: str) -> list[tuple[str, str]]:
        """(stack, variable) of function `name`'s frame bases (own, callees'), saved at every call when
        frame buffers are addressed from them (Renderer.bases)."""
        return [("so", f"o_{name}"), ("sc", f"c_{name}")]

    def fork_lines(self, fork: Fork, ind: int) -> list[str]:
        """A Fork (plan.Fork): the lower half of the vEU group makes the first call, every vEU the
        statements between, the upper half the second call; a group of one vEU makes both. The vEU's group
        is the same again after each call (restored with its return site), so the second test sees the
        group the first one did."""
        pad, veu = "  " * ind, self.dialect.block_index
        alone = f"gdsl_hi - gdsl_lo < {2 * fork.min_group}"
        mid = "gdsl_lo + (gdsl_hi - gdsl_lo) / 2"
        lines = [f"{pad}// fork: the two calls on the two halves of this vEU's group (one after the other "
                 f"when a half would have fewer than {fork.min_group} vEUs)",
                 f"{pad}if ({alone} || (int){veu} < {mid}) {{"]
        lines += self.fork_half(fork, fork.first, ind + 1, 0)
        lines += [pad + "}"] + self.block(fork.between, ind)
        lines.append(f"{pad}if ({alone}) {{ {self.grid_sync()} }}")
        lines.append(f"{pad}if ({alone} || (int){veu} >= {mid}) {{")
        lines += self.fork_half(fork, fork.second, ind + 1, 1)
        return lines + [pad + "}"]

    def fork_half(self, fork: Fork, stmts, ind: int, half: int) -> list[str]:
        """One half of a Fork: its argument statements, then its Call entered in that half of the group."""
        return self.block(stmts[:-1], ind) + self.call_lines(stmts[-1], "  " * ind, (half, fork.min_group))

    def grid_sync(self) -> str:
        """A barrier of every vEU: of the grid, or when calls run in parallel, of the running vEU group (its
        own counter, heap-numbered; a group of one vEU syncs its threads; the grid is group 1), which every
        vEU leaves for the kernel's exit once a call overflowed (gdsl_group_sync_atomic)."""
        if self.forks:
            return ("if (gdsl_group_sync_atomic(gdsl_gbar + gdsl_g, gdsl_lo, gdsl_hi - gdsl_lo, gdsl_err, "
                    "(volatile int*)gdsl_smem)) goto gdsl_exit;")
        return self.dialect.grid_sync(self.barrier)

    def fork_prologue(self, regions: int) -> list[str]:
        """The kernel's first lines when calls run in parallel: vEU 0 clears the overflow flag and the group
        barriers' counters (a launch that overflowed left some rounds unfinished), then a grid barrier, so
        that no vEU sets the flag or counts on a group barrier before that."""
        thread = self.dialect.thread_index
        return [f"  if ({self.dialect.block_index} == 0) {{",
                f"    for (int k = {thread}; k < {regions}; k += {self.plan.block}) gdsl_gbar[k] = 0u;",
                f"    if ({self.dialect.thread_index} == 0) *gdsl_err = 0;",
                "  }",
                "  " + self.dialect.grid_sync(self.barrier)]

    # ------------------------------------------------------------------------------------ repeated sequences
    def rolled(self, stmts, lines, starts, calls, ind: int) -> list[str]:
        """`lines` (the C of `stmts`, statements and uniform ops: piece i's lines from starts[i] to starts[i + 1],
        its call sites self.call_log[calls[i]:calls[i + 1]]) with each run of repeated piece sequences as one
        loop (ROLL_REPEATS, gdsl/backends/cfamily/repeats.py)."""
        templates = [repeats.template("\n".join(lines[a:b]), self.pointer_types, self.uniform_types)
                     for a, b in zip(starts, starts[1:])]
        keys = [t.key if not any(isinstance(s, Call) for s in _nodes([stmt])) else object()
                for t, stmt in zip(templates, stmts)]

        def repetition(start, period, count):
            reps = [repeats.joined(templates[start + j * period:start + (j + 1) * period]) for j in range(count)]
            own = functools.partial(self._owner, [stmts[start + j * period:start + (j + 1) * period]
                                                  for j in range(count)], stmts[start + count * period:])
            return repeats.Repetition(reps, own)

        def accept(start, period, count):
            sites = sum(n for _, n in self.call_log[calls[start]:calls[start + period]])
            if (count - 1) * sites < ROLL_MIN_CALLS:
                return 0
            count = repetition(start, period, count).count_valid()
            return count if (count - 1) * sites >= ROLL_MIN_CALLS else 0

        out, done = [], 0
        for start, period, count in repeats.find_repeats(keys, accept):
            out += lines[starts[done]:starts[start]]
            out += self.repetition_loop(repetition(start, period, count), period, ind)
            for fn, sites in self.call_log[calls[start + period]:calls[start + count * period]]:
                self.count_call(fn, -sites)
            done = start + count * period
        return out + lines[starts[done]:]

    def _owner(self, reps, after, name: str, j: int):
        """Whether uniform `name` belongs to repetition j of a run (reps: each repetition's statements; after:
        the statements after the run): repeats.OWN if only repetition j uses it, repeats.LIVE if statements
        after the run read it too and the first statement of repetition j that uses it is a top-level one
        that assigns it (so every pass through the repetition sets it), else None."""
        users = self.uniform_users[name]
        mine = [s for s in _nodes(reps[j]) if id(s) in users]
        if len(mine) == len(users):
            return repeats.OWN
        if len(mine) + sum(1 for s in _nodes(after) if id(s) in users) < len(users):
            return None
        first = mine[0] if mine else None
        written = [first.output] if isinstance(first, UniformOp) else _reads_writes(first)[1] if first else []
        assigned = any(first is s for s in reps[j]) and \
            any(v.storage.name == name for v in written if isinstance(v.storage, Uniform))
        return repeats.LIVE if assigned else None

    def repetition_loop(self, repetition, period: int, ind: int) -> list[str]:
        """The loop that runs `repetition`'s text once per repetition (ind: the indentation level)."""
        pad, index, count = "  " * ind, f"gdsl_r{ind}", len(repetition.templates)
        setup, text, copy_out = repetition.body(index)
        return [f"{pad}// {count} repetitions of {period} statements, the same but for the arguments {index} picks",
                f"{pad}#pragma unroll 1",
                f"{pad}for (int {index} = 0; {index} < {count}; ++{index}) {{",
                *(f"{pad}  {line}" for line in setup),
                *("  " + line for line in text.split("\n")),
                *(f"{pad}  {line}" for line in copy_out),
                pad + "}"]

    # ------------------------------------------------------------------------------------ instrumentation
    def trace_lines(self, pad, record, site, arg="0") -> list[str]:
        """The record of an event's begin or end (`record`: trace_begin / trace_end) in an instrumented
        build; nothing in a normal one."""
        return [pad + record(site, arg)] if self.trace else []

    def sync_by_return_site(self, stmt: Sync) -> str:
        """A grid barrier when the running call of the function being rendered returns to one of
        `stmt.sites`, a block barrier otherwise (the return site is the same on every vEU)."""
        n = cid(self.function)
        test = " || ".join(f"r_{n}[d_{n} - 1] == {site}" for site in sorted(stmt.sites))
        grid = self.grid_sync()
        if self.trace:
            grid = self.traced(grid, self.trace.barrier(stmt))
        return f"if ({test}) {{ {grid} }} else {{ {self.dialect.block_barrier} }}"

    def traced(self, statement: str, site, arg="0") -> str:
        """`statement` between the begin and end records of event `site` (instrumented builds only)."""
        if not self.trace:
            return statement
        return f"{{ {trace_begin(site, arg)} {statement} {trace_end(site, arg)} }}"

    def wave(self, tasks) -> list[str]:
        """The C lines of one wave's tasks, in order. With GROUP_WAVE_TASKS, a run of consecutive tasks that
        call the same uTask function on disjoint vEU ranges is one call site (`task_run`), not one each."""
        if self.trace or not GROUP_WAVE_TASKS or (self.forks and self.function is not None):
            return [line for task in tasks for line in self.task(task)]
        lines, run = [], []
        for task in tasks:
            if run and not self._joins_run(run, task):
                lines += self.task_run(run)
                run = []
            if self.views.get(task.op.outputs[0].buffer) is not None:
                lines += self.task(task)
            else:
                run.append(task)
        return lines + (self.task_run(run) if run else [])

    def _joins_run(self, run, task) -> bool:
        """Whether `task` can share the call site of `run`: the same function, and no vEU that runs a task
        of the run runs this one too (each vEU then runs at most one task of the run, as before)."""
        if self.views.get(task.op.outputs[0].buffer) is not None:
            return False
        if self.utask_function(task.op) != self.utask_function(run[0].op):
            return False
        lo, hi = self._veu_range(task)
        return all(hi <= a or b <= lo for a, b in map(self._veu_range, run))

    @staticmethod
    def _veu_range(task) -> tuple[int, int]:
        """The vEUs [lo, hi) that run at least one uTask of `task`."""
        return task.first, task.first + min(task.op.n_utasks, task.count)

    def utask_function(self, op) -> str:
        """The name of the uTask function of `op`; renders the function on first use. Ops whose functions
        would be the same text share one. An input that is a permuted view (plan.Value.perm, or a transpose
        Op the renderer reads in place: _permuted_inputs) is read through the source's strides."""
        if op not in self.op_function:
            remap = {k: permuted_reads(v) for k, v in enumerate(op.inputs) if v.perm is not None}
            remap.update((k, (op.inputs[k].buffer.aval.shape, view.source.aval.shape, view.perm))
                         for k, view in self._permuted_inputs(op).items())
            renderer = OpRenderer(op, self.dialect, self.plan.block, self.read_only, remap, self.flag_roles.get(op),
                                  self.preloads.get(op, ()), prefetches_next_window(op),
                                  on_chip=self.local.keys())
            params, body = renderer.render()
            if (params, body) not in self.functions:
                self.functions[params, body] = (op.name, f"void {op.name}({params}) {{\n{body}}}\n")
                self.parameters[op.name] = params.split(", ")[:-2]      # less `int t, char* smem`
                self.function_kind[op.name] = op.kind
                self.function_cost[op.name] = op.cost
                if renderer.ends_with_block_barrier:
                    self.ends_with_barrier.add(op.name)
            self.op_function[op] = self.functions[params, body][0]
            self.smem = max(self.smem, renderer.smem)
        return self.op_function[op]

    def _permuted_inputs(self, op) -> dict:
        """Input number -> View of the inputs of `op` that are transpose Ops read in place (cfamily/views.py:
        those the scheduler left as ops, their readers outside the transpose's segment)."""
        return {k: self.views[v.buffer] for k, v in enumerate(op.inputs)
                if v.buffer in self.views and self.views[v.buffer].perm is not None}

    def call_args(self, op, t: str | None = None) -> list[str]:
        """The C arguments of a call of `op`'s uTask function, less the uTask index and shared memory (a
        view's pointer: into its storage, plan.Value's offset and terms; a permuted one at its source). A temp
        kept a slot per round (self.slots) is passed shifted for uTask `t`, so that its slice's own indices
        reach slot t / count."""
        permuted = self._permuted_inputs(op)
        roles = self.flag_roles.get(op, {})
        flags = [arg for k, tag in sorted(roles.get("publish", {}).items())
                 for arg in (f"{op.outputs[k].buffer.name}_f", tag)]
        flags += [arg for k, tag in sorted(roles.get("wait", {}).items())        # (a window: at its offset)
                  for arg in (f"{op.inputs[k].buffer.name}_f" + (f" + {op.inputs[k].offset}" if op.inputs[k].offset
                                                                 else ""), tag)]
        preloaded = [_preload_name(op, k) for k in self.preloads.get(op, ())]
        nxt = [next_window_pointer(op.inputs[0].buffer.name, op.inputs[0], self.elem)] if prefetches_next_window(op) \
            else []
        args = [self.ptr(v) for v in op.outputs] + [self.ptr(permuted[k].source) if k in permuted else self.arg(v)
                                                    for k, v in enumerate(op.inputs)]
        if t is not None:
            args = [self._slot_shifted(v, arg, t) for v, arg in zip(op.outputs + op.inputs, args)]
        return args + flags + preloaded + nxt

    def _slot_shifted(self, value, arg: str, t: str) -> str:
        """`arg` (the pointer of `value`) for uTask `t`: where a temp is kept a slot per round, its slice t of
        `size` elements at slot t / count of the vEU's copy."""
        if value.storage not in self.slots:
            return arg
        size, count = self.slots[value.storage]
        return f"({arg} + ((long long)({t}) / {count} - ({t})) * {size})"

    def touches_slots(self, op) -> bool:
        return any(v.storage in self.slots for v in op.outputs + op.inputs)

    def preload_lines(self, stmts, index: int) -> list[str]:
        """Before the wave stmts[index]: each thread of a vEU that will run a uTask of the next wave with preloaded
        inputs (gdsl/schedule/preload.py) loads its element of each into a register the call then passes."""
        after = next_wave(stmts, index)
        tasks = [t for t in stmts[after].tasks if t.op in self.preloads] if after is not None else []
        return [line for task in tasks for line in self._task_preload(task)]

    def _task_preload(self, task) -> list[str]:
        """The register declarations and loads of one task's preloaded inputs (the thread's element of its uTask
        on this vEU: one a thread, preload._eligible)."""
        op = task.op
        size = math.prod(element_shape(op))
        chunk, thread = op.params.get("chunk", size), f"(int){self.dialect.thread_index}"
        lines, loads = [], []
        for k in self.preloads[op]:
            value = op.inputs[k]
            dtype = value.aval.dtype
            lines.append(f"{c_types.compute(dtype)} {_preload_name(op, k)} = {c_types.literal(0, dtype)};")
            loads.append(f"{_preload_name(op, k)} = {c_types.from_storage(dtype, f'{self.arg(value)}[i]')};")
        load = " ".join(loads)
        return lines + self.over_utasks(task, lambda t: (
            f"{{ const int i = ({t}) * {chunk} + {thread}; if ({thread} < {chunk} && i < {size}) {{ {load} }} }}"))

    def task(self, task) -> list[str]:
        op = task.op
        if op.outputs[0].buffer in self.views:     # no work: the output is a pointer into the source
            return []
        fn = self.utask_function(op)
        self.count_call(fn)
        args = ", ".join(self.call_args(op))
        def call(t):
            text = ", ".join(self.call_args(op, t)) if self.touches_slots(op) else args
            return self.traced(f"{fn}({text}, {t}, gdsl_smem);", self.trace and self.trace.op(task), t)
        return self.over_utasks(task, call)

    def over_utasks(self, task, statement, rounds: int | None = None) -> list[str]:
        """`statement(t)` (C, for uTask index expression t) for every uTask of `task` this vEU runs (in its
        first `rounds` rounds only, where given)."""
        first, count, n = task.first, task.count, task.op.n_utasks
        n = n if rounds is None else min(n, rounds * count)
        veu = self.dialect.block_index
        if self.forks and self.function is not None:
            return self.over_utasks_in_group(first, count, n, statement)
        if n <= count:   # one round: vEU first + t runs uTask t
            t = f"(int){veu} - {first}" if first else f"(int){veu}"
            if first == 0 and n == self.plan.grid:
                return [statement(t)]
            lo = f"{veu} >= {first} && " if first else ""
            return [f"if ({lo}{veu} < {first + n}) {statement(t)}"]
        loop = f"for (gdsl_t = (int){veu} - {first}; gdsl_t < {n}; gdsl_t += {count}) " + statement("gdsl_t")
        if first == 0 and count == self.plan.grid:
            return [loop]
        lo = f"{veu} >= {first} && " if first else ""
        return [f"if ({lo}{veu} < {first + count}) {loop}"]

    def over_utasks_in_group(self, first: int, count: int, n: int, statement) -> list[str]:
        """`statement(t)` for the uTasks of a task (first vEU, vEU count, uTasks) that this vEU runs in its
        group [gdsl_lo, gdsl_hi): uTask t runs on the plan's vEU a = first + t % count, and that on the
        group's vEU lo + a % size. The same plan vEU is always the same group vEU (what the scheduler
        placed on one vEU stays on one); a group smaller than the plan's vEUs runs more rounds."""
        used = min(n, count)
        veu = self.dialect.block_index
        size, own = "(gdsl_hi - gdsl_lo)", f"((int){veu} - gdsl_lo)"
        start = f"{first} + (({own} - {first}) % {size} + {size}) % {size}"
        inner = f"for (gdsl_t = gdsl_a - {first}; gdsl_t < {n}; gdsl_t += {count}) " + statement("gdsl_t")
        return [f"for (int gdsl_a = {start}; gdsl_a < {first + used}; gdsl_a += {size}) {inner}"]

    def resident_preload(self, loop) -> list[str]:
        """Before a loop: each vEU copies the resident tiles of its uTasks (gdsl/schedule/resident.py) into its
        shared memory, then a block barrier (the uTasks read what all threads copied)."""
        tasks = [task for stmt in loop.body if isinstance(stmt, Wave) for task in parts_of_tasks(stmt.tasks)
                 if RESIDENT in task.op.params]
        return self.staged(tasks)

    def staged_in(self, loop) -> list[str]:
        """Before a loop that keeps buffers in shared memory (plan.Staged, gdsl/schedule/local.py): each vEU
        copies its slice of each in, then a block barrier; then, in a scope that ends after the loop (staged_out),
        the buffer's name is a pointer into the shared copy, shifted so that the slice's own indices reach it."""
        if not loop.staged:
            return []
        d, lines = self.dialect, ["{ // staged: each vEU's slice in its shared memory while the loop runs"]
        for k, s in enumerate(loop.staged):
            t = c_types.storage(s.buffer.aval.dtype)
            lines.append(f"  {t}* gdsl_staged{k} = ({t}*)(gdsl_smem + GDSL_LOCAL_BASE + {s.offset});")
            lines += self._staged_copy(s, f"gdsl_staged{k}", s.buffer.name, into=True)
        lines += [f"  {d.block_barrier}", "  { // in the loop, the buffers' names point into the shared copies"]
        lines += [f"    {c_types.storage(s.buffer.aval.dtype)}* {s.buffer.name} = gdsl_staged{k} - "
                  f"(long long){d.block_index} * {s.size};" for k, s in enumerate(loop.staged)]
        return lines

    def staged_out(self, loop) -> list[str]:
        """After a loop that kept buffers in shared memory: the scope of the shifted names ends, and each vEU
        copies its slices back (the grid barrier that follows the loop publishes them: local.py)."""
        if not loop.staged:
            return []
        lines = ["  }", f"  {self.dialect.block_barrier}"]
        for k, s in enumerate(loop.staged):
            lines += self._staged_copy(s, f"gdsl_staged{k}", s.buffer.name, into=False)
        return lines + ["}"]

    def _staged_copy(self, staged, local: str, name: str, into: bool) -> list[str]:
        """The threads of a vEU that holds a slice of `staged` copy it `into` its shared copy `local` from the
        buffer `name`, or back."""
        d, parts = self.dialect, staged.buffer.aval.size // staged.size
        whole = f"{name} + (long long){d.block_index} * {staged.size}"
        dst, src = (local, whole) if into else (whole, local)
        return [f"  if ({d.block_index} < {parts}) gdsl_copy_block({dst}, {src}, {staged.size});"]

    def function_preload(self, functions) -> list[str]:
        """When the kernel starts: the resident tiles of the recursive functions' matmuls (option
        resident_calls), staged once for every call (resident.keep_resident_in_functions)."""
        return self.staged([task for f in functions for task in function_resident_tasks(f.body)])

    def staged(self, tasks) -> list[str]:
        """Each vEU copies its uTasks' tiles of the resident `tasks` into its shared memory, then a block
        barrier (the uTasks read what all threads copied); nothing without tasks."""
        lines = []
        for task in tasks:
            bs = [self.ptr(part.inputs[1]) for part in sibling_parts(task.op)]      # (sibling matmuls: every B)
            slots = task.op.params[RESIDENT][2]          # (a tile each round, or one that all rounds read)
            lines += self.over_utasks(task, functools.partial(gemm.stage_resident, task.op, bs, "gdsl_smem"), slots)
        return lines + [self.dialect.block_barrier] if lines else []

    def task_run(self, run) -> list[str]:
        """Tasks of one function on disjoint vEU ranges as one call site: the vEU finds its own task in a
        chain of range tests (the tests the tasks rendered one by one make too) and takes that task's
        arguments, its first vEU and its uTask count and stride; then one call. NVRTC then compiles
        (inlines) the function once for the run instead of once per task."""
        if len(run) == 1 or any(self.touches_slots(task.op) for task in run):
            return [line for task in run for line in self.task(task)]
        fn = self.utask_function(run[0].op)
        self.count_call(fn)
        columns = {f"gdsl_{decl.rsplit(' ', 1)[1]}": (decl.rsplit(' ', 1)[0], args) for decl, args in
                   zip(self.parameters[fn], zip(*(self.call_args(t.op) for t in run)))}
        columns["gdsl_n"] = ("int", tuple(str(t.op.n_utasks) for t in run))
        columns["gdsl_step"] = ("int", tuple(str(t.count) for t in run))
        varying = {name: c_type for name, (c_type, values) in columns.items() if len(set(values)) > 1}
        value = {name: (name if name in varying else values[0]) for name, (_, values) in columns.items()}
        veu = self.dialect.block_index
        lines = [f"{{ // {len(run)} tasks of {fn} on disjoint vEUs: this vEU's arguments, then one call",
                 "  " + " ".join([f"{c_type} {name}{{}};" for name, c_type in varying.items()] +
                                 ["int gdsl_first = -1;"])]
        for k, task in enumerate(run):
            lo, hi = self._veu_range(task)
            sets = " ".join([f"gdsl_first = {lo};"] + [f"{name} = {columns[name][1][k]};" for name in varying])
            test = f"{veu} >= {lo} && {veu} < {hi}" if lo else f"{veu} < {hi}"
            lines.append(f"  {'else ' if k else ''}if ({test}) {{ {sets} }}")
        args = ", ".join(value[f"gdsl_{decl.rsplit(' ', 1)[1]}"] for decl in self.parameters[fn])
        if all(t.op.n_utasks <= t.count for t in run):   # one round each: vEU first + t runs uTask t
            lines.append(f"  if (gdsl_first >= 0) {fn}({args}, (int){veu} - gdsl_first, gdsl_smem);")
        else:
            lines.append(f"  if (gdsl_first >= 0) for (gdsl_t = (int){veu} - gdsl_first; gdsl_t < {value['gdsl_n']}; "
                         f"gdsl_t += {value['gdsl_step']}) {fn}({args}, gdsl_t, gdsl_smem);")
        return lines + ["}"]

    # ------------------------------------------------------------------------------------ uniform ops
    def uniform_op(self, u) -> list[str]:
        """C lines computing uniform op `u` in every thread: an elementwise primitive from the dialect's
        table, any other kind by its "uniform" lowering rule."""
        out = self.uniform_ref(u.output)
        table = self.dialect.elementwise
        if u.primitive in table:
            operand = u.inputs[-1].aval.dtype
            text = c_expression(table, u.primitive, c_types.klass(operand), c_types.compute(operand),
                                [self.elem(v) for v in u.inputs])
            return [f"{out} = {c_types.rounded(u.output.aval.dtype, text)};"]
        return lowering_rule(u.primitive, self.dialect.lowering_chain, "uniform")(self, u, out)

    # ------------------------------------------------------------------------------------ kernels
    def kernel(self, kernel, index: int) -> KernelCode:
        plan = self.plan
        name = f"gdsl_{cid(kernel.name)}"
        params = [("buffer", v.buffer) for v in plan.inputs] + [("buffer", v.buffer) for v in plan.outputs]
        params.append(("ws", None))
        if self.trace:
            params.append(("trace", None))
        functions = list(plan.functions) if self.device_control else []
        if not self.device_control:
            params += [("depth", f.name) for f in plan.functions]
        first_call = len(self.call_log)
        body_lines = ["  " + line for line in self.function_preload(functions)] + self.block(kernel.body, 1)
        fn_lines = []
        for f in functions:
            n = cid(f.name)
            fn_lines.append(f"f_{n}:")
            self.function = f.name
            fn_lines += self.block(f.body, 1)
            self.function = None
            fn_lines.append(f"  d_{n} -= 1;")
            sites = " ".join(f"case {k}: goto f_{n}_ret_{k};" for k in range(f.n_sites - 1))
            fn_lines.append(f"  switch (r_{n}[d_{n}]) {{ {sites} default: goto f_{n}_ret_{f.n_sites - 1}; }}")
        stmts = list(walk(kernel.body)) + [s for f in functions for s in walk(f.body)]
        grid_syncs = sum(1 for s in stmts if isinstance(s, Sync) and s.scope == "grid")
        grid_syncs += 1 if self.forks and functions else 0         # the fork prologue's (fork_prologue)
        loops = [self.flag_loops[s] for s in kernel.body if s in self.flag_loops]
        if loops:                          # flag syncs: the shadows zeroed before the plan's first grid barrier
            body_lines = self.flag_prologue() + body_lines
        if self.local_bytes:               # block-local temps: the region zeroed (local.py), then the vEU syncs
            body_lines = [f"  for (int i = (int){self.dialect.thread_index}; i < {self.local_bytes // 4}; i += "
                          f"{plan.block}) ((unsigned*)(gdsl_smem + GDSL_LOCAL_BASE))[i] = 0u;",
                          f"  {self.dialect.block_barrier}"] + body_lines

        decls = []
        c_params = []
        for kind, obj in params:
            if kind == "buffer":
                const = "const " if obj.kind in ("input", "const") else ""
                restrict = " __restrict__" if obj.kind in ("input", "const") else ""
                c_params.append(f"{const}{c_types.storage(obj.aval.dtype)}*{restrict} {obj.name}")
            elif kind == "ws":
                c_params.append("char* __restrict__ gdsl_ws")
            elif kind == "trace":
                c_params.append("unsigned long long* __restrict__ gdsl_trace_buf")
            else:
                c_params.append(f"int d_{cid(obj)}")
        used_buffers, used_uniforms = {}, {}         # (dicts as ordered sets: first use first)
        for s in stmts:
            for v in _values_of(s):
                if v.buffer is not None and v.buffer in self.layout.offsets:
                    used_buffers.setdefault(v.buffer)
                if isinstance(v.storage, Uniform):
                    used_uniforms.setdefault(v.storage)
        used_buffers, used_uniforms = list(used_buffers), list(used_uniforms)
        # (the declaration of gdsl_smem comes first, from render: static or dynamic is known once all kernels are)
        decls.append(f"unsigned* gdsl_bar = (unsigned*)(gdsl_ws + {BARRIER_OFFSET}); (void)gdsl_bar;")
        if functions:
            decls.append(f"int* gdsl_err = (int*)(gdsl_ws + {ERROR_OFFSET});")
            if not self.forks:
                decls.append(f"if ({self.first_thread()}) *gdsl_err = 0;")
        for buf in sorted(used_buffers, key=lambda b: self.layout.offsets[b]):
            if buf not in self.views:
                decls.append(self.buffer_decl(buf))
        pending = [b for b in used_buffers if b in self.views]
        declared = set(used_buffers) - set(pending)
        while pending:       # a view of a view is declared after its source
            buf = next(b for b in pending if self.views[b].source.buffer not in pending)
            src = self.views[buf].source.buffer
            if src in self.layout.offsets and src not in declared:
                declared.add(src)
                decls.append(self.buffer_decl(src))
            decls.append(view_decl(buf, self.views[buf], self.ptr(self.views[buf].source)))
            pending.remove(buf)
            declared.add(buf)
        for f in functions:
            n = cid(f.name)
            frames = f" int b_{n} = 0;" if self.steps_frames(f.name) else ""
            decls.append(f"int d_{n} = 0; int r_{n}[{f.max_depth}];{frames}")
            if self.bases:
                saved = self.saved_state(n) if self.forks else self.saved_bases(n)
                decls.append(f"int o_{n} = 0, c_{n} = 0; " + " ".join(
                    f"int {stack}_{n}[{f.max_depth}];" for stack, _ in saved))
        if self.forks and functions:
            decls.append(f"int gdsl_g = 1, gdsl_lo = 0, gdsl_hi = {plan.grid};")
            decls.append(f"unsigned* gdsl_gbar = (unsigned*)(gdsl_ws + {self.layout.group_barriers});")
            body_lines = self.fork_prologue(group_ids(plan)) + body_lines
        decls.append("int gdsl_t; (void)gdsl_t;")
        for number, _ in loops:
            decls.append(f"unsigned gdsl_it{number} = 0u;")
        for buf in (self.layout.shadows if loops else ()):
            decls.append(f"unsigned long long* {buf.name}_f = "
                         f"(unsigned long long*)(gdsl_ws + {self.layout.shadows[buf]});")
        if self.trace:
            decls.append(f"unsigned long long* gdsl_tr = gdsl_trace_buf + (size_t){self.dialect.block_index} * "
                         f"{self.trace.region_words};")
        for u in used_uniforms:
            t = c_types.compute(u.aval.dtype)
            if u in self.stacked:
                decls.append(f"{t} {u.name}_s[{self.fns[u.frame_of].register_frames}];")
            else:
                decls.append(f"{t} {u.name} = {c_types.literal(0, u.aval.dtype)};")
        if functions:
            body_lines += ["  goto gdsl_exit;", *fn_lines, "gdsl_exit: ;"]
        head = f"{self.dialect.kernel_prefix.format(block=plan.block, veus_per_sm=self.veus_per_sm)} {name}("
        return KernelCode(KernelSpec(name, params, grid_syncs), head, c_params, decls, body_lines,
                          self.call_log[first_call:])

    def buffer_decl(self, buf) -> str:
        """The declaration of a buffer's pointer, in the memory space it lives in (BUFFER_SPACES)."""
        space, offset = ("shared", self.local[buf]) if buf in self.local else ("global", self.layout.offsets[buf])
        t = c_types.storage(buf.aval.dtype)
        return f"{t}* {buf.name} = ({t}*)({BUFFER_SPACES[space].format(offset=offset)});"

    def flag_prologue(self) -> list[str]:
        """Every flag word zeroed (no tag is 0 while a loop runs: flags.py), before the grid barrier that the
        flags pass puts first in the kernel."""
        d = self.dialect
        start = min(self.layout.shadows.values())
        return [f"  for (int i = (int)({d.block_index} * {self.plan.block} + {d.thread_index}); i < "
                f"{self.layout.shadow_words}; i += {self.plan.grid * self.plan.block}) "
                f"((unsigned long long*)(gdsl_ws + {start}))[i] = 0ull;"]

    def merged_kernels(self, codes: list) -> list:
        """`codes` with each group of kernels whose bodies are the same up to the holes of a repeated sequence
        (MERGE_KERNELS; repeats.py: pointers, integers, each kernel's own uniforms) as one kernel with one
        more parameter, `int gdsl_variant`, that picks each one's arguments: the group's first KernelCode
        becomes that kernel, the others None, and every member's spec names it and passes its variant."""
        groups: dict = {}
        for k, code in enumerate(codes):
            body = repeats.template("\n".join(code.body), self.pointer_types, self.uniform_types)
            groups.setdefault(body.key, []).append((k, body))
        codes = list(codes)
        for members in groups.values():
            while len(members) >= 2:
                count = repeats.Repetition([t for _, t in members], lambda name, j: repeats.OWN).count_valid()
                if count < 2:
                    members = members[1:]
                    continue
                self._merge([codes[k] for k, _ in members[:count]], [t for _, t in members[:count]])
                for k, _ in members[1:count]:
                    codes[k] = None
                members = members[count:]
        return codes

    def _merge(self, codes: list, templates: list) -> None:
        """Make codes[0] the kernel that runs every one of `codes` (bodies `templates`) by its variant, and
        point their specs at it."""
        first = codes[0]
        setup, text, _ = repeats.Repetition(templates, lambda name, j: repeats.OWN).body("gdsl_variant")
        decls = list(dict.fromkeys(d for code in codes for d in code.decls))   # every member's, in order
        for j, code in enumerate(codes):
            for fn, sites in code.calls if j else ():
                self.count_call(fn, -sites)
            code.spec.name = first.spec.name
            code.spec.params = code.spec.params + [("variant", j)]
        first.c_params = first.c_params + ["int gdsl_variant"]
        first.decls = decls + setup
        first.body = [f"  // {len(codes)} kernels of this text, the arguments that differ picked by gdsl_variant",
                      *text.split("\n")]

    def not_inlined(self) -> set:
        """The shared functions to call instead of inlining: the tiled ones (CALL_TILED_UTASKS), then those
        without which inlining every call site would give NVRTC more than INLINE_BUDGET of code. Those that
        save the most go first; below the budget everything is inlined (calling every shared function, the
        elementwise ones too, cost 10-18 % on LSTM and BlockDrop, measured on an H100)."""
        out = {name for name, _ in self.functions.values() if CALL_TILED_UTASKS
               and self.calls_unrolled[name] >= CALL_TILED_MIN_SITES
               and self.function_kind[name] in TILED_KINDS and self.function_cost[name] >= CALL_MIN_UTASK_NS}
        cost = {name: (self.call_sites[name] - 1) * len(code) for name, code in self.functions.values()
                if name not in out}
        total = sum(self.call_sites[name] * len(code) for name, code in self.functions.values() if name not in out)
        for name in sorted((n for n in cost if cost[n] > 0), key=cost.get, reverse=True):
            if total <= INLINE_BUDGET:
                break
            out.add(name)
            total -= cost[name]
        if CALL_IN_LARGE_KERNELS:
            out |= self.called_in_large_kernels(out)
        return out

    def called_in_large_kernels(self, called: set) -> set:
        """The functions to call, besides `called`, in a program whose estimated machine code inlined passes
        LARGE_KERNEL_BUDGET: those of the largest inlined share first, whatever their call sites (a called
        function is compiled once, apart from the kernel, whose time grows faster than its size), until what
        stays inlined is at most LARGE_KERNEL_INLINED."""
        share = {name: self.call_sites[name] * self.code_size(name, code)
                 for name, code in self.functions.values() if name not in called and self.call_sites[name] > 0}
        total = sum(share.values())
        if total <= LARGE_KERNEL_BUDGET:
            return set()
        out = set()
        for name in sorted(share, key=lambda n: (-share[n], n)):
            if total <= LARGE_KERNEL_INLINED:
                break
            out.add(name)
            total -= share[name]
        return out

    def code_size(self, name: str, code: str) -> int:
        """The estimated machine code of uTask function `name` (C text `code`), in elementwise source bytes."""
        return len(code) * (TILED_CODE_WEIGHT if self.function_kind[name] in TILED_KINDS else 1)

    def function_code(self, name: str, code: str, shared: set) -> str:
        if name not in shared:
            return "GDSL_DEV " + code
        sites = self.call_sites[name]
        return f"// called from {sites} sites (ops of the same kind, shapes and split)\nGDSL_SHARED_OP " + code

    def render(self) -> Rendered:
        codes = [self.kernel(k, i) for i, k in enumerate(self.plan.kernels)]
        specs = [code.spec for code in codes]
        if MERGE_KERNELS and not self.trace and not self.device_control:
            codes = self.merged_kernels(codes)
        shared = self.not_inlined()
        scratch = -(-self.smem // 16) * 16
        local_base = scratch + -(-self.resident_bytes // 16) * 16
        smem = local_base + self.local_bytes if self.local_bytes else scratch + self.resident_bytes
        # Shared memory sized at launch where resident or block-local data need it, or where a uTask's scratch is
        # more than the dialect lets a kernel declare statically (known only once every kernel is rendered).
        dynamic = smem if self.resident_bytes or self.local_bytes or smem > self.dialect.static_smem_limit else 0
        shared_decl = (self.dialect.dynamic_shared_decl if dynamic else self.dialect.shared_decl)
        for code in codes:
            if code is not None:
                code.decls.insert(0, shared_decl.format(nbytes="GDSL_SMEM_BYTES"))
        specs = [dataclasses.replace(spec, dynamic_smem=dynamic) for spec in specs]
        parts = [f"// generated by gdsl ({self.dialect.name} dialect): {self.plan.control} control, grid "
                 f"{self.plan.grid} x {self.plan.block} threads, barrier {self.barrier}",
                 self.dialect.includes(self.barrier) + self.dialect.header,
                 f"#define GDSL_GEMV_LAST_CHUNK_SYNC {int(GEMV_LAST_CHUNK_SYNC)}",
                 f"#define GDSL_GEMV_LOOP_UNROLL {GEMV_LOOP_UNROLL}", PRELUDE, self.dialect.device_library,
                 f"#define GDSL_SMEM_BYTES {smem}\n#define GDSL_RESIDENT_BASE {scratch}\n" +
                 (f"#define GDSL_LOCAL_BASE {local_base}\n" if self.local_bytes else ""),
                 trace_prelude(self.dialect, self.trace.capacity) if self.trace else "",
                 "// ---------------------------------------------------------------------------------------- ops",
                 "\n".join(self.function_code(name, code, shared) for name, code in self.functions.values()),
                 "// ---------------------------------------------------------------------------------------- kernels",
                 "\n".join(code.text() for code in codes if code is not None),
                 self.dialect.host_code(specs, self.plan)]
        source = "\n".join(p for p in parts if p) + ("\n" if not parts[-1] else "")
        return Rendered(source, specs, self.layout, smem, frozenset(v.op for v in self.views.values()),
                        self.trace)


def render_plan(plan, dialect: Dialect, *, barrier: str = "atomic", trace=None, veus_per_sm: int = 1) -> Rendered:
    """The translation unit for `plan` in `dialect` (see the module docstring for its shape); with
    `trace` (TraceSites) the instrumented one. `veus_per_sm`: how many of the plan's vEUs one SM holds at once
    (a dialect's kernel_prefix may bound the registers of a thread by it)."""
    return Renderer(plan, dialect, barrier=barrier, trace=trace, veus_per_sm=veus_per_sm).render()


def _preload_name(op, k: int) -> str:
    """The register holding a thread's element of input k of `op`, loaded one wave early."""
    return f"gdsl_pre_{op.name}_{k}"
