"""The schedule: what the scheduler produces and every backend renders.

Storage
    Buffer    an array in (device) memory: an input, a const, an output, a temp, or a frame buffer of a
              recursive function (one copy per recursion depth)
    Uniform   a scalar that every vEU computes for itself (a register per vEU): trip counts, predicates,
              indices. Reading one needs no barrier.
    Value     what an IR variable became: storage + its type (+ which recursion frame, for frame storage);
              a view (a window of the storage read in place), or, for an op's output, a StoreWindow: the
              op stores straight into a window of a larger array (a dynamic_update_slice folded away;
              a reduction may store its result there as well as in its own output: WINDOW_COPY)

Work
    Op        one operator, split into `n_utasks` uTasks (one thread block's share each); fused
              elementwise chains are one Op whose `expr` is evaluated per output element. A matmul or
              conv2d may carry an elementwise epilogue (params[EPILOGUE], see epilogue_operands): an Expr
              over its own result (a RESULT leaf) and its inputs after the contraction's operands, which
              its uTasks apply to each output element as they store it. A ROWS op is a chain of
              reductions over the last axis and elementwise steps on whole rows (RowStep, params[STEPS])
    UniformOp a scalar operation every vEU evaluates itself

Statements (a Block is a tuple of them; a Kernel runs one Block on `grid` persistent vEUs)
    Wave(tasks)         Ops that run at once, each Task on its own vEU range; a vEU runs uTasks
                        first+k, first+k+count, ... of its Op (rounds when n_utasks > count)
    Sync(scope, sites)  "grid": all vEUs wait (a real cross-vEU dependency); "block": vEU-local. In a
                        recursive function's body, `sites` (not None) makes a grid Sync one only when
                        the running call returns to one of those call sites, a block Sync otherwise (the
                        return site is uniform: every vEU takes the same one; see
                        scheduler._sync_by_return_site). A backend may treat it as a grid Sync always.
                        "flags" (a loop body's, the scheduler option `flags`: gdsl/schedule/flags.py): a
                        vEU-local sync, plus producer/consumer flags for `published` (Buffers): their
                        readers in the loop (matmul A loaders) wait for each element they read; `waits`
                        (FlagWait): vEUs that wait at the sync for a published buffer's flags, reading
                        nothing (orders their later writes after its writers' earlier reads).
    Uniforms(ops)       every vEU evaluates these scalar ops
    Assign(dst, src)    uniform copy (loop carries, call arguments)
    Loop(cond, pred, body)      while True: cond; if not pred: break; body
    Branch(index, branches, in_place, depth_of)   run branches[index] (index is uniform and already clamped);
                        in_place: results kept in a dead operand's storage (a forwarding branch is empty);
                        depth_of: a call's base cases at its call site (peel.py), that function's depth checked
    Call(fn, site, step)  push the return site, enter recursive function `fn` `step` frames deeper (its
                        arguments and results are at frame_offset `step`; step > 1 leaves the frames in
                        between to results of earlier calls that are still read: see Scheduler._call)
    Fork(first, between, second, min_group)  two calls that may run at once (the scheduler option `fork`): `first` and
                        `second` are each a call's argument Assigns and its Call, `between` uniform
                        statements that read neither call's results nor memory the plan writes. Run one
                        after the other (first, between, second) it means what those statements mean;
                        device control may run `first` on one half of the running vEU group and
                        `second` on the other, each half with its own frames (see `Fork`)
    Launch(kernel)      host control only: launch kernel number `kernel` and wait
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gdsl.core.ir import Lit, ShapedArray
from gdsl.primitives.registry import CONTRACTION, DATA_MOVEMENT, ELEMENTWISE, REDUCE, op_kind

# The uTask kinds the scheduler makes that are not primitives (an Op's kind is one of these or a primitive).
FUSED = op_kind("fused", ELEMENTWISE)        # a chain of fusible primitives, one expression per element
COPY = op_kind("copy", DATA_MOVEMENT)        # a copy between buffers (numpy broadcasting, or a reshape)
# A chain of row reductions and elementwise steps (RowStep), made only for backends with its rule.
ROWS = op_kind("row_chain", REDUCE, optional=True)
# A GEMV, the row chain on its output rows and a GEMV reading the chain's rows, as one uTask (gemv_rows.py:
# params[CHAIN_PARTS]), made only for backends with its rule.
GEMV_ROWS_GEMV = op_kind("gemv_rows_gemv", CONTRACTION, optional=True)


@dataclass(frozen=True, eq=False)
class Buffer:
    name: str
    aval: ShapedArray
    kind: str                      # "input", "const", "output", "temp", "frame"
    frame_of: str | None = None    # recursive function whose frames hold one copy each

    def __repr__(self):
        return self.name


@dataclass(frozen=True, eq=False)
class Uniform:
    name: str
    aval: ShapedArray
    frame_of: str | None = None

    def __repr__(self):
        return self.name


@dataclass(frozen=True, eq=False)
class OffsetTerm:
    """One run-time part of a view's offset: `stride * clamp(index, 0, high)`, `index` a uniform Value (a
    start of a dynamic window, or the index of a row taken, both clamped into the source like the
    primitives do)."""
    index: Any                     # Value of a Uniform or a Lit
    stride: int
    high: int

    def __repr__(self):
        index = f"clamp({self.index!r}, 0, {self.high})"
        return index if self.stride == 1 else f"{self.stride}*{index}"


@dataclass(frozen=True, eq=False)
class RowIndex:
    """The rows a gathered-row view reads (a take of whole rows at run-time indices, read by matmuls as their
    left operand: Scheduler._fold_row_gathers): row m of the view is row `clamp(index[m], 0, high)` of the
    storage (rows of the view's last axis, from its offset on), clamped like the take primitive does."""
    index: Any                     # Value of the index buffer (integers, one per row of the view)
    high: int                      # the last row of the source

    def __repr__(self):
        return f"clamp({self.index!r}[m], 0, {self.high})"


@dataclass(frozen=True, eq=False)
class StoreWindow:
    """Where an op stores its output when it writes it straight into a window of a larger array (a
    dynamic_update_slice folded into the op that computes its update, Scheduler._fold_window_stores): the
    output's element c, row-major in `shape` (the window's shape, of the array's rank), lands at
    sum(c_i * strides(array_shape)_i) from the value's first element (Value.offset + Value.terms, the window's
    start clamped into the array). `drop` (dynamic_update_slice's mode="drop"): a start out of range (a term's
    index outside [0, high]) stores nothing at all."""
    shape: tuple
    array_shape: tuple
    drop: bool = False

    def elements(self, flat):
        """Storage element numbers, from the window's first element, of the output's elements `flat`."""
        return np.ravel_multi_index(np.unravel_index(flat, self.shape), self.array_shape)


@dataclass(frozen=True, eq=False)
class Value:
    storage: Any                   # Buffer | Uniform | Lit
    aval: ShapedArray
    frame_offset: int = 0          # k > 0: the frame k deeper of storage.frame_of (a callee's frame)
    # A view: the value is the storage's elements [offset, offset + aval.size) in row-major order (a
    # contiguous static slice, see the scheduler). Views are only read, never written (but for `window`).
    offset: int = 0
    # A view at a run-time offset (a dynamic window, a row taken at a uniform index; device control only,
    # see Scheduler._dynamic_view): `offset + sum(terms)` with the uniforms' values where it is read. The
    # scheduler keeps every reader in the segment that makes it, so no Assign changes them in between.
    terms: tuple[OffsetTerm, ...] = ()
    # A permuted view (a transpose read in place, see Scheduler._permuted_view): the storage window holds the
    # source, of shape `source_shape`, row-major; element (c_0, ..., c_n) of the value is the source's
    # element with c_i at axis perm[i] (the value's axis i is the source's axis perm[i]).
    perm: tuple[int, ...] | None = None
    # Written only: an op's output stored into a strided window of its storage (see StoreWindow), from
    # `offset + sum(terms)` on. Never read: the variable it holds has no reader but the folded update.
    window: StoreWindow | None = None
    # A gathered-row view (read only, as a matmul's left operand with ROW_INDEX): row m of the value is row
    # `rows.index[m]` (clamped) of the storage; any element of the storage may be read (`dynamic`).
    rows: RowIndex | None = None

    @property
    def is_uniform(self) -> bool:
        return isinstance(self.storage, (Uniform, Lit))

    @property
    def buffer(self) -> Buffer | None:
        return self.storage if isinstance(self.storage, Buffer) else None

    @property
    def dynamic(self) -> bool:
        """A view whose elements are known at run time only (`terms`, or gathered rows)."""
        return bool(self.terms) or self.rows is not None

    @property
    def source_shape(self) -> tuple:
        """The shape of the array the storage window holds: the value's own, or a permuted view's source."""
        if self.perm is None:
            return self.aval.shape
        shape = [0] * len(self.perm)
        for axis, source_axis in enumerate(self.perm):
            shape[source_axis] = self.aval.shape[axis]
        return tuple(shape)

    def __repr__(self):
        if isinstance(self.storage, Lit):
            return repr(self.storage.val.item())
        name = self.storage.name + "'" * self.frame_offset
        if self.window is not None:  # stored into a window: `out0[1x12x1x64 window at 64*clamp(u7, 0, 63)]`
            start = " + ".join(map(repr, self.terms + ((self.offset,) if self.offset or not self.terms else ())))
            drop = ", none if out of range" if self.window.drop and self.terms else ""
            return f"{name}[{'x'.join(map(str, self.window.shape))} window at {start}{drop}]"
        if self.rows is not None:    # gathered rows: `in3[rows clamp(t7[m], 0, 3796)]<f32[64,256]>`
            name += f"[rows {self.rows!r}" + (f" from {self.offset}]" if self.offset else "]")
        elif self.terms:             # a window at a run-time offset: `in6[256*clamp(u13, 0, 3796) +: 256]`
            start = " + ".join(map(repr, self.terms + ((self.offset,) if self.offset else ())))
            name += f"[{start} +: {self.aval.size}]"
        elif self.offset or (isinstance(self.storage, Buffer) and self.aval.size != self.storage.aval.size):
            name += f"[{self.offset}:{self.offset + self.aval.size}]"     # a view: a window of the storage
        if self.perm is not None:    # read transposed in place: `out0.T(0,1,3,2)`
            name += f".T({','.join(map(str, self.perm))})"
        if isinstance(self.storage, Buffer) and self.aval != self.storage.aval:
            return f"{name}<{self.aval}>"
        return name


# The param of a matmul / conv2d Op that holds its epilogue (an Expr), and the leaf of that Expr that stands
# for the contraction's own result at the element being stored.
EPILOGUE = "epilogue"
RESULT = "result"
CONTRACTION_OPERANDS = 2         # a matmul's or conv2d's own operands; an epilogue's come after them
# The param of a matmul Op whose left operand is a concatenation along its last axis (the depth) read in
# place, its parts never copied into one array (a `concatenate` that only the matmul reads folded into it,
# Scheduler._fold_k_parts; concat.py makes them): the depths (K_1, ..., K_n) of the parts, which are input 0
# and, after B (input 1), inputs 2 .. n; A[..., m, k] is part i's [..., m, k - K_1 - ... - K_{i-1}].
K_PARTS = "k_parts"
# The param of a matmul Op whose left operand (input 0) is a gathered-row view (Value.rows: the rows of a
# table taken at run-time indices, a take that only matmuls read folded into them, Scheduler._fold_row_gathers):
# the number of its input that holds the indices (the one after B), read by the tile loaders la(m, k).
ROW_INDEX = "row_index"
# The param of a matmul Op that computes several sibling matmuls of one wave at once (the scheduler option
# `siblings`, siblings.py): products of the same left operand A by different right operands B_1 .. B_n (of the
# same depth K) into outputs O_1 .. O_n; the widths (N_1, ..., N_n) of the parts. Inputs (A, B_1, ..., B_n),
# outputs (O_1, ..., O_n); column n of the op's N_1 + ... + N_n columns is column n - N_1 - ... - N_{i-1} of
# part i (sibling_parts: each part as the plain matmul Op it was). Its uTask t is one whole tile of batch
# element t (tile_m >= M, tile_n = the sum), no epilogue.
N_PARTS = "n_parts"
# The split param of a matmul / conv2d Op computing a GEMM as S = k_splits partial products over ranges of its
# depth (split-K, gdsl/schedule/splitk.py): its one output is a temp P of shape (S, *out_shape) (float32), P[s]
# the product over k in [s*KC, min((s+1)*KC, K)), KC = k_chunk_of(K, S) (a multiple of the GEMM stage's 32);
# uTask t computes tile t % tiles of slice s = t // tiles (its operands read at that k range only). No epilogue,
# no window store: a "fused" Op of the next wave sums P[0] + ... + P[S-1] in that order into the output.
K_SPLITS = "k_splits"
K_SPLIT_ALIGN = 32               # KC is a multiple of this: one GEMM stage's depth (cfamily gemm.GEMM_BK)


def k_chunk(k: int, splits: int) -> int:
    """KC, the depth of each of `splits` ranges of a GEMM of depth k (split-K, K_SPLITS): ceil(k / splits)
    rounded up to whole stages (K_SPLIT_ALIGN); the last range takes what is left."""
    per_split = -(-k // splits)
    return -(-per_split // K_SPLIT_ALIGN) * K_SPLIT_ALIGN


def k_range(k: int, splits: int, s: int) -> tuple[int, int]:
    """[first, end) of the depth of slice s of a GEMM of depth k split `splits` ways (K_SPLITS)."""
    kc = k_chunk(k, splits)
    return min(s * kc, k), min((s + 1) * kc, k)


@dataclass(frozen=True, eq=False)
class Expr:
    """A node of a fused elementwise expression: `op` is an elementwise primitive name, "input" (read
    input number params["index"] of the Op, broadcast to the output shape), "literal", or RESULT (in an
    epilogue: the contraction's result at the output element, in its dtype)."""
    op: str
    args: tuple[Expr, ...]
    params: dict
    aval: ShapedArray

    def __repr__(self):
        return fold_expr(self, _expr_text)


def _expr_text(node: Expr, args: list[str]) -> str:
    if node.op == "input":
        return f"in{node.params['index']}"
    if node.op == "literal":
        return repr(node.params["value"].item())
    if node.op == RESULT:
        return RESULT
    if node.op == STEP:
        return f"s{node.params['index']}"
    return f"{node.op}({', '.join(args)})"


def fold_expr(expr: Expr, combine):
    """`combine(node, results of its args)` applied bottom-up over the expression tree `expr`, args left to
    right; the root's result. Iterative, so the depth of an expression is never limited by Python's stack."""
    results: dict = {}                # id(node) -> result (the nodes stay alive in `expr` meanwhile)
    stack = [(expr, False)]
    while stack:
        node, args_done = stack.pop()
        if args_done:
            results[id(node)] = combine(node, [results[id(a)] for a in node.args])
        elif id(node) not in results:
            stack.append((node, True))
            stack.extend((a, False) for a in reversed(node.args))
    return results[id(expr)]


@dataclass(frozen=True, eq=False)
class Op:
    name: str
    kind: str                      # a primitive name, "fused" (elementwise chain) or "copy"
    inputs: tuple[Value, ...]
    outputs: tuple[Value, ...]
    params: dict                   # the primitive's params plus the split's (chunk, tile sizes, ...)
    n_utasks: int
    cost: float                    # estimated ns per uTask on one vEU
    expr: Expr | None = None

    def __repr__(self):
        return self.name


# The param of a reduction Op that also stores its result into a window of a larger array: its last output
# (a Value with a StoreWindow) is a copy of its first, which stays for the result's other readers (a
# dynamic_update_slice folded into the reduction computing its update, Scheduler._fold_window_stores).
WINDOW_COPY = "window_copy"


def epilogue_of(op) -> Expr | None:
    """The elementwise epilogue a matmul / conv2d Op applies to its output (None: it stores its result)."""
    return op.params.get(EPILOGUE)


def epilogue_operands(op) -> range:
    """The numbers of the inputs of `op` that only its epilogue reads (at the output elements it writes,
    broadcast to the output shape like a fused chain's inputs): none without an epilogue."""
    return range(contraction_operands(op.params) if EPILOGUE in op.params else len(op.inputs), len(op.inputs))


def contraction_operands(params) -> int:
    """How many inputs of a matmul / conv2d Op with these params are its own operands: A (or A's first part),
    B, and A's other parts (K_PARTS), the indices of its gathered rows (ROW_INDEX) or its siblings' B
    (N_PARTS); an epilogue's operands follow."""
    return CONTRACTION_OPERANDS + max(len(params.get(K_PARTS, ())) - 1, 0) + (ROW_INDEX in params) + \
        max(len(params.get(N_PARTS, ())) - 1, 0)


def a_parts(op) -> list[tuple[int, int, int]]:
    """(input number, first k, depth) of each part of a matmul Op's left operand: [(0, 0, K)] unless it is a
    concatenation read in place (K_PARTS)."""
    depths = op.params.get(K_PARTS) or (op.inputs[0].aval.shape[-1],)
    starts = np.cumsum((0,) + tuple(depths[:-1]))
    return [(0 if i == 0 else i + 1, int(k0), int(d)) for i, (k0, d) in enumerate(zip(starts, depths))]


def sibling_parts(op) -> list:
    """The parts of a matmul Op computing sibling matmuls at once (N_PARTS), each as the plain matmul Op it
    computes (A, B_i -> O_i, its own tile of N_i columns, the op's uTasks); [op] for any other Op."""
    widths = op.params.get(N_PARTS)
    if widths is None:
        return [op]
    params = {k: v for k, v in op.params.items() if k != N_PARTS}
    return [Op(op.name, op.kind, (op.inputs[0], b), (out,), dict(params, tile_n=width), op.n_utasks,
               op.cost / len(widths))
            for b, out, width in zip(op.inputs[1:], op.outputs, widths)]


# The params of a GEMV_ROWS_GEMV Op (gdsl/schedule/gemv_rows.py): its parts, the Ops it computes in this order (a
# matmul, a ROWS op reading the matmul's output, a matmul whose left operand is the ROWS op's output), each as
# it was, on the same uTasks; and, for each of its inputs, (part number, input number of that part). The parts'
# intermediate results never leave the uTask: the op's outputs are the last part's.
CHAIN_PARTS = "chain_parts"
CHAIN_INPUTS = "chain_inputs"


def part_tasks(task) -> tuple:
    """`task`, or, for a GEMV_ROWS_GEMV op, one Task of each of its parts (the same vEUs and uTasks): what a pass
    that looks at the ops themselves sees of it (a part's resident B: resident.py, the renderer's staging; each
    part's accesses: hazards.py)."""
    parts = task.op.params.get(CHAIN_PARTS)
    return (task,) if parts is None else tuple(Task(part, task.first, task.count) for part in parts)


def parts_of_tasks(tasks) -> list:
    """`tasks` with each GEMV_ROWS_GEMV op's as its parts' (part_tasks)."""
    return [part for task in tasks for part in part_tasks(task)]


def chain_input(op, k) -> tuple:
    """(the part of a GEMV_ROWS_GEMV Op, the number of that part's input) that the op's input k is."""
    part, number = op.params[CHAIN_INPUTS][k]
    return op.params[CHAIN_PARTS][part], number


# The params of a ROWS op: its row shape (the rows' array shape, its last axis the row), its steps in order,
# and the step each of its outputs is (in the order of Op.outputs). Its uTask t computes the whole rows
# [t*rows, (t+1)*rows) (params["rows"]), every step of a row on chip, and stores only those steps. A cell
# chain (every step at the element: no reduction, no per-row step) in a column layout (owner.py) is split
# like an elementwise op instead: uTask t computes the elements [t*chunk, (t+1)*chunk) of its row shape,
# row-major (params[ROW_CHUNK]; no "rows" then).
ROW_SHAPE = "row_shape"
STEPS = "steps"
STEP_OUTPUTS = "step_outputs"
# The Expr leaf that reads an earlier step of the same row (params["index"]): a row step at the element
# being computed, a per-row step (a reduction's result) as the row's one value.
STEP = "step"
# The split param of a cell chain split in chunks of its row shape (the elementwise kinds' own name for it).
ROW_CHUNK = "chunk"


@dataclass(frozen=True, eq=False)
class RowStep:
    """One step of a ROWS op on one row: `reduce` None: elementwise, `expr` evaluated at each element of the
    row (aval the row shape) or once per row (aval one element per row: a row-constant expression, its
    inputs broadcast to aval's shape); else a reduction primitive's name, folding `expr` (an elementwise
    expression over the row, the row shape) along the row into the row's one value (aval: the reduction's
    output type). Expr leaves: "input" (Op input params["index"], broadcast as in a fused chain), STEP,
    "literal"."""
    reduce: str | None
    expr: Expr
    aval: ShapedArray

    def per_row(self, row_shape) -> bool:
        """Does this step have one value per row (not one per element of the row)?"""
        return tuple(self.aval.shape) != tuple(row_shape)


# The split param that makes an elementwise op's or a cell chain's chunk two-dimensional (owner.py's column
# layouts of more than one row, on a backend with the "row_block" lowering rule): uTask t then covers rows
# [i*R, (i+1)*R) by columns [j*chunk, (j+1)*chunk) of its output viewed as [rows, n] (n its last axis; a ROWS
# op's row shape), R = params[ROW_BLOCK], (i, j) = divmod(t, ceil(n / chunk)): the same numbering as a matmul's
# tiles of R x chunk (gathered), so that uTask t of each covers the same rows and columns. The last row block and
# column range may be shorter.
ROW_BLOCK = "row_block"


def chunk_grid(params, shape) -> tuple[int, int, int, int]:
    """(rows, n, R, chunk) of an op split in 2-D chunks (ROW_BLOCK) over an array of `shape`."""
    n = shape[-1] if len(shape) else 1
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return rows, n, params[ROW_BLOCK], params["chunk"]


def chunk_count(params, shape) -> int:
    """The uTasks of an op split in chunks ("chunk", with ROW_BLOCK two-dimensional) over `shape`."""
    if ROW_BLOCK not in params:
        return max(1, -(-int(np.prod(shape, dtype=np.int64)) // params["chunk"]))
    rows, n, block, chunk = chunk_grid(params, shape)
    return max(1, -(-rows // block) * -(-n // chunk))


def chunk_elements(params, shape, t) -> np.ndarray:
    """Flat (row-major) indices of the elements of an array of `shape` that uTask t of an op split in chunks
    covers: [t*chunk, (t+1)*chunk), or with ROW_BLOCK its block of rows by its column range."""
    size = int(np.prod(shape, dtype=np.int64))
    if ROW_BLOCK not in params:
        chunk = params["chunk"]
        return np.arange(min(t * chunk, size), min((t + 1) * chunk, size))
    rows, n, block, chunk = chunk_grid(params, shape)
    i, j = divmod(int(t), -(-n // chunk))
    r = np.arange(i * block, min((i + 1) * block, rows))
    c = np.arange(j * chunk, min((j + 1) * chunk, n))
    return (r[:, None] * n + c[None, :]).reshape(-1)


def chunk_utask(params, shape, e) -> np.ndarray:
    """The uTask of an op split in chunks that covers each flat element `e` of an array of `shape`."""
    if ROW_BLOCK not in params:
        return e // params["chunk"]
    rows, n, block, chunk = chunk_grid(params, shape)
    r, c = np.divmod(e, n)
    return (r // block) * -(-n // chunk) + c // chunk


def row_chunk(op) -> int | None:
    """The elements per uTask of a ROWS op split in chunks of its row shape (a cell chain in a column
    layout: ROW_CHUNK), None for one split in whole rows."""
    return op.params.get(ROW_CHUNK)


def is_cell_chain(steps, row_shape) -> bool:
    """Are all of a ROWS op's steps computed at the element (no reduction, no per-row step): may its uTasks
    take chunks of elements instead of whole rows?"""
    return all(step.reduce is None and not step.per_row(row_shape) for step in steps)


def row_count(op) -> int:
    """The rows of a ROWS op (all of its row shape but the last axis)."""
    shape = op.params[ROW_SHAPE]
    size = 1
    for d in shape[:-1]:
        size *= d
    return size


@dataclass(frozen=True, eq=False)
class UniformOp:
    primitive: str
    inputs: tuple[Value, ...]
    output: Value
    params: dict


@dataclass(frozen=True, eq=False)
class Task:
    op: Op
    first: int                     # first vEU
    count: int                     # number of vEUs
    # Input numbers whose elements each thread loads into registers before the wave before this one
    # (preload.py: what the step does not change by then); the op reads those registers.
    preload: tuple[int, ...] = ()


@dataclass(frozen=True, eq=False)
class Wave:
    tasks: tuple[Task, ...]


@dataclass(frozen=True, eq=False)
class FlagWait:
    """At a flag sync: vEUs first .. first + count - 1 wait for the flags of elements [start, stop) of `buffer`
    (published by a flag sync of the same loop) before the next wave, reading nothing: what orders a vEU's later
    writes after the reads that the buffer's writers made before they wrote it (flags.py)."""
    buffer: Buffer
    first: int
    count: int
    start: int
    stop: int

    def __repr__(self):
        last = f"-{self.first + self.count - 1}" if self.count > 1 else ""
        return f"vEU {self.first}{last} wait for {self.buffer.name}[{self.start}:{self.stop}]"


@dataclass(frozen=True, eq=False)
class Sync:
    scope: str                     # "grid", "block" or "flags"
    sites: frozenset | None = None   # grid only when returning to one of these call sites (None: always)
    published: tuple = ()          # "flags": the Buffers whose elements carry flags across it (flags.py)
    waits: tuple = ()              # "flags": FlagWaits of vEUs that read none of those elements (flags.py)

    @property
    def always_grid(self) -> bool:
        """A grid barrier on every path (not one by return site, a block barrier on some)."""
        return self.scope == "grid" and self.sites is None

    def is_grid_at(self, site) -> bool:
        """Is this a grid barrier when the innermost running call returns to `site` (None: outside any)?"""
        return self.scope == "grid" and (self.sites is None or site in self.sites)


@dataclass(frozen=True, eq=False)
class Uniforms:
    ops: tuple[UniformOp, ...]


@dataclass(frozen=True, eq=False)
class Assign:
    dst: Value
    src: Value


@dataclass(frozen=True, eq=False)
class Staged:
    """A buffer a loop keeps in shared memory while it runs (local.py, smem carries): `size` elements per vEU
    at byte `offset` of the block-local region; vEU v holds the buffer's elements [v * size, (v + 1) * size),
    copied in when the loop is entered and out when it ends."""
    buffer: Buffer
    offset: int
    size: int

    def __repr__(self):
        return f"{self.buffer.name}[{self.size} per vEU] at +{self.offset}"


@dataclass(frozen=True, eq=False)
class Loop:
    cond: tuple
    pred: Value
    body: tuple
    parts: int = 0                 # partitioned: uTask p of every op on vEU p mod grid (partition.py)
    staged: tuple[Staged, ...] = ()  # buffers in the vEUs' shared memory while it runs


@dataclass(frozen=True, eq=False)
class Branch:
    index: Value
    branches: tuple[tuple, ...]
    # Results that live in the storage of an operand no one reads after the branch: a branch that returns
    # that operand unchanged runs nothing for it, the others overwrite it (see Scheduler.schedule_cond).
    in_place: tuple[Value, ...] = ()
    # The recursive function whose call this branch stands for (its base cases at the call site, peel.py):
    # entering the branch checks that function's depth as the call would (gdsl.RecursionDepthError).
    depth_of: str | None = None


@dataclass(frozen=True, eq=False)
class Call:
    fn: str
    site: int
    step: int = 1                  # frames between the caller's and the callee's (see the module docstring)


@dataclass(frozen=True, eq=False)
class Fork:
    """Two calls whose arguments do not read each other's results (the two children of a tree node). As a
    sequence: `first`, `between`, `second`.
    In parallel (the C-family renderer, the simulator): the running vEU group [lo, hi) splits at
    lo + (hi - lo) // 2, the lower half runs `first` then `between`, the upper half `between` then
    `second`; each half is a group of its own inside the calls (heap-numbered: group g's halves are 2g and
    2g + 1; the whole grid is group 1), its waves on its own vEUs and its grid barriers barriers of that
    group, and the callees' deeper frames in a frame region of that group (the callee's own frame, where the
    caller reads its results, stays where the caller addresses it). A group of fewer than 2 * min_group
    vEUs does not split: it runs first, between, a barrier of the group, then second, all in the caller's
    group and frames (the barrier stands for the join the first half would have met). The plan puts a
    grid barrier before a Fork (kept only when something before it touches memory) and one after it (the
    join: the caller's group waits for both halves)."""
    first: tuple
    between: tuple
    second: tuple
    min_group: int = 1             # the fewest vEUs a half may have (the scheduler's FORK_MIN_SHARE)

    @property
    def calls(self) -> tuple:
        """The two Calls, first half's first."""
        return self.first[-1], self.second[-1]


@dataclass(frozen=True, eq=False)
class Launch:
    kernel: int


@dataclass(frozen=True, eq=False)
class RecFunction:
    name: str
    params: tuple[Value, ...]      # in the function's own frame
    results: tuple[Value, ...]     # in the function's own frame
    body: tuple
    max_depth: int
    n_sites: int                   # call sites (return points) across the whole plan
    max_step: int = 1              # the largest `step` of a Call of this function
    # Spread frames (the scheduler option `spread_frames`; 0: off): a call of step s also moves the frames of
    # the callee's own callees `spread * s` further from the callee's own frame (`callee_extra`), so that
    # the subtree of a later call from one body never reuses the frames that an earlier call's last op
    # read (see Scheduler._spread_sites). Buffers only: stacked uniforms are per-vEU registers.
    spread: int = 0

    def callee_extra(self, step: int) -> int:
        """How much further than `step` frames past its own the callees of a call of this step put theirs."""
        return self.spread * step

    @property
    def frames(self) -> int:
        """Copies of each frame storage: frame 0 is the caller's outside the function, every active call
        is at most `max_step` frames deeper than its caller (plus its caller's callee_extra with spread
        frames), and the call that overflows max_depth still receives its arguments (max_depth + 2 frames
        when every step is 1)."""
        return (self.max_depth + 1) * (self.max_step + self.callee_extra(self.max_step)) + 1

    @property
    def register_frames(self) -> int:
        """Copies of each stacked uniform: frames as if not spread (a vEU's registers are addressed by the
        frame counter alone, which spread frames do not move further)."""
        return (self.max_depth + 1) * self.max_step + 1


@dataclass(frozen=True, eq=False)
class Kernel:
    name: str
    body: tuple
    functions: tuple[RecFunction, ...] = ()


@dataclass(frozen=True, eq=False)
class Plan:
    control: str                   # "device" or "host"
    grid: int                      # vEUs
    block: int                     # threads per vEU (a backend hint; the CPU runs one thread per vEU)
    kernels: tuple[Kernel, ...]
    host: tuple | None             # host control: the control flow around Launch statements
    inputs: tuple[Value, ...]      # program consts first, then arguments
    outputs: tuple[Value, ...]
    consts: tuple                  # numpy arrays for the const buffers
    buffers: tuple[Buffer, ...]
    uniforms: tuple[Uniform, ...]
    functions: tuple[RecFunction, ...]
    stats: dict = field(default_factory=dict)
    # Block-local temps kept in each vEU's shared memory at the same element indices (local.py, the option
    # smem_temps): (Buffer, byte offset in the block-local region) pairs; backends without it ignore them.
    block_local: tuple = ()
    # Of those, the temps of a partitioned loop kept a slot per round instead (local.py, SLOTTED_TEMPS): (Buffer,
    # elements a slot, the vEU count of its tasks, rounds): uTask t's slice [t * size, (t + 1) * size) sits in slot
    # t // count.
    local_slots: tuple = ()

    def __str__(self):
        from gdsl.schedule.printer import print_plan
        return print_plan(self)


def walk(block):
    """Every statement of `block`, nested ones included, outer first."""
    for stmt in block:
        yield stmt
        if isinstance(stmt, Loop):
            yield from walk(stmt.cond)
            yield from walk(stmt.body)
        elif isinstance(stmt, Branch):
            for b in stmt.branches:
                yield from walk(b)
        elif isinstance(stmt, Fork):
            yield from walk(stmt.first + stmt.between + stmt.second)


def rewrite_blocks(block, after) -> tuple:
    """`block` with each nested block (a Loop's, a Branch's, a Fork's) rewritten the same way first, `after(out)`
    called each time a statement is appended to the result list `out`, which it may change in place (fold the
    statements at its end into fewer)."""
    out: list = []
    for stmt in block:
        if isinstance(stmt, Loop):
            stmt = dataclasses.replace(stmt, cond=rewrite_blocks(stmt.cond, after),
                                       body=rewrite_blocks(stmt.body, after))
        elif isinstance(stmt, Branch):
            stmt = dataclasses.replace(stmt, branches=tuple(rewrite_blocks(b, after) for b in stmt.branches))
        elif isinstance(stmt, Fork):
            stmt = dataclasses.replace(stmt, first=rewrite_blocks(stmt.first, after),
                                       between=rewrite_blocks(stmt.between, after),
                                       second=rewrite_blocks(stmt.second, after))
        out.append(stmt)
        after(out)
    return tuple(out)


def plan_statements(plan: Plan):
    """Every statement of every kernel, recursive function and the host program."""
    for k in plan.kernels:
        yield from walk(k.body)
    for f in plan.functions:
        yield from walk(f.body)
    if plan.host is not None:
        yield from walk(plan.host)
