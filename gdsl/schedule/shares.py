"""Which elements each uTask of an Op writes and reads: the split's semantics (utasks.py) as flat element
numbers of the op's output and inputs. The plan simulator checks every access against the barriers with
them; the scheduler uses them to choose a vEU-local sync instead of a grid barrier where no vEU reads what
another wrote (or overwrites what another read) since the last grid barrier.

Exact for elementwise ops, matmul (its output tiles), reductions and data movement; conservative (the whole
input: None) for the others and for dynamic windows whose start is not known yet.
"""
from __future__ import annotations

import math

import numpy as np

from gdsl.primitives.linalg import matmul_p
from gdsl.primitives.registry import DATA_MOVEMENT, REGISTRY, kinds_of
from gdsl.primitives.structural import clamp_starts
from gdsl.schedule import utasks
from gdsl.schedule.plan import (
    CHAIN_PARTS,
    COPY,
    EPILOGUE,
    FUSED,
    K_PARTS,
    K_SPLITS,
    N_PARTS,
    ROW_BLOCK,
    ROW_INDEX,
    ROW_SHAPE,
    ROWS,
    STEPS,
    WINDOW_COPY,
    a_parts,
    chain_input,
    chunk_elements,
    epilogue_operands,
    fold_expr,
    k_range,
    row_chunk,
    row_count,
    sibling_parts,
)
from gdsl.schedule.resident import RESIDENT

# The params the scheduler adds to a primitive's own (its split, an epilogue, a left operand read in parts).
SPLIT_PARAMS = frozenset({"chunk", ROW_BLOCK, "tile_m", "tile_n", "rows", "in_place", utasks.GATHER_BATCH,
                          utasks.K_CHUNK, RESIDENT, EPILOGUE, WINDOW_COPY, K_PARTS, ROW_INDEX, N_PARTS,
                          K_SPLITS})


def storage_elements(value, flat):
    """Storage element numbers of `value`'s elements `flat` (None: all of them; see Value.offset; a permuted
    view's in the value's own element order, Value.perm; an output stored into a window, through its
    StoreWindow). A view at a run-time offset (Value.terms) has none until its offset is known
    (Simulator.resolved); gathered rows (Value.rows) may be anywhere in their storage."""
    assert not value.terms, f"{value!r}: a view at a run-time offset"
    if value.rows is not None:
        return slice(None)
    if value.window is not None:
        return value.window.elements(np.arange(value.aval.size) if flat is None else flat) + value.offset
    if value.perm is not None:
        coords = np.unravel_index(np.arange(value.aval.size) if flat is None else flat, value.aval.shape)
        source_coords = [None] * len(value.perm)
        for axis, source_axis in enumerate(value.perm):
            source_coords[source_axis] = coords[axis]
        return np.ravel_multi_index(source_coords, value.source_shape) + value.offset
    if flat is None:
        return slice(None) if not value.offset and value.aval.size == value.storage.aval.size else \
            np.arange(value.offset, value.offset + value.aval.size)
    return flat + value.offset if value.offset else flat


def write_share(op, t, k=0) -> np.ndarray:
    """Flat indices of the elements of output k that uTask t writes (utasks.py's decomposition)."""
    if N_PARTS in op.params:            # sibling matmuls (plan.N_PARTS): output k is part k's
        return write_share(sibling_parts(op)[k], t)
    if CHAIN_PARTS in op.params:        # a GEMV, a row chain, a GEMV as one (plan.GEMV_ROWS_GEMV): the last's
        return write_share(op.params[CHAIN_PARTS][-1], t, k)
    if op.kind == ROWS.name:
        return row_elements(op, op.outputs[k].aval.size, t)
    out = op.outputs[0].aval
    p = op.params
    if op.kind in utasks.GEMM_KINDS:
        batch, m, n, _ = utasks.gemm_dims(op.kind, [v.aval for v in op.inputs], out, p)
        tm, tn = p["tile_m"], p["tile_n"]
        if utasks.gathers_batch(p):         # tile (i, j) of every batch element
            i, j = np.unravel_index(t, (math.ceil(m / tm), math.ceil(n / tn)))
            b = np.arange(batch)[:, None, None]
        else:
            b, i, j = np.unravel_index(t, (batch, math.ceil(m / tm), math.ceil(n / tn)))
        rows = np.arange(i * tm, min((i + 1) * tm, m))
        cols = np.arange(j * tn, min((j + 1) * tn, n))
        if op.kind == matmul_p.name:
            return (b * m * n + rows[:, None] * n + cols[None, :]).reshape(-1)
        *_, o, ho, wo = out.shape      # conv2d: GEMM row r = (image, y, x), column = output channel
        img, yx = np.divmod(rows, ho * wo)      # (b: split-K's slice, plan.K_SPLITS, else 0)
        return (b * m * n + img[:, None] * o * ho * wo + cols[None, :] * ho * wo + yx[:, None]).reshape(-1)
    if op.kind in utasks.REDUCE_KINDS:
        rows = p["rows"]
        return np.arange(t * rows, min((t + 1) * rows, out.size))
    return chunk_elements(p, out.shape, t)         # (2-D with plan.ROW_BLOCK)


def row_elements(op, size: int, t) -> np.ndarray:
    """Flat indices, in an array of `size` elements laid out by the rows of a ROWS op (its row shape, or
    one element per row), of the rows of uTask t; of its chunk of the row shape when split so (row_chunk:
    a cell chain, whose arrays all have the row shape; plan.chunk_elements)."""
    if row_chunk(op) is not None:               # (2-D with plan.ROW_BLOCK: a block of rows by a column range)
        return chunk_elements(op.params, op.params[ROW_SHAPE], t)
    per_row = size // max(row_count(op), 1)
    span = op.params["rows"] * per_row
    return np.arange(min(t * span, size), min((t + 1) * span, size))


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
    conservative (everything) for the others. An epilogue's operands are read at the elements written."""
    if CHAIN_PARTS in op.params:        # (plan.GEMV_ROWS_GEMV) what uTask t of the part that reads it reads
        part, number = chain_input(op, k)
        return read_share(part, number, t, starts)
    if k in epilogue_operands(op):
        return _broadcast_share(op, k, write_share(op, t))
    if op.kind == ROWS.name:             # each input is read in the uTask's rows (row_chain_reads)
        flat = row_elements(op, math.prod(op.params[ROW_SHAPE]), t)
        if op.inputs[k].aval.size == 1:
            return np.zeros(1, np.int64) if flat.size else flat
        return np.concatenate(row_chain_reads(op, k, flat))
    if op.kind in utasks.REDUCE_KINDS:
        return _reduce_share(op, write_share(op, t))
    if N_PARTS in op.params:            # sibling matmuls: A as every part reads it, B_i as part i
        part = sibling_parts(op)[max(k - 1, 0)]
        return _matmul_share(part, min(k, 1), write_share(part, t))
    if op.kind == matmul_p.name:
        return _matmul_share(op, k, write_share(op, t), _k_range(op, t))
    if utasks.in_place_update(op.kind, op.params) and k < 2:
        if k == 0:
            return np.zeros(0, np.int64)          # x is only written (in the window)
        chunk = op.params["chunk"]
        return np.arange(t * chunk, min((t + 1) * chunk, op.inputs[1].aval.size))
    if op.kind in MOVES and k < _array_operands(op):
        return _move_share(op, k, write_share(op, t), starts)
    if op.kind not in (FUSED.name, COPY.name):
        return None
    return _broadcast_share(op, k, write_share(op, t))


def row_chain_reads(op, k, flat) -> list:
    """For elements `flat` of a ROWS op's row shape S, the elements of its input k that they read, one array for
    each way the chain reads it (rows.py): broadcast to S (numpy, right-aligned) where a row step or a reduction
    reads it, the element of their row where a per-row step (shape S[:-1] or S[:-1] + (1,)) does."""
    shape = tuple(op.params[ROW_SHAPE])
    in_shape = op.inputs[k].aval.shape
    shapes = {shape if step.reduce is not None else tuple(step.aval.shape)
              for step in op.params[STEPS] if k in _inputs_read(step.expr)}
    return [broadcast_source(shape, in_shape, flat) if s == shape else broadcast_source(s, in_shape, flat // shape[-1])
            for s in sorted(shapes)] or [broadcast_source(shape, in_shape, flat)]


def _inputs_read(expr) -> set:
    """The input numbers an expression (plan.Expr) reads."""
    return fold_expr(expr, lambda node, args: set().union(*args, {node.params["index"]} if node.op == "input"
                                                          else set()))


def _broadcast_share(op, k, flat):
    """The elements of input k, broadcast to the output shape, that the output elements `flat` read."""
    out = op.outputs[0].aval
    in_aval = op.inputs[k].aval
    if in_aval.size == 1:
        return np.zeros(1, np.int64) if flat.size else flat
    return broadcast_source(out.shape, in_aval.shape, flat)


def broadcast_source(out_shape, in_shape, flat) -> np.ndarray:
    """For output elements `flat` (row-major), the elements of an input of `in_shape` broadcast (numpy,
    right-aligned) to `out_shape` that they read (`flat` None: every output element). Stride arithmetic on the
    input's axes of size > 1 only (np.unravel_index / ravel_multi_index over every axis took ~1 s of SkipNet's
    2 s lowering)."""
    if flat is None:                     # numpy's own broadcasting, written out
        source = np.empty(math.prod(out_shape), np.intp)
        source.reshape(out_shape)[...] = np.arange(math.prod(in_shape)).reshape(in_shape)
        return source
    flat = np.asarray(flat, np.intp)
    offset = len(out_shape) - len(in_shape)
    if tuple(out_shape[offset:]) == tuple(in_shape) and math.prod(out_shape[:offset]) == 1:   # not broadcast
        return flat.copy()
    out_strides = np.cumprod((1,) + tuple(out_shape[:0:-1]))[::-1]
    source, in_stride = np.zeros_like(flat), 1
    for axis in range(len(in_shape) - 1, -1, -1):
        if in_shape[axis] != 1:
            o = offset + axis
            coord = flat // int(out_strides[o]) if out_strides[o] != 1 else flat
            source += (coord % out_shape[o] if o else coord) * in_stride
        in_stride *= in_shape[axis]
    return source


def _reduce_share(op, flat) -> np.ndarray:
    """The input elements the outputs `flat` of a reduction reduce."""
    x = op.inputs[0].aval
    if op.outputs[0].aval.size == 0:          # an empty result reduces nothing
        return np.zeros(0, np.int64)
    axes = list(op.params["axes"] if "axes" in op.params else (op.params["axis"],))
    keep = [a for a in range(x.ndim) if a not in axes]
    idx = np.arange(x.size).reshape(x.shape).transpose(keep + axes)
    return idx.reshape(op.outputs[0].aval.size, -1)[flat].reshape(-1)


def _k_range(op, t) -> range | None:
    """The depths uTask t of a GEMM contracts: its slice's range under split-K (plan.K_SPLITS), else None (all)."""
    splits = op.params.get(K_SPLITS, 1)
    if splits == 1:
        return None
    batch, m, n, k = utasks.gemm_dims(op.kind, [v.aval for v in op.inputs], op.outputs[0].aval, op.params)
    tiles = batch // splits * -(-m // op.params["tile_m"]) * -(-n // op.params["tile_n"])
    return range(*k_range(k, splits, int(t) // tiles))


def _matmul_share(op, k, flat, depths=None) -> np.ndarray:
    """Operand k's elements that the outputs `flat` of a (batched, broadcasting) matmul read: their rows
    of a (of each of its parts, plan.K_PARTS), their columns of b, in the matching batch element; at the
    `depths` only where given (split-K's range, _k_range)."""
    out, x = op.outputs[0].aval, op.inputs[k].aval
    m, n = out.shape[-2:]
    a_depths = {number: depth for number, _, depth in a_parts(op)}
    depth = a_depths.get(k, op.inputs[1].aval.shape[-2])
    b, rest = np.divmod(flat, m * n)
    i, j = np.divmod(rest, n)
    bshape, xshape = out.shape[:-2], x.shape[:-2]
    bidx = np.unravel_index(b, bshape) if bshape else ()
    offset = len(bshape) - len(xshape)
    xb = np.ravel_multi_index(tuple(np.zeros_like(b) if d == 1 else bidx[offset + a]
                                    for a, d in enumerate(xshape)), xshape) if xshape else np.zeros_like(b)
    if k == op.params.get(ROW_INDEX):       # the indices of gathered rows (plan.ROW_INDEX): one per row of A
        return np.unique(i)
    # (the distinct rows of a, or columns of b, first: an output tile reads each of them many times)
    kk = np.arange(depth) if depths is None else np.asarray(depths)
    if k in a_depths:
        rows = np.unique(xb * m + i)            # sorted: their whole rows, one after another, are too
        return (rows[:, None] * depth + kk[None, :]).reshape(-1)
    columns = np.unique(xb * n + j)
    xb, j = np.divmod(columns, n)
    return np.sort(((xb * depth * n + j)[:, None] + kk[None, :] * n).reshape(-1))


def _move_share(op, k, flat, starts) -> np.ndarray:
    picked = moved_from(op, k, starts)[flat]
    return np.unique(picked[picked >= 0])


def moved_from(op, k, starts=()) -> np.ndarray:
    """For each output element of a data movement op, the element of input k it comes from (-1: another
    input): the primitive itself run on element numbers (input k) and -1 (the others)."""
    first = _array_operands(op)
    ins = [np.arange(v.aval.size).reshape(v.aval.shape) if j == k else np.full(v.aval.shape, -1)
           for j, v in enumerate(op.inputs[:first])]
    params = {p: v for p, v in op.params.items() if p not in SPLIT_PARAMS}
    return np.asarray(REGISTRY[op.kind].impl(*ins, *[np.int64(s) for s in starts], **params)[0]).reshape(-1)


def _array_operands(op) -> int:
    """The number of leading array operands of `op` (all of them but a dynamic op's start indices)."""
    first = utasks.first_start(op.kind)
    return len(op.inputs) if first is None else first
