"""What one uTask of each Op kind computes, as LLVM IR (the shares of gdsl/schedule/utasks.py).

    elementwise-like kinds   output elements [t*chunk, min((t+1)*chunk, size)) in row-major order, walked
                             row by row so the innermost loop has constant strides (and vectorises)
    reductions               output elements [t*rows, ...), each a full reduction
    matmul / conv2d          output tile (b, i, j) = unravel(t, (batch, ceil(M/tile_m), ceil(N/tile_n)))
    dynamic_update_slice     in place: update elements [t*chunk, ...)

Every emitter reads its operands through an `Operands` (a pointer, a uniform scalar or a literal per input),
so the same code evaluates a uniform op (one element, in the kernel) and a uTask (in its own function).
"""
from __future__ import annotations

import functools
import math

import numpy as np

from gdsl import dtypes
from gdsl.backends.cpu.ir import (
    affine,
    compute_type,
    const,
    convert,
    load_element,
    mem_type,
    round_to,
    store_element,
    strides,
    unravel,
)
from gdsl.backends.cpu.lowerings import LOWERINGS
from gdsl.schedule import utasks
from gdsl.schedule.plan import Expr


class Operands:
    """How a piece of code reaches an Op's inputs and outputs: per value ("ptr", SSA pointer),
    ("scalar", SSA compute-type value) or ("lit", numpy scalar)."""

    def __init__(self, fn, in_values, in_access, out_values=(), out_access=()):
        self.fn = fn
        self.in_values, self.in_access = list(in_values), list(in_access)
        self.out_values, self.out_access = list(out_values), list(out_access)

    def aval(self, k):
        return self.in_values[k].aval

    def load(self, k, offset):
        kind, x = self.in_access[k]
        dtype = self.aval(k).dtype
        if kind == "ptr":
            return load_element(self.fn, dtype, x, offset)
        if kind == "scalar":
            return x
        return const(dtype, x)

    def index(self, k):
        """Input k (an integer scalar) as i64."""
        return self.fn.ext_index(self.load(k, 0), compute_type(self.aval(k).dtype))

    def store(self, j, offset, value):
        _, ptr = self.out_access[j]
        store_element(self.fn, self.out_values[j].aval.dtype, ptr, offset, value)


# ------------------------------------------------------------------------------------------ iteration

def for_chunk(fn, shape, chunk, t, element):
    """element(idx, linear) for the output elements [t*chunk, min((t+1)*chunk, size)) of `shape`, row by
    row: the inner loop runs over the last dimension with constant bounds when rows do not straddle chunks."""
    size = math.prod(shape)
    if size == 0:
        return
    if len(shape) == 0:
        element([], 0)
        return
    whole = chunk >= size
    start = 0 if whole else fn.op(f"mul nsw i64 {t}, {chunk}")
    end = size if whole else fn.imin(fn.op(f"add nsw i64 {start}, {chunk}"), size)
    if len(shape) == 1:
        fn.loop(start, end, lambda j: element([j], j))
        return
    width, outer_shape = shape[-1], shape[:-1]

    def row(r, lo, hi):
        outer = unravel(fn, r, outer_shape)
        base = fn.op(f"mul nsw i64 {r}, {width}")
        fn.loop(lo, hi, lambda j: element(outer + [j], fn.op(f"add nsw i64 {base}, {j}")))

    if whole or chunk % width == 0:
        r0 = 0 if whole else fn.op(f"udiv i64 {start}, {width}")
        r1 = size // width if whole else fn.op(f"udiv i64 {end}, {width}")
        fn.loop(r0, r1, lambda r: row(r, 0, width))
        return
    r0 = fn.op(f"udiv i64 {start}, {width}")
    r1 = fn.op(f"udiv i64 {fn.op(f'add nsw i64 {end}, {width - 1}')}, {width}")

    def partial(r):
        first = fn.op(f"mul nsw i64 {r}, {width}")
        lo = fn.imax(fn.op(f"sub nsw i64 {start}, {first}"), 0)
        hi = fn.imin(fn.op(f"sub nsw i64 {end}, {first}"), width)
        row(r, lo, hi)
    fn.loop(r0, r1, partial)


def broadcast_strides(shape, out_shape) -> tuple[int, ...]:
    """Element strides that read a row-major `shape` broadcast (numpy rules) to `out_shape`."""
    own = strides(shape)
    pad = len(out_shape) - len(shape)
    return tuple(0 if d < pad or shape[d - pad] == 1 else own[d - pad] for d in range(len(out_shape)))


def collapse(shape, stride_sets):
    """Merge adjacent dimensions that every stride set walks contiguously; drop unit dimensions."""
    dims = [(n, [s[d] for s in stride_sets]) for d, n in enumerate(shape) if n != 1]
    merged: list = []
    for n, ss in dims:
        if merged and all(prev == cur * n for prev, cur in zip(merged[-1][1], ss)):
            merged[-1] = (merged[-1][0] * n, ss)
        else:
            merged.append((n, ss))
    return tuple(n for n, _ in merged), [tuple(ss[k] for _, ss in merged) for k in range(len(stride_sets))]


# ------------------------------------------------------------------------------- affine elementwise kinds
# An affine kind reads each of its "leaves" at base + sum(idx[d] * strides[d]) and combines the values.

class Leaf:
    def __init__(self, strides_, load, base=0):
        self.strides, self.load, self.base = tuple(strides_), load, base


def eval_expr(fn, expr, leaf_value):
    """The compute-type value of a fused Expr tree; leaf_value(node) gives input and iota nodes."""
    memo: dict = {}

    def ev(node):
        if id(node) in memo:
            return memo[id(node)]
        if node.op in ("input", "iota"):
            v = leaf_value(node)
        elif node.op == "literal":
            v = const(node.aval.dtype, node.params["value"])
        else:
            args = [ev(a) for a in node.args]
            operand = node.args[1] if node.op == "select" else node.args[0]
            v = LOWERINGS[node.op](fn, operand.aval.dtype, args, node.params)
            if node.op != "convert_element_type":
                v = round_to(fn, node.aval.dtype, v)
        memo[id(node)] = v
        return v
    return ev(expr)


def _iota_leaf(fn, shape, dimension, dtype, out_shape):
    """iota's value is its index along `dimension`: a leaf whose "offset" is that index."""
    st = [0] * len(out_shape)
    pad = len(out_shape) - len(shape)
    if shape[dimension] != 1:
        st[pad + dimension] = 1
    return Leaf(st, lambda off: convert(fn, str(off), dtypes.int64, dtype))


def _broadcastable(shape, out_shape) -> bool:
    pad = len(out_shape) - len(shape)
    return pad >= 0 and all(d in (1, out_shape[pad + k]) for k, d in enumerate(shape))


def affine_leaves(fn, ops: Operands, kind, params, expr, out_aval):
    """(leaves, combine(values) -> value) of an affine kind."""
    out_shape = out_aval.shape
    if kind in ("fused", "broadcast_to", "iota"):
        if expr is None:      # an unfused broadcast_to / iota
            args = (Expr("input", (), {"index": 0}, ops.aval(0)),) if kind == "broadcast_to" else ()
            expr = Expr(kind, args, params, out_aval)
        leaves, slot = [], {}

        def collect(node):
            key = ("in", node.params["index"]) if node.op == "input" else ("iota", id(node))
            if node.op in ("input", "iota") and key not in slot:
                slot[key] = len(leaves)
                if node.op == "input":
                    k = node.params["index"]
                    leaves.append(Leaf(broadcast_strides(ops.aval(k).shape, out_shape),
                                       lambda off, k=k: ops.load(k, off)))
                else:
                    leaves.append(_iota_leaf(fn, node.params["shape"], node.params["dimension"],
                                             node.params["dtype"], out_shape))
            for a in node.args:
                collect(a)
        collect(expr)

        def combine(values):
            def leaf_value(node):
                key = ("in", node.params["index"]) if node.op == "input" else ("iota", id(node))
                return values[slot[key]]
            return eval_expr(fn, expr, leaf_value)
        return leaves, combine
    src = ops.aval(0)
    xs = strides(src.shape)

    def load0(off):
        return ops.load(0, off)

    def same(values):
        return values[0]
    if kind == "copy":        # numpy broadcasting; between shapes of one size (a reshape), element by element
        st = broadcast_strides(src.shape, out_shape) if _broadcastable(src.shape, out_shape) else strides(out_shape)
        return [Leaf(st, load0)], lambda values: convert(fn, values[0], src.dtype, out_aval.dtype)
    if kind == "transpose":
        return [Leaf([xs[p] for p in params["permutation"]], load0)], same
    if kind == "slice":
        base = sum(b * s for b, s in zip(params["start"], xs))
        return [Leaf([st * s for st, s in zip(params["step"], xs)], load0, base)], same
    if kind == "dynamic_slice":
        starts = [fn.clamp(ops.index(1 + d), 0, n - z) for d, (n, z) in enumerate(zip(src.shape, params["sizes"]))]
        return [Leaf(xs, load0, affine(fn, 0, zip(starts, xs)))], same
    raise NotImplementedError(kind)


AFFINE_KINDS = frozenset({"fused", "copy", "broadcast_to", "iota", "transpose", "slice", "dynamic_slice"})


def emit_affine(fn, ops, op, t):
    out_aval = op.outputs[0].aval
    leaves, combine = affine_leaves(fn, ops, op.kind, op.params, op.expr, out_aval)
    shape, sets = collapse(out_aval.shape, [leaf.strides for leaf in leaves] + [strides(out_aval.shape)])

    def element(idx, linear):
        values = [leaf.load(affine(fn, leaf.base, zip(idx, st))) for leaf, st in zip(leaves, sets)]
        ops.store(0, affine(fn, 0, zip(idx, sets[-1])), combine(values))
    for_chunk(fn, shape, op.params["chunk"], t, element)


def affine_scalar(fn, ops, kind, params, expr, out_aval):
    """Element 0 of an affine kind (a uniform op)."""
    leaves, combine = affine_leaves(fn, ops, kind, params, expr, out_aval)
    return combine([leaf.load(leaf.base) for leaf in leaves])


# ---------------------------------------------------------------------------------- gather-like kinds

def _in_window(fn, idx, starts, sizes):
    conds = []
    for i, s, z in zip(idx, starts, sizes):
        rel = fn.op(f"sub nsw i64 {i}, {s}")
        conds.append(fn.op(f"icmp ult i64 {rel}, {z}"))   # 0 <= i - s < z
    acc = "true"
    for c in conds:
        acc = c if acc == "true" else fn.op(f"and i1 {acc}, {c}")
    return acc


def _update_starts(fn, ops, params):
    """Clamped start indices of a dynamic_update_slice, and an i1 that is true when mode='drop' drops it."""
    x, u = ops.aval(0), ops.aval(1)
    raw = [ops.index(2 + d) for d in range(x.ndim)]
    starts = [fn.clamp(r, 0, n - z) for r, n, z in zip(raw, x.shape, u.shape)]
    dropped = "false"
    if params["mode"] == "drop":
        for r, n, z in zip(raw, x.shape, u.shape):
            bad = fn.op(f"or i1 {fn.op(f'icmp slt i64 {r}, 0')}, {fn.op(f'icmp sgt i64 {r}, {n - z}')}")
            dropped = bad if dropped == "false" else fn.op(f"or i1 {dropped}, {bad}")
    return starts, dropped


def gather_element(fn, ops, kind, params, out_aval, prepared, idx, linear):
    """The value of output element `idx` of take / concatenate / dynamic_update_slice / pools."""
    if kind == "take":
        x, ind = ops.aval(0), ops.aval(1)
        axis, r = params["axis"], ind.ndim
        xs = strides(x.shape)
        i = ops.load(1, affine(fn, 0, zip(idx[axis:axis + r], strides(ind.shape))))
        i = fn.clamp(fn.ext_index(i, compute_type(ind.dtype)), 0, x.shape[axis] - 1)
        pos = list(idx[:axis]) + [i] + list(idx[axis + r:])
        return ops.load(0, affine(fn, 0, zip(pos, xs)))
    if kind == "concatenate":
        axis = params["axis"]
        value, first = None, 0
        for k in range(len(ops.in_values)):
            a = ops.aval(k)
            n = a.shape[axis]
            if n == 0:
                continue
            pos = list(idx)
            pos[axis] = fn.clamp(fn.op(f"sub nsw i64 {idx[axis]}, {first}") if first else idx[axis], 0, n - 1)
            v = ops.load(k, affine(fn, 0, zip(pos, strides(a.shape))))
            if value is None:
                value = v
            else:
                take = fn.op(f"icmp sge i64 {idx[axis]}, {first}")
                value = fn.op(f"select i1 {take}, {compute_type(a.dtype)} {v}, {compute_type(a.dtype)} {value}")
            first += n
        return value
    if kind == "dynamic_update_slice":
        x, u = ops.aval(0), ops.aval(1)
        starts, dropped = prepared
        old = ops.load(0, linear)
        if u.size == 0:
            return old
        inside = fn.op(f"and i1 {_in_window(fn, idx, starts, u.shape)}, {fn.op(f'xor i1 {dropped}, true')}")
        rel = [fn.clamp(fn.op(f"sub nsw i64 {i}, {s}"), 0, z - 1) for i, s, z in zip(idx, starts, u.shape)]
        new = ops.load(1, affine(fn, 0, zip(rel, strides(u.shape))))
        ty = compute_type(x.dtype)
        return fn.op(f"select i1 {inside}, {ty} {new}, {ty} {old}")
    if kind in ("avg_pool2d", "max_pool2d"):
        return _pool_element(fn, ops, kind, params, idx)
    raise NotImplementedError(kind)


def _pool_element(fn, ops, kind, params, idx):
    x = ops.aval(0)
    _, _, h, w = x.shape
    win, stride, pad = params["window"], params["stride"], params["padding"]
    n, c, ho, wo = idx
    xs = strides(x.shape)
    base = affine(fn, 0, [(n, xs[0]), (c, xs[1])])
    acc = fn.alloca("float", "acc")
    is_max = kind == "max_pool2d"
    fn.store("float", "0xFFF0000000000000" if is_max else "0.0", acc)
    h0 = fn.op(f"sub nsw i64 {fn.op(f'mul nsw i64 {ho}, {stride}') if ho != 0 else 0}, {pad}")
    w0 = fn.op(f"sub nsw i64 {fn.op(f'mul nsw i64 {wo}, {stride}') if wo != 0 else 0}, {pad}")

    def at(kh):
        hh = fn.op(f"add nsw i64 {h0}, {kh}")
        h_ok = fn.op(f"icmp ult i64 {hh}, {h}")
        hc = fn.clamp(hh, 0, h - 1)

        def at2(kw):
            ww = fn.op(f"add nsw i64 {w0}, {kw}")
            ok = fn.op(f"and i1 {h_ok}, {fn.op(f'icmp ult i64 {ww}, {w}')}")
            v = ops.load(0, affine(fn, base, [(hc, xs[2]), (fn.clamp(ww, 0, w - 1), xs[3])]))
            v = convert(fn, v, x.dtype, dtypes.float32)
            a = fn.load("float", acc)
            if is_max:
                v = fn.op(f"select i1 {ok}, float {v}, float 0xFFF0000000000000")
                new = LOWERINGS["max"](fn, dtypes.float32, [a, v], {})
            else:
                new = fn.op(f"fadd float {a}, {fn.op(f'select i1 {ok}, float {v}, float 0.0')}")
            fn.store("float", new, acc)
        fn.loop(0, win, at2)
    fn.loop(0, win, at)
    total = fn.load("float", acc)
    if not is_max:
        total = fn.op(f"fdiv float {total}, {const(dtypes.float32, win * win)}")
    return convert(fn, total, dtypes.float32, x.dtype)


def emit_gather(fn, ops, op, t):
    out_aval = op.outputs[0].aval
    prepared = _update_starts(fn, ops, op.params) if op.kind == "dynamic_update_slice" else None
    for_chunk(fn, out_aval.shape, op.params["chunk"], t,
              lambda idx, linear: ops.store(0, linear, gather_element(fn, ops, op.kind, op.params, out_aval,
                                                                      prepared, idx, linear)))


def emit_update_in_place(fn, ops, op, t):
    """dynamic_update_slice whose output is its operand's storage: write only the window."""
    x, u = ops.aval(0), ops.aval(1)
    starts, dropped = _update_starts(fn, ops, op.params)
    xs = strides(x.shape)

    def body():
        def element(idx, linear):
            pos = [fn.op(f"add nsw i64 {s}, {i}") if i != 0 else s for s, i in zip(starts, idx)]
            ops.store(0, affine(fn, 0, zip(pos, xs)), ops.load(1, linear))
        for_chunk(fn, u.shape, op.params["chunk"], t, element)
    if dropped == "false":
        body()
    else:
        fn.if_(fn.op(f"xor i1 {dropped}, true"), body)


# -------------------------------------------------------------------------------------------- reductions

def _reduce_setup(kind, params, x):
    axes = tuple(params["axes"]) if kind.startswith("reduce") else (params["axis"],)
    kept = [d for d in range(x.ndim) if d not in axes]
    xs = strides(x.shape)
    reduced = [(x.shape[d], xs[d]) for d in sorted(axes) if x.shape[d] != 1]
    merged: list = []
    for n, s in reduced:   # adjacent reduced axes of a row-major array form one longer axis
        if merged and merged[-1][1] == s * n:
            merged[-1] = (merged[-1][0] * n, s)
        else:
            merged.append((n, s))
    return kept, xs, merged


def reduce_element(fn, ops, kind, params, out_aval, idx):
    """The reduction of output element `idx` (kept axes in order)."""
    x = ops.aval(0)
    kept, xs, loops = _reduce_setup(kind, params, x)
    base = affine(fn, 0, zip(idx, [xs[d] for d in kept]))
    if kind in ("argmax", "argmin"):
        return _arg_reduce(fn, ops, kind, x, base, loops)
    acc_dtype = out_aval.dtype if not dtypes.is_float(x.dtype) else dtypes.float32
    ty = compute_type(acc_dtype)
    if kind == "reduce_sum":
        init = const(acc_dtype, 0)
    elif dtypes.is_float(x.dtype):
        init = "0xFFF0000000000000" if kind == "reduce_max" else "0x7FF0000000000000"
    else:
        info = np.iinfo(x.dtype) if x.dtype != dtypes.bool_ else None
        init = (("false" if kind == "reduce_max" else "true") if info is None
                else str(info.min if kind == "reduce_max" else info.max))
    acc = fn.alloca(ty, "acc")
    fn.store(ty, init, acc)
    combine = {"reduce_max": "max", "reduce_min": "min"}.get(kind)

    def nest(level, offset):
        if level == len(loops):
            v = convert(fn, ops.load(0, offset), x.dtype, acc_dtype)
            a = fn.load(ty, acc)
            if combine:
                new = LOWERINGS[combine](fn, acc_dtype, [a, v], {})
            elif ty == "float":
                new = fn.op(f"fadd reassoc contract float {a}, {v}")
            else:
                new = fn.op(f"add {ty} {a}, {v}")
            fn.store(ty, new, acc)
            return
        n, s = loops[level]
        fn.loop(0, n, lambda i: nest(level + 1, affine(fn, offset, [(i, s)])))
    nest(0, base)
    return convert(fn, fn.load(ty, acc), acc_dtype, out_aval.dtype)


def _arg_reduce(fn, ops, kind, x, base, loops):
    """Index (int32) of the first maximum/minimum along the axis; the first NaN wins, as numpy."""
    n, s = loops[0] if loops else (1, 0)
    ty = compute_type(x.dtype)
    best, where = fn.alloca(ty, "best"), fn.alloca("i64", "at")
    fn.store(ty, ops.load(0, base), best)
    fn.store("i64", "0", where)

    def step(i):
        v = ops.load(0, affine(fn, base, [(i, s)]))
        b = fn.load(ty, best)
        if dtypes.is_float(x.dtype):
            better = fn.op(f"fcmp {'ogt' if kind == 'argmax' else 'olt'} float {v}, {b}")
            nan = fn.op(f"and i1 {fn.op(f'fcmp uno float {v}, 0.0')}, {fn.op(f'fcmp ord float {b}, 0.0')}")
            better = fn.op(f"or i1 {better}, {nan}")
        else:
            pred = ("ugt" if kind == "argmax" else "ult") if ty == "i1" else ("sgt" if kind == "argmax" else "slt")
            better = fn.op(f"icmp {pred} {ty} {v}, {b}")
        fn.store(ty, fn.op(f"select i1 {better}, {ty} {v}, {ty} {b}"), best)
        fn.store("i64", fn.op(f"select i1 {better}, i64 {i}, i64 {fn.load('i64', where)}"), where)
    fn.loop(1, n, step)
    return fn.op(f"trunc i64 {fn.load('i64', where)} to i32")


def emit_reduce(fn, ops, op, t):
    out_aval = op.outputs[0].aval
    for_chunk(fn, out_aval.shape, op.params["rows"], t,
              lambda idx, linear: ops.store(0, linear, reduce_element(fn, ops, op.kind, op.params, out_aval, idx)))


# ---------------------------------------------------------------------------------------------- GEMMs

def _acc_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtypes.is_float(dtype):
        return dtypes.float32
    return dtypes.int32 if dtype == dtypes.bool_ else dtype


PREFETCH_ROWS = 8
BAND_LIMIT = 8192   # accumulator elements (32 KiB of float32: L1) of a matmul row band done in one go


def packed_tile(op) -> int:
    """The column tile width of a matmul whose right operand is a constant of several column tiles, which
    the executable keeps packed (pack_columns); else 0. Row-major, a tile is a short piece of every row of
    b: with a power-of-two row length those pieces map to a fraction of the L2 cache's sets, and the
    prefetchers run on into the next tile, so a core cannot keep its tiles in its L2 across calls. Packed,
    each tile is one contiguous panel."""
    if op.kind != "matmul":
        return 0
    b, tn = op.inputs[1], op.params["tile_n"]
    const = b.buffer is not None and b.buffer.kind == "const"
    return tn if const and b.aval.ndim >= 2 and b.aval.shape[-1] > tn else 0


def pack_columns(b: np.ndarray, tn: int) -> np.ndarray:
    """b[..., k, n] as panels p[..., j, kk, c] = b[..., kk, j * tn + c] (zeros past column n)."""
    *batch, k, n = b.shape
    panels = -(-n // tn)
    padded = np.zeros((*batch, k, panels * tn), b.dtype)
    padded[..., :n] = b
    return np.ascontiguousarray(np.swapaxes(padded.reshape(*batch, k, panels, tn), -2, -3))


def matmul_bands(op) -> int:
    """How many row bands (b, ti) a matmul has, when one thread can compute all column tiles of a band in
    one go (its accumulators fit BAND_LIMIT) along b's rows (b not packed); else 0."""
    if op.kind != "matmul" or packed_tile(op):
        return 0
    n, tm, tn = op.outputs[0].aval.shape[-1], op.params["tile_m"], op.params["tile_n"]
    if n <= tn or tm * n > BAND_LIMIT:
        return 0
    return op.n_utasks // -(-n // tn)


def emit_matmul(fn, ops, op, t, band=False):
    """uTask t: output tile (b, ti, tj). With `band`, t numbers a row band (b, ti) instead and the function
    computes all of its column tiles at once, reading the right operand in the longest pieces of its rows
    that the accumulators allow (whole rows; float32: as many columns as the micro-kernel's registers
    hold): each output element gets the same sum in the same order, but memory is read in far fewer, longer
    streams than a tile's short pieces of many rows (the GEMV case: LSTM cells, tree encoders)."""
    a, b = ops.aval(0), ops.aval(1)
    out = op.outputs[0].aval
    batch, m, n, k = utasks.gemm_dims("matmul", [a, b], out, op.params)
    tm, tn = op.params["tile_m"], op.params["tile_n"]
    nm, nn = -(-m // tm), -(-n // tn)
    if batch * m * n == 0:
        return
    if band:
        tn, nn = n, 1
    bi = fn.op(f"udiv i64 {t}, {nm * nn}") if batch > 1 else 0
    rest = fn.op(f"urem i64 {t}, {nm * nn}") if batch > 1 else t
    ti = fn.op(f"udiv i64 {rest}, {nn}") if nn > 1 else rest
    tj = fn.op(f"urem i64 {rest}, {nn}") if nn > 1 else 0
    bshape = out.shape[:-2]
    bidx = unravel(fn, bi, bshape) if bshape else []
    a_st = broadcast_strides(a.shape[:-2], bshape)
    b_st = broadcast_strides(b.shape[:-2], bshape)
    a_base = affine(fn, 0, [(i, s * m * k) for i, s in zip(bidx, a_st)])
    packed = packed_tile(op)
    b_base = affine(fn, 0, [(i, s * k * (nn * tn if packed else n)) for i, s in zip(bidx, b_st)])
    o_base = affine(fn, 0, [(i, s * m * n) for i, s in zip(bidx, strides(bshape))])
    i0 = fn.op(f"mul nsw i64 {ti}, {tm}") if nm > 1 else 0
    rows = min(tm, m) if m % tm == 0 or nm == 1 else fn.imin(fn.op(f"sub nsw i64 {m}, {i0}"), tm)
    j0 = fn.op(f"mul nsw i64 {tj}, {tn}") if nn > 1 else 0
    cols = min(tn, n) if n % tn == 0 or nn == 1 else fn.imin(fn.op(f"sub nsw i64 {n}, {j0}"), tn)
    b_tile = affine(fn, b_base, [(tj, k * tn)] if packed else [(j0, 1)])   # b[kk, j0+c] at b_tile + kk*ldb + c

    def block(cols):
        _gemm_block(fn, ops, a.dtype, b.dtype, out.dtype, k, n, a_base, b_tile, packed or n, o_base, i0, rows, j0,
                    cols, tm, tn)
    if isinstance(cols, int):
        block(cols)
    else:   # every tile but the last column's is whole: give those constant columns (the micro-kernel)
        fn.if_(fn.op(f"icmp eq i64 {cols}, {tn}"), lambda: block(tn), lambda: block(cols))


@functools.cache
def micro_shape() -> tuple[int, int, int]:
    """(rows, columns, vector lanes) of the float32 GEMM micro-kernel for this CPU: 8 x 32 accumulators
    in 16 AVX-512 registers, else 6 x 16 in 12 AVX2 registers (both leave room for b and a broadcast)."""
    try:
        import llvmlite.binding as llvm
        wide = "+avx512f" in llvm.get_host_cpu_features().flatten().split(",")
    except Exception:  # noqa: BLE001 - no feature list: assume the narrow vectors
        wide = False
    return (8, 32, 16) if wide else (6, 16, 8)


def _gemm_block(fn, ops, a_dtype, b_dtype, out_dtype, k, n, a_base, b_tile, ldb, o_base, i0, rows, j0, cols,
                max_rows, max_cols):
    """out[i0+r, j0+c] = sum_kk a[i0+r, kk] * b[b_tile + kk*ldb + c] for r < rows, c < cols (row-major a
    [., k], out [., n] at the given bases), each element summed over kk in order (fused multiply-add).

    float32 blocks whose columns are a constant multiple of the vector width go through the register-
    blocked micro-kernel (_micro_kernel, micro_shape): its number of rows at a time, then the constant
    rest of the rows (a GEMV's one row) at once. The other rows use loop order k, r, c with a row of
    accumulators per row (max_rows x max_cols, in L1): a row of b is read once per k and reused by every
    row."""
    done = 0
    f32 = dtypes.float32
    mr, mc, lanes = micro_shape()
    if (a_dtype == b_dtype == out_dtype == f32 and isinstance(cols, int) and cols % lanes == 0
            and k > 0 and ops.in_access[0][0] == ops.in_access[1][0] == "ptr"):
        def block(r, count):
            rows_at = [affine(fn, a_base, [(i0, k), (r, k), (rr, k)]) for rr in range(count)]
            width = lanes * max(1, mr * mc // lanes // count)     # as many accumulators as mr x mc
            for c in range(0, cols, width):
                out_at = [affine(fn, o_base, [(i0, n), (r, n), (rr, n), (j0, 1), (c, 1)]) for rr in range(count)]
                _micro_kernel(fn, ops.in_access[0][1], rows_at, ops.in_access[1][1], affine(fn, b_tile, [(c, 1)]),
                              ldb, ops.out_access[0][1], out_at, k, min(width, cols - c))
        if max_rows >= mr:
            done = (rows // mr * mr if isinstance(rows, int)
                    else fn.op(f"mul nsw i64 {fn.op(f'sdiv i64 {rows}, {mr}')}, {mr}"))
            fn.loop(0, done, lambda r: block(r, mr), step=mr)
        if isinstance(rows, int):
            if rows > done:
                block(done, rows - done)
            return
    acc_dtype = _acc_dtype(a_dtype)
    ty = compute_type(acc_dtype)
    acc = fn.alloca(f"[{max_rows * max_cols} x {ty}]", "acc")
    zero = const(acc_dtype, 0)
    mul, add = ("fmul contract", "fadd contract") if ty == "float" else ("mul", "add")
    unroll = isinstance(cols, int) and cols <= 128   # a row of acc in vector registers

    def slot(r, c):
        return fn.gep(ty, acc, affine(fn, 0, [(r, max_cols), (c, 1)]))
    fn.loop(done, rows, lambda r: fn.loop(0, cols, lambda c: fn.store(ty, zero, slot(r, c)), unroll=unroll))

    def kstep(kk):
        _prefetch(fn, ops, b_dtype, b_tile, kk, k, ldb, cols)
        b_row = affine(fn, b_tile, [(kk, ldb)])

        def row(r):
            av = convert(fn, ops.load(0, affine(fn, a_base, [(i0, k), (r, k), (kk, 1)])), a_dtype, acc_dtype)

            def col(c):
                p = slot(r, c)
                bv = convert(fn, ops.load(1, affine(fn, b_row, [(c, 1)])), b_dtype, acc_dtype)
                fn.store(ty, fn.op(f"{add} {ty} {fn.load(ty, p)}, {fn.op(f'{mul} {ty} {av}, {bv}')}"), p)
            fn.loop(0, cols, col, unroll=unroll)
        fn.loop(done, rows, row)
    fn.loop(0, k, kstep)

    def store_row(r):
        o_row = affine(fn, o_base, [(i0, n), (r, n), (j0, 1)])
        fn.loop(0, cols, lambda c: ops.store(0, affine(fn, o_row, [(c, 1)]), convert(
            fn, fn.load(ty, slot(r, c)), acc_dtype, out_dtype)), unroll=unroll)
    fn.loop(done, rows, store_row)


def _micro_kernel(fn, a_ptr, a_rows, b_ptr, b_start, b_stride, out_ptr, out_rows, k_count, cols=None,
                  accumulate=False):
    """A float32 register block of len(a_rows) rows and `cols` columns (default: micro_shape()'s, a
    multiple of its lanes): for each row rr and column cc,

        out[out_rows[rr] + cc] (+)= sum(a[a_rows[rr] + kk] * b[b_start + kk * b_stride + cc]
                                        for kk in range(k_count))           (kk in order, fused multiply-add)

    The accumulators are explicit <lanes x float> SSA values carried through the k loop (phis), so they
    live in registers; per k one vector load of each piece of b's row and one broadcast of each a
    element feed rows x cols / lanes fused multiply-adds. `accumulate`: start from out's values."""
    _, micro_cols, lanes = micro_shape()
    micro_rows = len(a_rows)
    vec, q = f"<{lanes} x float>", (cols or micro_cols) // lanes

    def vector_at(ptr, offset, j):
        return fn.gep("float", ptr, fn.op(f"add nsw i64 {offset}, {j * lanes}"))
    start = [[fn.op(f"load {vec}, ptr {vector_at(out_ptr, out_rows[rr], j)}, align 4") if accumulate
              else "zeroinitializer" for j in range(q)] for rr in range(micro_rows)]
    before, head, done = fn.block, fn.label("micro"), fn.label("micro_end")
    fn.goto(head)
    fn.start(head)
    kk = fn.name("k")
    accs = [[fn.name("acc") for _ in range(q)] for _ in range(micro_rows)]
    phi_at = len(fn.lines)
    fn.lines += [None] * (1 + micro_rows * q)
    b_row = fn.op(f"add nsw i64 {b_start}, {fn.op(f'mul nsw i64 {kk}, {b_stride}')}")
    bs = [fn.op(f"load {vec}, ptr {vector_at(b_ptr, b_row, j)}, align 4") for j in range(q)]
    new = []
    for rr in range(micro_rows):
        a = fn.load("float", fn.gep("float", a_ptr, fn.op(f"add nsw i64 {a_rows[rr]}, {kk}")))
        splat = fn.op(f"shufflevector {vec} {fn.op(f'insertelement {vec} poison, float {a}, i64 0')}, {vec} poison, "
                      f"<{lanes} x i32> zeroinitializer")
        new.append([fn.op(f"call {vec} @llvm.fma.v{lanes}f32({vec} {splat}, {vec} {bs[j]}, {vec} {accs[rr][j]})")
                    for j in range(q)])
    nxt = fn.op(f"add nsw i64 {kk}, 1")
    fn.do(f"br i1 {fn.op(f'icmp slt i64 {nxt}, {k_count}')}, label %{head}, label %{done}")
    fn.lines[phi_at] = f"  {kk} = phi i64 [0, %{before}], [{nxt}, %{head}]"
    for rr in range(micro_rows):
        for j in range(q):
            fn.lines[phi_at + 1 + rr * q + j] = (f"  {accs[rr][j]} = phi {vec} [{start[rr][j]}, %{before}], "
                                                 f"[{new[rr][j]}, %{head}]")
    fn.start(done)
    for rr in range(micro_rows):
        for j in range(q):
            fn.do(f"store {vec} {new[rr][j]}, ptr {vector_at(out_ptr, out_rows[rr], j)}, align 4")


def _prefetch(fn, ops, b_dtype, b_tile, kk, k, ldb, cols):
    """Each k reads a short piece of a new row of b, which hardware prefetchers follow poorly: fetch the
    piece PREFETCH_ROWS rows ahead by hand."""
    if not (PREFETCH_ROWS and isinstance(cols, int) and cols <= 128 and ldb > cols and ops.in_access[1][0] == "ptr"):
        return
    ahead = fn.imin(fn.op(f"add nsw i64 {kk}, {PREFETCH_ROWS}"), k - 1)
    for line in range(0, cols, 64 // b_dtype.itemsize):
        at = fn.gep(mem_type(b_dtype), ops.in_access[1][1], affine(fn, b_tile, [(ahead, ldb), (line, 1)]))
        fn.do(f"call void @llvm.prefetch.p0(ptr {at}, i32 0, i32 3, i32 1)")


CONV_K_CHUNK = 256    # rows of the im2col panel of a conv2d tile built at once (256 x 64 floats: 64 KiB)


def emit_conv2d(fn, ops, op, t):
    """Implicit GEMM, tile (ti, tj): output positions (n, ho, wo) i0..i1-1 x output channels j0..j1-1.
    A float32 tile of whole micro-kernel blocks inside one image is computed transposed, channels x
    positions = w[O, K] . im2col[K, positions] (_conv_tile_gemm); other tiles gather each position's
    input patch once (zeros in the padding) and dot it with every channel's weights."""
    x, w = ops.aval(0), ops.aval(1)
    out = op.outputs[0].aval
    _, m, n, _ = utasks.gemm_dims("conv2d", [x, w], out, op.params)
    tm, tn = op.params["tile_m"], op.params["tile_n"]
    if m * n == 0:
        return
    nn = -(-n // tn)
    ti = fn.op(f"udiv i64 {t}, {nn}")
    tj = fn.op(f"urem i64 {t}, {nn}")
    i0 = fn.op(f"mul nsw i64 {ti}, {tm}")
    i1 = fn.imin(fn.op(f"add nsw i64 {i0}, {tm}"), m)
    j0 = fn.op(f"mul nsw i64 {tj}, {tn}")
    j1 = fn.imin(fn.op(f"add nsw i64 {j0}, {tn}"), n)
    mr, mc, _ = micro_shape()
    positions = out.shape[2] * out.shape[3]
    if not (x.dtype == w.dtype == out.dtype == dtypes.float32 and tm % mc == 0
            and ops.in_access[0][0] == ops.in_access[1][0] == "ptr"):
        _conv_positions(fn, ops, op, i0, i1, j0, j1)
        return
    # tm positions inside one image (i0 % positions + tm <= positions), whole micro blocks of channels
    last = fn.op(f"add nsw i64 {fn.op(f'urem i64 {i0}, {positions}')}, {tm}")
    inside = fn.op(f"icmp sle i64 {last}, {positions}")
    channels = fn.op(f"sub nsw i64 {j1}, {j0}")
    blocks = fn.op(f"icmp eq i64 {fn.op(f'urem i64 {channels}, {mr}')}, 0")
    fn.if_(fn.op(f"and i1 {inside}, {blocks}"), lambda: _conv_tile_gemm(fn, ops, op, i0, j0, channels),
           lambda: _conv_positions(fn, ops, op, i0, i1, j0, j1))


def _conv_tile_gemm(fn, ops, op, i0, j0, channels):
    x, w = ops.aval(0), ops.aval(1)
    out = op.outputs[0].aval
    _, c, h, wd = x.shape
    _, _, kh, kw = w.shape
    _, o, ho, wo = out.shape
    stride, pad = op.params["stride"], op.params["padding"]
    tm = op.params["tile_m"]
    k = c * kh * kw
    mr, mc, _ = micro_shape()
    chunk = min(k, CONV_K_CHUNK)
    panel = fn.alloca(f"[{chunk * tm} x float]", "im2col")
    image = fn.op(f"udiv i64 {i0}, {ho * wo}")
    first = fn.op(f"urem i64 {i0}, {ho * wo}")          # the tile's first position in its image
    xs = strides(x.shape)
    x_ptr, w_ptr, out_ptr = ops.in_access[0][1], ops.in_access[1][1], ops.out_access[0][1]

    corner = fn.alloca(f"[{2 * tm} x i64]", "corner")   # per position: its window's top-left (y, x)

    def place(p):
        y, xx = unravel(fn, fn.op(f"add nsw i64 {first}, {p}"), (ho, wo))
        fn.store("i64", affine(fn, -pad, [(y, stride)]), fn.gep("i64", corner, p))
        fn.store("i64", affine(fn, -pad, [(xx, stride)]), fn.gep("i64", corner, fn.op(f"add nsw i64 {p}, {tm}")))
    fn.loop(0, tm, place)

    def fill(k0, count):
        """panel[kk - k0, p] = x at position first + p for patch element kk (0 in the padding)."""
        def element(kk):
            ci, r, q = unravel(fn, fn.op(f"add nsw i64 {k0}, {kk}") if k0 else kk, (c, kh, kw))
            base = affine(fn, 0, [(image, xs[0]), (ci, xs[1])])

            def position(p):
                yy = affine(fn, fn.load("i64", fn.gep("i64", corner, p)), [(r, 1)])
                xq = affine(fn, fn.load("i64", fn.gep("i64", corner, fn.op(f"add nsw i64 {p}, {tm}"))), [(q, 1)])
                ok = fn.op(f"and i1 {fn.op(f'icmp ult i64 {yy}, {h}')}, {fn.op(f'icmp ult i64 {xq}, {wd}')}")
                v = load_element(fn, x.dtype, x_ptr, affine(fn, base, [(fn.clamp(yy, 0, h - 1), xs[2]),
                                                                       (fn.clamp(xq, 0, wd - 1), 1)]))
                fn.store("float", fn.op(f"select i1 {ok}, float {v}, float 0.0"),
                         fn.gep("float", panel, affine(fn, 0, [(kk, tm), (p, 1)])))
            fn.loop(0, tm, position)
        fn.loop(0, count, element)

    for k0 in range(0, k, chunk):
        count = min(chunk, k - k0)
        fill(k0, count)

        def block(r, k0=k0, count=count):
            w_rows = [affine(fn, k0, [(j0, k), (r, k), (rr, k)]) for rr in range(mr)]
            for cc in range(0, tm, mc):
                out_rows = [affine(fn, cc, [(image, o * ho * wo), (j0, ho * wo), (r, ho * wo), (rr, ho * wo),
                                            (first, 1)]) for rr in range(mr)]
                _micro_kernel(fn, w_ptr, w_rows, panel, cc, tm, out_ptr, out_rows, count, accumulate=k0 > 0)
        fn.loop(0, channels, block, step=mr)


def _conv_positions(fn, ops, op, i0, i1, j0, j1):
    """Positions i0..i1-1 x channels j0..j1-1, position by position: gather the patch, dot per channel."""
    x, w = ops.aval(0), ops.aval(1)
    out = op.outputs[0].aval
    nb, c, h, wd = x.shape
    _, _, kh, kw = w.shape
    _, _, ho, wo = out.shape
    stride, pad = op.params["stride"], op.params["padding"]
    k = c * kh * kw
    patch = fn.alloca(f"[{max(k, 1)} x float]", "patch")
    xs, os_ = strides(x.shape), strides(out.shape)

    def position(i):
        bn, y, xx = unravel(fn, i, (nb, ho, wo))
        y0 = affine(fn, -pad, [(y, stride)])
        x0 = affine(fn, -pad, [(xx, stride)])

        def channel(ci):
            def row(r):
                yy = fn.op(f"add nsw i64 {y0}, {r}")
                y_ok = fn.op(f"icmp ult i64 {yy}, {h}")
                base = affine(fn, 0, [(bn, xs[0]), (ci, xs[1]), (fn.clamp(yy, 0, h - 1), xs[2])])

                def col(q):
                    xq = fn.op(f"add nsw i64 {x0}, {q}")
                    ok = fn.op(f"and i1 {y_ok}, {fn.op(f'icmp ult i64 {xq}, {wd}')}")
                    v = convert(fn, ops.load(0, affine(fn, base, [(fn.clamp(xq, 0, wd - 1), 1)])), x.dtype,
                                dtypes.float32)
                    slot = affine(fn, 0, [(ci, kh * kw), (r, kw), (q, 1)])
                    fn.store("float", fn.op(f"select i1 {ok}, float {v}, float 0.0"), fn.gep("float", patch, slot))
                fn.loop(0, kw, col)
            fn.loop(0, kh, row)
        fn.loop(0, c, channel)

        def out_channel(j):
            acc = fn.alloca("float", "acc")
            fn.store("float", "0.0", acc)
            w_row = affine(fn, 0, [(j, k)])

            def dot(kk):
                pv = fn.load("float", fn.gep("float", patch, kk))
                wv = convert(fn, ops.load(1, affine(fn, w_row, [(kk, 1)])), w.dtype, dtypes.float32)
                prod = fn.op(f"fmul contract float {pv}, {wv}")
                fn.store("float", fn.op(f"fadd reassoc contract float {fn.load('float', acc)}, {prod}"), acc)
            fn.loop(0, k, dot)
            dst = affine(fn, 0, [(bn, os_[0]), (j, os_[1]), (y, os_[2]), (xx, os_[3])])
            ops.store(0, dst, convert(fn, fn.load("float", acc), dtypes.float32, out.dtype))
        fn.loop(j0, j1, out_channel)
    fn.loop(i0, i1, position)


# ----------------------------------------------------------------------------------------- dispatch

GATHER_KINDS = frozenset({"take", "concatenate", "dynamic_update_slice", "avg_pool2d", "max_pool2d"})


def emit_utask(fn, ops, op, t, band=False):
    """The body of `op`'s uTask function for uTask number `t` (an i64 SSA name); with `band`, of its
    row-band function (matmul_bands)."""
    kind = op.kind
    if band:
        emit_matmul(fn, ops, op, t, band=True)
    elif kind == "dynamic_update_slice" and op.params.get("in_place"):
        emit_update_in_place(fn, ops, op, t)
    elif kind in AFFINE_KINDS:
        emit_affine(fn, ops, op, t)
    elif kind in GATHER_KINDS:
        emit_gather(fn, ops, op, t)
    elif kind in utasks.REDUCE_KINDS:
        emit_reduce(fn, ops, op, t)
    elif kind == "matmul":
        emit_matmul(fn, ops, op, t)
    elif kind == "conv2d":
        emit_conv2d(fn, ops, op, t)
    else:
        raise NotImplementedError(f"cpu backend: no uTask lowering for op kind {kind!r}")


def uniform_value(fn, ops, primitive, params, out_aval):
    """The value of a uniform op (its output has one element)."""
    zeros = [0] * out_aval.ndim
    if primitive in LOWERINGS and primitive != "broadcast_to":
        args = tuple(Expr("input", (), {"index": k}, ops.aval(k)) for k in range(len(ops.in_values)))
        return affine_scalar(fn, ops, "fused", params, Expr(primitive, args, params, out_aval), out_aval)
    if primitive in ("reshape", "transpose", "broadcast_to"):
        return ops.load(0, 0)
    if primitive == "iota":
        return const(out_aval.dtype, 0)
    if primitive in ("slice", "dynamic_slice"):
        return affine_scalar(fn, ops, primitive, params, None, out_aval)
    if primitive in ("take", "concatenate"):
        return gather_element(fn, ops, primitive, params, out_aval, None, zeros, 0)
    if primitive in utasks.REDUCE_KINDS:
        return reduce_element(fn, ops, primitive, params, out_aval, zeros)
    raise NotImplementedError(f"cpu backend: no uniform lowering for {primitive!r}")
