"""The matmul kind: tiled GEMM, row bands, packed constant weights and the float32 register-blocked
micro-kernel (AVX-512 or AVX2 vectors).

uTask t computes output tile (b, ti, tj) = unravel(t, (batch, ceil(M/tile_m), ceil(N/tile_n))); gathering the
batch (utasks.GATHER_BATCH), tile (ti, tj) of every batch element, one after another. Split over its depth
(plan.K_SPLITS: the partial products P, S more batch elements in front), batch element (s, ...) contracts only
the depths plan.k_range(K, S, s). Where one
thread can compute all column tiles of a row band at once, the renderer also writes a row-band function
(matmul_bands, emit_matmul_band) and a lone thread calls that instead. A matmul's constant right operand of
several column tiles is read from a copy packed tile by tile (packed_tile, pack_columns: the runtime packs
it once). The micro-kernel is shared with the convolution (conv.py).
"""
from __future__ import annotations

import functools

import numpy as np

from gdsl import dtypes
from gdsl.backends.cpu.epilogue import with_epilogue
from gdsl.backends.cpu.ir import affine, compute_type, const, convert, mem_type, strides, unravel
from gdsl.backends.cpu.operands import broadcast_strides
from gdsl.primitives.registry import CONTRACTION, family_of, register_lowering
from gdsl.schedule import utasks
from gdsl.schedule.plan import K_SPLITS, k_chunk


def _accumulator_dtype(dtype):
    """float32 for float operands, int32 for bool, else the operands' own integer type."""
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
    if family_of(op.kind) != CONTRACTION:
        return 0
    b, tn = op.inputs[1], op.params["tile_n"]
    # (a view of a constant, plan.Value.offset, is read in place: the executable packs whole constants)
    constant = b.buffer is not None and b.buffer.kind == "const" and not b.offset
    return tn if constant and b.aval.ndim >= 2 and b.aval.shape[-1] > tn else 0


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
    if family_of(op.kind) != CONTRACTION or packed_tile(op):
        return 0
    batch, m, n, _ = utasks.gemm_dims(op.kind, [v.aval for v in op.inputs], op.outputs[0].aval, op.params)
    tm, tn = op.params["tile_m"], op.params["tile_n"]
    if n <= tn or tm * n > BAND_LIMIT:
        return 0
    return batch * -(-m // tm)


@register_lowering("matmul", backend="cpu")
def matmul_utask(fn, ops, op, t):
    if not utasks.gathers_batch(op.params):
        emit_matmul(fn, ops, op, t)
        return
    # uTask t of a gathered matmul is tile t of each batch element: tile b * tiles + t of the plain split.
    batch, m, n, _ = utasks.gemm_dims(op.kind, [v.aval for v in op.inputs], op.outputs[0].aval, op.params)
    tiles = -(-m // op.params["tile_m"]) * -(-n // op.params["tile_n"])
    for b in range(batch):
        emit_matmul(fn, ops, op, fn.op(f"add nsw i64 {t}, {b * tiles}") if b else t)


def emit_matmul_band(fn, ops, op, t):
    """The body of the row-band function of a matmul with matmul_bands(op) bands: band t."""
    emit_matmul(fn, ops, op, t, band=True)


def emit_matmul(fn, ops, op, t, band=False):
    """uTask t: output tile (b, ti, tj). With `band`, t numbers a row band (b, ti) instead and the function
    computes all of its column tiles at once, reading the right operand in the longest pieces of its rows
    that the accumulators allow (whole rows; float32: as many columns as the micro-kernel's registers
    hold): each output element gets the same sum in the same order, but memory is read in far fewer, longer
    streams than a tile's short pieces of many rows (the GEMV case: LSTM cells, tree encoders)."""
    a, b = ops.aval(0), ops.aval(1)
    out = op.outputs[0].aval
    batch, m, n, k = utasks.gemm_dims(op.kind, [a, b], out, op.params)
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
    ldb = packed or n
    b_base = affine(fn, 0, [(i, s * k * (nn * tn if packed else n)) for i, s in zip(bidx, b_st)])
    o_base = affine(fn, 0, [(i, s * m * n) for i, s in zip(bidx, strides(bshape))])
    depth = k
    if op.params.get(K_SPLITS, 1) > 1:      # slice bidx[0] of split-K: its range of k, A's columns and B's rows
        kc = k_chunk(k, op.params[K_SPLITS])
        k0 = affine(fn, 0, [(bidx[0], kc)])
        a_base = affine(fn, a_base, [(k0, 1)])
        b_base = affine(fn, b_base, [(k0, ldb)])
        depth = fn.imin(fn.op(f"sub nsw i64 {k}, {k0}") if k0 != 0 else k, kc)
    i0 = fn.op(f"mul nsw i64 {ti}, {tm}") if nm > 1 else 0
    rows = min(tm, m) if m % tm == 0 or nm == 1 else fn.imin(fn.op(f"sub nsw i64 {m}, {i0}"), tm)
    j0 = fn.op(f"mul nsw i64 {tj}, {tn}") if nn > 1 else 0
    cols = min(tn, n) if n % tn == 0 or nn == 1 else fn.imin(fn.op(f"sub nsw i64 {n}, {j0}"), tn)
    b_tile = affine(fn, b_base, [(tj, k * tn)] if packed else [(j0, 1)])   # b[kk, j0+c] at b_tile + kk*ldb + c

    def block(cols):
        _gemm_block(fn, ops, a.dtype, b.dtype, out.dtype, k, n, a_base, b_tile, ldb, o_base, i0, rows, j0,
                    cols, tm, tn, depth)

    def compute():
        if isinstance(cols, int):
            block(cols)
        else:   # every tile but the last column's is whole: give those constant columns (the micro-kernel)
            fn.if_(fn.op(f"icmp eq i64 {cols}, {tn}"), lambda: block(tn), lambda: block(cols))
    with_epilogue(fn, ops, op, rows, cols, tm, tn,
                  lambda r, c: affine(fn, o_base, [(i0, n), (r, n), (j0, 1), (c, 1)]), compute)


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
                max_rows, max_cols, depth=None):
    """out[i0+r, j0+c] = sum_kk a[i0+r, kk] * b[b_tile + kk*ldb + c] for r < rows, c < cols (row-major a
    [., k], out [., n] at the given bases), each element summed over kk < depth (default k: all of a's row; an
    SSA value or an int) in order (fused multiply-add).

    float32 blocks whose columns are a constant multiple of the vector width go through the register-
    blocked micro-kernel (micro_kernel, micro_shape): its number of rows at a time, then the constant
    rest of the rows (a GEMV's one row) at once. The other rows use loop order k, r, c with a row of
    accumulators per row (max_rows x max_cols, in L1): a row of b is read once per k and reused by every
    row."""
    done = 0
    depth = k if depth is None else depth
    f32 = dtypes.float32
    mr, mc, lanes = micro_shape()
    if (a_dtype == b_dtype == out_dtype == f32 and isinstance(cols, int) and cols % lanes == 0
            and k > 0 and ops.is_pointer(0) and ops.is_pointer(1)):
        def block(r, count):
            rows_at = [affine(fn, a_base, [(i0, k), (r, k), (rr, k)]) for rr in range(count)]
            width = lanes * max(1, mr * mc // lanes // count)     # as many accumulators as mr x mc
            for c in range(0, cols, width):
                out_at = [affine(fn, o_base, [(i0, n), (r, n), (rr, n), (j0, 1), (c, 1)]) for rr in range(count)]
                micro_kernel(fn, ops.input_pointer(0), rows_at, ops.input_pointer(1), affine(fn, b_tile, [(c, 1)]),
                             ldb, ops.output_pointer(0), out_at, depth, min(width, cols - c))
        if max_rows >= mr:
            done = (rows // mr * mr if isinstance(rows, int)
                    else fn.op(f"mul nsw i64 {fn.op(f'sdiv i64 {rows}, {mr}')}, {mr}"))
            fn.loop(0, done, lambda r: block(r, mr), step=mr)
        if isinstance(rows, int):
            if rows > done:
                block(done, rows - done)
            return
    acc_dtype = _accumulator_dtype(a_dtype)
    ty = compute_type(acc_dtype)
    acc = fn.alloca(f"[{max_rows * max_cols} x {ty}]", "acc")
    zero = const(acc_dtype, 0)
    mul, add = ("fmul contract", "fadd contract") if ty == "float" else ("mul", "add")
    unroll = isinstance(cols, int) and cols <= 128   # a row of acc in vector registers

    def slot(r, c):
        return fn.gep(ty, acc, affine(fn, 0, [(r, max_cols), (c, 1)]))
    fn.loop(done, rows, lambda r: fn.loop(0, cols, lambda c: fn.store(ty, zero, slot(r, c)), unroll=unroll))

    def kstep(kk):
        _prefetch(fn, ops, b_dtype, b_tile, kk, depth, ldb, cols)
        b_row = affine(fn, b_tile, [(kk, ldb)])

        def row(r):
            av = convert(fn, ops.load(0, affine(fn, a_base, [(i0, k), (r, k), (kk, 1)])), a_dtype, acc_dtype)

            def col(c):
                p = slot(r, c)
                bv = convert(fn, ops.load(1, affine(fn, b_row, [(c, 1)])), b_dtype, acc_dtype)
                fn.store(ty, fn.op(f"{add} {ty} {fn.load(ty, p)}, {fn.op(f'{mul} {ty} {av}, {bv}')}"), p)
            fn.loop(0, cols, col, unroll=unroll)
        fn.loop(done, rows, row)
    fn.loop(0, depth, kstep)

    def store_row(r):
        o_row = affine(fn, o_base, [(i0, n), (r, n), (j0, 1)])
        fn.loop(0, cols, lambda c: ops.store(0, affine(fn, o_row, [(c, 1)]), convert(
            fn, fn.load(ty, slot(r, c)), acc_dtype, out_dtype)), unroll=unroll)
    fn.loop(done, rows, store_row)


def micro_kernel(fn, a_ptr, a_rows, b_ptr, b_start, b_stride, out_ptr, out_rows, k_count, cols=None,
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
    vec, vectors = f"<{lanes} x float>", (cols or micro_cols) // lanes

    def vector_at(ptr, offset, j):
        return fn.gep("float", ptr, fn.op(f"add nsw i64 {offset}, {j * lanes}"))
    start = [[fn.op(f"load {vec}, ptr {vector_at(out_ptr, out_rows[rr], j)}, align 4") if accumulate
              else "zeroinitializer" for j in range(vectors)] for rr in range(micro_rows)]
    before, head, done = fn.block, fn.label("micro"), fn.label("micro_end")
    fn.goto(head)
    fn.start(head)
    kk = fn.name("k")
    accs = [[fn.name("acc") for _ in range(vectors)] for _ in range(micro_rows)]
    phi_at = len(fn.lines)
    fn.lines += [None] * (1 + micro_rows * vectors)
    b_row = fn.op(f"add nsw i64 {b_start}, {fn.op(f'mul nsw i64 {kk}, {b_stride}')}")
    b_vectors = [fn.op(f"load {vec}, ptr {vector_at(b_ptr, b_row, j)}, align 4") for j in range(vectors)]
    new = []
    for rr in range(micro_rows):
        a = fn.load("float", fn.gep("float", a_ptr, fn.op(f"add nsw i64 {a_rows[rr]}, {kk}")))
        splat = fn.op(f"shufflevector {vec} {fn.op(f'insertelement {vec} poison, float {a}, i64 0')}, {vec} poison, "
                      f"<{lanes} x i32> zeroinitializer")
        new.append([fn.op(f"call {vec} @llvm.fma.v{lanes}f32({vec} {splat}, {vec} {b_vectors[j]}, {vec} {accs[rr][j]})")
                    for j in range(vectors)])
    k_next = fn.op(f"add nsw i64 {kk}, 1")
    fn.do(f"br i1 {fn.op(f'icmp slt i64 {k_next}, {k_count}')}, label %{head}, label %{done}")
    fn.lines[phi_at] = f"  {kk} = phi i64 [0, %{before}], [{k_next}, %{head}]"
    for rr in range(micro_rows):
        for j in range(vectors):
            fn.lines[phi_at + 1 + rr * vectors + j] = (f"  {accs[rr][j]} = phi {vec} [{start[rr][j]}, %{before}], "
                                                 f"[{new[rr][j]}, %{head}]")
    fn.start(done)
    for rr in range(micro_rows):
        for j in range(vectors):
            fn.do(f"store {vec} {new[rr][j]}, ptr {vector_at(out_ptr, out_rows[rr], j)}, align 4")


def _prefetch(fn, ops, b_dtype, b_tile, kk, k, ldb, cols):
    """Each k reads a short piece of a new row of b, which hardware prefetchers follow poorly: fetch the
    piece PREFETCH_ROWS rows ahead by hand."""
    if not (PREFETCH_ROWS and isinstance(cols, int) and cols <= 128 and ldb > cols and ops.is_pointer(1)):
        return
    last = k - 1 if isinstance(k, int) else fn.op(f"sub nsw i64 {k}, 1")
    ahead = fn.imin(fn.op(f"add nsw i64 {kk}, {PREFETCH_ROWS}"), last)
    for line in range(0, cols, 64 // b_dtype.itemsize):
        at = fn.gep(mem_type(b_dtype), ops.input_pointer(1), affine(fn, b_tile, [(ahead, ldb), (line, 1)]))
        fn.do(f"call void @llvm.prefetch.p0(ptr {at}, i32 0, i32 3, i32 1)")
