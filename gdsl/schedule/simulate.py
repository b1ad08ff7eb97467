"""The plan simulator: runs a Plan with numpy, uTask by uTask on its vEUs, and checks every read against
the barriers. It is the executable definition of plan semantics and finds missing barriers without a GPU.

Semantics it defines (every backend follows them):
- uTask t of a Task runs on vEU `first + t % count`; its share of the Op's output is utasks.py's.
- A frame value of recursive function f lives at index `frame[f] + frame_offset` of f's frame storage
  (f.frames copies); depth[f] counts the active calls of f (0 outside f), frame[f] is the sum of their
  Call steps (depth[f] when every step is 1). Call(f) fails with RecursionDepthError when
  depth[f] + 1 > max_depth.
- Uniform values are per vEU; every vEU computes the same ones (the simulator keeps one copy).
- Race rules: a vEU may read an element another vEU wrote only after a grid barrier, and may overwrite an
  element another vEU read only after one; within one vEU, a different op's write must be followed by a
  sync (block or grid) before a read. Violations raise BarrierError naming the op and buffer.
"""
from __future__ import annotations

import math

import numpy as np

from gdsl.core.ir import Lit
from gdsl.errors import RecursionDepthError
from gdsl.primitives.linalg import matmul_p
from gdsl.primitives.registry import DATA_MOVEMENT, REGISTRY, kinds_of
from gdsl.primitives.structural import broadcast_p, clamp_starts
from gdsl.schedule import utasks
from gdsl.schedule.plan import (
    COPY,
    FUSED,
    Assign,
    Branch,
    Buffer,
    Call,
    Launch,
    Loop,
    Sync,
    Uniform,
    Uniforms,
    Value,
    Wave,
    fold_expr,
)

SPLIT_PARAMS = frozenset({"chunk", "tile_m", "tile_n", "rows", "in_place"})


class BarrierError(RuntimeError):
    """A uTask read (or overwrote) data that no barrier made visible (or safe to overwrite)."""


def _flat(array, slot):
    """A flat writable view of one frame copy (array[slot] of a 0-d copy would be a scalar copy)."""
    return array[slot:slot + 1].reshape(-1)


class _Memory:
    """Buffers with, per element, who wrote/read it since the last grid barrier."""

    def __init__(self, buf: Buffer, copies: int):
        shape = (copies,) + buf.aval.shape
        self.data = np.zeros(shape, buf.aval.dtype)
        self.writer = np.full(shape, -1, np.int64)       # vEU, -1: none since the last grid barrier
        self.writer_op = np.full(shape, -1, np.int64)
        self.writer_sync = np.zeros(shape, np.int64)     # the writer vEU's sync count at the write
        self.reader = np.full(shape, -1, np.int64)       # vEU, -2: several

    def reset(self):
        self.writer.fill(-1)
        self.reader.fill(-1)


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
        self.uniforms: dict = {}
        self.depth = {name: 0 for name in self.functions}
        self.frame = {name: 0 for name in self.functions}
        self.local_syncs = np.zeros(plan.grid, np.int64)
        self.op_ids: dict = {}
        self.stats = {"grid_barriers": 0, "utasks": 0}

    # -------------------------------------------------------------------------------------------- values
    def _slot(self, value: Value) -> int:
        s = value.storage
        return self.frame[s.frame_of] + value.frame_offset if s.frame_of else 0

    def read(self, value: Value, veu=None, op=None) -> np.ndarray:
        s = value.storage
        if isinstance(s, Lit):
            return np.broadcast_to(np.asarray(s.val), value.aval.shape).copy()
        if isinstance(s, Uniform):
            key = (s, self._slot(value))
            if key not in self.uniforms:
                raise BarrierError(f"uniform {s.name} read before it was computed")
            return self.uniforms[key].reshape(value.aval.shape)
        m, slot = self.mem[s], self._slot(value)
        if veu is not None and self.check:
            self._check_read(m, slot, _window(value, None), veu, op, s.name)
        return _flat(m.data, slot)[_window(value, None)].reshape(value.aval.shape).copy()

    def write_uniform(self, value: Value, data):
        s = value.storage
        self.uniforms[(s, self._slot(value))] = np.asarray(data, s.aval.dtype).reshape(s.aval.shape)

    def _check_read(self, m, slot, flat, veu, op, name):
        writer = _flat(m.writer, slot)
        writer_op = _flat(m.writer_op, slot)
        writer_sync = _flat(m.writer_sync, slot)
        idx = np.arange(writer.size) if flat is None else flat
        veus = [veu] if veu != "all" else range(self.plan.grid)
        for v in veus:
            w = writer[idx]
            other = (w >= 0) & (w != v)
            if other.any():
                raise BarrierError(f"{op}: vEU {v} reads {name} written by vEU {int(w[other][0])} "
                                   f"with no grid barrier in between")
            same = (w == v) & (writer_op[idx] != self.op_ids.get(op, -3)) & \
                (writer_sync[idx] == self.local_syncs[v])
            if same.any():
                raise BarrierError(f"{op}: vEU {v} reads {name} that it wrote with no sync in between")
            reader = _flat(m.reader, slot)
            r = reader[idx]
            reader[idx] = np.where((r == -1) | (r == v), v, -2)

    def _record_write(self, m, slot, flat, veu, op, name):
        reader = _flat(m.reader, slot)[flat]
        if self.check and ((reader == -2) | ((reader >= 0) & (reader != veu))).any():
            raise BarrierError(f"{op}: vEU {veu} overwrites {name} that another vEU read with no grid "
                               f"barrier in between")
        _flat(m.writer, slot)[flat] = veu
        _flat(m.writer_op, slot)[flat] = self.op_ids[op]
        _flat(m.writer_sync, slot)[flat] = self.local_syncs[veu]

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

    def run_sync(self, stmt: Sync):
        self.local_syncs += 1
        if stmt.scope == "grid":
            self.stats["grid_barriers"] += 1
            for m in self.mem.values():
                m.reset()

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
        while True:
            self.block(stmt.cond)
            if not bool(self.read(stmt.pred).reshape(())):
                return
            self.block(stmt.body)

    def run_branch(self, stmt: Branch):
        index = int(np.clip(int(self.read(stmt.index).reshape(())), 0, len(stmt.branches) - 1))
        self.block(stmt.branches[index])

    def run_call(self, stmt: Call):
        fn = self.functions[stmt.fn]
        if self.depth[fn.name] + 1 > fn.max_depth:
            raise RecursionDepthError(f"recursive function {fn.name!r} went deeper than max_depth="
                                      f"{fn.max_depth}; raise max_depth in @gdsl.recurse(...) if the data "
                                      f"needs it")
        self.depth[fn.name] += 1
        self.frame[fn.name] += stmt.step
        try:
            self.block(fn.body)
        finally:
            self.depth[fn.name] -= 1
            self.frame[fn.name] -= stmt.step

    def run_wave(self, stmt: Wave):
        for task in stmt.tasks:
            self.op_ids.setdefault(task.op, len(self.op_ids))
        # Every uTask computes from the values before the wave (they never read what the wave writes:
        # the race check enforces that), then writes its share; vEUs interleave in random order.
        results = {task.op: self._evaluate(task.op) for task in stmt.tasks}
        work = [(task, t) for task in stmt.tasks for t in range(task.op.n_utasks)]
        for k in self.rng.permutation(len(work)):
            task, t = work[k]
            veu = task.first + t % task.count
            self._run_utask(task.op, t, veu, results[task.op])
            self.stats["utasks"] += 1

    def _evaluate(self, op) -> list:
        ins = [self.read(v) for v in op.inputs]
        if op.kind == FUSED.name:
            return [evaluate_expr(op.expr, ins, op.outputs[0].aval)]
        if op.kind == COPY.name:
            return [np.broadcast_to(ins[0], op.outputs[0].aval.shape).astype(op.outputs[0].aval.dtype)]
        params = {k: v for k, v in op.params.items() if k not in SPLIT_PARAMS}
        outs = REGISTRY[op.kind].impl(*ins, **params)
        return [np.asarray(o).astype(v.aval.dtype).reshape(v.aval.shape) for o, v in zip(outs, op.outputs)]

    def _starts(self, op) -> list:
        """The start indices of a dynamic_slice / dynamic_update_slice, as this run has them."""
        first = utasks.first_start(op.kind)
        return [] if first is None else [int(self.read(v).reshape(())) for v in op.inputs[first:]]

    def _run_utask(self, op, t, veu, results):
        if self.check:
            for k, value in enumerate(op.inputs):
                if isinstance(value.storage, Buffer):
                    flat = _window(value, read_share(op, k, t, self._starts(op)))
                    m = self.mem[value.storage]
                    self._check_read(m, self._slot(value), flat, veu, op, value.storage.name)
        for value, result in zip(op.outputs, results):
            assert not value.offset, f"{op} writes a view"
            if utasks.in_place_update(op.kind, op.params):
                flat = window_share(op, t, self._starts(op))
            else:
                flat = write_share(op, t)
            m, slot = self.mem[value.storage], self._slot(value)
            self._record_write(m, slot, flat, veu, op, value.storage.name)
            _flat(m.data, slot)[flat] = result.reshape(-1)[flat]


# ------------------------------------------------------------------------------------------------ shares


def _window(value, flat):
    """Storage element numbers of `value`'s elements `flat` (None: all of them; see Value.offset)."""
    if flat is None:
        return slice(None) if not value.offset and value.aval.size == value.storage.aval.size else \
            np.arange(value.offset, value.offset + value.aval.size)
    return flat + value.offset if value.offset else flat


def write_share(op, t) -> np.ndarray:
    """Flat indices of the output elements uTask t writes (utasks.py's decomposition)."""
    out = op.outputs[0].aval
    p = op.params
    if op.kind in utasks.GEMM_KINDS:
        batch, m, n, _ = utasks.gemm_dims(op.kind, [v.aval for v in op.inputs], out, p)
        tm, tn = p["tile_m"], p["tile_n"]
        b, i, j = np.unravel_index(t, (batch, math.ceil(m / tm), math.ceil(n / tn)))
        rows = np.arange(i * tm, min((i + 1) * tm, m))
        cols = np.arange(j * tn, min((j + 1) * tn, n))
        if op.kind == matmul_p.name:
            return (b * m * n + rows[:, None] * n + cols[None, :]).reshape(-1)
        nb, o, ho, wo = out.shape      # conv2d: GEMM row r = (image, y, x), column = output channel
        img, yx = np.divmod(rows, ho * wo)
        return (img[:, None] * o * ho * wo + cols[None, :] * ho * wo + yx[:, None]).reshape(-1)
    if op.kind in utasks.REDUCE_KINDS:
        rows = p["rows"]
        return np.arange(t * rows, min((t + 1) * rows, out.size))
    chunk = p["chunk"]
    return np.arange(t * chunk, min((t + 1) * chunk, out.size))


def window_share(op, t, starts) -> np.ndarray:
    """In-place dynamic_update_slice: the x elements that update elements [t*chunk, ...) land on, or none
    when mode="drop" and the window does not fit (`starts` as given, before clamping)."""
    x, update = op.inputs[0].aval, op.inputs[1].aval
    if op.params["mode"] == "drop" and any(s < 0 or s + u > d for s, u, d in zip(starts, update.shape, x.shape)):
        return np.zeros(0, np.int64)
    starts = clamp_starts(x.shape, update.shape, starts)
    chunk = op.params["chunk"]
    k = np.arange(t * chunk, min((t + 1) * chunk, update.size))
    idx = np.unravel_index(k, update.shape)
    return np.ravel_multi_index(tuple(i + s for i, s in zip(idx, starts)), x.shape)


# The kinds whose read share _move_share finds exactly: data movement primitives, and the dynamic window
# ops, whose index map is known once their start operands are.
MOVES = frozenset(name for name in kinds_of(DATA_MOVEMENT) if name in REGISTRY) | \
    frozenset(p.name for p in utasks.DYNAMIC_STARTS)


def read_share(op, k, t, starts=()):
    """Flat indices of input k that uTask t reads (None: all of it): exact for elementwise ops, matmul,
    reductions and data movement (where writing in place and partitioned loops depend on it),
    conservative (everything) for the others."""
    if op.kind in utasks.REDUCE_KINDS:
        return _reduce_share(op, write_share(op, t))
    if op.kind == matmul_p.name:
        return _matmul_share(op, k, write_share(op, t))
    if utasks.in_place_update(op.kind, op.params) and k < 2:
        if k == 0:
            return np.zeros(0, np.int64)          # x is only written (in the window)
        chunk = op.params["chunk"]
        return np.arange(t * chunk, min((t + 1) * chunk, op.inputs[1].aval.size))
    if op.kind in MOVES and k < _array_operands(op):
        return _move_share(op, k, write_share(op, t), starts)
    if op.kind not in (FUSED.name, COPY.name):
        return None
    out = op.outputs[0].aval
    in_aval = op.inputs[k].aval
    flat = write_share(op, t)
    if in_aval.size == 1:
        return np.zeros(1, np.int64) if flat.size else flat
    idx = np.unravel_index(flat, out.shape)
    offset = out.ndim - in_aval.ndim
    in_idx = tuple(np.zeros_like(idx[0]) if d == 1 else idx[offset + a] for a, d in enumerate(in_aval.shape))
    return np.ravel_multi_index(in_idx, in_aval.shape)


def _reduce_share(op, flat) -> np.ndarray:
    """The input elements the outputs `flat` of a reduction reduce."""
    x = op.inputs[0].aval
    if op.outputs[0].aval.size == 0:          # an empty result reduces nothing
        return np.zeros(0, np.int64)
    axes = list(op.params["axes"] if "axes" in op.params else (op.params["axis"],))
    keep = [a for a in range(x.ndim) if a not in axes]
    idx = np.arange(x.size).reshape(x.shape).transpose(keep + axes)
    return idx.reshape(op.outputs[0].aval.size, -1)[flat].reshape(-1)


def _matmul_share(op, k, flat) -> np.ndarray:
    """Operand k's elements that the outputs `flat` of a (batched, broadcasting) matmul read: their rows
    of a, their columns of b, in the matching batch element."""
    out, x = op.outputs[0].aval, op.inputs[k].aval
    m, n = out.shape[-2:]
    depth = op.inputs[0].aval.shape[-1]
    b, rest = np.divmod(flat, m * n)
    i, j = np.divmod(rest, n)
    bshape, xshape = out.shape[:-2], x.shape[:-2]
    bidx = np.unravel_index(b, bshape) if bshape else ()
    offset = len(bshape) - len(xshape)
    xb = np.ravel_multi_index(tuple(np.zeros_like(b) if d == 1 else bidx[offset + a]
                                    for a, d in enumerate(xshape)), xshape) if xshape else np.zeros_like(b)
    kk = np.arange(depth)
    if k == 0:
        idx = (xb * m + i)[:, None] * depth + kk[None, :]
    else:
        idx = xb[:, None] * depth * n + kk[None, :] * n + j[:, None]
    return np.unique(idx.reshape(-1))


def _move_share(op, k, flat, starts) -> np.ndarray:
    """Data movement: run the primitive itself on element numbers (input k) and -1 (the others)."""
    first = _array_operands(op)
    ins = [np.arange(v.aval.size).reshape(v.aval.shape) if j == k else np.full(v.aval.shape, -1)
           for j, v in enumerate(op.inputs[:first])]
    params = {p: v for p, v in op.params.items() if p not in SPLIT_PARAMS}
    moved = np.asarray(REGISTRY[op.kind].impl(*ins, *[np.int64(s) for s in starts], **params)[0]).reshape(-1)
    picked = moved[flat]
    return np.unique(picked[picked >= 0])


def _array_operands(op) -> int:
    """The number of leading array operands of `op` (all of them but a dynamic op's start indices)."""
    first = utasks.first_start(op.kind)
    return len(op.inputs) if first is None else first


def evaluate_expr(expr, ins, out_aval) -> np.ndarray:
    """A fused elementwise expression with numpy, broadcast to the op's output shape."""
    def ev(node, args):
        if node.op == "input":
            return ins[node.params["index"]]
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
    Launch: "run_launch",
}
