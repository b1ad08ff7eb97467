"""The scheduler: a traced Program -> a Plan of uTasks on vEUs in waves, with control flow placed in the
kernel (control="device") or on the host (control="host").

Per straight-line block of equations (a Jaxpr's eqns between control-flow equations, a "segment"):
1. reshapes become aliases; scalar work becomes uniform ops every vEU computes itself (device control);
   contiguous windows and transposes become views (plan.Value.offset / terms / perm: no op, no wave, no
   barrier; see _dynamic_view, _permuted_view and docs/schedule.md "Views in the plan");
2. elementwise chains fuse into one Op when the intermediate has no other use;
3. the dataflow graph is levelled into waves; the ops of a wave share the grid, each on a vEU range sized
   by its cost; a barrier separates two waves only where a uTask reads what another vEU wrote (a
   vEU-local sync where producer and consumer are single uTasks on the same vEU).
Control flow becomes Loop / Branch / Call statements; loop carries are updated in place when no reader
can see the overwrite; recursive functions get frame storage (one copy per depth) and a call stack.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field

from gdsl.core.ir import Lit, ShapedArray, Var, subjaxprs, walk_eqns
from gdsl.core.typecheck import typecheck_program
from gdsl.primitives import control
from gdsl.primitives.elementwise import convert_p
from gdsl.primitives.linalg import matmul_p
from gdsl.primitives.registry import (
    CONTRACTION,
    CONTROL,
    CONVOLUTION,
    ELEMENTWISE,
    OP_KINDS,
    REDUCE,
    family_of,
    has_lowering,
    is_uniform,
)
from gdsl.primitives.structural import (
    concatenate_p,
    dynamic_slice_p,
    dynamic_update_slice_p,
    reshape_p,
    slice_p,
    take_p,
    transpose_p,
)
from gdsl.schedule import balance, gemv_rows, licm, partition, resident, speculate, splitk, trailing, utasks
from gdsl.schedule.backedge import demote_back_edges
from gdsl.schedule.concat import concat_products
from gdsl.schedule.flags import flag_syncs
from gdsl.schedule.gemv_rows import fuse_gemv_rows
from gdsl.schedule.hazards import Hazards
from gdsl.schedule.local import LOOPS, block_local, smem_carries
from gdsl.schedule.owner import Layout, Node, column_layouts
from gdsl.schedule.partition import BARRIER_NS, LOCAL_SYNC_NS
from gdsl.schedule.peel import peel_program
from gdsl.schedule.plan import (
    COPY,
    EPILOGUE,
    FUSED,
    GEMV_ROWS_GEMV,
    K_PARTS,
    K_SPLITS,
    RESULT,
    ROW_BLOCK,
    ROW_INDEX,
    ROW_SHAPE,
    ROWS,
    STEPS,
    WINDOW_COPY,
    Assign,
    Branch,
    Buffer,
    Call,
    Expr,
    Fork,
    Kernel,
    Launch,
    Loop,
    OffsetTerm,
    Op,
    Plan,
    RecFunction,
    RowIndex,
    StoreWindow,
    Sync,
    Task,
    Uniform,
    UniformOp,
    Uniforms,
    Value,
    Wave,
    fold_expr,
    rewrite_blocks,
    walk,
)
from gdsl.schedule.preload import step_preloads
from gdsl.schedule.ranges import drop_index_wraps
from gdsl.schedule.resident import RESIDENT, keep_resident, keep_resident_in_functions
from gdsl.schedule.rows import ROW_SLOTS, find_row_chains, numbered_steps, rows_params
from gdsl.schedule.siblings import merge_siblings
from gdsl.schedule.steps import hoist_step_products
from gdsl.schedule.unroll import unroll_twice
from gdsl.schedule.wavefront import loop_iteration_ns, loop_iteration_rounds, skew_program, wave_ns

UNIFORM_MAX_INPUT = 16   # a uniform op reads at most this many elements per input
# With the option uniform_reductions=True (the C family's default), a reduction to one element reads at most this
# many (every vEU computes it, no barrier), instead of running as an op of its own behind a grid barrier (Seq2seq's
# exit test at batch 64: max over 64 tokens). The C family unrolls one of at most 64 elements into a chain a thread
# and reduces a longer one with the vEU's threads together (cfamily/reductions.py), so a larger bound is possible:
# 8192 makes Seq2seq's argmax over 3797 logits a uniform, no op and no single-vEU reduction a step, and then the
# grid barrier after the token's store goes too (backedge.py). Measured on the H200 (session 16,
# benchmarks/kernel_ab.py, ncu kernel time, two processes x 15 launches): Seq2seq bs1 110.9 us at 64 -> 98.6 at
# 8192 (111.5 at 8192 with the back-edge barrier kept); no other zoo row's plan changes.
UNIFORM_REDUCTION_MAX_INPUT = 8192
# The deepest fused expression: a longer chain is cut into several ops. Backends render an expression
# recursively, and C compilers nest it as deeply, so its depth must not grow with the program's length.
MAX_FUSED_DEPTH = 64
# The largest elementwise expression (in nodes) that is recomputed inside a consumer reading its result
# through a view, instead of running as an op of its own behind a barrier (see Scheduler._inline_window).
MAX_INLINED_NODES = 8
# A Fork splits a vEU group only when each half keeps at least this share of the called function's widest
# task (its vEUs): deeper, each half would run that task in more rounds on fewer vEUs, trading a barrier
# (about a microsecond) for rounds of uTasks. RAE at hidden 512, grid 132 (benchmarks/recursion_counts.py
# --fork, critical path of the fixed tree): see docs/schedule.md, "Parallel recursion". Timed on the H200 (session
# 17, models.bench with fork=True beside the default, one process per value): at 1.0, 0.5, 0.25 and 0.125 the random
# bench trees took 1.07x, 1.14x, 1.34x and 1.25x the default's time, the fixed tree 1.32x (1.0) and 1.51x (0.5): the
# option stays off, and no value of this share makes it pay.
FORK_MIN_SHARE = 0.25
# owner="auto" with flag syncs: also take the owner-computes plan where its loops, after the flags pass, keep no grid
# barrier (every step-end barrier a flag sync, FlagWaits included: flags.py) while the default's keep some: a
# skewed stack of layers (the LSTM) would run each step as its layers' GEMV, cell and flag waits on the
# neighbouring layers only, where `pays` declines it with barriers (its chains share the grid). Off: measured
# slower on the H200 (session 23, benchmarks/kernel_ab.py, LSTM bs1 kernel 321.1 -> 413.5 µs: a step's wave
# 3.9-4.1 µs against the default's 4.4, but the work before the loop 127 µs against ~30: the hoisted input
# projection on a few vEUs, and nine weight concatenations of the stacked products; docs/performance.md).
OWNER_WITHOUT_BARRIERS = False
# A partitioned loop's initial carry copies split by its partitions, on their vEUs, then a block sync (schedule_while;
# False: split for the whole grid, then a grid barrier).
PARTITIONED_INITS = True


def _finer(split, op) -> bool:
    """Does `split` cut op's elements into smaller chunks than op's own split (balance.py: one round only)?"""
    return "chunk" in split and split["chunk"] < op.params.get("chunk", 0)


def _chunked_size(op) -> int:
    """The elements an op split in chunks spreads over its uTasks (utasks.split)."""
    if utasks.in_place_update(op.kind, op.params):
        return op.inputs[1].aval.size
    return op.outputs[0].aval.size


def _use_counts(jaxpr) -> dict:
    counts: dict = {}
    for eqn in jaxpr.eqns:
        for a in eqn.inputs:
            if isinstance(a, Var):
                counts[a] = counts.get(a, 0) + 1
    for a in jaxpr.outs:
        if isinstance(a, Var):
            counts[a] = counts.get(a, 0) + 1
    return counts


@dataclass(eq=False)
class _Item:
    """An equation (or fused chain) of the segment being scheduled."""
    eqn: object
    uniform: bool
    expr: object = None                      # fused: Expr over `leaves`
    raw_expr: object = None                  # fused: Expr over the variables read (before numbering)
    depth: int = 0                           # fused: the nesting depth of `expr`
    absorbed: bool = False                   # fused into a consumer's expression (no op of its own)
    leaves: list = field(default_factory=list)
    deps: set = field(default_factory=set)
    level: int = 0
    alias: Value | None = None               # write the output here (in-place carry, branch result)
    op: Op | None = None
    index: int = 0                           # position in the segment (program order)
    inlined: int = 0                         # reads of its result recomputed in consumers through views
    # A window at a run-time offset read in place (Scheduler._dynamic_view): no op, levelled like a uniform
    # op (its readers wait for its sources only); `read_level`: the last wave level of its readers;
    # `read_by_uniform`: a uniform op reads it (every vEU, right after a wave).
    view: bool = False
    read_level: int = -1
    read_by_uniform: bool = False
    # An epilogue: the matmul / conv2d item whose result `expr` reads; the two run as one op of its kind
    # (see Scheduler._fold_epilogues), `leaves` then being the epilogue's own operands; `result` the
    # variable the epilogue reads for it (the contraction's output, or a row vector's reshape of it).
    contraction: _Item | None = None
    result: Var | None = None
    # A row chain (rows.py): the ROWS op's params (its steps read `leaves`) and the members' variables it
    # stores (`row_outputs`); `row_output`: a member of a chain whose result the chain stores.
    rows: dict | None = None
    row_outputs: list = field(default_factory=list)
    row_output: bool = False
    # A contraction (or its epilogue) or a reduction that stores its result straight into the window of
    # this dynamic_update_slice item (Scheduler._fold_window_stores), which then runs no op. `window_copy`:
    # a reduction whose result other readers still read stores it into the window as well, through this
    # extra output (plan.WINDOW_COPY).
    stores_into: _Item | None = None
    keeps_result: bool = False
    window_copy: Value | None = None
    # (a ROWS item) the item whose `alias` says where each of `row_outputs` is stored: itself for the last
    # member's result (it allocates it, see _allocate), else the member (a `row_output`)
    row_owners: list = field(default_factory=list)
    # A matmul whose left operand, a concatenation along its depth, it reads in place (_fold_k_parts): the
    # concatenation's operands (plan.K_PARTS).
    k_parts: list | None = None
    # A matmul whose left operand is rows of a table gathered at run-time indices (_fold_row_gathers): the
    # take item it reads them from in place (plan.ROW_INDEX, plan.Value.rows).
    row_gather: _Item | None = None


class Scheduler:
    def __init__(self, program, *, control="device", grid=132, block=256, partition=None, resident_bytes=0,
                 owner=False, epilogues=(), views=(), balance=True, rows=(), fork=False, window_stores=(),
                 resident_calls=False, cells=True, spread_frames=False, aside=False, uniform_reductions=False,
                 resident_partitioned=False, k_parts=(), thin_gemv=False, row_gathers=(), siblings=(),
                 row_blocks=(), split_k=True, resident_pad=0):
        if control not in ("device", "host"):
            raise ValueError(f"control must be 'device' or 'host', got {control!r}")
        if partition not in (None, True, False):
            raise ValueError(f"partition must be None (when estimated faster), True or False, got {partition!r}")
        self.program = program
        self.control = control
        self.uniforms_allowed = control == "device"
        # The most elements a reduction to one element reads and still is a uniform op (_is_uniform).
        self.uniform_reduction_input = UNIFORM_REDUCTION_MAX_INPUT if uniform_reductions else UNIFORM_MAX_INPUT
        self.grid = int(grid)
        self.block = int(block)
        self.partition = partition           # partitioned loops: None = when estimated faster, or a bool
        # Shared memory per vEU for loop-invariant weights (resident.py): with device control only, where the
        # loop runs inside the kernel that loads them.
        self.resident_bytes = resident_bytes if control == "device" else 0
        # in partitioned loops too (keep_resident); None: resident.PARTITIONED
        self.resident_partitioned = resident.PARTITIONED if resident_partitioned is None else bool(resident_partitioned)
        self.resident_pad = int(resident_pad)    # resident GEMM rows this many elements wider (resident.RESIDENT_PITCH)
        self.balance = balance                # each wave's splits and shares chosen together (balance.py)
        # Two calls of a node's children as one Fork that device control may run on two halves of the vEU
        # group (_forks; device control with one recursive function only).
        self.fork = bool(fork) and control == "device"
        # The callees of a call put their frames past those of its later siblings (plan.RecFunction.spread),
        # so that a callee's last barrier is not needed before a sibling's subtree (_spread_sites; device
        # control, a plan without Forks).
        self.spread_frames = bool(spread_frames) and control == "device"
        # Small waves of recursive functions that grid barriers isolate run on vEUs beside those of the
        # functions' wide waves (_waves_aside; device control, a plan without Forks).
        self.aside = bool(aside) and control == "device"
        # The weights of GEMV-shaped matmuls in recursive functions kept in shared memory for the whole
        # kernel (resident.keep_resident_in_functions; within resident_bytes, with device control only).
        self.resident_calls = bool(resident_calls)
        # GEMVs may take tiles of fewer than 16 columns, each staging its whole k at once where that fits
        # (utasks.THIN_GEMV_COLUMNS, thin_gemv_params).
        self.thin_gemv = bool(thin_gemv)
        # GEMMs with too few output tiles for the grid and a deep k may run as partial products over ranges of
        # k and a sum (splitk.py), where utasks.k_splits estimates that faster.
        self.split_k = bool(split_k)
        # The lowering chain of the backend (its names, gdsl/primitives/registry.py) whose "epilogue" rules say
        # which contractions may take an elementwise epilogue; empty: none do.
        self.epilogues = tuple(epilogues)
        # The lowering chain whose "k_parts" rule for matmul says that it reads a left operand concatenated
        # along its depth from the parts (plan.K_PARTS, _fold_k_parts); empty: the concatenation is a copy.
        self.k_parts = has_lowering(matmul_p.name, tuple(k_parts), "k_parts") if k_parts else False
        # The lowering chain whose "row_block" rules say which kinds take 2-D chunks (plan.ROW_BLOCK): a column
        # layout of several rows may then split into blocks of rows (owner.py); empty: whole rows only.
        self.row_blocks = tuple(row_blocks)
        # The lowering chain whose "row_gather" rule for matmul says that its tiles read a left operand of rows
        # gathered at run-time indices in place (plan.ROW_INDEX, _fold_row_gathers); empty: the take is an op.
        self.row_gathers = has_lowering(matmul_p.name, tuple(row_gathers), "row_gather") if row_gathers else False
        # The lowering chain whose "n_parts" rule for matmul says that it computes sibling matmuls of a wave
        # (one left operand, loop-invariant right operands, the same vEUs and uTasks) as one op (plan.N_PARTS,
        # siblings.py); empty: they stay separate ops.
        self.siblings = has_lowering(matmul_p.name, tuple(siblings), "n_parts") if siblings else False
        # The lowering chain whose "epilogue" rules for dynamic_update_slice and a contraction's or a
        # reduction's kind say that it may store its result straight into the window of an in-place update
        # (_fold_window_stores; device control only, where the window's start is a uniform); empty: never.
        self.window_stores = tuple(window_stores) if control == "device" else ()
        # The lowering chain of the backend: with a "utask" rule for ROWS, row chains fuse (rows.py).
        self.row_chains = has_lowering(ROWS.name, tuple(rows), "utask") if rows else False
        # Cell chains (rows.py: connected elementwise items of one shape, as one multi-output ROWS op), for
        # such a backend too unless switched off.
        self.cell_chains = self.row_chains and bool(cells)
        # The lowering chain whose "view" rules say which windows the backend reads in place: at a run-time
        # offset (plan.Value.terms; device control only, where every vEU has the uniforms) or transposed
        # (plan.Value.perm); empty: none.
        self.view_rules = tuple(views)
        self.parts = 0                      # partitions of the loop body being scheduled (0: none)
        # Column layouts for matmul -> elementwise chains in loop bodies (owner.py); `loop_depth`: the
        # loops around the block being scheduled.
        self.owner = bool(owner) and control == "device"
        self.loop_depth = 0
        self.env: dict = {}
        self.buffers: list[Buffer] = []
        self.uniform_list: list[Uniform] = []
        self.names = itertools.count()
        self.op_names = itertools.count()
        self.frame: str | None = None       # recursive function whose body is being scheduled
        self.fn_defs: dict = {}             # name -> (FunctionDef, params, results)
        self.fn_bodies: dict = {}
        self.sites: dict = {}               # name -> number of call sites
        self.held_frames: dict = {}         # (calling function or None, callee) -> frames its results hold
        self.after_call_syncs: set = set()  # the grid Syncs right after Calls (see _after_call_sync)
        self.max_steps: dict = {}           # name -> the largest step of a Call of it (see _call_step)
        self.shared_params: dict = {}       # name -> positions of the parameters every call shares (_shared_arguments)
        # Var -> (Value to write into, None or the binders whose storage that is). With binders (a loop
        # carry, a branch result in its operand's storage) the write is in place: _choose_aliases checks
        # that no reader of those binders can see it.
        self.hints: dict = {}
        self.site = None                    # (Jaxpr, equation index) of the control equation being scheduled
        self.read_barriers: dict = {}       # Sync -> the buffers that uniform ops read before it (only)
        self.window_vars: dict = {}         # (Var, offset, aval) -> its _Window (see _inline_window)
        self.hazards = Hazards()            # the accesses since the last grid barrier (hazards.py)
        self.stats = {"grid_syncs": 0, "block_syncs": 0, "waves": 0, "ops": 0, "uniform_ops": 0,
                      "fused_eqns": 0, "partitioned_loops": 0, "epilogues": 0, "row_chains": 0,
                      "window_stores": 0, "cell_chains": 0, "k_parts": 0,
                      "row_gathers": 0}

    # ---------------------------------------------------------------------------------------- storage
    def _buffer(self, aval, kind="temp", name=None) -> Buffer:
        kind = "frame" if (self.frame and kind == "temp") else kind
        buf = Buffer(name or f"t{next(self.names)}", aval, kind, self.frame if kind == "frame" else None)
        self.buffers.append(buf)
        return buf

    def _new_value(self, aval, uniform: bool) -> Value:
        if uniform:
            u = Uniform(f"u{next(self.names)}", aval, self.frame)
            self.uniform_list.append(u)
            return Value(u, aval)
        return Value(self._buffer(aval), aval)

    def _wants_uniform(self, aval) -> bool:
        return self.uniforms_allowed and aval.size == 1

    def read(self, atom) -> Value:
        if isinstance(atom, Lit):
            return Value(atom, atom.aval)
        if isinstance(atom, _Window):
            base = self.read(atom.base)
            return dataclasses.replace(base, aval=atom.aval, offset=base.offset + atom.offset)
        if isinstance(atom, _Rows):        # gathered rows read in place (_fold_row_gathers)
            table = self.read(atom.base)
            rows = RowIndex(self.read(atom.index), atom.base.aval.shape[0] - 1)
            return dataclasses.replace(table, aval=atom.aval, rows=rows)
        return self.env[atom]

    # ---------------------------------------------------------------------------------------- entry
    def run(self) -> Plan:
        prog = self.program
        inputs = []
        for k, var in enumerate(prog.jaxpr.in_binders):
            kind = "const" if k < prog.nconsts else "input"
            name = f"c{k}" if kind == "const" else f"in{k - prog.nconsts}"
            value = Value(self._buffer(var.aval, kind, name), var.aval)
            self.env[var] = value
            inputs.append(value)
        outputs = [Value(self._buffer(v.aval, "output", f"out{k}"), v.aval) for k, v in
                   enumerate(prog.jaxpr.outs)]
        for atom, out in zip(prog.jaxpr.outs, outputs):   # let the producing op write the result itself
            if isinstance(atom, Var) and atom not in self.hints:
                self.hints[atom] = (out, None)
        body = list(self.schedule_block(prog.jaxpr))
        for atom, out in zip(prog.jaxpr.outs, outputs):
            value = self.read(atom)
            if value.storage is not out.storage:
                body += self._copy(out, value)
        functions = tuple(RecFunction(name, params, results, self.fn_bodies[name], fn.max_depth,
                                      self.sites.get(name, 0), self.max_steps.get(name, 1))
                          for name, (fn, params, results) in self.fn_defs.items())
        idle = _idle_read_barriers(body, [self.fn_bodies[name] for name in self.fn_defs], self.read_barriers) | \
            _covered_read_barriers(body, self.read_barriers)
        if idle:
            self.stats["grid_syncs"] -= len(idle)
            body = _without(body, idle)
            functions = tuple(dataclasses.replace(f, body=_without(f.body, idle)) for f in functions)
        if self.control == "device":
            body, demoted, exits = demote_back_edges(body)
            self.stats["grid_syncs"] += exits - demoted
            self.stats["block_syncs"] += demoted
        body = tuple(_drop_trailing_sync(body))
        if self.fork and len(functions) == 1:
            body, functions = self._forks(body, functions)
        if self.resident_calls and functions:
            functions = keep_resident_in_functions(body, functions, self.resident_bytes, self.grid)
        forked = any(isinstance(s, Fork) for b in [body] + [f.body for f in functions] for s in walk(b))
        if forked:      # a forked call's loops run on groups of vEUs: no resident tiles (resident.without_resident)
            functions = tuple(dataclasses.replace(f, body=resident.without_resident(f.body)) for f in functions)
        if self.spread_frames and not forked:
            functions = tuple(_with_spread(f) for f in functions)
        if self.aside and functions and not forked:
            body, functions, moved = _waves_aside(body, functions, self.grid)
            self.stats["waves_aside"] = moved
        if self.control == "device" and functions:
            body, functions, demoted, dropped = _demote_syncs_around_calls(body, functions, self.after_call_syncs)
            self.stats["grid_syncs"] -= demoted + dropped
            self.stats["block_syncs"] += demoted
        if self.siblings:
            body, functions, merged = merge_siblings(body, functions)
            self.stats["ops"] -= merged
            self.stats["siblings_merged"] = merged
        if self.control == "device":
            kernels, host = (Kernel("main", body, functions),), None
        else:
            kernels, host, functions = _split_host(body, functions)
        return Plan(self.control, self.grid, self.block, kernels, host, tuple(inputs), tuple(outputs),
                    tuple(prog.consts), tuple(self.buffers), tuple(self.uniform_list), functions,
                    dict(self.stats))

    # ---------------------------------------------------------------------------------------- blocks
    def schedule_block(self, jaxpr):
        """Statements for a Jaxpr's equations (its binders are already in env). What only feeds conds is
        computed as early as its operands allow (_cond_inputs_early)."""
        jaxpr = _cond_inputs_early(jaxpr)
        uses = _use_counts(jaxpr)
        stmts: list = []
        segment: list = []
        for index, eqn in enumerate(jaxpr.eqns):
            if eqn.primitive.family == CONTROL:
                stmts += self._segment(segment, uses, jaxpr)
                segment = []
                self.site = (jaxpr, index)
                stmts += control_rule(eqn.primitive)(self, eqn)
            else:
                segment.append((index, eqn))
        stmts += self._segment(segment, uses, jaxpr)
        return stmts

    def _is_uniform(self, eqn) -> bool:
        """Scalar work every vEU can do itself: scalar arithmetic, loading one element, tiny reductions."""
        prim = eqn.primitive
        if not self.uniforms_allowed or not prim.uniform or any(v.aval.size != 1 for v in eqn.outs):
            return False
        if prim.family == REDUCE:
            return eqn.inputs[0].aval.size <= self.uniform_reduction_input
        return True

    def _segment(self, segment, uses, jaxpr):
        """Fuse, level and place one straight-line run of equations."""
        if not segment:
            return []
        items: list[_Item] = []
        producer: dict = {}      # Var -> _Item (within this segment)
        order: list = []         # items and reshapes in program order, for storage allocation
        windows: dict = {}       # alias Var -> _Alias
        reshaped: dict = {}      # reshape's output Var -> its operand Var
        for index, eqn in segment:
            spanning = self._adjacent_call_results(eqn)
            if spanning is not None:        # read in place across the callees' frames, no work
                self.env[eqn.outs[0]] = spanning
                continue
            if _is_alias(eqn):   # a reshape or a view: a window of its input's storage, no work
                if eqn.inputs[0] in producer:
                    producer[eqn.outs[0]] = producer[eqn.inputs[0]]
                if isinstance(eqn.inputs[0], Var):
                    windows[eqn.outs[0]] = _Alias.of(eqn, windows.get(eqn.inputs[0]))
                    if eqn.primitive is reshape_p:
                        reshaped[eqn.outs[0]] = eqn.inputs[0]
                order.append(eqn)
                continue
            uniform = self._is_uniform(eqn)
            view = self._dynamic_view(eqn, producer, segment, jaxpr) or \
                self._permuted_view(eqn, producer, segment, jaxpr)
            item = _Item(eqn, uniform, index=index, view=view)
            if not uniform and eqn.primitive.fusible:
                self._fuse(eqn, item, producer, uses, windows)
            for atom in (item.leaves if item.raw_expr is not None else eqn.inputs):
                if isinstance(atom, Var) and atom in producer:
                    item.deps.add(producer[atom])
            for v in eqn.outs:
                producer[v] = item
            items.append(item)
            order.append(item)
        self._fold_k_parts(items, producer, uses)
        self._fold_row_gathers(items, producer, segment, jaxpr)
        self._absorb_inlined(items, uses, windows)
        self._fold_epilogues(items, producer, uses, reshaped, jaxpr)
        self._fuse_rows(items, order, producer, uses, reshaped, windows)
        items = [it for it in items if not it.absorbed]
        for it in items:         # number the inputs of the expressions that stay ops of their own
            if it.contraction is not None:
                it.leaves = []
                it.expr = _index_leaves(it.raw_expr, it.leaves, result=it.result,
                                        first=len(_own_operands(it.contraction)))
            elif it.raw_expr is not None:
                it.leaves = []
                it.expr = _index_leaves(it.raw_expr, it.leaves)
        self._level(items)
        self._choose_aliases(items, jaxpr)
        items = self._fold_window_stores(items, producer, windows, jaxpr)
        self._allocate(order)
        return self._emit([it for it in items if not it.view])

    def _adjacent_call_results(self, eqn) -> Value | None:
        """The view that a concatenation of call results lying next to each other in memory is, or None.
        A call result read in place lives in its callee's frame, and calls made one after another from one
        body go to adjacent frames (_call_step): RAE's `concat(encode(left), encode(right))` is `t1'` then
        `t1''`, elements [0, 2H) from the first child's frame on. Such a view is no producer (no op, no
        wave, no barrier of its own); its readers read the callees' frames directly. Only for the frames of
        calls (only a later, deeper call writes them, see _by_reference), when the concatenation is one flat
        run (every dimension before the axis is 1) and its result is not wanted in a buffer of its own."""
        if eqn.primitive is not concatenate_p or eqn.outs[0] in self.hints:
            return None
        axis = eqn.params["axis"]
        if any(d != 1 for d in eqn.outs[0].aval.shape[:axis]):
            return None
        if not all(isinstance(a, Var) and a in self.env for a in eqn.inputs):
            return None
        values = [self.read(a) for a in eqn.inputs]
        first = values[0]
        if not all(v.buffer is not None and v.buffer is first.buffer and v.frame_offset > 0 for v in values):
            return None
        frame_size = first.buffer.aval.size
        position = first.frame_offset * frame_size + first.offset
        for v in values:
            if v.frame_offset * frame_size + v.offset != position:
                return None
            position += v.aval.size
        return Value(first.storage, eqn.outs[0].aval, first.frame_offset, first.offset)

    def _allocate(self, order):
        """Storage for every value the segment produces, in program order (aliases follow their source). A
        result stored into an update's window (_fold_window_stores) gets it last, when the uniforms of the
        window's start have theirs; its aliases, read by nothing but the update, get none. A reduction that
        stores into the window as well as into its own output (`window_copy`) gets both."""
        stored = []
        for entry in order:
            if not isinstance(entry, _Item):           # a reshape or a view
                src, out = entry.inputs[0], entry.outs[0]
                if isinstance(src, Lit):
                    self.env[out] = Value(src, out.aval)
                elif src not in self.env:                  # of a result recomputed where it is read
                    continue
                else:
                    value = self.read(src)
                    offset = value.offset + (view_offset(entry) or 0)
                    self.env[out] = dataclasses.replace(value, aval=out.aval, offset=offset)
            elif entry.view:
                self.env[entry.eqn.outs[0]] = self._view_value(entry.eqn)
            elif entry.stores_into is not None:
                stored.append(entry)
                if entry.keeps_result:        # (its own output as well, for its other readers)
                    self._allocate_outputs(entry)
            elif not entry.absorbed or entry.row_output:
                self._allocate_outputs(entry)
        for entry in stored:
            window = self._window_value(entry.stores_into, entry.eqn.outs[0].aval)
            if entry.keeps_result:
                entry.window_copy = window
            else:
                self.env[entry.eqn.outs[0]] = window

    def _allocate_outputs(self, item):
        """The storage of `item`'s outputs: its alias (an in-place carry, a branch result), else new."""
        for v in item.eqn.outs:
            self.env[v] = item.alias if item.alias is not None else self._new_value(v.aval, item.uniform)

    def _dynamic_view(self, eqn, producer, segment, jaxpr) -> bool:
        """Is `eqn` a window its readers can read in place at a run-time offset (plan.Value.terms), so that it
        is no op: a dynamic_slice whose window is one contiguous run of its operand, or a take of one index
        along an axis with only unit axes before it (one row), its starts or index uniform, when the
        backend has a "view" rule for its kind. Its source is a buffer of this frame that is no such view
        itself. Every reader (through reshapes and static views) is an op or a uniform op of this segment:
        no control flow, no result. So the readers run before any Assign can change the uniforms of the
        offset, and _choose_aliases sees them as readers of the source (no in-place write reaches it
        before they ran)."""
        if not self.uniforms_allowed or self.frame is not None or not self._has_view_rule(eqn) or \
                not _one_run(eqn) or not self._viewable_source(eqn.inputs[0], producer):
            return False
        if not all(self._is_uniform_atom(a, producer) for a in eqn.inputs[1:]):
            return False
        return self._read_by_segment_ops(eqn.outs[0], segment, jaxpr)

    def _permuted_view(self, eqn, producer, segment, jaxpr) -> bool:
        """Is `eqn` a transpose its readers can read in place through permuted indices (plan.Value.perm), so
        that it is no op, when the backend has a "view" rule for it: its source a buffer that is no view
        itself (a temp of this segment outside recursive functions, or any buffer of this frame), every
        reader an op of this segment (as for _dynamic_view) that is no window of it (its index map is the
        source's, not the transposed array's: cfamily/views.py) and no uniform op, and nothing reshapes it."""
        if eqn.primitive is not transpose_p or not self._has_view_rule(eqn) or \
                not self._viewable_source(eqn.inputs[0], producer):
            return False
        out = eqn.outs[0]
        if _alias_closure(jaxpr, out) != {out}:
            return False
        for reader in jaxpr.eqns:
            if any(a is out for a in reader.inputs) and \
                    (reader.primitive in (slice_p, dynamic_slice_p) or self._is_uniform(reader)):
                return False
        return self._read_by_segment_ops(out, segment, jaxpr)

    def _has_view_rule(self, eqn) -> bool:
        """Does the backend read a window made by `eqn` in place (a "view" lowering rule for its kind)?"""
        return bool(self.view_rules) and not self._is_uniform(eqn) and \
            has_lowering(eqn.primitive.name, self.view_rules, "view")

    def _viewable_source(self, src, producer) -> bool:
        """Can a view read `src` in place: a buffer of this frame that is no run-time or permuted view itself
        (computed in this segment outside recursive functions, or already stored)?"""
        if not isinstance(src, Var):
            return False
        if src in producer:
            return self.frame is None and not producer[src].uniform and not producer[src].view
        value = self.env.get(src)
        return value is not None and value.buffer is not None and value.buffer.kind != "frame" and \
            not value.frame_offset and not value.dynamic and value.perm is None

    def _is_uniform_atom(self, atom, producer) -> bool:
        """Is `atom` a literal or a variable held in a uniform (computed before or in this segment)?"""
        if isinstance(atom, Lit):
            return True
        if atom in producer:
            return producer[atom].uniform
        return atom in self.env and self.env[atom].is_uniform

    def _read_by_segment_ops(self, var, segment, jaxpr) -> bool:
        """Is every reader of `var` (and of its reshapes and static views) an equation of `segment`: no control
        flow, no result of `jaxpr`, no storage hint?"""
        names = _alias_closure(jaxpr, var)
        if any(v in self.hints for v in names) or any(isinstance(a, Var) and a in names for a in jaxpr.outs):
            return False
        in_segment = {id(eqn) for _, eqn in segment}
        for eqn in jaxpr.eqns:
            if not any(isinstance(a, Var) and a in names for a in eqn.inputs):
                continue
            if _is_alias(eqn) and eqn.outs[0] in names:
                continue
            if id(eqn) not in in_segment:
                return False
        return True

    def _view_value(self, eqn) -> Value:
        """The Value of a window read in place: a transpose's source permuted (_permuted_view), or its
        source's storage at the window's offset (_dynamic_view), the starts (or the index) clamped into the
        source as the primitive does; a literal one folds into the static offset."""
        source = self.read(eqn.inputs[0])
        if eqn.primitive is transpose_p:
            return dataclasses.replace(source, aval=eqn.outs[0].aval, perm=tuple(eqn.params["permutation"]))
        shape = eqn.inputs[0].aval.shape
        strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
        if eqn.primitive is take_p:
            axis = eqn.params["axis"]
            windows = [(axis, eqn.inputs[1], shape[axis] - 1)]
        else:
            windows = [(d, start, n - size) for d, (start, n, size) in
                       enumerate(zip(eqn.inputs[1:], shape, eqn.params["sizes"])) if n != size]
        offset, terms = source.offset, list(source.terms)
        for d, start, high in windows:
            if isinstance(start, Lit):
                offset += strides[d] * min(max(int(start.val.reshape(-1)[0]), 0), high)
            else:
                terms.append(OffsetTerm(self.read(start), strides[d], high))
        return Value(source.storage, eqn.outs[0].aval, source.frame_offset, offset, tuple(terms))

    def _fuse(self, eqn, item, producer, uses, windows):
        """`item.raw_expr`: the expression of `eqn` with single-use elementwise producers of this segment
        folded in, and small ones read through a view recomputed at the view's window (_inline_window);
        `item.leaves`: the variables it reads, by first appearance (kept per item, so fusing costs time
        in proportion to the equations, not to the expression sizes)."""
        item.depth = 1
        leaves: dict = {}        # id(var) -> var, in order of first appearance

        def build(atom):
            if isinstance(atom, Lit):
                return Expr("literal", (), {"value": atom.val}, atom.aval)
            inlined = self._inline_window(atom, producer, windows)
            if inlined is not None:
                p, expr = inlined
                item.depth = max(item.depth, p.depth + 1)
                for node in _input_nodes(expr):
                    var = node.params["var"]
                    leaves.setdefault(id(var), var)
                    if isinstance(var, _Window) and var.base in producer:
                        producer[var] = producer[var.base]
                return expr
            p = producer.get(atom)
            # (a reshape of p's output is not p's output: its index map differs, so it is not fused)
            if p is not None and p.raw_expr is not None and not p.uniform and atom in p.eqn.outs \
                    and uses.get(atom, 0) == 1 and atom not in self.hints and p.depth < MAX_FUSED_DEPTH:
                p.absorbed = True
                self.stats["fused_eqns"] += 1
                item.depth = max(item.depth, p.depth + 1)
                for var in p.leaves:
                    leaves.setdefault(id(var), var)
                return p.raw_expr
            leaves.setdefault(id(atom), atom)
            return Expr("input", (), {"var": atom}, atom.aval)
        item.raw_expr = Expr(eqn.primitive.name, tuple(build(a) for a in eqn.inputs), dict(eqn.params),
                             eqn.outs[0].aval)
        item.leaves = list(leaves.values())

    def _inline_window(self, atom, producer, windows):
        """(producer item, expression) when `atom` is a view of the result of a small elementwise
        expression of this segment whose leaves all have its shape: the expression evaluated at the view's
        window, its leaves read through the same window (_Window variables). Else None."""
        alias = windows.get(atom)
        if alias is None or not alias.viewed:
            return None
        root = alias.root
        p = producer.get(root)
        if p is None or p.raw_expr is None or p.uniform or root not in p.eqn.outs or \
                root in self.hints or p.depth >= MAX_FUSED_DEPTH:
            return None
        nodes = list(_nodes(p.raw_expr))
        if len(nodes) > MAX_INLINED_NODES:
            return None
        for node in nodes:
            if node.op == "literal" or (node.op == "input" and node.aval.size == 1):
                continue       # (a scalar reads the same element everywhere)
            if alias.window_of(node.aval.shape, atom.aval.shape) is None or \
                    (node.op != "input" and not _pure_elementwise(node.op)):
                return None
            if node.op == "input" and _permuted(producer.get(node.params["var"])):
                return None    # (a window of a transposed view is no window of its storage)

        def window(node, args):
            if node.op == "literal" or (node.op == "input" and node.aval.size == 1):
                return node    # (a scalar reads the same element everywhere: it may have no window)
            offset, shape = alias.window_of(node.aval.shape, atom.aval.shape)
            aval = ShapedArray(shape, node.aval.dtype)
            if node.op == "input":
                key = (node.params["var"], offset, aval)
                if key not in self.window_vars:      # one leaf per window, however often it is read
                    self.window_vars[key] = _Window(node.params["var"], offset, aval)
                return Expr("input", (), {"var": self.window_vars[key]}, aval)
            return Expr(node.op, tuple(args), node.params, aval)
        p.inlined += 1
        return p, fold_expr(p.raw_expr, window)

    def _absorb_inlined(self, items, uses, windows):
        """An item whose result is read only by consumers that recompute it (_inline_window) runs no op."""
        reads: dict = {}         # root Var -> reads of it and its aliases, by anything but an alias
        alias_reads: dict = {}
        for var, alias in windows.items():
            reads[alias.root] = reads.get(alias.root, 0) + uses.get(var, 0)
            alias_reads[alias.root] = alias_reads.get(alias.root, 0) + 1
        for it in items:
            if it.inlined and not it.absorbed and len(it.eqn.outs) == 1:
                out = it.eqn.outs[0]
                if uses.get(out, 0) + reads.get(out, 0) - alias_reads.get(out, 0) == it.inlined:
                    it.absorbed = True
                    self.stats["fused_eqns"] += 1

    def _fold_k_parts(self, items, producer, uses):
        """A matmul whose left operand is a concatenation along its last axis (the depth) that nothing else
        reads, computed in this segment (concat.py's `[A1 | A2] @ [B1 ; B2]`), reads the parts in place: they
        become its left operands (plan.K_PARTS), the concatenation runs no op, no wave, no barrier and
        copies nothing. When the backend's lowering chain has the "k_parts" rule for matmul."""
        if not self.k_parts:
            return
        for it in items:
            a = it.eqn.inputs[0] if it.eqn.primitive is matmul_p and not it.uniform else None
            cat = producer.get(a) if isinstance(a, Var) else None
            if cat is None or cat.eqn.primitive is not concatenate_p or cat.eqn.outs[0] is not a or cat.uniform \
                    or cat.view or cat.absorbed or cat.eqn.params["axis"] != a.aval.ndim - 1 or uses.get(a) != 1 \
                    or a in self.hints or not all(isinstance(p, Var) for p in cat.eqn.inputs):
                continue
            cat.absorbed = True
            it.k_parts = list(cat.eqn.inputs)
            it.deps = (it.deps | cat.deps) - {cat}
            self.stats["k_parts"] += 1

    def _fold_row_gathers(self, items, producer, segment, jaxpr):
        """A take of whole rows `E[idx]` (E [V, D], idx [M] integers in a buffer, along axis 0) computed in this
        segment and read only by matmuls of this segment as their left operand becomes a gathered-row view of E
        in each of them (plan.Value.rows, plan.ROW_INDEX: the tile loaders read row m of A at
        E[clamp(idx[m], 0, V - 1)], as the primitive clamps): the take runs no op, no wave and no barrier, and
        the matmuls read E and idx (all of both, for the barriers). When the backend's lowering chain has the
        "row_gather" rule for matmul; outside recursive functions; E a buffer no view reads at run time."""
        if not self.row_gathers or self.frame is not None:
            return
        items_of = {id(it.eqn): it for it in items}
        for take in items:
            eqn = take.eqn
            if eqn.primitive is not take_p or take.uniform or take.view or take.absorbed or eqn.params["axis"] != 0:
                continue
            (table, index), out = eqn.inputs, eqn.outs[0]
            if table.aval.ndim != 2 or index.aval.ndim != 1 or not isinstance(index, Var) or \
                    self._is_uniform_atom(index, producer) or not self._viewable_source(table, producer):
                continue
            readers = self._row_gather_readers(out, items_of, segment, jaxpr)
            if not readers:
                continue
            take.absorbed = True
            for it in readers:
                it.row_gather = take
                it.deps = (it.deps | take.deps) - {take}
            self.stats["row_gathers"] += 1

    def _row_gather_readers(self, out, items_of, segment, jaxpr) -> list:
        """The matmul items that read `out`, a take's result, as their left operand, when nothing else reads it
        (no reshape or view of it, no result, no storage hint, no reader in another segment); else []."""
        if out in self.hints or any(a is out for a in jaxpr.outs) or _alias_closure(jaxpr, out) != {out} or \
                not self._read_by_segment_ops(out, segment, jaxpr):
            return []
        readers = []
        for eqn in jaxpr.eqns:
            if not any(a is out for a in eqn.inputs):
                continue
            it = items_of.get(id(eqn))
            if it is None or eqn.primitive is not matmul_p or it.uniform or it.k_parts is not None or \
                    eqn.inputs[0] is not out or eqn.inputs[1] is out:
                return []
            readers.append(it)
        return readers

    def _fold_epilogues(self, items, producer, uses, reshaped, jaxpr):
        """Fold an elementwise chain into the matmul / conv2d whose result it reads as an epilogue, when the
        chain is that result's only reader and reads it at the element it writes (the same shape and dtype
        as the result, or a reshape of it that only drops leading unit dimensions: `_epilogue_path`), the
        result need not exist in memory (no loop carry, branch or program result), and the backend's
        lowering chain has an "epilogue" rule for the contraction's kind; not when the chain could write a
        loop carry (or branch result) in place that the contraction reads (`h = tanh(h W + b)`): folded, it
        could not, and a copy behind a barrier of its own would replace the one saved. The chain's item then
        stands for both (`contraction`): one op, one wave, no barrier between them, no intermediate
        buffer."""
        if not self.epilogues:
            return
        for it in items:
            if it.absorbed or it.uniform or it.raw_expr is None:
                continue
            for leaf in it.leaves:
                c = producer.get(leaf)
                if c is not None and self._takes_epilogue(c, leaf, it, uses, reshaped) and \
                        not self._reads_own_target(c, it, jaxpr) and not _read_elsewhere(leaf, it, items):
                    c.absorbed = True
                    it.contraction = c
                    it.result = leaf
                    it.deps = (it.deps | c.deps) - {c}
                    it.leaves = [a for a in it.leaves if a is not leaf]
                    self.stats["epilogues"] += 1
                    break

    def _fuse_rows(self, items, order, producer, uses, reshaped, windows):
        """Each row chain (rows.py: reductions over the last axis and the elementwise steps on the same rows
        that read them), and each cell chain (connected elementwise items of one shape) when `cells`,
        becomes one item of kind ROWS in place of its members, when the backend has a uTask rule for it:
        one op, one wave, its intermediates on chip. Its readers wait for it instead of the members; only
        the members read outside the chain get storage (`row_output`)."""
        if not self.row_chains:
            return
        # (Where owner.py lays out matmul -> elementwise chains by columns, a cell chain joins the layout in
        # chunks of its row shape: plan.row_chunk.)
        for chain in find_row_chains(items, producer, reshaped, windows, uses, ROW_SLOTS * self.block,
                                     cells=self.cell_chains):
            if self.parts and math.prod(chain.row_shape[:-1]) % self.parts:
                continue         # (a partition's elements are no whole rows: the members keep their splits)
            head = chain.members[-1]
            leaves: list = []
            steps = numbered_steps(chain.steps, leaves)
            members = set(chain.members)
            item = _Item(head.eqn, False, index=head.index, leaves=leaves, rows=rows_params(chain, steps),
                         row_outputs=[m.eqn.outs[0] for m in chain.outputs])
            item.row_owners = [m for m in chain.outputs[:-1]] + [item]
            item.deps = set().union(*(m.deps for m in chain.members)) - members
            for m in chain.members:
                m.absorbed = True
                m.row_output = m in chain.outputs and m is not head
            for it in items:
                if it.deps & members:
                    it.deps = (it.deps - members) | {item}
            items.insert(items.index(head) + 1, item)
            order[order.index(head)] = item          # it allocates the head's result (and its alias)
            self.stats["cell_chains" if all(s.reduce is None for s in steps) else "row_chains"] += 1
            self.stats["fused_eqns"] += len(chain.members) - 1

    def _takes_epilogue(self, c, result, it, uses, reshaped) -> bool:
        """May contraction item `c`, whose result `result` chain item `it` reads, run `it` as its epilogue?"""
        kind = c.eqn.primitive
        if kind.family not in (CONTRACTION, CONVOLUTION) or c.uniform or c.absorbed or c.raw_expr is not None:
            return False
        if result.aval != it.eqn.outs[0].aval:
            return False
        path = _epilogue_path(result, c.eqn.outs, reshaped, uses)
        if path is None or any(v in self.hints for v in path):
            return False
        reads = sum(1 for node in _input_nodes(it.raw_expr) if node.params["var"] is result)
        return uses.get(result, 0) == reads and has_lowering(kind.name, self.epilogues, "epilogue")

    def _reads_own_target(self, c, it, jaxpr) -> bool:
        """Does contraction item `c` read the carry (or operand) that `it` may write in place (self.hints)?"""
        hint = self.hints.get(it.eqn.outs[0])
        if hint is None or hint[1] is None:
            return False
        names = _closure_of_all(jaxpr, hint[1])
        return any(_base_of(a) in names for a in _own_operands(c))

    @staticmethod
    def _level(items):
        """Waves: a global op runs one wave after its global producers and after the uniforms it reads;
        a uniform op (level L) runs right after wave L (the -1 level: before any wave). Levelled producers
        first (_producers_first: a fused op stands where its last member did, after readers of the others)."""
        items = _producers_first(items)
        for it in items:
            if it.uniform or it.view:
                it.level = max([-1] + [d.level for d in it.deps])
            else:
                it.level = max([0] + [d.level + 1 for d in it.deps])
        for it in reversed(items):      # (a view's readers follow it)
            for d in it.deps:
                if d.view:
                    d.read_level = max(d.read_level, it.read_level if it.view else it.level)
                    d.read_by_uniform |= it.uniform or it.read_by_uniform

    def _choose_aliases(self, items, jaxpr):
        """Let an op write straight into a loop carry or a branch/function result when that is safe. The
        result may be a reshape of the op's output (RAE's leaf `reshape(x[node], (H,))`): the op then
        writes the result's storage under its own shape, and the reshape reads it there, no copy."""
        for it in items:
            if it.uniform or it.view:
                continue
            for owner, out in _stored_results(it):
                self._choose_alias(it, owner, out, items, jaxpr)

    def _choose_alias(self, it, owner, out, items, jaxpr):
        """`owner.alias` for result `out` of item `it` (the item itself, or for a ROWS op the member whose
        result it stores, see _Item.row_owners): its hinted storage when that is safe."""
        hinted = self._hinted_result(out, jaxpr)
        if hinted is not None:
            target, binders = self.hints[hinted]
            in_target = Value(target.storage, out.aval, target.frame_offset, target.offset)
            if binders is None:           # a fresh result buffer nobody else reads
                owner.alias = in_target
            elif self._overwrite_safe(it, binders, hinted, items, jaxpr) and target.aval == hinted.aval:
                owner.alias = in_target

    def _overwrite_safe(self, it, binders, hinted, items, jaxpr) -> bool:
        """May item `it` overwrite the storage of `binders` (a loop carry, a branch operand) with `hinted`:
        does no reader of the binders see the overwrite?"""
        names = _closure_of_all(jaxpr, binders)     # the binders and their reshapes share storage
        readers_ok = not any(a in names for a in jaxpr.outs if a is not hinted)
        for later_index, eqn in enumerate(jaxpr.eqns):
            if later_index > it.index and any(a in names for a in eqn.inputs):
                readers_ok = False       # read after the overwrite
        for other in items:
            read_level = other.read_level if other.view else other.level    # (a view: where it is read)
            if other is not it and any(a in names for a in _reads(other)) and \
                    (read_level >= it.level or other.uniform or other.read_by_uniform):
                readers_ok = False       # read concurrently with or after the overwrite (every vEU
                #                          reads for a uniform op, with no barrier before the next wave)
        if any(a in names for a in _reads(it)) and not _same_index_read(it, binders, names):
            readers_ok = False
        views_of_carry = names - _closure_of_all(jaxpr, binders, views=False)
        windows_read = {_base_of(a) for a in it.leaves if isinstance(a, _Window)}
        if any(a in views_of_carry or a in names and a in windows_read for a in _reads(it)):
            readers_ok = False       # it reads the carry through a view: at other elements than it writes
        return readers_ok

    def _hinted_result(self, out, jaxpr):
        """The variable with a storage hint (self.hints) that an item computes as `out`: `out` itself, or
        else the one reshape (or chain of reshapes) of it that has a hint (a reshape shares its operand's
        storage, so writing the operand there writes the result); None when there is none. Two hinted
        reshapes of one output would want two storages: the output then takes neither."""
        if out in self.hints:
            return out
        hinted = [v for v in _alias_closure(jaxpr, out, views=False) if v in self.hints]
        return hinted[0] if len(hinted) == 1 else None

    def _fold_window_stores(self, items, producer, windows, jaxpr) -> list:
        """Fold each in-place dynamic_update_slice `x.at[..., t, ...].set(u)` whose update `u` a contraction
        (matmul / conv2d, with or without an epilogue) computes and nothing else reads into that contraction:
        its uTasks store `u` straight into x's window (plan.StoreWindow, at the clamped uniform starts), the
        update runs no op, no wave and no barrier. Likewise into a reduction (argmax, reduce_sum, ...) that
        computes `u`; when other readers still read its result (greedy decoding's token is the next step's
        carry and written into the sequence of tokens: `tokens.at[step].set(argmax(logits))`), the reduction
        stores it into its own output as well (`keeps_result`, plan.WINDOW_COPY). When the backend's chain
        (`window_stores`) has "epilogue" rules for dynamic_update_slice and the producer's kind (the
        C-family renderer's say how a GEMM tile and a reduction store). The update must write x's storage in
        place (_choose_aliases), and the contraction now overwrites it earlier, at its own level: every other
        reader of x's old value must have read it in an earlier wave (a contraction reading x itself reads
        whole rows of it, so it never folds), and the window's starts must be known before its wave. The
        levels stay as they were (re-levelled, an op could move into the wave of a reader of what it
        overwrites in place, which _choose_aliases allowed only at the levels it saw). Returns the items left."""
        if not self.window_stores or self.frame is not None or \
                not has_lowering(dynamic_update_slice_p.name, self.window_stores, "epilogue"):
            return items
        folded = []
        for update in items:
            found = self._window_store_producer(update, items, producer, windows, jaxpr)
            if found is None:
                continue
            c, c.keeps_result = found
            c.stores_into = update
            folded.append(update)
            for it in items:
                if update in it.deps:
                    it.deps = (it.deps - {update}) | {c}
            self.stats["window_stores"] += 1
        return [it for it in items if it not in folded]

    def _window_store_producer(self, update, items, producer, windows, jaxpr):
        """(The item of the contraction or reduction that may store the update of dynamic_update_slice item
        `update` into its window, whether it must keep its own result too) (see _fold_window_stores), or
        None."""
        eqn = update.eqn
        if eqn.primitive is not dynamic_update_slice_p or update.alias is None or update.uniform or update.view:
            return None
        x, u, starts = eqn.inputs[0], eqn.inputs[1], eqn.inputs[2:]
        # In place: the update's result is x's whole storage, x a buffer of this frame from before the segment.
        if not isinstance(x, Var) or x in producer or x not in self.env:
            return None
        old = self.env[x]
        if not _whole_buffer(old, x.aval) or update.alias.storage is not old.storage or \
                update.alias.offset or update.alias.frame_offset or update.alias.dynamic:
            return None
        # u is all of a contraction's result (through reshapes and whole views) that nothing else reads.
        alias = windows.get(u)
        root = u if alias is None else alias.root
        if alias is not None and (alias.offset or root.aval.size != u.aval.size):
            return None
        c = producer.get(root)
        if c is None or c.absorbed or c.uniform or c.stores_into is not None or \
                c.eqn.outs[0] is not root or c.rows is not None:
            return None
        kind = c.contraction.eqn.primitive if c.contraction is not None else c.eqn.primitive
        if not has_lowering(kind.name, self.window_stores, "epilogue"):
            return None
        only_the_update = _only_the_update_reads(jaxpr, root, eqn) and \
            not any(v in self.hints for v in _alias_closure(jaxpr, root))
        if kind.family in (CONTRACTION, CONVOLUTION):
            if c.alias is not None or (c.contraction is None and c.raw_expr is not None) or not only_the_update:
                return None
            keeps_result = False
        elif kind.family == REDUCE and c.raw_expr is None and len(c.eqn.outs) == 1:
            if c.alias is not None and c.alias.storage is old.storage:
                return None          # (its own result in x's storage: the window would overwrite it)
            keeps_result = c.alias is not None or not only_the_update
        else:
            return None
        if eqn.params["mode"] == "drop" and any(
                isinstance(s, Lit) and not 0 <= int(s.val.reshape(-1)[0]) <= n - k
                for s, n, k in zip(starts, x.aval.shape, u.aval.shape)):
            return None                  # (dropped for certain: the update writes nothing)
        for s in starts:                 # every start a literal or a uniform known before c's wave
            if isinstance(s, Lit):
                continue
            p = producer.get(s)
            if (p is None and not (s in self.env and self.env[s].is_uniform)) or \
                    (p is not None and not (p.uniform and p.level < c.level)):
                return None
        # x's old value: read by nothing else at or after c's level (the update's own check saw its level).
        hinted = self._hinted_result(update.eqn.outs[0], jaxpr)
        binders = self.hints[hinted][1] if hinted is not None else None
        if binders is None:
            return None
        names = _closure_of_all(jaxpr, binders)
        for other in items:
            read_level = other.read_level if other.view else other.level
            if other is not update and any(a in names for a in _reads(other)) and \
                    (read_level >= c.level or other.uniform or other.read_by_uniform):
                return None
        return c, keeps_result

    def _window_value(self, update, aval) -> Value:
        """Where the contraction folded into dynamic_update_slice item `update` stores its result (of type
        `aval`): x's storage from the window's start on, through a StoreWindow of the update's shape; the
        starts clamped into x as the primitive does (mode="clip"), or, mode="drop", a start out of range
        storing nothing. A literal start folds into the static offset."""
        eqn = update.eqn
        x, u, starts = eqn.inputs[0], eqn.inputs[1], eqn.inputs[2:]
        old = self.read(x)
        drop = eqn.params["mode"] == "drop"
        strides = [math.prod(x.aval.shape[d + 1:]) for d in range(x.aval.ndim)]
        offset, terms = old.offset, []
        for start, n, k, stride in zip(starts, x.aval.shape, u.aval.shape, strides):
            if isinstance(start, Lit):
                offset += stride * min(max(int(start.val.reshape(-1)[0]), 0), n - k)
            elif n != k or drop:         # (a start on a whole axis clamps to 0, or drops the store if not 0)
                terms.append(OffsetTerm(self.read(start), stride, n - k))
        window = StoreWindow(tuple(u.aval.shape), tuple(x.aval.shape), drop and bool(terms))
        return Value(old.storage, aval, old.frame_offset, offset, tuple(terms), window=window)

    def _emit(self, items):
        if not items:            # a segment of reshapes only: aliases, no work
            return []
        layouts = self._column_layouts(items)
        splits = self._k_splits(items, layouts)
        self._make_room_for_sums(items, splits)
        by_level: dict = {}
        for it in items:
            by_level.setdefault((it.level, it.uniform), []).append(it)
        top = max([it.level for it in items] + [it.level + 1 for it in splits])
        read_until = _read_until(items)
        waves: dict = {}
        placed: dict = {}        # Op -> its Task, for the ops of this segment placed so far
        sums: dict = {}          # wave level -> [(sum op, its GEMM's item)] (split-K)
        wave_reads: dict = {}    # wave level -> the last wave level after which its ops' results are read
        for level in range(0, top + 1):
            globals_ = by_level.get((level, False), [])
            if globals_:
                grids = self._wave_grids([it for it in globals_ if it not in layouts])
                ops = [self._make_op(it, grids.get(it), layouts.get(it), splits.get(it, 1)) for it in globals_]
                waves[level] = Wave(tuple(self._place(ops, placed, [layouts.get(it) for it in globals_])))
                placed.update((task.op, task) for task in waves[level].tasks)
                for it, op in zip(globals_, ops):
                    if it in splits:         # (the sum reads the partial products in the next wave)
                        sums.setdefault(level + 1, []).append((self._sum_op(it, op), it))
                wave_reads[level] = [level + 1 if it in splits else read_until.get(it, -2) for it in globals_]
            elif level in sums:          # (a level of its own: _make_room_for_sums)
                waves[level] = Wave(tuple(self._place([op for op, _ in sums[level]], placed)))
                placed.update((task.op, task) for task in waves[level].tasks)
                wave_reads[level] = [read_until.get(it, -2) for _, it in sums[level]]
        uniform_reads = {level: [self.read(a) for it in by_level.get((level, True), []) for a in it.eqn.inputs]
                         for level in range(-1, top + 1)}
        self.hazards.start(waves.values())
        stmts = []
        # The last wave level after which a reader of something written since the last grid barrier runs.
        unsynced_read_until = -2
        for level in range(-1, top + 1):
            if level in waves:
                stmts.append(waves[level])
                self.stats["waves"] += 1
                self.hazards.record(waves[level])
                unsynced_read_until = max([unsynced_read_until] + wave_reads[level])
                # (Every wave but the first reads a result of the wave before it, so a barrier precedes it,
                # and _sync_scope checks it against everything since the last grid barrier.)
                if level == top or unsynced_read_until >= level:
                    scope = self._sync_scope(level, top, waves.get(level + 1), uniform_reads)
                    self.stats[f"{scope}_syncs"] += 1
                    stmts.append(Sync(scope))
                    if scope == "grid":
                        unsynced_read_until = -2
                        self.hazards.clear()
            if by_level.get((level, True)):
                ops = tuple(self._make_uniform(it) for it in by_level[level, True])
                self.stats["uniform_ops"] += len(ops)
                stmts.append(Uniforms(ops))
        return stmts + self._after_uniform_reads(stmts)

    def _k_splits(self, items, layouts) -> dict:
        """Split-K (splitk.py): item -> S (> 1) for each GEMM of the segment that runs as S partial products and
        a sum, as utasks.k_splits decides for the vEUs it gets in its wave (_wave_grids). Not in partitioned
        loops, column layouts (owner.py) or recursive functions' frames, nor for a GEMM that stores into a
        window (plan.StoreWindow: the sum would have to)."""
        if not self.split_k or self.parts or self.frame is not None:
            return {}
        waves: dict = {}
        for it in items:
            if not it.uniform and not it.view and it not in layouts:
                waves.setdefault(it.level, []).append(it)
        found = {}
        for wave in waves.values():
            grids = self._wave_grids(wave)
            for it in wave:
                kind, atoms = self._kind_and_inputs(it)
                if it.stores_into is not None or it.rows is not None or kind not in utasks.GEMM_KINDS:
                    continue
                splits = utasks.k_splits(kind, [a.aval for a in atoms], self._out_avals(it)[0], self._params(it),
                                         grids.get(it) or self.grid, self.block)
                if splits > 1:
                    found[it] = splits
        return found

    def _make_room_for_sums(self, items, splits):
        """A wave level of its own after each level with a split GEMM, for the sums (splitk.shifted_levels: the
        order of every other wave stays); the uniform ops of such a level run after its sums (they may read
        them)."""
        if not splits:
            return
        split_levels = {it.level for it in splits}
        shifted = splitk.shifted_levels([it.level for it in items], split_levels)
        for it in items:
            after_sums = (it.uniform or it.view) and it.level in split_levels
            it.level = shifted[it.level] + after_sums

    def _sum_op(self, it, partial) -> Op:
        """The sum of split GEMM `it`'s partial products (`partial`'s output, splitk.py): a fused op over the
        slices and the epilogue's operands, writing the GEMM's output."""
        splits = partial.params[K_SPLITS]
        outs = self._op_outputs(it)
        epilogue = it.expr if it.contraction is not None else None
        first = len(_own_operands(it.contraction)) if it.contraction is not None else 0
        operands = it.leaves if it.contraction is not None else []
        inputs = tuple(splitk.slices(partial.outputs[0], outs[0].aval, splits)) + \
            tuple(self.read(a) for a in operands)
        expr = splitk.sum_expr(epilogue, splits, first, outs[0].aval)
        count, params, cost = self._split(FUSED.name, [x.aval for x in inputs], [v.aval for v in outs], {})
        label = "sum" if epilogue is None else f"sum_{_expr_label(epilogue)}"
        self.stats["ops"] += 1
        self.stats["k_splits"] = self.stats.get("k_splits", 0) + 1
        return Op(f"op{next(self.op_names)}_{label}", FUSED.name, inputs, tuple(outs), params, count, cost, expr)

    def _after_uniform_reads(self, stmts) -> list:
        """Every vEU reads a buffer when it evaluates a uniform op on it; before anything may overwrite that
        buffer (the next loop iteration, say) all vEUs must be done: a grid barrier, unless one follows
        the reads already. The barrier is recorded with the buffers read (self.read_barriers): run() drops
        it when nothing can write them afterwards (_idle_read_barriers)."""
        read: set = set()
        for stmt in stmts:
            if isinstance(stmt, Sync) and stmt.scope == "grid":
                read = set()
            elif isinstance(stmt, Uniforms):
                read |= {v.storage for u in stmt.ops for v in u.inputs if _writable(v)}
            elif isinstance(stmt, Assign) and _writable(stmt.src):
                read.add(stmt.src.storage)
        if not read:
            return []
        self.stats["grid_syncs"] += 1
        sync = Sync("grid")
        self.read_barriers[sync] = read
        return [sync]

    def _sync_scope(self, level, top, next_wave, uniform_reads) -> str:
        """The barrier after wave `level`: "block" (vEU-local) when no vEU of the next wave touches what another
        vEU wrote, or overwrites what another read, since the last grid barrier (hazards.py), and no uniform op
        after this wave reads anything written since then (every vEU reads for it). The last wave of a
        segment ends in a grid barrier: what runs after it may sit on any vEU. In a partitioned loop every
        vEU keeps to its partition: always "block"."""
        if self.parts:
            return "block"
        if level == top or next_wave is None:
            return "grid"
        later_reads = [v for lv in range(level, top + 1) for v in uniform_reads.get(lv, ())]
        if self.hazards.written(later_reads) or not self.hazards.local(next_wave):
            return "grid"
        return "block"

    def _wave_grids(self, items) -> dict:
        """The vEUs each GEMM of a crowded wave (more uTasks than vEUs) can count on: its share of the grid
        by estimated work. Split for the whole grid, each GEMM of a wave of twenty would take the smallest
        tile and run twenty rounds of it; split for its share it takes the largest tile that still fills the
        share, and the wave runs about one round of tiles with less traffic per flop. GEMV-shaped matmuls
        (a few rows) keep their split: their uTasks are latency-bound, smaller is faster there."""
        gemms = [it for it in items if self._is_gemm(it)]
        if self.parts or len(gemms) < 2:
            return {}
        splits = {it: self._natural_split(it) for it in items}
        if sum(count for count, _ in splits.values()) <= self.grid:
            return {}
        total = sum(count * cost for count, cost in splits.values())
        return {it: max(1, int(self.grid * splits[it][0] * splits[it][1] / total)) for it in gemms}

    def _is_gemm(self, it) -> bool:
        """A matmul or convolution with more rows than a GEMV."""
        kind, ins = self._kind_and_inputs(it)
        rows = utasks.gemm_dims(kind, [a.aval for a in ins], self._out_avals(it)[0], self._params(it))[1] \
            if kind in utasks.GEMM_KINDS else 0
        return not it.uniform and rows > utasks.GEMV_ROWS

    def _natural_split(self, it) -> tuple[int, float]:
        kind, ins = self._kind_and_inputs(it)
        count, _, cost = utasks.split(kind, [a.aval for a in ins], self._out_avals(it), self._params(it),
                                      self.grid, self.block, self.thin_gemv, self._gather_tiny)
        return count, cost

    def _n_utasks(self, it) -> int:
        kind, ins = self._kind_and_inputs(it)
        return utasks.split(kind, [a.aval for a in ins], self._out_avals(it), self._params(it),
                            self.grid, self.block, self.thin_gemv, self._gather_tiny)[0]

    @staticmethod
    def _params(it) -> dict:
        """The params of the op of `it` that its split and cost depend on: a ROWS op's, else its primitive's,
        with the depths of a left operand read in parts (plan.K_PARTS)."""
        if it.rows is not None:
            return it.rows
        c = it.contraction or it
        if c.row_gather is not None:        # (the indices are the input after B)
            return dict(c.eqn.params, **{ROW_INDEX: 2})
        if c.k_parts is None:
            return c.eqn.params
        return dict(c.eqn.params, **{K_PARTS: tuple(p.aval.shape[-1] for p in c.k_parts)})

    @staticmethod
    def _out_avals(it) -> list:
        """The types of the op's outputs: a contraction's own, under an epilogue (see _op_outputs)."""
        if it.rows is not None:
            return [v.aval for v in it.row_outputs]
        return [v.aval for v in (it.contraction.eqn.outs if it.contraction is not None else it.eqn.outs)]

    def _op_outputs(self, it) -> list[Value]:
        """Where the op of `it` writes: its outputs' storage. An epilogue read through a reshape of the
        contraction's result (_epilogue_path) writes its storage under the contraction's shape, which
        the GEMM's tiles index. A reduction that stores its result into a window as well has that window
        last (plan.WINDOW_COPY)."""
        values = [self.env[v] for v in (it.row_outputs if it.rows is not None else it.eqn.outs)]
        outs = [value if value.aval == aval else dataclasses.replace(value, aval=aval)
                for value, aval in zip(values, self._out_avals(it))]
        return outs + ([it.window_copy] if it.window_copy is not None else [])

    def _kind_and_inputs(self, it):
        if it.contraction is not None:       # a contraction with an epilogue: its operands, then the epilogue's
            return it.contraction.eqn.primitive.name, _own_operands(it.contraction) + it.leaves
        if it.rows is not None:
            return ROWS.name, it.leaves
        if it.expr is not None:
            return FUSED.name, it.leaves
        return it.eqn.primitive.name, _own_operands(it)

    # ---------------------------------------------------------------------------------------- ops
    def _column_layouts(self, items) -> dict:
        """_Item -> Layout for the matmul -> elementwise chains of a loop body's segment (owner.py),
        when the scheduler was asked for them."""
        if not self.owner or not self.loop_depth or self.parts:
            return {}
        nodes = []
        for it in items:
            if it.uniform or (it.rows is None and len(it.eqn.outs) != 1):
                continue
            kind, atoms = self._kind_and_inputs(it)
            first, *more = self._op_outputs(it)
            params = {k: v for k, v in self._params(it).items() if it.rows is not None or k in (K_PARTS, ROW_INDEX)}
            nodes.append(Node(it, kind, tuple(self.read(a) for a in atoms), first, params, tuple(more)))
        chain = self.row_blocks
        layouts = column_layouts(nodes, self.grid, self.block, self.resident_bytes,
                                 row_blocks=(lambda kind: has_lowering(kind, chain, "row_block")) if chain else None)
        chains = len({(layout.first, layout.count) for layout in layouts.values()})     # (one vEU range a chain)
        self.stats["owner_chains"] = max(self.stats.get("owner_chains", 0), chains)
        return layouts

    def _make_op(self, it: _Item, grid: int | None = None, layout: Layout | None = None, k_splits: int = 1) -> Op:
        if k_splits > 1:
            return self._partial_op(it, grid, k_splits)
        eqn = it.eqn
        kind, atoms = self._kind_and_inputs(it)
        inputs = tuple(self.read(a) for a in atoms)
        params = dict(self._params(it))
        label = _expr_label(it.expr) if it.expr is not None else kind
        if it.contraction is not None:
            params = dict(self._params(it), **{EPILOGUE: it.expr})
            label = f"{kind}_{label}"
        elif it.rows is not None:
            params = dict(it.rows)
            label = _rows_label(params)
        outs = self._op_outputs(it)
        if it.window_copy is not None:
            params[WINDOW_COPY] = True
        if eqn.primitive is dynamic_update_slice_p and it.alias is not None and inputs[0].storage is it.alias.storage:
            params["in_place"] = True
        if layout is not None:
            count, split_params, cost = utasks.column_split(kind, [x.aval for x in inputs], [v.aval for v in outs],
                                                            layout.tile_n, self.block, params=params,
                                                            row_block=layout.row_block)
        else:
            count, split_params, cost = self._split(kind, [x.aval for x in inputs], [v.aval for v in outs],
                                                    params, grid)
        params.update(split_params)
        expr = it.expr if it.contraction is None else None
        op = Op(f"op{next(self.op_names)}_{label}", kind, inputs, tuple(outs), params, count, cost, expr)
        it.op = op
        self.stats["ops"] += 1
        return op

    def _partial_op(self, it: _Item, grid: int | None, splits: int) -> Op:
        """The partial products of split GEMM `it` (splitk.py): its kind and own operands, no epilogue, into a
        new temp of (splits, *out_shape); _sum_op adds them up."""
        c = it.contraction or it
        kind = c.eqn.primitive.name
        inputs = tuple(self.read(a) for a in _own_operands(c))
        aval = splitk.partial_aval(self._out_avals(it)[0], splits)
        partials = Value(self._buffer(aval), aval)
        params = dict(self._params(it), **{K_SPLITS: splits})
        count, split_params, cost = self._split(kind, [x.aval for x in inputs], [aval], params, grid)
        params.update(split_params)
        self.stats["ops"] += 1
        return Op(f"op{next(self.op_names)}_{kind}_k{splits}", kind, inputs, (partials,), params, count, cost)

    def _split(self, kind, in_avals, out_avals, params, grid=None):
        """The split of an op; `grid`: the vEUs it may count on when fewer than the whole grid."""
        if self.parts:
            return utasks.partition_split(kind, in_avals, out_avals, params, self.parts)
        return utasks.split(kind, in_avals, out_avals, params, grid or self.grid, self.block, self.thin_gemv,
                            self._gather_tiny)

    @property
    def _gather_tiny(self) -> bool:
        """May a tiny batched GEMV be one gathered uTask here (utasks.tiny_gathered_gemv): outside loop bodies,
        where no owner layout places chains of small ops."""
        return not self.loop_depth

    def _make_uniform(self, it: _Item) -> UniformOp:
        eqn = it.eqn
        return UniformOp(eqn.primitive.name, tuple(self.read(a) for a in eqn.inputs), self.env[eqn.outs[0]],
                         dict(eqn.params))

    def _place(self, ops, placed=None, layouts=None) -> list[Task]:
        """vEU ranges for the ops of one wave: an op in a column layout (owner.py) on the layout's vEUs; the
        others on their producers' vEUs when each has such a home (_homes) and that costs less than the
        grid barrier it can save, else one vEU per uTask when they fit, else shares by cost. In a
        partitioned loop every op has uTask p on vEU p mod grid."""
        if self.parts:
            return [Task(op, 0, min(op.n_utasks, self.grid)) for op in ops]
        if layouts and any(layouts):
            free = [op for op, layout in zip(ops, layouts) if layout is None]
            spread = iter(self._place(free, placed) if free else [])
            return [Task(op, layout.first, layout.count) if layout is not None else next(spread)
                    for op, layout in zip(ops, layouts)]
        spread = self._shares(ops)
        if self.balance:
            spread = self._balanced(spread)
        homes = self._homes(ops, placed or {})
        if homes is not None:
            at_home = [Task(self._with_chunk(op, producer), producer_task.first, producer_task.count)
                       for op, (producer, producer_task) in zip(ops, homes)]
            if wave_ns(at_home) <= wave_ns(spread) + BARRIER_NS - LOCAL_SYNC_NS:
                return at_home
        return spread

    def _balanced(self, tasks) -> list[Task]:
        """The wave's tasks with their splits and shares chosen together (balance.py) when the cost model
        says that is faster."""
        options, current = [], []
        for task in tasks:
            op = task.op
            offered = utasks.split_options(op.kind, [x.aval for x in op.inputs], [v.aval for v in op.outputs],
                                           op.params, self.block, self.thin_gemv)
            index = next((i for i, (_, split, _) in enumerate(offered)
                          if all(op.params.get(key) == value for key, value in split.items())), None)
            if index is None or utasks.gathers_batch(op.params):
                # (a split with no alternatives, or a gathered batch, which split_options does not offer: at
                # least a round trip per uTask, as theirs)
                offered, index = [(op.n_utasks, {}, max(op.cost, utasks.ROUND_TRIP_NS))], 0
            elif op.n_utasks == 1:  # one vEU's work stays one vEU's: the barriers around it may be block syncs
                offered, index = [offered[index]], 0
            options.append(offered)
            current.append((index, task.count))
        choice = balance.balance([[(n, cost, 1 if _finer(split, task.op) else None) for n, split, cost in offered]
                                  for offered, task in zip(options, tasks)], self.grid, current)
        if choice is None:
            return tasks
        rebalanced, first = {}, 0
        for task, offered, (index, veus) in zip(tasks, options, choice):
            n, split, cost = offered[index]
            kept = {k: v for k, v in task.op.params.items() if k != utasks.K_CHUNK}   # (a split says if it has one)
            op = dataclasses.replace(task.op, params={**kept, **split}, n_utasks=n, cost=cost) if split else task.op
            rebalanced[task] = Task(op, first, veus)
            first += veus
        return [rebalanced.get(task, task) for task in tasks]

    def _with_chunk(self, op, producer):
        """`op` split in the chunks of `producer` (its home, _homes): the same uTasks over the same elements."""
        chunk = producer.params["chunk"]
        if op.params["chunk"] == chunk:
            return op
        return dataclasses.replace(op, params={**op.params, "chunk": chunk}, n_utasks=producer.n_utasks,
                                   cost=utasks.chunk_cost(chunk, len(op.inputs), self.block, _chunked_size(op)))

    def _shares(self, ops) -> list[Task]:
        """One vEU per uTask when they fit, else shares by cost."""
        total = sum(op.n_utasks for op in ops)
        if total <= self.grid:
            counts = [op.n_utasks for op in ops]
        else:
            work = [op.n_utasks * op.cost for op in ops]
            spare = self.grid - len(ops)
            counts = [1 + min(op.n_utasks - 1, int(spare * w / sum(work))) for op, w in zip(ops, work)]
        tasks, first = [], 0
        for op, count in zip(ops, counts):
            count = max(1, min(count, self.grid))
            if first + count > self.grid:
                first = 0  # more ops than vEUs: share from the start (they run one after another there)
            tasks.append(Task(op, first, count))
            first += count
        return tasks

    @staticmethod
    def _homes(ops, placed) -> list | None:
        """(first, count) per op of a wave, each the range of an op of an earlier wave of the segment whose
        result it reads and whose split it shares (the same uTasks over the same elements: an elementwise
        chain), the latest such wave first (an earlier one is more likely behind a grid barrier already),
        so that uTask t finds what it reads on its own vEU and the barrier before it can be vEU-local
        (hazards.py). None unless every op has a home. Ops with the same home run one after another."""
        def same_split(producer, op) -> bool:
            # (Chunks over the same number of elements: op can take producer's chunk, _with_chunk.)
            chunk = producer.params.get("chunk")
            if ROW_BLOCK in producer.params or ROW_BLOCK in op.params:
                return False         # (2-D chunks: a layout's own, owner.py)
            return chunk is not None and "chunk" in op.params and \
                producer.n_utasks == -(-_chunked_size(op) // chunk) and _chunked_size(producer) == _chunked_size(op)

        homes = []
        for op in ops:
            read = {v.storage for v in op.inputs}
            home = next(((producer, task) for producer, task in reversed(placed.items())
                         if producer.outputs[0].storage in read and same_split(producer, op)), None)
            if home is None:
                return None
            homes.append(home)
        return homes

    def _copy(self, dst: Value, src: Value) -> list:
        return self._copies([(dst, src)])

    def _copies(self, pairs) -> list:
        """Statements that copy each src into its dst at once: Assigns for uniforms, else copy Ops in one
        wave and a barrier. The sources must not be among the destinations (see _carry_update)."""
        stmts = [Assign(dst, src) for dst, src in pairs if dst.is_uniform]
        stmts += self._after_uniform_reads(stmts)
        ops = []
        for dst, src in pairs:
            if dst.is_uniform:
                continue
            count, params, cost = self._split(COPY.name, [src.aval], [dst.aval], {})
            ops.append(Op(f"op{next(self.op_names)}_{COPY.name}", COPY.name, (src,), (dst,), params, count, cost))
        if ops:
            scope = "block" if self.parts else "grid"
            self.stats["ops"] += len(ops)
            self.stats["waves"] += 1
            self.stats[f"{scope}_syncs"] += 1
            stmts += [Wave(tuple(self._place(ops))), Sync(scope)]
        return stmts

    def _as_uniform(self, value: Value):
        """A uniform copy of a 1-element value (device control), with the statements that load it."""
        if value.is_uniform or not self.uniforms_allowed:
            return [], value
        u = self._new_value(ShapedArray((), value.aval.dtype), True)
        self.stats["uniform_ops"] += 1
        stmts = [Uniforms((UniformOp(reshape_p.name, (value,), u, {"new_shape": ()}),))]
        return stmts + self._after_uniform_reads(stmts), u

    def _carry_storage(self, var) -> Value:
        """Storage for a loop carry, a branch result or a call result: the buffer the result is wanted in
        (a program output) when there is one, else a new uniform (scalars) or buffer."""
        hint = self.hints.get(var)
        if hint is not None and hint[1] is None and hint[0].aval == var.aval and not self._wants_uniform(var.aval):
            self.hints.pop(var)
            return hint[0]
        return self._new_value(var.aval, self._wants_uniform(var.aval))

    def _carry_update(self, carries, values) -> list:
        """carries[i] = values[i] for all i at once. A value that is itself one of the carries (a swap,
        or a carry passed on unchanged to another slot) goes through a temporary first."""
        pairs = [(c, v) for c, v in zip(carries, values)
                 if not (v.storage is c.storage and v.frame_offset == c.frame_offset and v.offset == c.offset)]
        targets = {id(c.storage) for c, _ in pairs}
        staged = []
        for c, v in pairs:
            if id(v.storage) in targets:
                tmp = self._new_value(v.aval, c.is_uniform)
                staged.append((tmp, v))
        stmts = self._copies(staged)
        lookup = {id(v): t for t, v in staged}
        return stmts + self._copies([(c, lookup.get(id(v), v)) for c, v in pairs])

    # ---------------------------------------------------------------------------------------- control
    def schedule_while(self, eqn):
        """A Loop whose carries live in storage of their own (updated in place where that is safe)."""
        p = eqn.params
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        ins = [self.read(a) for a in eqn.inputs]
        cond_consts, body_consts, inits = ins[:nc], ins[nc:nc + nb], ins[nc + nb:]
        carries = [self._carry_storage(v) for v in eqn.outs]
        cond_j, body_j = p["cond_jaxpr"], p["body_jaxpr"]
        outer_parts, parts = self.parts, self._loop_parts(cond_j, body_j, nb)
        # A partitioned loop's carries are copied in partition by partition, each on the vEU that runs it: a
        # block sync, not a grid barrier, before the loop, and a vEU starts as soon as its own are in.
        self.parts = parts if PARTITIONED_INITS else outer_parts
        stmts = self._copies(list(zip(carries, inits)))
        self.parts = parts
        self.env.update(zip(cond_j.in_binders, cond_consts + carries))
        cond_stmts = self.schedule_block(cond_j)
        load, pred = self._as_uniform(self.read(cond_j.outs[0]))
        cond_stmts += load
        body_binders = body_j.in_binders[nb:]
        self.env.update(zip(body_j.in_binders, body_consts + carries))
        for out, binder, carry in zip(body_j.outs, body_binders, carries):
            if isinstance(out, Var) and out is not binder and not carry.is_uniform:
                self.hints[out] = (carry, (binder,))
        self.loop_depth += 1
        body_stmts = self.schedule_block(body_j)
        self.loop_depth -= 1
        body_stmts += self._carry_update(carries, [self.read(out) for out in body_j.outs])
        for out in body_j.outs:
            self.hints.pop(out, None)
        self.env.update(zip(eqn.outs, carries))
        loop = [keep_resident(Loop(tuple(cond_stmts), pred, tuple(body_stmts), self.parts), self.resident_bytes,
                              self.resident_partitioned, self.resident_pad)]
        if self.parts:      # after the loop, readers may sit on any vEU
            self.stats["partitioned_loops"] += 1
            self.stats["grid_syncs"] += 1
            loop.append(Sync("grid"))
        self.parts = outer_parts
        return stmts + loop

    def _loop_parts(self, cond_j, body_j, n_body_consts) -> int:
        """The number of independent pipelines the loop body runs as (see partition.py), 0 for an
        ordinary loop."""
        if self.partition is False or not self.uniforms_allowed or self.frame is not None or self.parts:
            return 0
        P = partition.loop_partition(cond_j, body_j, n_body_consts, self._is_uniform)
        if P is None:
            return 0
        parts = math.prod(P)
        if self.partition is None and not partition.worth_it(body_j, parts, self.grid, self.block,
                                                             self._is_uniform):
            return 0
        return parts

    def schedule_cond(self, eqn):
        """A Branch on the (clamped) index; every branch writes the same result storage. A result that a
        branch forwards unchanged from a dead operand lives in that operand's storage (_forwarded_storage):
        that branch then runs nothing for it, and the others write it in place when that is safe."""
        jaxpr, index = self.site
        index_value = self.read(eqn.inputs[0])
        stmts, index_uniform = self._as_uniform(index_value)
        operands = [self.read(a) for a in eqn.inputs[1:]]
        results, in_place, donors = [], [], set()
        for k, out in enumerate(eqn.outs):
            forwarded = self._forwarded_storage(eqn, k, jaxpr, index, donors)
            if forwarded is None:
                in_callee = self._peeled_result(eqn, k)
                results.append(self._carry_storage(out) if in_callee is None else in_callee)
                continue
            self.hints.pop(out, None)
            donors.add(id(forwarded.storage))
            results.append(forwarded)
            in_place.append(forwarded)
        branches = []
        for branch in eqn.params["branches"]:
            self.env.update(zip(branch.in_binders, operands))
            for out, res in zip(branch.outs, results):
                if isinstance(out, Var) and not res.is_uniform and not any(out is b for b in branch.in_binders):
                    self.hints[out] = (res, _binders_in(branch, operands, res) or None)
            body = self.schedule_block(branch)
            body += self._carry_update(results, [self.read(out) for out in branch.outs])
            for out in branch.outs:
                self.hints.pop(out, None)
            branches.append(tuple(body))
        self.env.update(zip(eqn.outs, results))
        return stmts + [Branch(index_uniform, tuple(branches), tuple(in_place), eqn.params.get("peeled"))]

    def _peeled_result(self, eqn, k) -> Value | None:
        """Where result `k` of a call's base cases at its call site (a cond from peel.py) lives: in the
        callee's frame, where the call leaves it, when the caller may read the call's result there
        (_by_reference); the base branches then write it there, and the call runs as it would. None: in a
        storage of its own, as any branch result."""
        name, out = eqn.params.get("peeled"), eqn.outs[k]
        if name is None:
            return None
        result = self.fn_defs[name][2][k]
        if not self._by_reference(name, [out], [result])[0]:
            return None
        return Value(result.storage, result.aval, self._next_held_step(name))

    def _forwarded_storage(self, eqn, k, jaxpr, index, taken) -> Value | None:
        """The storage of an operand that result `k` of cond `eqn` (equation `index` of `jaxpr`) may live in,
        or None. A branch returns the operand unchanged, so the result is then already in place in that
        branch: no copy, no wave, no barrier. Legal only when the operand's storage is dead after the cond
        (every other branch overwrites it), which holds for

        - an operand computed in `jaxpr` (not a reshape or view of something else) that nothing reads after
          the cond, through no alias (not a program input: inputs are never written), or
        - the operand that the cond's result replaces in place already: the result is a loop carry's new
          value (or a result of an enclosing branch living in its operand's storage) and the operand is
          that carry's binder, read by nothing after the cond.

        A result wanted in a fresh buffer of its own (a program output) keeps it: the copy would only move
        to after the branch. No two results share an operand's storage (`taken`: those already used)."""
        out = eqn.outs[k]
        if self._wants_uniform(out.aval):
            return None           # a scalar result is a register: forwarding it costs an Assign, no barrier
        hint = self.hints.get(out)
        if hint is not None and hint[1] is None and hint[0].aval == out.aval:
            return None           # it goes to a fresh buffer of its own (see _carry_storage)
        in_place_binders = hint[1] if hint is not None else ()
        forwards = [j for j in range(len(eqn.inputs) - 1)
                    if any(branch.outs[k] is branch.in_binders[j] for branch in eqn.params["branches"])]
        for j in forwards:
            var = eqn.inputs[1 + j]
            value = self.read(var)
            if not _whole_buffer(value, out.aval) or not _writable(value) or id(value.storage) in taken:
                continue
            owned = any(var is b for b in in_place_binders) and hint[0].storage is value.storage and \
                hint[0].frame_offset == value.frame_offset
            if owned:
                names = _closure_of_all(jaxpr, in_place_binders)
            elif _computed_in(jaxpr, var, index):
                names = _alias_closure(jaxpr, var)
            else:
                continue
            if _read_after(jaxpr, index, names):
                continue
            sharing = [a for a in eqn.inputs[1:] if isinstance(a, Var) and self.read(a).storage is value.storage]
            if any(a not in names for a in sharing):
                continue          # another operand in the same storage that is not known dead
            return Value(value.storage, out.aval, value.frame_offset)
        return None

    def schedule_recurse(self, eqn):
        """The first call of a recursive function defines it (frame storage, body); every call is a Call."""
        fn = eqn.params["fn"]
        consts = [self.read(a) for a in eqn.inputs[:fn.nconsts]]
        args = [self.read(a) for a in eqn.inputs[fn.nconsts:]]
        if fn.name not in self.fn_defs:
            self._define_function(fn, consts, args)
        return self._call(fn.name, args, eqn.outs)

    def schedule_recurse_call(self, eqn):
        """A call of a recursive function from inside its own body."""
        return self._call(eqn.params["name"], [self.read(a) for a in eqn.inputs], eqn.outs)

    def _define_function(self, fn, consts, args):
        """The function's frame storage and body, at its first call (with arguments `args`). A parameter that
        every call passes unchanged from one input (_shared_arguments) is that input: no frame storage."""
        outer = self.frame
        self.frame = fn.name
        shared = self._shared_arguments(fn, args)
        self.shared_params[fn.name] = frozenset(shared)
        params = [shared[k] if k in shared else self._carry_storage(v)
                  for k, v in enumerate(fn.jaxpr.in_binders[fn.nconsts:])]
        results = [self._carry_storage(v) for v in fn.jaxpr.outs]
        self.fn_defs[fn.name] = (fn, params, results)
        self.env.update(zip(fn.jaxpr.in_binders, consts + params))
        for out, res in zip(fn.jaxpr.outs, results):
            if isinstance(out, Var) and not res.is_uniform:
                self.hints[out] = (res, None)
        body = self.schedule_block(fn.jaxpr)
        body += self._carry_update(results, [self.read(out) for out in fn.jaxpr.outs])
        for out in fn.jaxpr.outs:
            self.hints.pop(out, None)
        self.fn_bodies[fn.name] = tuple(body)
        self.frame = outer

    def _call(self, name, args, outs):
        """Arguments into the callee's frame, the Call, and its results. A result the caller may read in
        the callee's frame (_by_reference) is not copied: the caller reads it there. Its frame must then
        outlive every later call from this body, so a call after it goes `step` frames deeper, past the
        frames that hold such results (_call_step)."""
        _, params, results = self.fn_defs[name]
        placed = [self._placed_in_callee(out, result, self._next_held_step(name)) for out, result in zip(outs, results)]
        by_reference = [a or b for a, b in zip(self._by_reference(name, outs, results), placed)]
        step = self._call_step(name, any(by_reference))
        shared = self.shared_params[name]
        stmts = self._copies([(Value(p.storage, p.aval, step), arg) for k, (p, arg) in enumerate(zip(params, args))
                              if k not in shared])
        site = self.sites.get(name, 0)
        self.sites[name] = site + 1
        stmts.append(Call(name, site, step))
        if self.control == "device" and not self.parts:
            stmts.append(self._after_call_sync())
        copies = []
        for out, result, reference in zip(outs, results, by_reference):
            in_callee = Value(result.storage, result.aval, step)
            if reference:
                self.env[out] = in_callee
            else:
                dst = self._carry_storage(out)
                copies.append((dst, in_callee))
                self.env[out] = dst
        return stmts + self._copies(copies)

    def _forks(self, body, functions) -> tuple:
        """(body, functions) with each pair of calls that may run at once as a Fork (plan.Fork): a Call, its
        barrier, uniform statements and the Assigns of a second Call of the same function, then that Call,
        where nothing from the second call's argument Assigns back to the first Call reads the first call's
        results or memory the plan writes (_forkable_read). The first call's barrier goes (the callee's last
        barrier orders its work for the sequential case: _sync_by_return_site keeps it where the second call
        follows); a grid barrier goes before the Fork (removed when nothing before it touches memory); the
        second call's barrier stays, as the join."""
        min_group = {f.name: max(1, math.ceil(FORK_MIN_SHARE * _widest_wave(f.body))) for f in functions}

        def fold(out):
            fork = _fork_at_end(out, self.after_call_syncs)
            if fork is not None:
                start, made = fork
                made = dataclasses.replace(made, min_group=min_group[made.calls[0].fn])
                self.after_call_syncs.discard(out[start + len(made.first)])
                before = Sync("grid")
                self.after_call_syncs.add(before)        # (removed, not made a block sync, when demoted)
                out[start:] = [before, made]
                self.stats["forks"] = self.stats.get("forks", 0) + 1
        functions = tuple(dataclasses.replace(f, body=rewrite_blocks(f.body, fold)) for f in functions)
        return rewrite_blocks(body, fold), functions

    def _after_call_sync(self) -> Sync:
        """A grid barrier right after a call, at its call site: the one that orders the callee's writes
        before what this site reads. The callee's own last barrier serves every call site at once, so it
        would have to be a grid barrier wherever one site needs one (RAE's leaf, when the parent's matmul on
        32 vEUs reads it); with this one after each site, _demote_syncs_around_calls keeps a grid barrier
        only at the sites that need it, and removes this one where it is not needed (a callee's every path
        ends in a barrier, so a block sync here would order nothing more)."""
        sync = Sync("grid")
        self.after_call_syncs.add(sync)
        self.stats["grid_syncs"] += 1
        return sync

    def _shared_arguments(self, fn, args) -> dict:
        """Position -> argument, for the arguments of recursive function `fn` passed by reference: those that
        every call passes unchanged from one program input or const (the program calls `fn` once, with that
        input, and every call of `fn` in its body passes its own parameter on, through branches). Inputs are
        never written, so every call may read the input itself: no copy into each callee's frame, no wave,
        no barrier for it. An argument the callee changes before passing it on (`f(v * 0.5)`) is copied as
        before, and so is every argument of a function the program calls from more than one place."""
        outside = [e for e in walk_eqns(self.program.jaxpr)
                   if e.primitive is control.recurse_p and e.params["fn"].name == fn.name]
        if len(outside) != 1:
            return {}
        binders = fn.jaxpr.in_binders[fn.nconsts:]
        return {k: arg for k, (arg, binder) in enumerate(zip(args, binders))
                if _immutable_whole(arg) and _passed_on(fn.jaxpr, fn.name, k, {id(binder)})}

    def _by_reference(self, name, outs, results) -> list[bool]:
        """Per result of a call of `name`: may the caller read it in the callee's frame, with no copy?

        Nothing but a later call of `name` writes that frame, and later calls from this body go deeper
        (_call_step); a call of `name` deeper down, through another recursive function, could reach the
        frame again, so this holds only when the calling body calls no other recursive function. A
        result wanted in a buffer of its own (a program output, the function's own result, a branch
        result) is copied there as before; a scalar result is a uniform, copied by an Assign (no barrier).
        Device control only: the host control's executors step frames one at a time."""
        caller = self.program.jaxpr if self.frame is None else self.fn_defs[self.frame][0].jaxpr
        if self.control != "device" or self.parts or not _calls_only(caller, name):
            return [False] * len(outs)
        return [not result.is_uniform and not self._has_own_buffer(out) for out, result in zip(outs, results)]

    def _placed_in_callee(self, var, result, step) -> bool:
        """Is call result `var` wanted where the callee leaves `result` when it goes `step` frames deeper (a
        peeled call's branch result: _peeled_result)?"""
        hint = self.hints.get(var)
        return hint is not None and hint[0].storage is result.storage and hint[0].frame_offset == step

    def _next_held_step(self, name) -> int:
        """The step of the next call of `name` from the body being scheduled if it holds results."""
        return self.held_frames.get((self.frame, name), 0) + 1

    def _has_own_buffer(self, var) -> bool:
        """Does `var` go to a buffer chosen for it already (see _carry_storage)?"""
        hint = self.hints.get(var)
        return hint is not None and hint[1] is None and hint[0].aval == var.aval

    def _call_step(self, name, holds_results: bool) -> int:
        """How many frames deeper than its caller a call of `name` from the body being scheduled goes: past
        the frames of every earlier call from this body whose results are read in place (one frame each,
        in program order; a call holding results takes the next). Conservative: such a result counts as
        read until the end of the body."""
        step = self._next_held_step(name)
        if holds_results:
            self.held_frames[(self.frame, name)] = step
        self.max_steps[name] = max(self.max_steps.get(name, 1), step)
        return step


# The rule that schedules each control-flow primitive (a method of Scheduler).
CONTROL_RULES = {
    control.while_p: Scheduler.schedule_while,
    control.cond_p: Scheduler.schedule_cond,
    control.recurse_p: Scheduler.schedule_recurse,
    control.recurse_call_p: Scheduler.schedule_recurse_call,
}


def control_rule(prim):
    rule = CONTROL_RULES.get(prim)
    if rule is None:
        raise NotImplementedError(f"the scheduler has no rule for control primitive {prim.name!r}")
    return rule


# -------------------------------------------------------------------------------------------- helpers


def _immutable_whole(value) -> bool:
    """Is `value` an input's or a const's storage at a static place (the same wherever it is read)?"""
    return (isinstance(value.storage, Buffer) and value.storage.kind in ("input", "const")
            and value.frame_offset == 0 and not value.terms)


def _passed_on(jaxpr, name, position: int, same: set) -> bool:
    """Does every call of recursive function `name` in `jaxpr` pass, as argument `position`, a variable whose
    id is in `same` (the parameter itself, or a branch's binder for it)? A call inside a loop, or in any
    other sub-program but a branch, does not count as passing it on (its binders are not followed)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive is control.recurse_call_p and eqn.params["name"] == name:
            if id(eqn.inputs[position]) not in same:
                return False
        elif eqn.primitive is control.cond_p:
            for branch in eqn.params["branches"]:
                inner = same | {id(b) for b, a in zip(branch.in_binders, eqn.inputs[1:]) if id(a) in same}
                if not _passed_on(branch, name, position, inner):
                    return False
        elif not all(_passed_on(sub, name, position, set()) for sub in subjaxprs(eqn)):
            return False
    return True


def _calls_only(jaxpr, name) -> bool:
    """Does `jaxpr` (with its sub-programs, the bodies of the functions it calls included) call no recursive
    function but `name`?"""
    for eqn in walk_eqns(jaxpr):
        if eqn.primitive is control.recurse_p and eqn.params["fn"].name != name:
            return False
        if eqn.primitive is control.recurse_call_p and eqn.params["name"] != name:
            return False
    return True


def _widest_wave(body) -> int:
    """The most vEUs one task of `body` (nested statements included, not the functions it calls) runs on."""
    return max([min(t.count, t.op.n_utasks) for s in walk(body) if isinstance(s, Wave) for t in s.tasks], default=1)


def _fork_at_end(stmts, after_call_syncs) -> tuple | None:
    """(where it starts, the Fork) when `stmts` ends with a second Call that can run at once with an earlier
    one (see Scheduler._forks): [args of c0, c0, its barrier, between, args of c1, c1]; else None."""
    if not stmts or not isinstance(stmts[-1], Call):
        return None
    second_call = stmts[-1]
    k = len(stmts) - 1
    while k > 0 and _is_argument(stmts[k - 1], second_call):
        k -= 1
    second = tuple(stmts[k:])
    j = k
    while j > 0 and isinstance(stmts[j - 1], (Uniforms, Assign)):
        j -= 1
    between = tuple(stmts[j:k])
    if j < 2 or not isinstance(stmts[j - 1], Sync) or stmts[j - 1] not in after_call_syncs:
        return None
    first_call = stmts[j - 2]
    if not isinstance(first_call, Call) or first_call.fn != second_call.fn:
        return None
    i = j - 2
    while i > 0 and _is_argument(stmts[i - 1], first_call):
        i -= 1
    first = tuple(stmts[i:j - 1])
    reads = [v for s in between + second[:-1] for v in _values_read(s)]
    if not all(_forkable_read(v) for v in reads):
        return None
    return i, Fork(first, between, second)


def _is_argument(stmt, call) -> bool:
    """Is `stmt` an Assign of an argument of `call` (into the callee's frame the call enters)?"""
    return isinstance(stmt, Assign) and getattr(stmt.dst.storage, "frame_of", None) == call.fn and \
        stmt.dst.frame_offset == call.step


def _values_read(stmt) -> list:
    if isinstance(stmt, Uniforms):
        return [v for u in stmt.ops for v in u.inputs]
    return [stmt.src]


def _forkable_read(value) -> bool:
    """May a statement between the calls of a Fork read `value`: a literal, a uniform of the running
    call's own frame (or no frame), or a buffer the plan never writes (not a call's result, nor anything
    the first call could change while the second half reads it)?"""
    if value.is_uniform:
        return value.frame_offset == 0
    return not _writable(value) and value.frame_offset == 0


EVERY_VEU = -1           # in a set of vEUs (_SyncNeighbourhoods): every vEU reads (a uniform op on memory)


def _demote_syncs_around_calls(body, functions, after_calls=frozenset()) -> tuple:
    """(body, functions, how many demoted, how many dropped) with the grid Syncs that only one vEU's work
    surrounds made block Syncs (those of `after_calls`, right after a Call, removed instead: every path
    through a function ends in a barrier, so a block sync there orders nothing more),
    across calls and returns. A grid barrier orders the memory accesses of different vEUs; when everything
    that touches memory from the previous grid barrier to the next one (on every path: into a function
    from each of its call sites, out of it to each return site) runs on one vEU, a block barrier keeps
    that vEU's ops in order and is enough. RAE's leaves (a one-uTask slice and copy on vEU 0) and the
    one-uTask concatenation and tanh around each matmul then pay no grid barrier. The C-family renderer
    demotes the same way inside one statement list (Renderer.demoted); this also sees through Call.
    One Sync at a time, each decision made with the previous ones in place."""
    demoted: set = set()
    while True:
        candidate = _SyncNeighbourhoods(body, functions, demoted).first_single_veu()
        if candidate is None:
            break
        demoted.add(candidate)
    by_site, spread_used = _sync_by_return_site(body, functions, demoted)
    functions = tuple(f if f.name in spread_used else dataclasses.replace(f, spread=0) for f in functions)
    if not demoted and not by_site:
        return body, functions, 0, 0

    def change(stmt):
        if stmt in demoted:
            return None if stmt in after_calls else Sync("block")
        return Sync("grid", sites=by_site[stmt]) if stmt in by_site else stmt
    body, functions = _map_statements(body, functions, change)
    dropped = len(demoted & after_calls)
    return body, functions, len(demoted) - dropped, dropped


def _sync_by_return_site(body, functions, demoted) -> tuple[dict, set]:
    """(Sync -> the call sites it stays a grid barrier for, the functions whose spread frames made a site
    leave one out), for the grid Syncs that end a function (nothing
    touches memory after them up to its end, on their path: _trailing_grid_syncs) where some call sites do
    not need them: those whose continuation reaches a grid barrier, on every path, before anything touches
    memory (the Sync after the call, kept). There the barrier at the callee's end would order nothing that
    the next one does not; elsewhere (RAE's left child returning, its right sibling's first leaf about to
    overwrite a frame the left child's matmul read) it stays, unless the function's frames are spread
    (plan.RecFunction.spread) and the site is one of _spread_sites: there the sibling's subtree touches
    other frames than the barrier's tail did. Which site a call returns to is only known as
    the program runs, but it is uniform (plan.Sync.sites). A static rule could not separate the two: a
    function's end serves all of its call sites, and the barrier after a call site serves every path
    through the callee, the leaf's (one vEU: no grid barrier needed) as much as the inner node's."""
    hoods = _SyncNeighbourhoods(body, functions, demoted)
    calls = [s for block in [body] + [f.body for f in functions] for s in walk(block) if isinstance(s, Call)]
    out: dict = {}
    spread_used: set = set()
    for f in functions:
        sites = {c.site for c in calls if c.fn == f.name}
        needed = frozenset(c.site for c in calls if c.fn == f.name and hoods.after_call.get(c))
        spread = _spread_sites(f, demoted) & needed if f.spread else frozenset()
        for sync, framed in _trailing_grid_syncs(f.body, demoted):
            kept = needed - spread if framed else needed
            if kept != sites:
                out[sync] = kept
            spread_used |= {f.name} if kept != needed else set()
    return out, spread_used


def _waves_aside(body, functions, grid) -> tuple:
    """(body, functions, how many waves moved) with each small wave that grid barriers isolate
    (_isolated_waves: nothing else touches memory between it and the grid barriers around it, on every path)
    moved past the vEUs that the recursive functions' waves use, all by the same number of vEUs (what ran
    on one vEU still does), when they fit in the grid. Small: narrower than the functions' widest wave; in
    a function body or in the kernel's own (RAE's output copy, which reads the root's result). Between two
    grid barriers a vEU runs its uTasks one after the other, and the barrier waits for the busiest: RAE's
    leaf (one uTask copying a row, on vEU 0) ran after the matmul's uTask on vEU 0 of the node before it;
    on vEU 32 it runs while the matmul does. Isolated, the wave depends on nothing by a block sync (one
    vEU's order), so any vEUs may run it; the barrier passes that follow see where it went."""
    waves = [s for f in functions for s in walk(f.body) if isinstance(s, Wave)]
    end = max((_wave_end(w) for w in waves), default=0)
    widest = max((_wave_span(w) for w in waves), default=0)
    small = [w for block in [body] + [f.body for f in functions] for w in _unpartitioned_waves(block)
             if _wave_span(w) < widest and _wave_end(w) + end <= grid
             and not any(RESIDENT in t.op.params for t in w.tasks)]
    moved = set(_isolated_waves(body, functions, small))
    if not moved:
        return body, functions, 0

    def change(stmt):
        return Wave(tuple(dataclasses.replace(t, first=t.first + end) for t in stmt.tasks)) if stmt in moved else stmt
    return *_map_statements(body, functions, change), len(moved)


def _map_statements(body, functions, change) -> tuple:
    """(body, functions) with each statement other than a Loop or a Branch replaced by `change(stmt)` (the
    statement itself to keep it, None to drop it); Loops and Branches are rebuilt around their changed blocks."""
    def rewrite(block):
        out = []
        for stmt in block:
            if isinstance(stmt, Loop):
                stmt = dataclasses.replace(stmt, cond=rewrite(stmt.cond), body=rewrite(stmt.body))
            elif isinstance(stmt, Branch):
                stmt = dataclasses.replace(stmt, branches=tuple(rewrite(b) for b in stmt.branches))
            else:
                stmt = change(stmt)
            if stmt is not None:
                out.append(stmt)
        return tuple(out)
    return rewrite(body), tuple(dataclasses.replace(f, body=rewrite(f.body)) for f in functions)


def _unpartitioned_waves(block):
    """The Waves of `block`, nested ones included, but those of partitioned loops (whose uTask p must stay on
    vEU p mod grid, plan.Loop.parts)."""
    for stmt in block:
        if isinstance(stmt, Wave):
            yield stmt
        elif isinstance(stmt, Loop) and not stmt.parts:
            yield from _unpartitioned_waves(stmt.cond + stmt.body)
        elif isinstance(stmt, Branch):
            for branch in stmt.branches:
                yield from _unpartitioned_waves(branch)


def _wave_end(wave) -> int:
    """One past the highest vEU on which `wave` runs a uTask."""
    return max(t.first + min(t.count, t.op.n_utasks) for t in wave.tasks)


def _wave_span(wave) -> int:
    """How many vEUs `wave` spans, from its first task's first vEU to its end."""
    return _wave_end(wave) - min(t.first for t in wave.tasks)


def _isolated_waves(body, functions, waves) -> list:
    """Those of `waves` that grid barriers isolate from every other wave: on every path from one to the grid
    barrier before it and the one after it (the kernel's start and end count as such), nothing touches
    memory but waves isolated so too (two base cases of a node at their call sites, peel.py: moved together,
    they keep their order on one vEU). Each wave is marked as a vEU number of its own (below EVERY_VEU) in
    _SyncNeighbourhoods' sets; a wave whose sets hold anything else drops out, and so, in turn, do those that
    share a set with it."""
    marks = {w: EVERY_VEU - 1 - k for k, w in enumerate(waves)}
    hoods = _SyncNeighbourhoods((Sync("grid"),) + tuple(body) + (Sync("grid"),), functions, frozenset(), marks)
    sets = list(hoods.before.values()) + list(hoods.after.values())
    chosen = set(marks.values())
    while True:
        kept = {m for m in chosen
                if any(m in veus for veus in sets) and all(veus <= chosen for veus in sets if m in veus)}
        if kept == chosen:
            return [w for w, mark in marks.items() if mark in chosen]
        chosen = kept


def _with_spread(f: RecFunction) -> RecFunction:
    """`f` with spread frames (plan.RecFunction.spread: `max_step - 1`, the least that keeps a later call's
    subtree off the frames an earlier call's callees hold) when its calls step more than one frame and its
    body touches no memory but its own frames and buffers the plan never writes (then what a call's subtree
    touches is where the frame layout says), else `f` unchanged."""
    if f.max_step < 2:
        return f
    for stmt in walk(f.body):
        if isinstance(stmt, Call) and stmt.fn != f.name:
            return f
        if isinstance(stmt, Wave) and not all(_own_frame_or_unwritten(v, f.name) for t in stmt.tasks
                                              for v in t.op.inputs + t.op.outputs):
            return f
        if isinstance(stmt, (Uniforms, Assign)) and not all(_own_frame_or_unwritten(v, f.name)
                                                            for v in _values_read(stmt)):
            return f
    return dataclasses.replace(f, spread=f.max_step - 1)


def _own_frame_or_unwritten(value, fn: str) -> bool:
    """Is `value` a uniform, a literal, a frame buffer of `fn`, or a buffer the plan never writes?"""
    return value.is_uniform or not _writable(value) or value.storage.frame_of == fn


def _spread_sites(f: RecFunction, demoted) -> frozenset:
    """The call sites of `f` in its own body after which, with spread frames, nothing up to the next grid
    barrier can touch the frames that the tail of a call of `f` (from its last grid barrier to its end)
    touched: what follows the Call in its block, up to a grid barrier there, is only uniform statements that
    read no memory the plan writes and later calls of `f` (a larger step). Such a later call's own frame
    lies between the earlier callee's own and its callees' frames, and its callees' frames past those
    (plan.RecFunction.callee_extra: spread * step), and _with_spread made sure that a call's subtree
    touches nothing else the plan writes; so a callee's last barrier orders nothing for these sites."""
    sites = set()

    def visit(block, after):        # after: what follows `block` on its path (a branch case's: after the branch)
        for k, stmt in enumerate(block):
            rest = tuple(block[k + 1:]) + after
            if isinstance(stmt, Call) and stmt.fn == f.name and _continues_to_grid(rest, stmt, demoted, f):
                sites.add(stmt.site)
            elif isinstance(stmt, Branch):
                for branch in stmt.branches:
                    visit(branch, rest)
            elif isinstance(stmt, Loop):
                visit(stmt.cond, ())
                visit(stmt.body, ())
    visit(f.body, ())
    return frozenset(sites)


def _continues_to_grid(rest, call, demoted, f: RecFunction) -> bool:
    """Does `rest` (what follows `call` of `f`, on its path) reach a grid barrier on every vEU (not demoted,
    not by return site) through nothing but barriers, uniform statements that read no memory the plan
    writes, later calls of `f`, waves that touch only what such later calls' own frames hold (_later_frame:
    a base case at its call site, peel.py) or memory the plan never writes, and branches of these?"""
    for k, stmt in enumerate(rest):
        if isinstance(stmt, Sync):
            if stmt.always_grid and stmt not in demoted:
                return True
        elif isinstance(stmt, Call):
            if stmt.fn != call.fn or stmt.step <= call.step:
                return False
        elif isinstance(stmt, Branch):
            return all(_continues_to_grid(tuple(b) + tuple(rest[k + 1:]), call, demoted, f) for b in stmt.branches)
        elif isinstance(stmt, Wave):
            if not all(not _writable(v) or _later_frame(v, call, f) for t in stmt.tasks
                       for v in t.op.inputs + t.op.outputs):
                return False
        elif not isinstance(stmt, (Uniforms, Assign)) or _veus_touching_memory(stmt):
            return False
    return False


def _later_frame(value, call, f: RecFunction) -> bool:
    """Does `value` lie in own frames of later calls than `call` from the same body (offsets call.step + 1 to
    f.max_step), which no call of `call`'s subtree touches (_spread_sites)? Only for a plain window."""
    if value.is_uniform or value.storage.frame_of != f.name or value.terms or value.perm is not None \
            or value.window is not None or value.rows is not None:
        return False
    size = value.storage.aval.size
    first = value.frame_offset + value.offset // size
    last = value.frame_offset + (value.offset + value.aval.size - 1) // size
    return call.step < first and last <= f.max_step


def _trailing_grid_syncs(block, demoted) -> list:
    """(Sync, framed) for the grid Syncs of `block` (not `demoted`) after which nothing touches memory up to
    its end, on the path through them (the last of each branch case, when what follows the branch touches no
    memory). `framed`: the Sync's tail, from a grid barrier before it in the same statement list, is waves,
    uniform statements and barriers only (no call, branch or loop): what it touches is the running call's
    own frames (see _spread_sites)."""
    for k in range(len(block) - 1, -1, -1):
        stmt = block[k]
        if isinstance(stmt, Sync):
            if stmt.scope == "grid" and stmt not in demoted:
                return [(stmt, _tail_in_frame(block[:k], demoted))]
        elif isinstance(stmt, Branch):
            return [sync for branch in stmt.branches for sync in _trailing_grid_syncs(branch, demoted)]
        elif not isinstance(stmt, (Uniforms, Assign)) or _veus_touching_memory(stmt):
            return []
    return []


def _tail_in_frame(before, demoted) -> bool:
    """Does `before` end with a grid barrier on every vEU (not demoted, not by return site) followed by
    waves, uniform statements and other barriers only (that barrier may end every case of a branch)?"""
    for stmt in reversed(before):
        if isinstance(stmt, Sync) and stmt.always_grid and stmt not in demoted:
            return True
        if isinstance(stmt, Branch):
            return all(_tail_in_frame(b, demoted) for b in stmt.branches)
        if not isinstance(stmt, (Wave, Uniforms, Assign, Sync)):
            return False
    return False


class _SyncNeighbourhoods:
    """For every grid Sync (those in `demoted` count as block Syncs): the vEUs that touch memory since the
    previous grid barrier (`before`) and until the next one (`after`), on every path through the plan's
    control flow, calls and returns included. A set of vEU numbers; EVERY_VEU in it: all vEUs (a uniform op
    or Assign reading a buffer that the plan writes). Interprocedural: a function's entry joins the sets
    of its call sites, each call site continues with its function's exit (fixed points, by iteration:
    the sets only grow)."""

    def __init__(self, body, functions, demoted, marks=None):
        self.body, self.demoted = body, demoted
        self.marks = marks or {}         # Wave -> the one vEU number it counts as (see _isolated_waves)
        self.fns = {f.name: f for f in functions}
        self.before: dict = {}
        self.after: dict = {}
        self.entry = {name: frozenset() for name in self.fns}       # forward: at a function's start
        self.exit = {name: frozenset() for name in self.fns}        # forward: at its end
        self.continues = {name: frozenset() for name in self.fns}   # backward: after its call sites
        self.starts = {name: frozenset() for name in self.fns}      # backward: at its start
        self.after_call: dict = {}                                  # backward: Call -> right after it
        self._solve()

    def first_single_veu(self):
        """The first grid Sync that orders nothing between vEUs: one vEU's work around it, or else no work
        on one side (a barrier right after another, as after a call whose function ends in one). The
        first kind first: demoting a barrier with nothing on one side can leave its neighbour with work
        of several vEUs on both sides, where the other order demotes both."""
        for sync in self.before:
            veus = self.before[sync] | self.after.get(sync, frozenset())
            if len(veus) <= 1 and EVERY_VEU not in veus:
                return sync
        for sync in self.before:
            if not self.before[sync] or not self.after.get(sync, frozenset()):
                return sync
        return None

    def _solve(self):
        changed = True
        while changed:
            old = (dict(self.entry), dict(self.exit), dict(self.continues), dict(self.starts))
            self.forward(self.body, frozenset())
            for name, f in self.fns.items():
                self.exit[name] = self.forward(f.body, self.entry[name])
            self.backward(self.body, frozenset())
            for name, f in self.fns.items():
                self.starts[name] = self.backward(f.body, self.continues[name])
            changed = old != (self.entry, self.exit, self.continues, self.starts)

    def _grid(self, stmt) -> bool:
        return isinstance(stmt, Sync) and stmt.scope == "grid" and stmt not in self.demoted

    def forward(self, block, veus):
        for stmt in block:
            if self._grid(stmt):
                self.before[stmt] = self.before.get(stmt, frozenset()) | veus
                veus = frozenset()
            elif isinstance(stmt, Loop):
                start = veus
                while True:
                    again = start | self.forward(stmt.body, self.forward(stmt.cond, start))
                    if again == start:
                        break
                    start = again
                veus = self.forward(stmt.cond, start)
            elif isinstance(stmt, Branch):
                veus = frozenset().union(*[self.forward(b, veus) for b in stmt.branches])
            elif isinstance(stmt, Call):
                self.entry[stmt.fn] |= veus
                veus = self.exit[stmt.fn]
            elif isinstance(stmt, Fork):
                veus = self.forward_fork(stmt, veus)
            else:
                veus = veus | self.touching(stmt)
        return veus

    def forward_fork(self, fork, veus):
        """Into and through a Fork: its halves in parallel, each from what was before the Fork (a group of
        one vEU runs them one after the other, but there every barrier orders one vEU's work: none is
        needed between vEUs). What the halves did ran on other vEUs than their plan numbers say (each
        half's vEUs are its group's), so after the Fork it is every vEU's work: the join stays a barrier of
        the caller's group."""
        after_first = self.forward(fork.first + fork.between, veus)
        return self.forward(fork.second, veus) | after_first | {EVERY_VEU}

    def backward(self, block, veus):
        for stmt in reversed(block):
            if self._grid(stmt):
                self.after[stmt] = self.after.get(stmt, frozenset()) | veus
                veus = frozenset()
            elif isinstance(stmt, Loop):
                start = self.backward(stmt.cond, veus)            # before the condition: exit or one more trip
                while True:
                    again = self.backward(stmt.cond, veus | self.backward(stmt.body, start))
                    if again == start:
                        break
                    start = again
                veus = start
            elif isinstance(stmt, Branch):
                veus = frozenset().union(*[self.backward(b, veus) for b in stmt.branches])
            elif isinstance(stmt, Call):
                self.continues[stmt.fn] |= veus
                self.after_call[stmt] = self.after_call.get(stmt, frozenset()) | veus
                veus = self.starts[stmt.fn]
            elif isinstance(stmt, Fork):
                veus = self.backward_fork(stmt, veus)
            else:
                veus = veus | self.touching(stmt)
        return veus

    def touching(self, stmt) -> frozenset:
        """The vEUs that touch memory in `stmt` (a marked wave: its mark)."""
        mark = self.marks.get(stmt) if isinstance(stmt, Wave) else None
        return _veus_touching_memory(stmt) if mark is None else frozenset({mark})

    def backward_fork(self, fork, veus):
        """Back through a Fork (see forward_fork): after each half comes the join; before the Fork, either
        half, on vEUs other than their plan numbers: every vEU's work, so a barrier before the Fork is kept
        whenever something before it touches memory."""
        before_second = self.backward(fork.between + fork.second, veus)
        return self.backward(fork.first + fork.between, veus) | before_second | {EVERY_VEU}


def _veus_touching_memory(stmt) -> frozenset:
    """The vEUs that read or write buffers in a Wave, Uniforms or Assign (EVERY_VEU: all of them read one
    that the plan writes; buffers never written are not memory anyone must wait for)."""
    if isinstance(stmt, Wave):
        return frozenset(t.first + k for t in stmt.tasks for k in range(min(t.count, t.op.n_utasks)))
    if isinstance(stmt, Uniforms):
        reads = [v for u in stmt.ops for v in u.inputs]
    elif isinstance(stmt, Assign):
        reads = [stmt.src]
    else:
        return frozenset()
    return frozenset({EVERY_VEU}) if any(_writable(v) for v in reads) else frozenset()


def _writable(value) -> bool:
    """Is `value` in storage the plan may write (not an input, a const or a uniform)?"""
    return isinstance(value.storage, Buffer) and value.storage.kind not in ("input", "const")


def _alias_closure(jaxpr, var, views=True) -> set:
    """`var` and every reshape of it (they share its storage), and every view of those (views=True)."""
    names = {var}
    for eqn in jaxpr.eqns:
        if (eqn.primitive is reshape_p or (views and view_offset(eqn) is not None)) and eqn.inputs[0] in names:
            names.add(eqn.outs[0])
    return names


def _binders_in(branch, operands, result) -> tuple:
    """The binders of `branch` whose operands are in `result`'s storage (none when the result has a fresh
    buffer): writing the result overwrites them."""
    return tuple(b for b, v in zip(branch.in_binders, operands)
                 if v.storage is result.storage and v.frame_offset == result.frame_offset)


def _whole_buffer(value, aval) -> bool:
    """Is `value` a whole buffer (no view, this frame) of `aval`'s size?"""
    return isinstance(value.storage, Buffer) and not value.offset and not value.terms and not value.frame_offset and \
        value.storage.aval.size == aval.size == value.aval.size


def _computed_in(jaxpr, var, index) -> bool:
    """Is `var` the result of an equation of `jaxpr` before equation `index` that has storage of its own
    (not a reshape or a view of another variable)?"""
    return any(any(var is o for o in eqn.outs) and not _is_alias(eqn) for eqn in jaxpr.eqns[:index])


def _read_after(jaxpr, index, names) -> bool:
    """Does an equation after equation `index` of `jaxpr`, or `jaxpr`'s results, read one of `names`?"""
    later = [a for eqn in jaxpr.eqns[index + 1:] for a in eqn.inputs] + list(jaxpr.outs)
    return any(isinstance(a, Var) and a in names for a in later)


def _closure_of_all(jaxpr, binders, views=True) -> set:
    """The union of _alias_closure over `binders`."""
    names: set = set()
    for binder in binders:
        names |= _alias_closure(jaxpr, binder, views)
    return names


def view_offset(eqn) -> int | None:
    """The element offset of a static slice whose window is one contiguous run of its operand, which the
    plan then reads in place as a view (plan.Value.offset); None for any other equation. One-element
    windows stay copies: the host reads scalars (predicates, branch indices) from their own buffers."""
    if eqn.primitive is not slice_p or not isinstance(eqn.inputs[0], Var) or eqn.outs[0].aval.size <= 1:
        return None
    p = eqn.params
    shape = eqn.inputs[0].aval.shape
    sizes = [len(range(b, e, s)) for b, e, s in zip(p["start"], p["limit"], p["step"])]
    if any(step != 1 and size > 1 for step, size in zip(p["step"], sizes)):
        return None
    first = next((d for d, size in enumerate(sizes) if size != 1), len(sizes))    # outer dims: one index each
    if any(sizes[d] != shape[d] for d in range(first + 1, len(shape))):           # inner dims: whole
        return None
    offset, stride = 0, 1
    for start, n in zip(reversed(p["start"]), reversed(shape)):
        offset += start * stride
        stride *= n
    return offset


def _epilogue_path(result, outs, reshaped, uses) -> list | None:
    """How an epilogue reading `result` reaches a contraction output among `outs`: [result] when it is one,
    else [result, ..., output] through reshapes that only drop leading unit dimensions (a vector-matrix
    product is traced as reshape (K,) -> (1, K), matmul, reshape (1, N) -> (N,)). The epilogue's operands,
    broadcast to the result's shape from the right, then sit at the same flat elements under the
    contraction's shape, which the op keeps as its output's (Scheduler._op_outputs). None when there is no
    such path, or when a variable on it before `result` is read by anything but the next reshape."""
    path = [result]
    while path[-1] not in outs:
        source = reshaped.get(path[-1])
        if source is None or uses.get(source, 0) != 1:
            return None
        path.append(source)
    shape, rank = path[-1].aval.shape, len(result.aval.shape)
    lead = len(shape) - rank
    if lead < 0 or shape[lead:] != result.aval.shape or any(d != 1 for d in shape[:lead]):
        return None
    return path


def _only_the_update_reads(jaxpr, root, update_eqn) -> bool:
    """Is `root` (and every reshape or view of it) read by nothing but those aliases and, as its update
    operand, dynamic_update_slice equation `update_eqn`: no other equation, no result of `jaxpr`?"""
    names = _alias_closure(jaxpr, root)
    if any(isinstance(a, Var) and a in names for a in jaxpr.outs):
        return False
    for eqn in jaxpr.eqns:
        read = [k for k, a in enumerate(eqn.inputs) if isinstance(a, Var) and a in names]
        if not read:
            continue
        if eqn is update_eqn and read == [1]:
            continue
        if not (_is_alias(eqn) and eqn.outs[0] in names):
            return False
    return True


def _permuted(item) -> bool:
    """Is `item` a transpose read in place (Scheduler._permuted_view)?"""
    return item is not None and item.view and item.eqn.primitive is transpose_p


def _one_run(eqn) -> bool:
    """Is `eqn` a dynamic_slice whose window is one contiguous run of its operand, or a take of one index
    along an axis with only unit axes before it (one contiguous row)?"""
    shape = eqn.inputs[0].aval.shape
    if eqn.primitive is dynamic_slice_p:
        return utasks.contiguous_window(shape, eqn.params["sizes"])
    if eqn.primitive is take_p:
        return eqn.inputs[1].aval.size == 1 and math.prod(shape[:eqn.params["axis"]]) == 1
    return False


def _producers_first(items) -> list:
    """`items` in program order but with each after the items among them that it depends on: a row or cell chain
    fused into one op (Scheduler._fuse_rows) stands at its last member's place, and a reader of an earlier member
    (a softmax row stored into a cache before the row's other use) would otherwise be levelled before it."""
    listed, placed, out = set(items), set(), []
    for root in items:
        stack = [(root, False)]
        while stack:
            it, ready = stack.pop()
            if it in placed:
                continue
            if ready:
                placed.add(it)
                out.append(it)
                continue
            stack.append((it, True))
            stack.extend((d, False) for d in it.deps if d in listed and d not in placed)
    return out


def _is_alias(eqn) -> bool:
    """Does `eqn`'s result share its operand's storage (a reshape, or a view: see view_offset)?"""
    return eqn.primitive is reshape_p or view_offset(eqn) is not None


def _read_until(items) -> dict:
    """item -> the last wave level after which one of its readers still runs (a global reader at level L
    runs after waves < L, a uniform reader at level L after waves <= L); items nobody reads are left out."""
    until: dict = {}
    for it in items:
        last = it.level if it.uniform else it.level - 1
        for d in _through_views(it.deps):
            until[d] = max(until.get(d, -2), last)
    return until


def _through_views(deps) -> set:
    """`deps` with every window read in place (_Item.view) replaced by what it depends on: its readers read
    its source (and its uniforms) when they run."""
    out, pending = set(), list(deps)
    while pending:
        d = pending.pop()
        if d.view:
            pending.extend(d.deps)
        else:
            out.add(d)
    return out


def _read_elsewhere(var, item, items) -> bool:
    """Does a live item other than `item` read `var`? (An expression that recomputes an inlined producer where it
    reads a window of it, Scheduler._absorb_inlined, reads that producer's operands: no `uses` counts those.)"""
    return any(o is not item and not o.absorbed and
               any(_base_of(a) is var for a in (o.leaves if o.raw_expr is not None else o.eqn.inputs))
               for o in items)


def _reads(item) -> list:
    """The variables an item reads (a window of a variable counts as a read of that variable)."""
    atoms = list(item.leaves) if item.expr is not None or item.rows is not None else _own_operands(item)
    if item.contraction is not None:
        atoms += _own_operands(item.contraction)
    return [_base_of(a) for a in atoms]


def _own_operands(item) -> list:
    """The atoms an item's primitive reads: its equation's inputs, or, for a matmul reading its left operand
    in parts (_Item.k_parts), the first part, B, then the other parts (plan.K_PARTS); for one reading gathered
    rows of a table (_Item.row_gather), those rows in place, B, then the indices (plan.ROW_INDEX)."""
    if item.row_gather is not None:
        table, index = item.row_gather.eqn.inputs
        return [_Rows(table, index, item.eqn.inputs[0].aval), item.eqn.inputs[1], index]
    if item.k_parts is None:
        return list(item.eqn.inputs)
    return [item.k_parts[0], item.eqn.inputs[1], *item.k_parts[1:]]


def _base_of(atom):
    while isinstance(atom, (_Window, _Rows)):
        atom = atom.base
    return atom


@dataclass(frozen=True)
class _Alias:
    """What an alias variable (a reshape or view, or a chain of them) is of its root variable: the
    element offset of its window, whether a view is in the chain, and, when the chain is one static
    slice (optionally dropping leading unit dimensions), the slice's start and sizes in the root's
    dimensions (then broadcast operands of the root's expression have windows too: window_of)."""
    root: Var
    offset: int
    viewed: bool
    start: tuple | None = None
    sizes: tuple | None = None

    @staticmethod
    def of(eqn, source: _Alias | None) -> _Alias:
        src = eqn.inputs[0]
        own = view_offset(eqn)
        if source is None:
            if own is None:
                return _Alias(src, 0, False)
            p = eqn.params
            sizes = tuple(len(range(b, e, s)) for b, e, s in zip(p["start"], p["limit"], p["step"]))
            return _Alias(src, own, True, tuple(p["start"]), sizes)
        offset = source.offset + (own or 0)
        if own is None and source.start is not None and _drops_leading_ones(source.sizes, eqn.outs[0].aval.shape):
            return _Alias(source.root, offset, source.viewed, source.start, source.sizes)
        return _Alias(source.root, offset, source.viewed or own is not None)

    def window_of(self, shape, atom_shape):
        """(element offset, shape) of the window of an operand of shape `shape` (broadcast to the root's
        shape) that the alias's window reads, as an operand of an expression of shape `atom_shape`; None
        when there is no such window."""
        root_shape = self.root.aval.shape
        if tuple(shape) == tuple(root_shape) and self.start is None:
            return self.offset, tuple(atom_shape)
        if self.start is None or len(shape) > len(root_shape):
            return None
        padded = (1,) * (len(root_shape) - len(shape)) + tuple(shape)
        if any(d not in (1, r) for d, r in zip(padded, root_shape)):
            return None
        starts = [b if d != 1 else 0 for b, d in zip(self.start, padded)]
        sizes = [z if d != 1 else 1 for z, d in zip(self.sizes, padded)]
        offset, stride = 0, 1
        for b, d in zip(reversed(starts), reversed(padded)):
            offset += b * stride
            stride *= d
        drop = len(sizes) - len(atom_shape)
        if drop < 0 or any(z != 1 for z in sizes[:drop]):
            return None
        return offset, tuple(sizes[drop:])


def _drops_leading_ones(sizes, shape) -> bool:
    """Is `shape` `sizes` with some leading unit dimensions dropped?"""
    drop = len(sizes) - len(shape)
    return drop >= 0 and all(z == 1 for z in sizes[:drop]) and tuple(sizes[drop:]) == tuple(shape)


class _Window(Var):
    """Elements [offset, offset + size) of variable `base` read in place: a leaf of an expression
    recomputed at a view's window (Scheduler._inline_window)."""
    __slots__ = ("base", "offset")

    def __init__(self, base, offset, aval):
        super().__init__(aval)
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "offset", offset)


class _Rows(Var):
    """Rows `index[m]` of the table `base` read in place by a matmul (Scheduler._fold_row_gathers), of type
    `aval` (the take's result)."""
    __slots__ = ("base", "index")

    def __init__(self, base, index, aval):
        super().__init__(aval)
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "index", index)


def _nodes(expr):
    yield expr
    for arg in expr.args:
        yield from _nodes(arg)


def _input_nodes(expr):
    return (node for node in _nodes(expr) if node.op == "input")


def _pure_elementwise(kind) -> bool:
    """An elementwise primitive with no shape in its params: it commutes with taking a window."""
    return family_of(kind) == ELEMENTWISE and is_uniform(kind)


def _stored_results(item) -> list:
    """(owner, variable) for each result of `item` stored in memory, `owner` the item whose `alias` says
    where (a ROWS op stores several members' results: _Item.row_owners); an item's first output else."""
    if item.rows is not None:
        return list(zip(item.row_owners, item.row_outputs))
    return [(item, item.eqn.outs[0])] if item.eqn.outs else []


def _same_index_read(item, binders, names=()) -> bool:
    """Does the op read `binders` (variables sharing one storage; `names`: they and their reshapes) only at
    the element it writes (so writing in place is safe)?"""
    if item.rows is not None:
        return _rows_same_index_read(item, binders, names)
    if item.eqn.primitive is dynamic_update_slice_p:
        first, rest = item.eqn.inputs[0], item.eqn.inputs[1:]
        return any(first is b for b in binders) and not any(a is b for a in rest for b in binders)
    if item.contraction is not None and any(a is b for a in _own_operands(item.contraction) for b in binders):
        return False             # a contraction reads whole rows / windows of its operands
    return item.expr is not None and all(b.aval.shape == item.eqn.outs[0].aval.shape for b in binders)


def _rows_same_index_read(item, binders, names) -> bool:
    """Does a ROWS op read `binders` (`names`: they and their reshapes) only in elementwise steps over its
    row shape, unreshaped, at the element being computed? Then an output may overwrite them in place: a
    lane computes every step of its elements of a row in registers before it stores any (cfamily
    reductions.row_chain; the simulator evaluates a uTask before it writes), so each read of an element
    comes before the store to it, in the same thread. Reductions and per-row steps read other elements of
    the row: not in place."""
    shape = tuple(item.rows[ROW_SHAPE])
    if any(tuple(b.aval.shape) != shape for b in binders):
        return False
    for step in item.rows[STEPS]:
        for node in _input_nodes(step.expr):
            leaf = item.leaves[node.params["index"]]
            if leaf in names and (step.reduce is not None or step.per_row(shape) or
                                  tuple(leaf.aval.shape) != shape):
                return False
    return True


# Shorter names for some primitives in fused op labels.
SHORT_LABELS = {convert_p: "convert"}


def _expr_label(expr) -> str:
    """A short name for a fused op: its outermost operations, e.g. `tanh_add`."""
    sizes: dict = {}             # id(node) -> the number of nodes under it

    def count(node, arg_sizes):
        sizes[id(node)] = 1 + sum(arg_sizes)
        return sizes[id(node)]
    fold_expr(expr, count)
    names = []
    node = expr
    while node.op not in ("input", "literal", RESULT) and len(names) < 3:
        names.append(SHORT_LABELS.get(OP_KINDS[node.op], node.op))
        node = max(node.args, key=lambda a: sizes[id(a)], default=None) if node.args else None
        if node is None:
            break
    return "_".join(names) or FUSED.name


def _rows_label(params) -> str:
    """A short name for a ROWS op: its kind and its reductions, e.g. `row_chain_reduce_max_reduce_sum`; a
    cell chain (no reduction): its kind and its first step's label, e.g. `row_chain_add_mul_logistic`."""
    reductions = [step.reduce for step in params[STEPS] if step.reduce is not None]
    if not reductions:
        return f"{ROWS.name}_{_expr_label(params[STEPS][0].expr)}"
    return "_".join([ROWS.name] + reductions)


def _index_leaves(expr, leaves, result=None, first=0) -> Expr:
    """`expr` with its input nodes numbered by first appearance from `first` on; `leaves` gets the variables
    read. An epilogue's reads of its contraction's `result` become RESULT leaves."""
    index: dict = {}             # id(var) -> its input number

    def number(node, args):
        if node.op != "input":
            return Expr(node.op, tuple(args), node.params, node.aval)
        var = node.params["var"]
        if var is result:
            return Expr(RESULT, (), {}, node.aval)
        if id(var) not in index:
            index[id(var)] = first + len(leaves)
            leaves.append(var)
        return Expr("input", (), {"index": index[id(var)]}, node.aval)
    return fold_expr(expr, number)


def _cond_inputs_early(jaxpr):
    """`jaxpr` with the equations that only compute inputs of conds (their results feed nothing but conds,
    as index or operand, directly or through other such equations) moved before the control-flow
    equations they do not depend on, into the first straight-line segment where their operands exist.
    BlockDrop's per-block `sum(action[:, t]) > 0` and its mask `action[:, t]` then run with the first layers
    instead of as waves and barriers of their own before every block. The other equations keep their
    places; the order stays topological (gdsl primitives are pure), so every rule that reads the order
    (in-place writes, liveness) sees the order that runs."""
    early = _feeds_conds_only(jaxpr)
    if not early:
        return jaxpr
    segment_of: dict = {}       # Var -> the segment (count of control equations before it) defining it
    placed = []                 # (segment, 1 for the control equation closing it, original index, eqn)
    segment = 0
    for index, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive.family == CONTROL:
            placed.append((segment, 1, index, eqn))
            segment += 1
            at = segment
        elif index in early:
            at = max([segment_of.get(a, 0) for a in eqn.inputs if isinstance(a, Var)], default=0)
            placed.append((at, 0, index, eqn))
        else:
            at = segment
            placed.append((at, 0, index, eqn))
        for v in eqn.outs:
            segment_of[v] = at
    eqns = tuple(eqn for *_, eqn in sorted(placed, key=lambda p: p[:3]))
    if all(a is b for a, b in zip(eqns, jaxpr.eqns)):
        return jaxpr
    return dataclasses.replace(jaxpr, eqns=eqns)


def _feeds_conds_only(jaxpr) -> set:
    """Indices of the equations of `jaxpr` (not control flow, no result of `jaxpr`) whose results are read
    only by conds or by other such equations."""
    readers: dict = {}          # Var -> indices of the equations reading it
    for index, eqn in enumerate(jaxpr.eqns):
        for a in eqn.inputs:
            if isinstance(a, Var):
                readers.setdefault(a, []).append(index)
    results = {a for a in jaxpr.outs if isinstance(a, Var)}
    found: set = set()
    for index in range(len(jaxpr.eqns) - 1, -1, -1):       # readers come later: decided first
        eqn = jaxpr.eqns[index]
        if eqn.primitive.family == CONTROL or not eqn.outs or any(v in results for v in eqn.outs):
            continue
        if all(readers.get(v) and all(jaxpr.eqns[r].primitive is control.cond_p or r in found for r in readers[v])
               for v in eqn.outs):
            found.add(index)
    return found


def _idle_read_barriers(body, function_bodies, read_barriers) -> set:
    """The barriers of `read_barriers` (Sync -> buffers read by uniform ops before it) that guard nothing:
    no op can write any of those buffers after it. That holds when every op writing such a buffer comes
    before the barrier in the kernel body, outside any loop (so it runs once, and before), and no
    recursive function writes it. A predicate read from a buffer written once (BlockDrop's actions, a
    gate) then costs no barrier of its own."""
    where: dict = {}            # Sync -> its position in program order (kernel body only)
    writes: dict = {}           # Buffer -> [(position or None in a function, inside a loop)]
    position = itertools.count()

    def visit(block, in_loop, in_function):
        for stmt in block:
            pos = next(position)
            if isinstance(stmt, Sync) and stmt in read_barriers and not in_function:
                where[stmt] = pos
            elif isinstance(stmt, Wave):
                for value in (v for t in stmt.tasks for v in t.op.outputs):
                    writes.setdefault(value.storage, []).append((None if in_function else pos, in_loop))
            elif isinstance(stmt, Loop):
                visit(stmt.cond, True, in_function)
                visit(stmt.body, True, in_function)
            elif isinstance(stmt, Branch):
                for branch in stmt.branches:
                    visit(branch, in_loop, in_function)
    visit(body, False, False)
    for fn_body in function_bodies:
        visit(fn_body, False, True)

    def written_before_only(buf, pos) -> bool:
        return buf.kind != "frame" and all(
            at is not None and not in_loop and at < pos for at, in_loop in writes.get(buf, ()))
    return {sync for sync, pos in where.items() if all(written_before_only(b, pos) for b in read_barriers[sync])}


def _covered_read_barriers(body, read_barriers) -> set:
    """The barriers of `read_barriers` at the top level of a loop body or condition after which no statement
    can write the buffers read before them until another grid barrier: on every path from them (the rest of
    the body, the loop's condition, then around to the body's start, or out of the loop to the end of the
    kernel), a grid barrier comes first; every vEU has done its reads when it passes that one. (Seq2seq's
    token, read by every vEU at the end of a step, is written again by the next step's argmax, grid barriers
    later; at batch 64 the exit test's maximum of the tokens, read by every vEU in the condition, is written
    again by the next condition, after the body's barriers, or never once the loop exits.)"""
    covered = set()

    def visit(block, after):            # after: what runs once `block` is done; None: not known here
        for i, stmt in enumerate(block):
            if isinstance(stmt, Loop):
                exit_path = None if after is None else list(block[i + 1:]) + after
                for j, sync in enumerate(stmt.body):
                    if sync not in read_barriers:
                        continue
                    buffers = read_barriers[sync]
                    around = list(stmt.body[j + 1:]) + list(stmt.cond)
                    back_in = _barrier_first(around + list(stmt.body[:j]), buffers)   # (or the sync itself)
                    out = _barrier_first(around, buffers) or \
                        (exit_path is not None and _barrier_first(around + exit_path, buffers))
                    if back_in and out:
                        covered.add(sync)
                for j, sync in enumerate(stmt.cond):
                    if sync not in read_barriers or exit_path is None:
                        continue
                    buffers = read_barriers[sync]
                    rest = list(stmt.cond[j + 1:])      # then the body and around, or out of the loop
                    if _barrier_first(rest + list(stmt.body) + list(stmt.cond[:j]), buffers) and \
                            _barrier_first(rest + exit_path, buffers):
                        covered.add(sync)
                visit(stmt.cond, None)
                visit(stmt.body, None)
            elif isinstance(stmt, Branch):
                for branch in stmt.branches:
                    visit(branch, None)
    visit(tuple(body), [])
    return covered


def _barrier_first(stmts, buffers) -> bool:
    """Does a grid barrier (or the end of `stmts`) come before any statement that may write `buffers`? A
    nested loop or branch counts as a write when anything in it may write them (a call: always), and its
    own barriers do not count (it may run none of them)."""
    for stmt in stmts:
        if isinstance(stmt, Sync) and stmt.always_grid:
            return True
        if _may_write(stmt, buffers):
            return False
    return True


def _may_write(stmt, buffers) -> bool:
    if isinstance(stmt, Call):
        return True
    if isinstance(stmt, Wave):
        return any(v.storage in buffers for task in stmt.tasks for v in task.op.outputs)
    if isinstance(stmt, Assign):
        return stmt.dst.storage in buffers
    if isinstance(stmt, Loop):
        return any(_may_write(s, buffers) for s in stmt.cond + stmt.body)
    if isinstance(stmt, Branch):
        return any(_may_write(s, buffers) for branch in stmt.branches for s in branch)
    return False


def _without(block, drop) -> tuple:
    """`block` without the statements in `drop`, nested blocks included."""
    out = []
    for stmt in block:
        if stmt in drop:
            continue
        if isinstance(stmt, Loop):
            stmt = dataclasses.replace(stmt, cond=_without(stmt.cond, drop), body=_without(stmt.body, drop))
        elif isinstance(stmt, Branch):
            stmt = dataclasses.replace(stmt, branches=tuple(_without(b, drop) for b in stmt.branches))
        out.append(stmt)
    return tuple(out)


def _drop_trailing_sync(stmts):
    stmts = list(stmts)
    while stmts and isinstance(stmts[-1], Sync):
        stmts.pop()
    return stmts


def _split_host(body, functions):
    """Host control: every maximal run of straight-line statements becomes its own kernel."""
    kernels: list[Kernel] = []

    def split(block):
        out, run = [], []

        def flush():
            if run:
                kernels.append(Kernel(f"k{len(kernels)}", tuple(_drop_trailing_sync(run))))
                out.append(Launch(len(kernels) - 1))
                run.clear()
        for stmt in block:
            if isinstance(stmt, Loop):
                flush()
                out.append(Loop(split(stmt.cond), stmt.pred, split(stmt.body)))
            elif isinstance(stmt, Branch):
                flush()
                out.append(dataclasses.replace(stmt, branches=tuple(split(b) for b in stmt.branches)))
            elif isinstance(stmt, Call):
                flush()
                out.append(stmt)
            else:
                run.append(stmt)
        flush()
        return tuple(out)

    host = split(body)
    functions = tuple(RecFunction(f.name, f.params, f.results, split(f.body), f.max_depth, f.n_sites)
                      for f in functions)
    return tuple(kernels), host, functions


def schedule(program, *, control="device", grid=132, block=256, partition=None, wavefront=None,
             hoist=None, resident_bytes=0, owner=None, epilogues=(), views=(), balance=None, rows=(),
             fork=None, window_stores=(), resident_calls=None, cells=None, spread_frames=None,
             aside=None, uniform_reductions=None, resident_partitioned=None, index_ranges=None, concat_k=None,
             k_parts=(), thin_gemv=None, row_gathers=(), siblings=(), row_blocks=(), flags=None,
             double_temps=None, smem_temps=None, split_k=None, preloads=None, peel=None, resident_pad=0) -> Plan:
    """The Plan for `program` (see gdsl.schedule.plan). `partition`: run loops that are independent
    pipelines partitioned (True), never (False), or when estimated faster (None). `wavefront`: skew
    counted loops whose body is a chain of recurrences (True), never (False), or when estimated faster.
    `hoist=False` turns off the first three passes (to measure what they give). `resident_bytes`: the
    shared memory per vEU a backend offers for loop-invariant matmul weights (resident.py; 0: none).
    `owner=True`: owner-computes placement with double-buffered carries (owner.py, unroll.py) where it
    leaves fewer grid barriers per loop step; "auto" or None (the default): where it also is estimated faster
    per step, runs no more uTasks one after another per step and lays its loops out as one chain (pays);
    False: not. The choice is made for the whole program (all its counted loops or none).
    `concat_k=True`: a sum of matmuls over loop-invariant right operands, `A1 @ B1 + A2 @ B2`, becomes one
    matmul over the concatenated depth, `[A1 | A2] @ [B1 ; B2]`, the stacked B built before the loop
    (concat.py); None: only in the owner-computes plan (where a layer's vEUs would run the products one after
    the other) and where the backend reads the concatenated operand in place (`k_parts`); False: never.
    `k_parts`: the backend's lowering chain, whose "k_parts" rule for matmul says that it reads such a
    concatenated left operand from its parts in place (Scheduler._fold_k_parts; empty: it is a copy).
    `row_gathers`: the backend's lowering chain, whose "row_gather" rule for matmul says that it reads the rows
    of a table gathered at run-time indices (`E[idx] @ W`) in place, the take folded into the matmuls that are
    its only readers (Scheduler._fold_row_gathers, plan.ROW_INDEX; empty, the default: the take is an op).
    `siblings`: the backend's lowering chain, whose "n_parts" rule for matmul says that it computes the sibling
    matmuls of a wave (one left operand, right operands the loop never writes, on the same vEUs with the same
    uTasks, one whole GEMV tile each) as one op (siblings.py, plan.N_PARTS; empty: separate ops; the C family
    passes its chain unless siblings=False).
    `row_blocks`: the backend's lowering chain, whose "row_block" rules say which elementwise-like kinds (and
    cell chains) take 2-D chunks (plan.ROW_BLOCK): an owner-computes column layout of several rows (batch > 1)
    may then give each vEU a block of rows by a column range (owner.py); empty: a layout's uTasks take whole
    rows (a chunk of tile_n elements per row), which at batch 64 is never worth its barrier.
    `flags=True` (device control): a loop's grid barrier that orders only carries written by elementwise ops
    and read by the next step's matmuls as their left operand becomes a flag sync (flags.py: the readers
    wait for each element's flag; proven from the plan's accesses); None (the default) or False: not.
    `double_temps=True` (with `flags`, device control): where the flag pass leaves a grid barrier in a
    top-level loop, the plan's counted loops unrolled twice (unroll.py) are scheduled too, so that the second
    copy's loop temporaries (a step's gate buffers) are buffers of their own and one is reused only two steps
    apart; that plan, its flag syncs found by the same proof, is taken when it leaves fewer grid barriers per
    step (_doubled_temps); True: so; None (the default): so where the doubled plan has flag syncs (the LSTM bs1
    on the H200, session 12: 0.42 -> 0.40 ms; a doubled plan with fewer barriers but no flag sync, as small
    recurrences get, is not timed, and it may lose sibling merges and window stores); False: not.
    `preloads=True` (device control; a backend that renders Task.preload): an elementwise op's inputs that a
    loop step does not change by the wave before it are loaded one wave early (preload.py); None or False: not.
    `smem_temps=True` (device control): temps that uTasks of one vEU only write and read (a partitioned loop's
    per-head chain, a vEU's gate columns between its GEMV and its cell) live in that vEU's shared memory at the
    same indices, within what `resident_bytes` leaves past the resident weights (local.py, Plan.block_local);
    "loops": only those a loop's body touches (local.LOOPS; what the C family passes for the jit's default);
    None (the default) or False: every temp in the workspace.
    `epilogues`: the backend's lowering chain, whose "epilogue" rules say which contractions may run an
    elementwise chain that reads their result as an epilogue (Scheduler._fold_epilogues; empty: never).
    `views`: the backend's lowering chain, whose "view" rules say which windows it reads in place at a
    run-time offset under device control (Scheduler._dynamic_view; empty: none, they stay ops).
    `rows`: the backend's lowering chain; with a "utask" rule for ROWS, chains of reductions over the last
    axis and the elementwise steps on those rows fuse into one op (rows.py; empty: never).
    `cells=False`: no cell chains (with such a backend, connected elementwise items of one shape, a
    recurrent cell's `c`, `h` and carry updates, fuse into one ROWS op with several outputs; None or True: on).
    `balance=False`: each wave's ops keep the split chosen for the whole grid and share it by cost; None or
    True: a wave's splits and shares are chosen together when that is estimated faster (balance.py).
    `fork=True`: two calls of one recursive function whose arguments do not read each other's results
    become a Fork (plan.Fork) that device control runs on the two halves of the vEU group; None or False:
    calls one after the other (the default until it is timed).
    `window_stores`: the backend's lowering chain, whose "epilogue" rules for dynamic_update_slice and a
    contraction's or reduction's kind say that it may store its result straight into the window of an
    in-place update that is its only reader, or, a reduction, as well as into its own output
    (Scheduler._fold_window_stores; device control; empty: never).
    `uniform_reductions=True`: a reduction to one element of up to UNIFORM_REDUCTION_MAX_INPUT elements is a
    uniform op (every vEU computes it, no op and no barrier) instead of only up to UNIFORM_MAX_INPUT; None or
    False: not (the default until it is timed).
    `resident_partitioned`: partitioned loops keep their weights resident too, all of a loop's or none
    (resident.keep_resident); None: resident.PARTITIONED (on); False: only loops that are not partitioned.
    `resident_pad`: a GEMM-shaped matmul's resident rows that many elements wider than its tile (the backend's
    choice: resident.RESIDENT_PITCH); 0 (the default): not.
    `index_ranges=True`: `where(i < 0, i + n, i)` of an integer `i` that is never negative (an argmax carried
    through a loop: Seq2seq's token before its embedding gather) becomes `i` first (ranges.py); None or
    False: not (the default until it is timed).
    `resident_calls=True`: the weights of a
    recursive function's GEMV-shaped matmuls (an input or const the plan never writes) stay in the shared
    memory of their vEUs for the whole kernel, staged once when it starts, within `resident_bytes` (not with
    Forks; resident.keep_resident_in_functions); None or False: read from memory at every call (the default
    until it is timed).
    `spread_frames=True` (device control, without Forks): a recursive function whose calls step more than one
    frame (results read in the callees' frames) puts each callee's own callees `spread * step` frames further
    (plan.RecFunction.spread), so that a later call's subtree never reuses the frames an earlier call's last op
    read, and the grid barrier at the end of that call becomes a block sync where only such a sibling follows
    (_spread_sites); None (the default) or True: on (RAE on the H200 with `aside`: 0.110 -> 0.096 ms);
    False: off.
    `aside=True` (device control, without Forks): a small wave of a recursive function that grid barriers
    isolate (RAE's leaf) runs on the vEUs right after those of the functions' widest waves, at the same time
    as their uTasks instead of after them on one vEU (_waves_aside); None (the default) or True: on; False: off.
    `thin_gemv` (None, the default, or True): every GEMV tile stages its whole k in one chunk where a thread's
    B values fit its registers (utasks.thin_gemv_params: one round trip instead of one per 256 k), and a
    GEMV-shaped matmul may also take tiles of utasks.THIN_GEMV_COLUMNS (fewer than 16 columns) where those
    stage their k so (utasks.thin_columns), so that one whose 16-column tiles leave vEUs idle spreads over
    more of them (RAE's node GEMV: 64 vEUs instead of 32); False: neither.
    `split_k` (None, the default, or True): a GEMM whose output tiles are too few for the grid and whose k is
    deep runs as S partial products over ranges of k and a fused op of the next wave that sums them, where
    utasks.k_splits estimates that clearly faster (splitk.py; utasks.FORCE_K_SPLITS forces an S); False: never.
    `peel` (None, the default: unless `fork`; or True): a recursive function's base cases run at its call sites,
    with no call (peel.py; the branch result in the callee's frame, where the call would leave it); False: every
    call a Call.

    Small work on the program's inputs leaves its branches first (speculate.py: it runs with the kernel's first
    wave instead of as a wave of the branch), then loop invariants leave their loops (licm.py): the plan never
    recomputes them per iteration.
    Per-step products `xs[i] @ W` of counted loops become one GEMM before the loop (steps.py). Then
    chains of recurrences are skewed into wavefronts (wavefront.py)."""
    if wavefront not in (None, True, False):
        raise ValueError(f"wavefront must be None (when estimated faster), True or False, got {wavefront!r}")
    if hoist not in (None, True, False):
        raise ValueError(f"hoist must be None (on), True or False, got {hoist!r}")
    if owner not in (None, True, False, "auto"):
        raise ValueError(f"owner must be None ('auto'), True, False or 'auto', got {owner!r}")
    if concat_k not in (None, True, False):
        raise ValueError(f"concat_k must be None (with owner), True or False, got {concat_k!r}")
    if balance not in (None, True, False):
        raise ValueError(f"balance must be None (on), True or False, got {balance!r}")
    if fork not in (None, True, False):
        raise ValueError(f"fork must be None (off), True or False, got {fork!r}")
    if resident_calls not in (None, True, False):
        raise ValueError(f"resident_calls must be None (off), True or False, got {resident_calls!r}")
    if cells not in (None, True, False):
        raise ValueError(f"cells must be None (on), True or False, got {cells!r}")
    if spread_frames not in (None, True, False):
        raise ValueError(f"spread_frames must be None (on), True or False, got {spread_frames!r}")
    if aside not in (None, True, False):
        raise ValueError(f"aside must be None (on), True or False, got {aside!r}")
    if thin_gemv not in (None, True, False):
        raise ValueError(f"thin_gemv must be None (on), True or False, got {thin_gemv!r}")
    if flags not in (None, True, False):
        raise ValueError(f"flags must be None (off), True or False, got {flags!r}")
    if double_temps not in (None, True, False):
        raise ValueError(f"double_temps must be None (on), True or False, got {double_temps!r}")
    if split_k not in (None, True, False):
        raise ValueError(f"split_k must be None (on), True or False, got {split_k!r}")
    if peel not in (None, True, False):
        raise ValueError(f"peel must be None (on), True or False, got {peel!r}")
    if smem_temps not in (None, True, False, LOOPS):
        raise ValueError(f"smem_temps must be None (off), True, {LOOPS!r} or False, got {smem_temps!r}")
    options = dict(
        control=control, grid=grid, block=block, partition=partition, resident_bytes=resident_bytes,
        epilogues=epilogues, views=views, balance=balance is not False, rows=rows, fork=bool(fork),
        window_stores=window_stores, resident_calls=bool(resident_calls), cells=cells is not False,
        spread_frames=spread_frames is not False, aside=aside is not False,
        uniform_reductions=bool(uniform_reductions), resident_partitioned=resident_partitioned,
        k_parts=k_parts, thin_gemv=thin_gemv is not False, row_gathers=row_gathers, siblings=siblings,
        row_blocks=row_blocks, split_k=split_k is not False, resident_pad=resident_pad)
    if peel or (peel is None and not fork):      # (a Fork pairs two Calls: peeled, they are branches)
        program = _checked(peel_program(program), program)
    plan, source = _scheduled(program, control, wavefront, hoist, owner, concat_k, k_parts, index_ranges, options,
                              flags)
    if flags:
        plan = flag_syncs(plan)
        if double_temps is not False and control == "device" and source is not None and loop_grid_barriers(plan):
            plan = _doubled_temps(source, plan, options, with_flags=double_temps is None)
    if gemv_rows.ENABLED and rows and has_lowering(GEMV_ROWS_GEMV.name, tuple(rows), "utask"):
        plan = fuse_gemv_rows(plan)
    if smem_temps and control == "device":
        plan = block_local(plan, resident_bytes, loops_only=smem_temps == LOOPS)
        plan = smem_carries(plan, resident_bytes)
    if preloads and control == "device":
        plan = step_preloads(plan)
    return plan


def _doubled_temps(program, plan, options, with_flags=False) -> Plan:
    """double_temps: the plan of `program` (the one `plan`, flag syncs found, was scheduled from) with its
    counted loops unrolled twice, flag syncs found, when that leaves fewer grid barriers per loop step (and,
    `with_flags`, has flag syncs); else `plan`. The second copy's temporaries are values of their own
    (unroll.py), so a buffer a step writes and reads is written again only two steps later, and a
    write-after-read on it across vEUs that only the grid barrier at the step's end ordered (the LSTM's next-step
    matmuls overwriting the gates that another layer's cell of this step still reads) may now be ordered by the
    flag waits between: flags.py's proof decides."""
    doubled = _unrolled_plan(program, options)
    if doubled is None:
        return plan
    doubled = flag_syncs(doubled)
    fewer = loop_grid_barriers(doubled) < loop_grid_barriers(plan)
    return doubled if fewer and (doubled.stats.get("flag_syncs") or not with_flags) else plan


def _unrolled_plan(program, options, **more) -> Plan | None:
    """The plan of `program` with its counted loops unrolled twice (unroll.py; two steps an iteration), None
    when it has none to unroll."""
    unrolled, count = unroll_twice(program)
    if not count:
        return None
    plan = Scheduler(_checked(unrolled, program), **options, **more).run()
    plan.stats["steps_per_iteration"] = 2
    return plan


def _scheduled(program, control, wavefront, hoist, owner, concat_k, k_parts, index_ranges, options,
               flags=False) -> tuple:
    """schedule's plan before the flag syncs (an owner plan taken for having none left: after them), and the
    program it was scheduled from (None: unrolled for owner-computes placement)."""
    if index_ranges:
        program = _checked(drop_index_wraps(program), program)
    program = _checked(trailing.flatten_trailing_reductions(program), program)
    if hoist is not False:
        program = _checked(speculate.hoist_branches(program), program)
        program = _checked(licm.hoist_program(program), program)
        program = _checked(hoist_step_products(program), program)
    # (concat_k=None: the owner plan's products stacked where the backend reads the parts in place)
    stack_owned = concat_k or (concat_k is None and bool(k_parts) and has_lowering(matmul_p.name, k_parts, "k_parts"))
    stacked = _stacked_products(program, hoist) if stack_owned else program
    plain, plan = _skewed_or_plain(stacked if concat_k else program, wavefront, options)
    if owner is not False and control == "device":
        skewed = plain is not (stacked if concat_k else program)
        source = stacked
        source = _checked(skew_program(source)[0], source) if skewed else source
        owner_plan = _unrolled_plan(source, options, owner=True)
        if owner_plan is not None and loop_grid_barriers(owner_plan) < loop_grid_barriers(plan):
            if owner is True or pays(owner_plan, plan):
                return owner_plan, None
            if flags and OWNER_WITHOUT_BARRIERS:
                flagged = flag_syncs(owner_plan)
                if loop_grid_barriers(flagged) == 0:
                    return flagged, None
    return plan, plain


def pays(owner_plan, plan) -> bool:
    """owner="auto": is the owner-computes plan estimated faster per loop step than `plan` (loop_step_ns), its
    busiest vEUs running no more uTasks one after another (loop_step_rounds), its loops laid out as one chain
    (owner.py's chains share the grid: stats["owner_chains"])? A uTask of a step is a memory round trip or
    more, which at batch 1 costs as much as the grid barrier the layout saves (docs/performance.md: GEMV
    1.4-1.7 µs, a cell 0.9 µs, a barrier's wait 2.0-2.9 µs on the H200), where the cost model prices the
    default's wide uTasks by bandwidth: the LSTM's owner plan with two GEMVs per layer's vEUs was estimated
    faster and measured slower (0.456 -> 0.620 ms), one more uTask per step than the default. With the
    products stacked (concat_k) it has one GEMV per layer and as many rounds as the default, and was still
    slower (0.466 -> 0.540 / 0.555 ms, H200, session 9): its ten chains (a skewed stack) each get a tenth of
    the grid, where the default spreads every GEMV of a step over all of it. NASRNN's one chain pays
    (4.73 -> 3.80 ms)."""
    return loop_step_ns(owner_plan) < loop_step_ns(plan) and \
        loop_step_rounds(owner_plan) <= loop_step_rounds(plan) and owner_plan.stats.get("owner_chains", 0) == 1


def _stacked_products(program, hoist):
    """`program` with its sums of matmuls over loop invariants as matmuls over the concatenated depth
    (concat.py), the stacked right operands moved out of as many loops as they are invariant for."""
    stacked = _checked(concat_products(program), program)
    return stacked if hoist is False or stacked is program else _checked(licm.hoist_program(stacked), stacked)


def loop_step_ns(plan) -> float:
    """Estimated ns of one step of the kernels' loops (wavefront.loop_iteration_ns, per step of a body
    unrolled twice for owner-computes placement: plan.stats["steps_per_iteration"])."""
    return loop_iteration_ns(plan) / plan.stats.get("steps_per_iteration", 1)


def loop_step_rounds(plan) -> float:
    """The uTasks one vEU runs one after another in one step of the kernels' loops (per wave its busiest
    vEU's; wavefront.loop_iteration_rounds, per step as loop_step_ns)."""
    return loop_iteration_rounds(plan) / plan.stats.get("steps_per_iteration", 1)


def _skewed_or_plain(program, wavefront, options) -> tuple:
    """(program, its plan): skewed (wavefront.py) when asked for, or under wavefront=None when estimated
    faster; else as it is."""
    if wavefront is False:
        return program, Scheduler(program, **options).run()
    skewed, stretch = skew_program(program)
    if skewed is program:
        return program, Scheduler(program, **options).run()
    skewed = _checked(skewed, program)
    skewed_plan = Scheduler(skewed, **options).run()
    if wavefront:
        return skewed, skewed_plan
    plain_plan = Scheduler(program, **options).run()
    faster = loop_iteration_ns(skewed_plan) * stretch < loop_iteration_ns(plain_plan)
    return (skewed, skewed_plan) if faster else (program, plain_plan)


def loop_grid_barriers(plan) -> float:
    """Grid barriers per step of the kernels' top-level loops, summed over those loops (their condition
    and body, nested statements included); a plan whose loops were unrolled twice (owner=True) says so in
    its stats ("steps_per_iteration")."""
    loops = [s for k in plan.kernels for s in k.body if isinstance(s, Loop)]
    barriers = sum(1 for loop in loops for s in walk(loop.cond + loop.body)
                   if isinstance(s, Sync) and s.scope == "grid")
    return barriers / plan.stats.get("steps_per_iteration", 1)


def loop_invariant_work(plan) -> list[str]:
    """What the kernels' top-level loops compute (the Ops of their waves and their uniform ops, nested
    statements included) from nothing those loops write: work that could run once before the loop (LICM's
    leftovers, licm.py). A read counts through a view's run-time offsets and gathered rows' indices too."""
    found = []
    for loop in (s for k in plan.kernels for s in k.body if isinstance(s, Loop)):
        stmts = list(walk(loop.cond + loop.body))
        written = {id(v.storage) for s in stmts for v in _written_values(s)}
        for s in stmts:
            if isinstance(s, Wave):
                found += [t.op.name for t in s.tasks if not _reads_any(t.op.inputs, written)]
            elif isinstance(s, Uniforms):
                found += [repr(u.output) for u in s.ops if not _reads_any(u.inputs, written)]
    return found


def _written_values(stmt) -> list:
    if isinstance(stmt, Wave):
        return [v for t in stmt.tasks for v in t.op.outputs]
    if isinstance(stmt, Uniforms):
        return [u.output for u in stmt.ops]
    return [stmt.dst] if isinstance(stmt, Assign) else []


def _reads_any(values, storages) -> bool:
    def read(v):
        yield v.storage
        yield from (t.index.storage for t in v.terms if isinstance(t.index, Value))
        if v.rows is not None:
            yield v.rows.index.storage
    return any(id(s) in storages for v in values for s in read(v))


def _checked(transformed, program):
    """`transformed` (a pass's result), typechecked when the pass changed anything."""
    if transformed is not program:
        typecheck_program(transformed)
    return transformed
