"""The plan simulator: runs a Plan with numpy, uTask by uTask on its vEUs, and checks every read against
the barriers. It is the executable definition of plan semantics and finds missing barriers without a GPU.

Semantics it defines (every backend follows them):
- uTask t of a Task runs on vEU `first + t % count`; its share of the Op's output is utasks.py's.
- A frame value of recursive function f lives at index `frame[f] + frame_offset` of f's frame storage
  (f.frames copies); depth[f] counts the active calls of f (0 outside f), frame[f] is the sum of their
  Call steps (depth[f] when every step is 1). Call(f) fails with RecursionDepthError when
  depth[f] + 1 > max_depth.
- Uniform values are per vEU; every vEU computes the same ones (the simulator keeps one copy).
- An output stored into a window (plan.StoreWindow) writes each element at its place in the window, from the
  start its uniforms have when the uTask runs (`resolved`); a dropped window (`dropped`) writes nothing. A
  reduction with plan.WINDOW_COPY writes its result twice: its own output, and its last output's window.
- Race rules: a vEU may read an element another vEU wrote only after a grid barrier, and may overwrite an
  element another vEU read only after one; within one vEU, a different op's write must be followed by a
  sync (block or grid) before a read. Violations raise BarrierError naming the op and buffer.
- A Fork (plan.Fork) splits the running vEU group [lo, hi) (the grid at first; heap number g, 1 for the
  grid) at mid = lo + (hi - lo) // 2: the lower half (group 2g) runs the first call and the statements
  between, the upper half (2g + 1) those statements and the second call, one after the other here but
  each from the state before the Fork (its own control state: depth, frames, group). Inside a group,
  uTask t of a Task runs on vEU lo + (first + t % count) % (hi - lo), a grid Sync is a barrier of the
  group (it clears what the group's vEUs wrote and what only they read: the other half's accesses stay
  checked against), a uniform op reads memory on the group's vEUs. A forked call's own frame is where
  its caller addresses it; the frames of its callees are in a frame region of its group (`frames`
  copies each, appended as groups first use them): frame_offset k > 0 is at frame[f] + k + kid_base[f],
  0 at frame[f] + own_base[f]. A group of fewer than 2 * min_group vEUs runs both halves, the calls
  not forked, with a barrier of the group in between.
- Spread frames (RecFunction.spread > 0, no Forks): a buffer frame value is addressed with the same two
  bases; a Call of step s makes the callee's own base the caller's callee base and moves the callee's own
  callee base `f.callee_extra(s)` further (the frames of a later call's subtree then lie past those an
  earlier call's last op read). Stacked uniforms keep frame[f] + frame_offset.
- Flag syncs (Sync "flags", gdsl/schedule/flags.py): a vEU-local sync that resets nothing. Each vEU v knows,
  per vEU u, the sync count below which u's accesses are ordered before v's (`known`: all of them after a
  grid barrier). A read of an element another vEU wrote, or a write over one another vEU read, is allowed
  when that is known. A matmul of the loop reading a published buffer as (part of) its left operand (or,
  with flags.CELL_WAITS, an elementwise-like op reading one) waits for the elements: that read is always
  allowed, and its vEU learns what each writer knew when it wrote (its own earlier syncs included), from its
  next sync on; a matmul's uTask that waited for the whole buffer knows it for its own writes already (the
  tile routines stage A before they store). Nothing else is ordered, so a
  barrier made a flag sync wrongly is a race here. (flags.py's proof also uses that a writer's reads come
  before its published stores in the same thread; the simulator does not: it is stricter.) A flag sync's
  FlagWaits are such waiting reads of their elements by their vEUs, known from the sync on.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from gdsl.core.ir import Lit
from gdsl.errors import RecursionDepthError
from gdsl.primitives.linalg import matmul_p
from gdsl.primitives.registry import REGISTRY
from gdsl.primitives.structural import broadcast_p
from gdsl.schedule import utasks
from gdsl.schedule.flags import loop_flags, published_in
from gdsl.schedule.plan import (
    CHAIN_PARTS,
    COPY,
    FUSED,
    K_PARTS,
    K_SPLITS,
    N_PARTS,
    RESULT,
    ROW_INDEX,
    ROWS,
    WINDOW_COPY,
    Assign,
    Branch,
    Buffer,
    Call,
    Fork,
    Launch,
    Loop,
    Sync,
    Uniform,
    Uniforms,
    Value,
    Wave,
    a_parts,
    epilogue_of,
    epilogue_operands,
    fold_expr,
    walk,
)
from gdsl.schedule.preload import previous_wave
from gdsl.schedule.rows import evaluate_rows
from gdsl.schedule.shares import SPLIT_PARAMS, read_share, storage_elements, window_share, write_share
from gdsl.schedule.splitk import partial_products

# The barrier between the two calls of a Fork that a group too small to split makes one after the other
# (not a statement of the plan).
FORK_BARRIER = Sync("grid")


class BarrierError(RuntimeError):
    """A uTask read (or overwrote) data that no barrier made visible (or safe to overwrite)."""


def _flat(array, slot, frames=1):
    """A flat writable view of `frames` adjacent frame copies from `slot` (array[slot] of a 0-d copy would
    be a scalar copy)."""
    return array[slot:slot + frames].reshape(-1)


def frames_spanned(value: Value) -> int:
    """The frame copies a buffer value covers: 1, or more for a view spanning adjacent frames (call results
    concatenated in place, see Scheduler._adjacent_call_results)."""
    size = value.storage.aval.size
    return max(1, -(-(value.offset + value.aval.size) // size)) if size else 1


class _Memory:
    """Buffers with, per element, who wrote/read it since the last grid barrier."""

    # The per-element records and what a fresh one holds (see `grow`).
    RECORDS = {"writer": -1, "writer_op": -1, "writer_sync": 0, "reader_lo": -1, "reader_hi": -1,
               "reader_sync": -1}

    def __init__(self, buf: Buffer, copies: int):
        self.buf = buf
        shape = (copies,) + buf.aval.shape
        self.data = np.zeros(shape, buf.aval.dtype)
        self.writer = np.full(shape, -1, np.int64)       # vEU, -1: none since the last grid barrier
        self.writer_op = np.full(shape, -1, np.int64)
        self.writer_sync = np.zeros(shape, np.int64)     # the writer vEU's sync count at the write
        self.reader_lo = np.full(shape, -1, np.int64)    # the lowest and highest vEU that read it, -1: none
        self.reader_hi = np.full(shape, -1, np.int64)
        self.reader_sync = np.full(shape, -1, np.int64)  # the readers' latest sync count at a read
        # A buffer published by flag syncs: each vEU's latest sync count at a read of each element (-1: none),
        # exact where the range above would count vEUs between two readers (a skewed stack's layers) as readers.
        self.read_by = None

    def reset(self):
        self.writer.fill(-1)
        self.reader_lo.fill(-1)
        self.reader_hi.fill(-1)
        if self.read_by is not None:
            self.read_by.fill(-1)

    def reset_group(self, lo: int, hi: int):
        """A barrier of vEUs [lo, hi): forget their writes and the reads no vEU outside them made."""
        self.writer[(self.writer >= lo) & (self.writer < hi)] = -1
        mine = (self.reader_lo >= lo) & (self.reader_hi < hi)
        self.reader_lo[mine] = -1
        self.reader_hi[mine] = -1
        if self.read_by is not None:
            self.read_by[:, lo:hi] = -1


def grow(memory, copies: int):
    """Give `memory` (a _Memory, or any object with `data`) `copies` frame copies, appending fresh ones."""
    have = memory.data.shape[0]
    if copies <= have:
        return
    for name, fill in [("data", 0)] + list(_Memory.RECORDS.items()):
        array = getattr(memory, name, None)
        if array is not None:
            extra = np.full((copies - have,) + array.shape[1:], fill, array.dtype)
            setattr(memory, name, np.concatenate([array, extra]))


class Simulator:
    def __init__(self, plan, *, seed=0, check=True):
        self.plan = plan
        self.rng = np.random.default_rng(seed)
        self.check = check
        self.functions = {f.name: f for f in plan.functions}
        self.mem: dict = {}
        for buf in plan.buffers:
            copies = self.functions[buf.frame_of].frames if buf.frame_of else 1
            self.mem[buf] = _Memory(buf, copies)
        for buf in published_in([s for k in plan.kernels for s in k.body]):
            if buf in self.mem:           # (a subclass may keep its buffers otherwise: models/floor.py)
                self.mem[buf].read_by = np.full((buf.aval.size, plan.grid), -1, np.int64)
        self.uniforms: dict = {}
        self.depth = {name: 0 for name in self.functions}
        self.return_sites: list = []                     # of the running calls, innermost last
        self.frame = {name: 0 for name in self.functions}
        # Forks (see the module docstring): the running group (heap number, lo, hi), the frame bases of
        # each function (own frame, callees' frames), the group a call about to be made enters (None: the
        # caller's), and the frame region of each group that forked calls used (region 0: the grid's).
        self.group = (1, 0, plan.grid)
        self.own_base = {name: 0 for name in self.functions}
        self.kid_base = {name: 0 for name in self.functions}
        self.entering = None
        self.regions = {1: 0}
        self.local_syncs = np.zeros(plan.grid, np.int64)
        self.known = np.zeros((plan.grid, plan.grid), np.int64)   # flag syncs: see the module docstring
        self.learned = np.zeros((plan.grid, plan.grid), np.int64)  # known from a vEU's next sync on
        self.waits: dict = {}             # Op -> input numbers that wait for flags (the running loop's)
        # Preloads (preload.py): the wave before a wave with preloaded inputs -> that wave; what those inputs
        # held when the wave before started, checked equal where the op reads them.
        self.preload_before = _waves_before_preloads(plan)
        self.preloaded: dict = {}
        self.published: set = set()
        self.snapshots: dict = {}         # (buffer, vEU) -> what the vEU knew at its last published write
        self.staged: dict = {}            # Buffer -> elements per vEU, of the running loops' staged slices
        self.op_ids: dict = {}
        self.stats = {"grid_barriers": 0, "utasks": 0}

    # -------------------------------------------------------------------------------------------- values
    def _slot(self, value: Value) -> int:
        s = value.storage
        if not s.frame_of:
            return 0
        slot = self.frame[s.frame_of] + value.frame_offset
        if isinstance(s, Uniform):          # (a vEU's own registers: no frame regions)
            return slot
        return slot + (self.kid_base if value.frame_offset else self.own_base)[s.frame_of]

    def resolved(self, value: Value) -> Value:
        """`value` with its run-time offset (plan.Value.terms) resolved from the uniforms as they are now: a
        view is read at the offset its uniforms have where its reader runs."""
        if not value.terms:
            return value
        offset = value.offset
        for term in value.terms:
            index = int(self.read(term.index).reshape(-1)[0])
            offset += term.stride * min(max(index, 0), term.high)
        return dataclasses.replace(value, offset=offset, terms=())

    def dropped(self, value: Value) -> bool:
        """Does an output stored into a window (plan.StoreWindow) with `drop` store nothing this time: a
        start of its window out of range?"""
        if value.window is None or not value.window.drop:
            return False
        indices = [int(self.read(term.index).reshape(-1)[0]) for term in value.terms]
        return any(not 0 <= index <= term.high for index, term in zip(indices, value.terms))

    def read(self, value: Value, veu=None, op=None) -> np.ndarray:
        value = self.resolved(value)
        s = value.storage
        if isinstance(s, Lit):
            return np.broadcast_to(np.asarray(s.val), value.aval.shape).copy()
        if isinstance(s, Uniform):
            key = (s, self._slot(value))
            if key not in self.uniforms:
                raise BarrierError(f"uniform {s.name} read before it was computed")
            return self.uniforms[key].reshape(value.aval.shape)
        m, slot, frames = self.mem[s], self._slot(value), frames_spanned(value)
        elements = self._gathered(value) if value.rows is not None else storage_elements(value, None)
        if veu is not None and self.check:
            self._check_read(m, slot, elements, veu, op, s.name, frames)
        return _flat(m.data, slot, frames)[elements].reshape(value.aval.shape).copy()

    def _gathered(self, value: Value) -> np.ndarray:
        """The storage elements of gathered rows (plan.Value.rows): row m at its index, clamped as take does."""
        rows = np.clip(self.read(value.rows.index).reshape(-1).astype(np.int64), 0, value.rows.high)
        width = value.aval.shape[-1]
        return (value.offset + rows[:, None] * width + np.arange(width)[None, :]).reshape(-1)

    def write_uniform(self, value: Value, data):
        s = value.storage
        self.uniforms[(s, self._slot(value))] = np.asarray(data, s.aval.dtype).reshape(s.aval.shape)

    def _check_read(self, m, slot, flat, veu, op, name, frames=1, waiting=None):
        writer = _flat(m.writer, slot, frames)
        writer_op = _flat(m.writer_op, slot, frames)
        writer_sync = _flat(m.writer_sync, slot, frames)
        idx = np.arange(writer.size) if flat is None else flat
        veus = [veu] if veu != "all" else range(self.group[1], self.group[2])
        for v in veus:
            w = writer[idx]
            other = (w >= 0) & (w != v)
            if waiting is not None:       # (a flag wait: it learns what each writer knew)
                for u in np.unique(w[other]):
                    waiting[:] = np.maximum(waiting, self.snapshots.get((m.buf, int(u)), waiting))
                other[:] = False
            other &= self.known[v, np.maximum(w, 0)] <= writer_sync[idx]
            if other.any():
                raise BarrierError(f"{op}: vEU {v} reads {name} written by vEU {int(w[other][0])} "
                                   f"with no grid barrier in between")
            same = (w == v) & (writer_op[idx] != self.op_ids.get(op, -3)) & \
                (writer_sync[idx] == self.local_syncs[v])
            if same.any():
                raise BarrierError(f"{op}: vEU {v} reads {name} that it wrote with no sync in between")
            lo, hi = _flat(m.reader_lo, slot, frames), _flat(m.reader_hi, slot, frames)
            first = lo[idx] == -1
            lo[idx] = np.where(first, v, np.minimum(lo[idx], v))
            hi[idx] = np.where(first, v, np.maximum(hi[idx], v))
            read_sync = _flat(m.reader_sync, slot, frames)
            read_sync[idx] = np.maximum(read_sync[idx], self.local_syncs[v])
            if m.read_by is not None:
                m.read_by[idx, v] = np.maximum(m.read_by[idx, v], self.local_syncs[v])

    def _record_write(self, m, slot, flat, veu, op, name, known=None):
        lo, hi = _flat(m.reader_lo, slot)[flat], _flat(m.reader_hi, slot)[flat]
        others = (lo >= 0) & ((lo != veu) | (hi != veu))
        if self.check and others.any():       # (unless it knows every reader read before)
            known = self.known[veu] if known is None else known
            if m.read_by is not None:         # (each reader's latest read)
                read_by = m.read_by[flat]
                unknown = (read_by >= 0) & (known[None, :] <= read_by)
                unknown[:, veu] = False
                others = unknown.any(axis=1)
            else:                             # (the readers in lo..hi, at their latest read's sync)
                read_sync = _flat(m.reader_sync, slot)[flat]
                unknown = np.zeros_like(others)
                for r in range(int(lo[others].min()), int(hi[others].max()) + 1):
                    if r != veu:
                        unknown |= others & (lo <= r) & (r <= hi) & (known[r] <= read_sync)
                others = unknown
        if self.check and others.any():
            raise BarrierError(f"{op}: vEU {veu} overwrites {name} that another vEU read with no grid "
                               f"barrier in between")
        _flat(m.writer, slot)[flat] = veu
        _flat(m.writer_op, slot)[flat] = self.op_ids[op]
        _flat(m.writer_sync, slot)[flat] = self.local_syncs[veu]
        if m.buf in self.published:
            snapshot = (self.known[veu] if known is None else known).copy()
            snapshot[veu] = self.local_syncs[veu]
            self.snapshots[m.buf, veu] = snapshot

    def _check_staged(self, buf, flat, veu, op):
        """A buffer a running loop keeps in its vEUs' shared memory (plan.Staged) is only touched by each vEU
        within its own slice."""
        size = self.staged.get(buf)
        if size is None:
            return
        elements = np.arange(buf.aval.size)[flat] if flat is None or isinstance(flat, slice) else np.asarray(flat)
        if elements.size and not (veu * size <= elements.min() and elements.max() < (veu + 1) * size):
            raise BarrierError(f"{op}: vEU {veu} touches {buf.name} outside its staged slice "
                               f"[{veu * size}, {(veu + 1) * size})")

    # -------------------------------------------------------------------------------------------- run
    def run(self, flat_args) -> list:
        for value, arr in zip(self.plan.inputs, list(self.plan.consts) + list(flat_args)):
            self.mem[value.storage].data[0] = np.asarray(arr, value.aval.dtype).reshape(value.aval.shape)
        if self.plan.host is not None:
            self.block(self.plan.host)
        else:
            self.block(self.plan.kernels[0].body)
        return [self.read(v).copy() for v in self.plan.outputs]

    def block(self, stmts):
        for stmt in stmts:
            getattr(self, STATEMENT_RULES[type(stmt)])(stmt)

    def run_launch(self, stmt: Launch):
        self.block(self.plan.kernels[stmt.kernel].body)
        self.run_sync(Sync("grid"))   # a kernel boundary orders everything

    def grid_here(self, stmt: Sync) -> bool:
        """Is `stmt` a grid barrier where it runs now (plan.Sync.sites: by the running call's return site)?"""
        return stmt.is_grid_at(self.return_sites[-1] if self.return_sites else None)

    def run_sync(self, stmt: Sync):
        _, lo, hi = self.group
        self.local_syncs[lo:hi] += 1
        self.known[lo:hi] = np.maximum(self.known[lo:hi], self.learned[lo:hi])
        for wait in stmt.waits if self.check else ():  # (FlagWaits: a waiting read, known from here on)
            m, elements = self.mem[wait.buffer], np.arange(wait.start, wait.stop)
            for v in range(max(wait.first, lo), min(wait.first + wait.count, hi)):
                waiting = self.known[v].copy()
                self._check_read(m, 0, elements, v, "flag wait", wait.buffer.name, waiting=waiting)
                self.known[v] = np.maximum(self.known[v], waiting)
        if self.grid_here(stmt):
            self.known[lo:hi, lo:hi] = self.local_syncs[lo:hi][None, :]
            self.stats["grid_barriers"] += 1
            whole = (lo, hi) == (0, self.plan.grid)
            for m in self.mem.values():
                m.reset() if whole else m.reset_group(lo, hi)

    def run_uniforms(self, stmt: Uniforms):
        for u in stmt.ops:
            ins = [self._read_uniform_input(v, u.primitive) for v in u.inputs]
            params = {k: v for k, v in u.params.items() if k not in SPLIT_PARAMS}
            prim = REGISTRY[u.primitive]
            self.write_uniform(u.output, np.asarray(prim.impl(*ins, **params)[0]).astype(u.output.aval.dtype))

    def _read_uniform_input(self, value, what):
        if isinstance(value.storage, Buffer):
            return self.read(value, veu="all", op=f"uniform {what}")
        return self.read(value)

    def run_assign(self, stmt: Assign):
        src = self._read_uniform_input(stmt.src, "assign")
        self.write_uniform(stmt.dst, src.astype(stmt.dst.aval.dtype))

    def run_loop(self, stmt: Loop):
        roles = loop_flags(stmt)
        saved = self.waits, self.published, self.staged
        self.staged = {**self.staged, **{s.buffer: s.size for s in stmt.staged}}
        if roles is not None:
            self.waits = {op: set(numbers) for op, numbers in roles.readers.items()}
            self.published = set(roles.published)
        try:
            while True:
                self.block(stmt.cond)
                if not bool(self.read(stmt.pred).reshape(())):
                    return
                self.block(stmt.body)
        finally:
            self.waits, self.published, self.staged = saved

    def run_branch(self, stmt: Branch):
        if stmt.depth_of:
            self._check_depth(self.functions[stmt.depth_of])
        index = int(np.clip(int(self.read(stmt.index).reshape(())), 0, len(stmt.branches) - 1))
        self.block(stmt.branches[index])

    def run_call(self, stmt: Call):
        fn = self.functions[stmt.fn]
        self._check_depth(fn)
        self.depth[fn.name] += 1
        self.frame[fn.name] += stmt.step
        self.return_sites.append(stmt.site)
        saved = (self.group, self.own_base[fn.name], self.kid_base[fn.name])
        self.own_base[fn.name] = self.kid_base[fn.name]
        self.kid_base[fn.name] += fn.callee_extra(stmt.step)
        if self.entering is not None:
            self.group, self.entering = self.entering, None
            self.kid_base[fn.name] = self._region(fn) - self.frame[fn.name]
        try:
            self.block(fn.body)
        finally:
            self.return_sites.pop()
            self.depth[fn.name] -= 1
            self.frame[fn.name] -= stmt.step
            self.group, self.own_base[fn.name], self.kid_base[fn.name] = saved

    def _check_depth(self, fn):
        """A call of `fn` from here (a Call, or a Branch that stands for one) would go past max_depth?"""
        if self.depth[fn.name] + 1 > fn.max_depth:
            raise RecursionDepthError.of(fn)

    def _region(self, fn) -> int:
        """The first frame of the running group's frame region of `fn`, made on first use."""
        g = self.group[0]
        if g not in self.regions:
            self.regions[g] = len(self.regions)
            for buf, m in self.mem.items():
                if buf.frame_of == fn.name:
                    grow(m, fn.frames * len(self.regions))
        return self.regions[g] * fn.frames

    def run_fork(self, stmt: Fork):
        g, lo, hi = self.group
        if hi - lo < 2 * stmt.min_group:      # too few vEUs: both calls, one after the other, in this group
            self.block(stmt.first + stmt.between)
            self.run_sync(FORK_BARRIER)       # (the group's barrier, where the first half meets the join)
            self.block(stmt.second)
            return
        mid = lo + (hi - lo) // 2
        self.fork_half(stmt.first, stmt.between, (), (2 * g, lo, mid))
        self.fork_half((), stmt.between, stmt.second, (2 * g + 1, mid, hi))

    def fork_half(self, first, between, second, group):
        """One half of a Fork from the control state before it (restored after): `first` (its Call entered
        in `group`), `between`, `second` (its Call entered in `group`)."""
        state = (self.group, dict(self.depth), dict(self.frame), dict(self.own_base), dict(self.kid_base))
        try:
            for part in (first, between, second):
                for stmt in part:
                    if isinstance(stmt, Call):
                        self.entering = group
                    getattr(self, STATEMENT_RULES[type(stmt)])(stmt)
        finally:
            self.group, self.depth, self.frame, self.own_base, self.kid_base = state
            self.entering = None

    def run_wave(self, stmt: Wave):
        for task in stmt.tasks:
            self.op_ids.setdefault(task.op, len(self.op_ids))
            for k in task.preload:
                early, now = self.preloaded.pop((task.op, k), None), self.read(task.op.inputs[k])
                if early is None or not np.array_equal(early, now, equal_nan=early.dtype.kind in "fc"):
                    raise BarrierError(f"{task.op.name}: input {k}, loaded a wave early, changed before the op")
        later = self.preload_before.get(stmt)
        for task in later.tasks if later is not None else ():
            self.preloaded.update(((task.op, k), np.array(self.read(task.op.inputs[k]))) for k in task.preload)
        # Every uTask computes from the values before the wave (they never read what the wave writes:
        # the race check enforces that), then writes its share; vEUs interleave in random order.
        results = {task.op: self._evaluate(task.op) for task in stmt.tasks}
        work = [(task, t) for task in stmt.tasks for t in range(task.op.n_utasks)]
        _, lo, hi = self.group
        for k in self.rng.permutation(len(work)):
            task, t = work[k]
            veu = lo + (task.first + t % task.count) % (hi - lo)   # (the plan's vEU when the group is the grid)
            self._run_utask(task.op, t, veu, results[task.op])
            self.stats["utasks"] += 1

    def _evaluate(self, op, on_chip=None) -> list:
        """The outputs of `op` from the values before its wave (`on_chip`: storage -> the whole value of a
        GEMV_ROWS_GEMV op's intermediate result, which its later parts read instead of memory)."""
        if CHAIN_PARTS in op.params:      # a GEMV, a row chain, a GEMV as one (plan.GEMV_ROWS_GEMV), in order
            on_chip = {}
            for part in op.params[CHAIN_PARTS]:
                outs = self._evaluate(part, on_chip)
                on_chip.update((v.storage, out) for v, out in zip(part.outputs, outs))
            return outs
        ins = [on_chip[v.storage] if on_chip and v.storage in on_chip else self.read(v) for v in op.inputs]
        if op.kind == FUSED.name:
            return [evaluate_expr(op.expr, ins, op.outputs[0].aval)]
        if op.kind == ROWS.name:
            return evaluate_rows(op.params, ins)
        if op.kind == COPY.name:
            return [np.broadcast_to(ins[0], op.outputs[0].aval.shape).astype(op.outputs[0].aval.dtype)]
        params = {k: v for k, v in op.params.items() if k not in SPLIT_PARAMS}
        own = ins[:len(ins) - len(epilogue_operands(op))]    # the primitive's operands (an epilogue's follow)
        if K_PARTS in op.params:        # a left operand read in parts: their concatenation along the depth
            own = [np.concatenate([ins[number] for number, _, _ in a_parts(op)], axis=-1), own[1]]
        if ROW_INDEX in op.params:      # gathered rows (input 0 read through Value.rows): A and B only
            own = own[:2]
        if K_SPLITS in op.params:       # split-K's partial products, one slice of P per range of k (splitk.py)
            return [partial_products(op.kind, own, params, op.params[K_SPLITS])]
        if N_PARTS in op.params:        # sibling matmuls: A by each B, into each output
            products = [REGISTRY[op.kind].impl(own[0], b, **params)[0] for b in own[1:]]
            return [np.asarray(o).astype(v.aval.dtype).reshape(v.aval.shape) for o, v in zip(products, op.outputs)]
        outs = REGISTRY[op.kind].impl(*own, **params)
        outs = [np.asarray(o).astype(v.aval.dtype).reshape(v.aval.shape) for o, v in zip(outs, op.outputs)]
        if epilogue_of(op) is not None:
            return [evaluate_expr(epilogue_of(op), ins, op.outputs[0].aval, result=outs[0])]
        if op.params.get(WINDOW_COPY):     # its result, stored into a window as well (the last output)
            outs.append(outs[0].reshape(op.outputs[-1].aval.shape))
        return outs

    def _starts(self, op) -> list:
        """The start indices of a dynamic_slice / dynamic_update_slice, as this run has them."""
        first = utasks.first_start(op.kind)
        return [] if first is None else [int(self.read(v).reshape(())) for v in op.inputs[first:]]

    def _run_utask(self, op, t, veu, results):
        known = None                      # what this uTask knows after waiting for a whole published input
        if self.check:
            for k, value in enumerate(op.inputs):
                if isinstance(value.storage, Buffer):
                    value = self.resolved(value)
                    share = read_share(op, k, t, self._starts(op))
                    flat = storage_elements(value, share)
                    self._check_staged(value.storage, flat, veu, op)
                    m = self.mem[value.storage]
                    waiting = self.known[veu].copy() if k in self.waits.get(op, ()) else None
                    self._check_read(m, self._slot(value), flat, veu, op, value.storage.name,
                                     frames_spanned(value), waiting)
                    if waiting is not None:
                        self.learned[veu] = np.maximum(self.learned[veu], waiting)
                        if op.kind == matmul_p.name and (share is None or np.unique(share).size == value.aval.size):
                            known = waiting if known is None else np.maximum(known, waiting)
        for number, (value, result) in enumerate(zip(op.outputs, results)):
            assert not value.offset or value.window is not None, f"{op} writes a view"
            if self.dropped(value):
                continue
            if utasks.in_place_update(op.kind, op.params):
                flat = stored = window_share(op, t, self._starts(op))
            else:
                flat = write_share(op, t, number)
                # (an output stored into a window of its storage: plan.StoreWindow, at its offset this time)
                stored = storage_elements(self.resolved(value), flat) if value.window is not None else flat
            m, slot = self.mem[value.storage], self._slot(value)
            if self.check:
                self._check_staged(value.storage, stored, veu, op)
            self._record_write(m, slot, stored, veu, op, value.storage.name, known)
            _flat(m.data, slot)[stored] = result.reshape(-1)[flat]


def evaluate_expr(expr, ins, out_aval, result=None) -> np.ndarray:
    """A fused elementwise expression with numpy, broadcast to the op's output shape (`result`: what an
    epilogue's RESULT leaves read, the contraction's result)."""
    def ev(node, args):
        if node.op == "input":
            return ins[node.params["index"]]
        if node.op == RESULT:
            return result.reshape(node.aval.shape)    # (under the contraction's shape when read through a reshape)
        if node.op == "literal":
            return np.asarray(node.params["value"])
        if node.op == broadcast_p.name:
            return np.broadcast_to(args[0], node.aval.shape)
        prim = REGISTRY[node.op]
        return np.asarray(prim.impl(*args, **node.params)[0]).astype(node.aval.dtype)
    return np.broadcast_to(fold_expr(expr, ev), out_aval.shape).astype(out_aval.dtype)


def simulate(plan, flat_args, *, seed=0, check=True) -> list:
    """Run `plan` on `flat_args` (numpy arrays, consts excluded). Raises BarrierError on a missing barrier."""
    return Simulator(plan, seed=seed, check=check).run(flat_args)


# The rule that runs each kind of plan statement: a method of Simulator, by name, so that a subclass (the
# bench's barrier counter, models/floor.py) can override one.
STATEMENT_RULES = {
    Wave: "run_wave",
    Sync: "run_sync",
    Uniforms: "run_uniforms",
    Assign: "run_assign",
    Loop: "run_loop",
    Branch: "run_branch",
    Call: "run_call",
    Fork: "run_fork",
    Launch: "run_launch",
}


def _waves_before_preloads(plan) -> dict:
    """Wave -> the wave after it whose tasks have preloaded inputs (preload.previous_wave)."""
    out = {}
    for loop in (s for kernel in plan.kernels for s in walk(kernel.body) if isinstance(s, Loop)):
        for i, stmt in enumerate(loop.body):
            before = previous_wave(loop.body, i) if isinstance(stmt, Wave) and any(t.preload for t in stmt.tasks) \
                else None
            if before is not None:
                out[loop.body[before]] = stmt
    return out
