"""Lowering rules of the contraction and convolution families: matmul and conv2d (an implicit GEMM), each
a GEMM on output tiles through the prelude's gdsl_gemm_tile (shared-memory stages, a register tile per
thread) or, for a few rows, gdsl_gemv_tile (k split across a warp's lanes).

A rule gives the GEMM's sizes and three C lambdas over the accumulator type: la(m, k) and lb(k, n) load
the operands, sc(m, n, v) stores an output element (through the op's epilogue, if it has one: the
"epilogue" rule `store_output`); `gemm_tiles` writes the tile loop around them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gdsl.backends.cfamily import types as c_types
from gdsl.backends.cfamily.ops import OpRenderer, broadcast_index
from gdsl.backends.cfamily.views import prefetches_gathered_rows, window_store_index
from gdsl.core.ir import subjaxprs, walk_eqns
from gdsl.primitives.control import while_p
from gdsl.primitives.linalg import matmul_p
from gdsl.primitives.nn import conv2d_p
from gdsl.primitives.registry import register_lowering
from gdsl.schedule import utasks
from gdsl.schedule.plan import K_PARTS, K_SPLITS, N_PARTS, ROW_INDEX, a_parts, epilogue_of, k_chunk
from gdsl.schedule.resident import RESIDENT, RESIDENT_PITCH, tile_bytes

GEMM_BK = 32        # k depth of a shared-memory GEMM stage
GEMV_KC = utasks.GEMV_KC    # k chunk of A rows staged in shared memory by the GEMV tile (or a split's K_CHUNK)
# The B values a thread of gdsl_gemv_tile prefetches at most (its template's default PF); a tile that stages all of
# its k (utasks.thin_gemv_params) may hold up to utasks.THIN_GEMV_REGISTERS.
GEMV_PREFETCH = 32
# A GEMV tile whose depth K is less than its chunk (GEMV_KC) stages a chunk of K, not of GEMV_KC: the template
# sizes its B prefetch by the chunk, so with 256 a 64-deep tile (each of Attention's products, k = 64) held too
# many B values to prefetch them (64 x 1 or 8 x 8 a thread against GEMV_PREFETCH) and loaded them in its FMA loop,
# eight at a time after A's staging and barrier: two dependent L2 round trips instead of one that overlaps the
# staging. Measured on the H200 (session 28, benchmarks/kernel_ab.py, 2 processes x 8 launches): Attention's
# kernel bs1 102.5 -> 88.4 us, bs64 465.4 -> 388.8 us; BlockDrop and SkipNet bs1 (a shallow GEMV each) within
# 1.3 us. (B values a thread holds still count against GEMV_PREFETCH: the sibling GEMV's 48 prefetched made that
# op 1.1 -> 1.9 us, the bs64 kernel 466 -> 784: session 23's SHALLOW_GEMV_STAGE, which did both and was removed.)
# Off: the old chunk (for A/B timing).
SHALLOW_GEMV_CHUNK = True
# Which GEMV tiles of one row whose k is one chunk read their A in place (gdsl_gemv_tile's a_in_place: each thread
# its own elements, no staging behind a barrier), as the first GEMV of a GEMV_ROWS_GEMV op does (gemv_rows.py,
# where it paid 2.3 us of Attention bs1's 72): "shared", an A in the vEU's shared memory (a block-local temp:
# staging it copies shared memory to shared memory); "plain", any A of plain loads (Gemm.a_plain); None: none.
# Measured on the H200 (session 30, ncu kernel time, bs1): every one-row GEMV, a published A (a flag wait per
# element) and gathered rows included: LSTM 293 -> 1539 us, NASRNN 1466 -> 6040, Seq2seq 83.5 -> 216, Attention
# 70.2 -> 65.2; "plain": Attention 70.3 -> 65.6 (bs64 362.3 -> 352.7), LSTM the same, Seq2seq, BlockDrop, SkipNet and
# RAE 0.2-1.8 % slower.
GEMV_A_IN_PLACE = "shared"
# A left operand read in parts (plan.K_PARTS: [A1 | A2] @ [B1 ; B2]) is staged whole, in one round trip, when
# its rows hold at most this many elements (8 KB of float32 at most): the point of stacking the products.
GEMV_PARTS_KC = 2048
# A float32 tile goes to the tensor cores (gdsl_gemm_tile_tc, where the dialect has them) when the FFMA tile
# would give each thread a register tile of fewer elements than this: there each FFMA waits on two shared-memory
# loads, and the tensor-core tile was faster (H200, batch 64: NASRNN's 16 x 16 tiles 27.7 -> 23.6 ms, Seq2seq's
# 16 x 16 and 16 x 32 tiles 1.81 -> 1.53 ms); with 4 x 4 per thread (LSTM's 64 x 64 tiles) the FFMA tile
# was faster (3.66 against 4.86 ms: the three TF32 products through mma.sync cost more than the FFMAs).
# (Those were gdsl_gemm_tile's small tiles. The wide tile, tried first, now takes every tile of the scheduler's
# menu, WIDE_MAX_GROUPS; this rule serves the tiles it cannot take.)
TENSOR_CORE_BELOW = 4
# Float32 tiles of whole fragments on gdsl_gemm_tile_tcp (cuda/tensor_cores.h) where the dialect has tensor cores and
# the operands' addresses are known (A along k; B along n, or resident): 3xTF32 fed by TC_STAGES shared-memory
# stages of TC_BK k that cp.async fills ahead, one block barrier a stage, before the wide FFMA tile. What session 8
# found missing (its tensor-core tiles on the FFMA tile's single-buffered staging were no faster): built in session
# 32 without a GPU, checked on the emulator (emulator.EmulatedTensorCores) and by NVRTC. Off: timed in session 34
# (H200, kernel µs) it was slower than the wide FFMA tile on every batch-64 row: LSTM 2450 -> 3082 (4 stages 2962),
# NASRNN 8634 -> 9956, Seq2seq 533 -> 646; each vEU runs one tile of K = 256 a step, which the stages' fill and
# barriers do not amortize (benchmarks/tc_wave.py times the tile on one wave of the LSTM's GEMMs; kernel_ab the models).
TC_PIPELINE = False
TC_STAGES = 3
TC_BK = 32
TC_MAX_ROWS = 64        # (taller tiles would stage more than pipelined_scratch's bound)
# In a program that takes the tile, a GEMM-shaped matmul's resident rows are this many floats wider than its tile
# (resident.RESIDENT_PITCH): the tile reads B's fragments in place, four k rows by eight columns a warp, and rows a
# multiple of 32 floats apart would put four lanes on each bank.
TC_RESIDENT_PAD = 8
# gdsl_gemm_tile_wide (float32): a thread's register tile holds at most this many outputs, and at most this
# many k groups split a tile. 4 x 4 was the fastest on the H200 at batch 64 (same run, ms: LSTM 3.611 / 3.646 /
# 3.758 with 16 / 32 / 64, NASRNN 14.86 / 14.68 / 15.26, BlockDrop 0.468 / 0.559 / 0.561; the 8 x 8 tile spills
# under the 128 registers two vEUs per SM leave a thread). 16 k groups put the 16 x 16 tiles on it too (a
# group of 16 threads, 2 of each stage's 32 k), where gdsl_gemm_tile gave each thread one output and two
# shared-memory loads per FFMA: BlockDrop bs64 0.545 / 0.531 -> 0.480 / 0.483 ms, bs1 0.152 / 0.197 ->
# 0.152 / 0.151, SkipNet 2.446 / 2.438 -> 2.506 / 2.357 (H200, alternated in one call).
WIDE_MAX_REGISTERS = 16
WIDE_MAX_GROUPS = 16
# Under utasks.ODD_GEMM_TILES the wide tile also takes register tiles of RN columns not a multiple of 4 (their
# last RN % 4 columns read with 8- and 4-byte loads), for tiles of widths 80 and 96 (4 x 5, 4 x 6 over 16 x 16
# threads), with at most this many outputs (RN a multiple of 4 first where both fit).
WIDE_ODD_COLUMNS = (5, 6)
WIDE_ODD_REGISTERS = 24
# Measured on the H200 in session 11 and not kept (two runs of one call, ms, default -> variant): 32 registers
# where each k group keeps at least 8 of a stage's k (8 x 4 on NASRNN's and Seq2seq's 32 x 64 resident tiles and
# the LSTM's 64 x 64; the smaller tiles stay 4 x 4): NASRNN bs64 9.52 / 9.60 -> 8.88 / 9.00, LSTM bs64 2.82 /
# 2.91 -> 2.80 / 2.86, Seq2seq bs64 0.793 / 0.792 -> 0.898 / 0.919 (all 32 registers: also BlockDrop bs64 0.47
# -> 0.53-0.57); two stage buffers with one block sync a stage: no gain anywhere (NASRNN 9.53 / 9.36, LSTM
# 2.87 / 2.86, Seq2seq 0.844 / 0.887).
# A convolution's implicit-GEMM loader reads its depth k = (c, kh, kw) from a table in shared memory (module switch
# IM2COL_TABLE), filled once by the uTask: k's offset in the image (c * H * W + kh * W + kw) and (kh, kw), so that
# staging an element of A costs a shared-memory load and a few adds instead of k's divisions by KH * KW and KW
# (the output pixel's part, m's, is the same for all of a thread's elements of a stage where the tile's rows divide
# the block, so the compiler may compute it once). ncu's source
# view of BlockDrop's batch-64 first-stage conv (256 x 16 tiles, K = 144, session 21): FFMAs 26 % of the executed
# instructions, the index arithmetic (IMAD, LEA, SHF, LOP3, ISETP, IADD3) ~50 %. Each entry serves the tile's
# tile_m rows, and filling it costs two block barriers and a dependent round before the first stage: only tiles of
# at least IM2COL_TABLE_MIN_ROWS rows take one (H200, kernel time, session 21: BlockDrop bs64's 128 x 16 and
# 64 x 32 tiles 334.0 -> 322.0 us; with the table on BlockDrop bs1's 16 x 16 tiles too, 119.2 -> 122.2 us). A table
# of more than IM2COL_TABLE_BYTES keeps the divisions, and a 1 x 1 convolution needs none.
IM2COL_TABLE = True
IM2COL_TABLE_BYTES = 16 * 1024
IM2COL_TABLE_MIN_ROWS = 64
# A wide tile of float32 operands in memory whose rows are a multiple of 4 long loads four elements at once
# when the tile's addresses are 16-byte aligned (checked at run time), a quarter of the load instructions.
WIDE_VECTOR_LOADS = True


@dataclass
class Gemm:
    """C[M, N] = A[M, K] B[K, N] for `batch` matrices, as the tile routines see it."""
    M: int
    N: int
    K: int
    batch: int
    setup: list          # C lines before the lambdas (batch offsets)
    load_a: str          # body of la(m, k)
    load_b: str          # body of lb(k, n)
    store: str           # body of sc(m, n, v)
    a_contiguous_k: bool  # A is contiguous along k in memory (the tile routine then loads consecutive k)
    b_contiguous_k: bool  # B likewise
    # A uTask of a matmul gathering its batch (utasks.GATHER_BATCH): the tile routine sees one GEMM of
    # `gathered` * tile_n columns, column n' being batch element n' / tile_n, column tj * tile_n + n' % tile_n
    # (the loaders map it and skip columns past N); 0: tiles of one batch element.
    gathered: int = 0
    # Bodies of pa(m, k) and pb(k, n) giving the float32 operands' addresses (the wide tile may then load four
    # elements at once: gdsl_gemm_stages_vec), None where an operand is computed or converted.
    address_a: str | None = None
    address_b: str | None = None
    gemv_kc: int = GEMV_KC     # the k chunk of A a GEMV stages at a time
    # C expression: the uTask's resident tile of B (K x tile_n in shared memory, resident.py), which the wide
    # tile reads in place instead of staging B; None where B is read from memory.
    resident_b: str | None = None
    resident_pitch: int | None = None   # its rows' distance where they are padded (resident.RESIDENT_PITCH)
    # A GEMV tile exactly N wide, not rounded up to a power of two (sibling matmuls' columns, a multiple of the
    # warp: 3 x 64 columns are split as one part's 64, three columns a thread).
    exact_n: bool = False
    # C statements of k setting A's depth-k entry of a table that the uTask fills in shared memory before its tile
    # (two ints a k, e_[0] and e_[1]); la(m, k) then reads entry k at kt_ + 2 * k. None: no table.
    k_table: str | None = None
    # la(m, k) is one plain load (not a published buffer's flag wait, gathered rows or parts): GEMV_A_IN_PLACE; of
    # the vEU's shared memory (a block-local temp)
    a_plain: bool = False
    a_shared: bool = False


@register_lowering((matmul_p, conv2d_p), backend="cfamily", role="epilogue")
def store_output(ops: OpRenderer, idx: str, v: str) -> str:
    """C statement: store the contraction's value `v` (accumulator type) at flat output element `idx`,
    through the op's elementwise epilogue when it has one (its other operands read at the same element,
    the RESULT leaf being `v` as the contraction's own output would hold it). An output stored into a
    window of a larger array (plan.StoreWindow: a dynamic_update_slice folded into this op) goes to its
    place in the window (views.window_store_index); one whose window a start out of range drops has a
    null pointer (views.view_pointer) and stores nothing."""
    out = ops.outs[0]
    window = out.value.window
    epilogue = epilogue_of(ops.op)
    if epilogue is None:
        return store_part(ops, 0, idx, v)
    result = c_types.from_storage(out.dtype, c_types.to_storage(out.dtype, v))
    at = "e_" if window is None else window_store_index(window, "e_")
    store = f"const int e_ = {idx}; {out.store(at, ops.expr(epilogue, 'e_', root=True, result=result))}"
    if window is not None and window.drop:
        return f"if ({out.name} != nullptr) {{ {store} }}"
    return store


def store_part(ops: OpRenderer, number: int, idx: str, v: str) -> str:
    """C statement: store `v` at flat element `idx` of output `number` as it is (no epilogue), into its window
    when it has one (nothing where a start out of range drops the window)."""
    out = ops.outs[number]
    window = out.value.window
    store = out.store(idx if window is None else window_store_index(window, idx), v)
    if window is not None and window.drop:
        return f"if ({out.name} != nullptr) {{ {store} }}"
    return store


@register_lowering("matmul", backend="cfamily")
def matmul(ops: OpRenderer) -> str:
    if utasks.gathers_batch(ops.op.params):
        a, b = ops.ins[:2]
        M, K, N = a.aval.shape[-2], b.aval.shape[-2], b.aval.shape[-1]
        return gathered_matmul(ops, M, N, K, ops.outs[0].aval.shape[:-2])
    if N_PARTS in ops.op.params:
        return sibling_matmul(ops)
    return gemm_tiles(ops, matmul_gemm(ops))


def matmul_gemm(ops: OpRenderer) -> Gemm:
    """The Gemm of a matmul whose uTask is tiles of one batch element (not gathered, no sibling parts): its
    batch offsets (a0, b0, c0 of `bt`), loaders and store."""
    a, b = ops.ins[:2]
    out = ops.outs[0]
    acc = c_types.accumulator(out.dtype)
    M, K = a.aval.shape[-2], b.aval.shape[-2]
    N = b.aval.shape[-1]
    parts = K_PARTS in ops.op.params       # A read in parts (plan.K_PARTS): la picks the part of k
    bshape = out.aval.shape[:-2]
    a_off = broadcast_index(bshape, a.aval.shape[:-2], "bt")
    b_off = broadcast_index(bshape, b.aval.shape[:-2], "bt")
    setup = [f"  const int a0 = ({a_off}) * {M * K}, b0 = ({b_off}) * {K * N}, c0 = bt * {M * N};"]
    load_b = f"return ({acc})({b.at(f'b0 + k * {N} + n')});"
    kmajor = _transposed_matrix(b)      # B is the transpose of a row-major source: contiguous along k
    if kmajor:
        load_b = f"return ({acc})({b.at_source(f'b0 + n * {K} + k')});"
    address_b = (f"return {b.address(f'b0 + n * {K} + k', source=True)};" if kmajor else
                 f"return {b.address(f'b0 + k * {N} + n')};")
    resident = RESIDENT in ops.op.params   # this uTask's K x tile_n columns of B wait in shared memory
    if resident:
        tn = ops.op.params["tile_n"]
        storage = c_types.storage(b.dtype)
        setup.append(f"  const {storage}* rb = {resident_tile(ops.op, 't', 'smem')};")
        row = ops.op.params.get(RESIDENT_PITCH, tn)        # (padded rows: resident.RESIDENT_PITCH)
        load_b = f"return ({acc})({c_types.from_storage(b.dtype, f'rb[k * {row} + n - tj * {tn}]')});"
        kmajor, address_b = False, None
    float32 = a.dtype == b.dtype == np.float32 and acc == "float"
    rows = ROW_INDEX in ops.op.params      # A's rows gathered at run-time indices (plan.ROW_INDEX)
    # (no vector loads of A read in parts: the tiles check only their first rows' alignment; gathered rows are the
    # table's, K apart, and the vector paths want K % 4 == 0, so that their alignment is every row's)
    if rows:
        load_a = load_a_rows(ops, acc, K)
        address_a = f"{_gathered_row(ops)} return {a.address(f'(int)r * {K} + k')};"
    elif parts:
        load_a, address_a = load_a_parts(ops, acc, f"({a_off}) * {M} + m"), None
    else:
        load_a = f"return ({acc})({a.at(f'a0 + m * {K} + k')});"
        address_a = f"return {a.address(f'a0 + m * {K} + k')};"
    return Gemm(
        M, N, K, math.prod(bshape), setup=setup, load_a=load_a, load_b=load_b,
        # (a view whose k is not its source's last axis, as A.T's, is no k-contiguous A: the tiles neither load it
        # four k at a time nor copy it, whatever its address)
        store=store_output(ops, f"c0 + m * {N} + n", "v"), a_contiguous_k=_unit_stride_k(a), b_contiguous_k=kmajor,
        # (addresses of operands in memory only: a one-element operand may be a scalar, a uniform's register)
        address_a=address_a if float32 and not a.flag and not a.scalar else None,
        address_b=address_b if float32 and not b.scalar else None, gemv_kc=_gemv_kc(M, K, parts),
        resident_b="rb" if resident and float32 else None,
        resident_pitch=ops.op.params.get(RESIDENT_PITCH) if resident else None,
        a_plain=not parts and not rows and not a.flag,
        a_shared=not parts and not rows and a.on_chip)


@register_lowering("matmul", backend="cfamily", role="n_parts")
def sibling_matmul(ops: OpRenderer) -> str:
    """Sibling matmuls computed as one (plan.N_PARTS: A @ B_1, ..., A @ B_n): one GEMM of A by the columns of
    every B side by side, uTask t the whole tile of batch element t. lb(k, n) reads the part that holds column
    n, sc(m, n, v) stores to that part's output (its window, if it has one) at column n less the part's first."""
    a = ops.ins[0]
    widths = ops.op.params[N_PARTS]
    acc = c_types.accumulator(ops.outs[0].dtype)
    M, K, N = a.aval.shape[-2], ops.ins[1].aval.shape[-2], sum(widths)
    bshape = ops.outs[0].aval.shape[:-2]
    resident = RESIDENT in ops.op.params     # every part's K x width tile waits in shared memory, one after another
    setup = [f"  const int a0 = ({broadcast_index(bshape, a.aval.shape[:-2], 'bt')}) * {M * K};"]
    if resident:
        setup.append(f"  const {c_types.storage(ops.ins[1].dtype)}* rb = {resident_tile(ops.op, 't', 'smem')};")
    loads, stores, n0 = [], [], 0
    for number, (b, width) in enumerate(zip(ops.ins[1:], widths)):
        n = f"(n - {n0})" if n0 else "n"
        b_off = broadcast_index(bshape, b.aval.shape[:-2], "bt")
        value = (c_types.from_storage(b.dtype, f"rb[{n0 * K} + k * {width} + {n}]") if resident else
                 b.at(f'({b_off}) * {K * width} + k * {width} + {n}'))
        loads.append((n0 + width, f"return ({acc})({value});"))
        stores.append((n0 + width, f"{{ {store_part(ops, number, f'bt * {M * width} + m * {width} + {n}', 'v')} }}"))
        n0 += width
    load_b = " ".join(f"if (n < {end}) {load}" for end, load in loads[:-1]) + " " + loads[-1][1]
    store = " else ".join(f"if (n < {end}) {part}" for end, part in stores[:-1]) + " else " + stores[-1][1]
    return gemm_tiles(ops, Gemm(
        M, N, K, math.prod(bshape), setup=setup,
        load_a=f"return ({acc})({a.at(f'a0 + m * {K} + k')});", load_b=load_b, store=store,
        a_contiguous_k=True, b_contiguous_k=False, exact_n=N % ops.dialect.warp_size == 0, a_plain=not a.flag,
        a_shared=a.on_chip))


def _gemv_kc(M: int, K: int, parts: bool) -> int:
    """The k chunk a GEMV of A[M, K] stages: all of K for A read in parts when it fits GEMV_PARTS_KC."""
    return K if parts and GEMV_KC < K and M * K <= GEMV_PARTS_KC else GEMV_KC


@register_lowering("matmul", backend="cfamily", role="k_parts")
def load_a_parts(ops: OpRenderer, acc: str, row: str) -> str:
    """Body of la(m, k) for a left operand read in parts (plan.K_PARTS: a concatenation along the depth that
    is never copied): element k of row `row` (a C expression over m: the row among all of A's batch
    elements) from the part that holds depth k, the parts' depths K_1, K_2, ... one after another."""
    loads = []
    for number, k0, depth in a_parts(ops.op):
        k = f"k - {k0}" if k0 else "k"
        loads.append((k0 + depth, f"return ({acc})({ops.ins[number].at(f'({row}) * {depth} + {k}')});"))
    return " ".join(f"if (k < {end}) {load}" for end, load in loads[:-1]) + " " + loads[-1][1]


@register_lowering("matmul", backend="cfamily", role="row_gather")
def load_a_rows(ops: OpRenderer, acc: str, K: int) -> str:
    """Body of la(m, k) for a left operand of gathered rows (plan.ROW_INDEX, plan.Value.rows: a take of whole
    rows folded into the matmul, A of no batch axes): element k of the table's row index[m], the index
    clamped into the table as take clamps it."""
    return f"{_gathered_row(ops)} return ({acc})({ops.ins[0].at(f'(int)r * {K} + k')});"


def _gathered_row(ops: OpRenderer) -> str:
    """C statements setting `r` to the table row that row m of a gathered-row A reads (plan.ROW_INDEX), the index
    clamped into the table as take clamps it."""
    index, high = ops.ins[ops.op.params[ROW_INDEX]], ops.ins[0].value.rows.high
    return f"long long r = (long long)({index.at('m')}); r = r < 0 ? 0 : (r > {high} ? {high} : r);"


def _gathered_rows_prefetch(ops: OpRenderer, rows: int, M: int, K: int) -> str:
    """C loop: the uTask's threads bring the table rows its tile reads (rows ti * rows .. of a gathered-row A,
    plan.ROW_INDEX) into the L2, a 128-byte line each (views.prefetches_gathered_rows)."""
    a = ops.ins[0]
    per_line = 128 // a.dtype.itemsize
    lines_a_row = -(-K // per_line)
    line = ops.dialect.prefetch_template.format(ptr=a.address(f"(int)r * {K} + l_ % {lines_a_row} * {per_line}"))
    return (f"  for (int l_ = (int){ops.dialect.thread_index}; l_ < {rows * lines_a_row}; l_ += {ops.block}) {{ "
            f"const int m = ti * {rows} + l_ / {lines_a_row}; if (m < {M}) {{ {_gathered_row(ops)} {line}; }} }}")


def _unit_stride_k(a) -> bool:
    """Are left operand `a`'s consecutive k consecutive in memory: no transposed view (cfamily/views.py), or one
    that keeps the last axis last."""
    return a.remap is None or a.remap[2][-1] == len(a.remap[2]) - 1


def _transposed_matrix(b) -> bool:
    """Is operand `b` read through a transposed view (cfamily/views.py) that swaps its last two axes and
    keeps the others: the source is [..., N, K], so element (k, n) lies at n * K + k of its matrix."""
    if b.remap is None:
        return False
    perm = b.remap[2]
    rank = len(perm)
    return rank >= 2 and tuple(perm) == tuple(range(rank - 2)) + (rank - 1, rank - 2)


def gathered_matmul(ops: OpRenderer, M: int, N: int, K: int, bshape) -> str:
    """A uTask of a matmul gathering its batch (utasks.GATHER_BATCH): columns [tj * tile_n, ...) of every
    batch element as one tile of batch * tile_n columns (Gemm.gathered): A, broadcast over the batch, is
    staged once and the partial sums reduced once for all of them. B's tile of batch element g is at
    g * K * tile_n of a resident region ([batch][K][tile_n], stage_resident)."""
    a, b = ops.ins[:2]
    acc = c_types.accumulator(ops.outs[0].dtype)
    tn = ops.op.params["tile_n"]
    batch = math.prod(bshape)
    column = f"const int g = n / {tn}, j = j0 + n % {tn};"
    setup = [f"  const int j0 = tj * {tn};"]
    if RESIDENT in ops.op.params:       # every batch element's K x tile_n columns of B wait in shared memory
        setup.append(f"  const {c_types.storage(b.dtype)}* rb = {resident_tile(ops.op, 't', 'smem')};")
        value = c_types.from_storage(b.dtype, f"rb[g * {K * tn} + k * {tn} + n % {tn}]")
        load_b = f"const int g = n / {tn}; return ({acc})({value});"
    else:
        b_off = broadcast_index(bshape, b.aval.shape[:-2], "g")
        load_b = f"{column} return j < {N} ? ({acc})({b.at(f'({b_off}) * {K * N} + k * {N} + j')}) : ({acc})0;"
    store = f"{column} if (j < {N}) {{ {store_output(ops, f'g * {M * N} + m * {N} + j', 'v')} }}"
    if ROW_INDEX in ops.op.params:
        load_a = load_a_rows(ops, acc, K)
    elif K_PARTS in ops.op.params:
        load_a = load_a_parts(ops, acc, "m")
    else:
        load_a = f"return ({acc})({a.at(f'm * {K} + k')});"
    return gemm_tiles(ops, Gemm(
        M, N, K, 1, setup=setup, load_a=load_a, load_b=load_b,
        store=store, a_contiguous_k=True, b_contiguous_k=False, gathered=batch,
        gemv_kc=_gemv_kc(M, K, K_PARTS in ops.op.params)))


def resident_tile(op, t: str, smem: str) -> str:
    """C expression: where uTask `t` of a matmul with resident B (gdsl/schedule/resident.py) keeps its tile
    in the vEU's shared memory `smem` (the resident region starts at GDSL_RESIDENT_BASE)."""
    offset, count, slots = op.params[RESIDENT]
    storage = c_types.storage(op.inputs[1].aval.dtype)
    base = f"(({storage}*)({smem} + GDSL_RESIDENT_BASE + {offset}))"
    if slots == 1:                          # (one round, or every round of the vEU reads the same tile)
        return base
    return f"({base} + ({t}) / {count} * {tile_bytes(op) // op.inputs[1].aval.dtype.itemsize})"


def stage_resident(op, b_ptrs: list, smem: str, t: str) -> str:
    """C statement: copy uTask `t`'s tile of B (its batch element's rows, its columns) from `b_ptrs[0]` into its
    place in shared memory, once before the loop (the tile's layout is [K][tile_n], zeros past N; rows
    RESIDENT_PITCH apart where the op has one). Sibling matmuls (plan.N_PARTS): part i's whole K x N_i tile from
    `b_ptrs[i]`, the parts one after another."""
    b, out = op.inputs[1].aval, op.outputs[0].aval
    K, N = b.shape[-2], b.shape[-1]
    if N_PARTS in op.params:
        copies, n0 = [], 0
        for b_ptr, value, width in zip(b_ptrs, op.inputs[1:], op.params[N_PARTS]):
            b_off = broadcast_index(out.shape[:-2], value.aval.shape[:-2], "bt")
            copies.append(f"gdsl_stage_columns({b_ptr} + ({b_off}) * {K * width}, {K}, {width}, 0, {width}, "
                          f"{resident_tile(op, t, smem)} + {n0 * K});")
            n0 += width
        return f"{{ const int bt = {t}; {' '.join(copies)} }}"      # (one uTask a batch element: siblings.py)
    b_ptr = b_ptrs[0]
    tn = op.params["tile_n"]
    tiles_n = -(-N // tn)
    if utasks.gathers_batch(op.params):       # every batch element's columns, [batch][K][tile_n]
        b_off = broadcast_index(out.shape[:-2], b.shape[:-2], "g")
        return (f"{{ const int tj = ({t}) % {tiles_n}; for (int g = 0; g < {math.prod(out.shape[:-2])}; ++g) "
                f"gdsl_stage_columns({b_ptr} + ({b_off}) * {K * N}, {K}, {N}, tj * {tn}, {tn}, "
                f"{resident_tile(op, t, smem)} + g * {K * tn}); }}")
    b_off = broadcast_index(out.shape[:-2], b.shape[:-2], "bt")
    tiles = -(-out.shape[-2] // op.params["tile_m"]) * tiles_n       # (gemm_tiles' order: batch, rows, columns)
    pitched = RESIDENT_PITCH in op.params
    stage = f"gdsl_stage_columns<{c_types.storage(b.dtype)}, true>" if pitched else "gdsl_stage_columns"
    return (f"{{ const int bt = ({t}) / {tiles}, tj = ({t}) % {tiles_n}; "
            f"{stage}({b_ptr} + ({b_off}) * {K * N}, {K}, {N}, tj * {tn}, {tn}, "
            f"{resident_tile(op, t, smem)}{f', {op.params[RESIDENT_PITCH]}' if pitched else ''}); }}")


@register_lowering("conv2d", backend="cfamily")
def conv2d(ops: OpRenderer) -> str:
    """Implicit GEMM: M = output pixels (n, ho, wo), N = output channels, K = (c, kh, kw); A gathered
    from the image with zero padding. Split over its depth (plan.K_SPLITS), its output is the partial products
    P: slice bt (one more batch element of the GEMM) at bt times the output's size."""
    x, w = ops.ins[:2]
    out = ops.outs[0]
    acc = c_types.accumulator(out.dtype)
    _, C, H, W = x.aval.shape
    O, _, KH, KW = w.aval.shape
    NB, _, HO, WO = out.aval.shape[-4:]
    splits = ops.op.params.get(K_SPLITS, 1)
    slice_at = f"bt * {NB * O * HO * WO} + " if splits > 1 else ""
    s, p = ops.op.params["stride"], ops.op.params["padding"]
    K = C * KH * KW
    table = None
    table_ok = KH * KW > 1 and K * 8 <= IM2COL_TABLE_BYTES     # (8 bytes an entry; 1 x 1: no division)
    if IM2COL_TABLE and table_ok and ops.op.params["tile_m"] >= IM2COL_TABLE_MIN_ROWS:
        table = (f"const int c_ = k / {KH * KW}, q_ = k % {KH * KW}; "
                 f"e_[0] = c_ * {H * W} + q_ / {KW} * {W} + q_ % {KW}; e_[1] = q_ / {KW} << 16 | q_ % {KW};")
        load_a = (f"const int n_ = m / {HO * WO}, r_ = m % {HO * WO}; const int h_ = (r_ / {WO}) * {s} - {p}, "
                  f"w_ = (r_ % {WO}) * {s} - {p}; const int* t_ = kt_ + 2 * k; "
                  f"const int y_ = h_ + (t_[1] >> 16), x_ = w_ + (t_[1] & 65535); "
                  f"return ((unsigned)y_ < {H}u && (unsigned)x_ < {W}u) ? "
                  f"({acc})({x.at(f'n_ * {C * H * W} + h_ * {W} + w_ + t_[0]')}) : ({acc})0;")
    else:
        load_a = (f"const int n_ = m / {HO * WO}, r_ = m % {HO * WO}, c_ = k / {KH * KW}, q_ = k % {KH * KW}; "
                  f"const int h_ = (r_ / {WO}) * {s} - {p} + q_ / {KW}, w_ = (r_ % {WO}) * {s} - {p} + q_ % {KW}; "
                  f"return (h_ >= 0 && h_ < {H} && w_ >= 0 && w_ < {W}) ? "
                  f"({acc})({x.at(f'((n_ * {C} + c_) * {H} + h_) * {W} + w_')}) : ({acc})0;")
    return gemm_tiles(ops, Gemm(
        NB * HO * WO, O, K, splits, setup=[], load_a=load_a,
        load_b=f"return ({acc})({w.at(f'n * {K} + k')});",
        store=store_output(ops, f"{slice_at}((m / {HO * WO}) * {O} + n) * {HO * WO} + m % {HO * WO}", "v"),
        a_contiguous_k=False, b_contiguous_k=True, k_table=table))


def gemm_tiles(ops: OpRenderer, gemm: Gemm, scratch: str = "smem", a_in_place: bool | None = None) -> str:
    """The uTask body: output tile t of params tile_m x tile_n, through the GEMV or the GEMM tile routine. Split
    over its depth (plan.K_SPLITS: S slices, the GEMM's outer batch elements), batch element bt's tile contracts
    only its slice's range of k: the loaders see k from k0_ on, the tile routine a depth of kd_. `scratch`: the
    C expression of the shared memory the tile routine works in (a resident B is at smem's GDSL_RESIDENT_BASE);
    `a_in_place`: a GEMV tile reads A where it is (gdsl_gemv_tile's a_in_place; None: where GEMV_A_IN_PLACE says)."""
    M, N, K = gemm.M, gemm.N, gemm.K
    tm, tn = ops.op.params["tile_m"], ops.op.params["tile_n"]
    acc = c_types.accumulator(ops.outs[0].dtype)
    block, warp_size = ops.block, ops.dialect.warp_size
    tiles_m, tiles_n = -(-M // tm), -(-N // tn)
    # A tile covering a whole dimension of any size (a partitioned loop's) is computed as the next power
    # of two, its extra rows and columns masked: the tile routines split a power of two among threads.
    gemv = tm == M and M <= utasks.GEMV_ROWS          # (any number of rows)
    col0 = f"tj * {tn}"
    if gemm.gathered:                  # one GEMM of the gathered columns (Gemm.gathered): exactly its width
        tn = N = gemm.gathered * tn
        col0 = "0"
    tm = _pow2(tm) if tm >= M and not gemv else tm
    # (an odd width of the menu, utasks.GEMM_ODD_TILES, stays as it is where the wide tile takes it: masked there)
    odd = not gemv and acc == "float" and tn & (tn - 1) and wide_tile(tm, tn, block) is not None
    tn = _pow2(tn) if tn >= N and not gemm.gathered and not (gemv and gemm.exact_n) and not odd else tn
    lines = [f"  const int bt = t / {tiles_m * tiles_n}, ti = (t / {tiles_n}) % {tiles_m}, "
             f"tj = t % {tiles_n};" if gemm.batch > 1 else
             f"  const int bt = 0, ti = t / {tiles_n}, tj = t % {tiles_n};"]
    lines += gemm.setup
    if ops.next_window:     # (views.prefetches_next_window: this uTask's share of the next window's lines, to L2)
        line, first = 128 // ops.ins[0].dtype.itemsize, f"t * {block} + (int){ops.dialect.thread_index}"
        lines.append(f"  for (int l_ = {first}; l_ * {line} < {ops.ins[0].aval.size}; l_ += {ops.op.n_utasks * block}) "
                     f"{ops.dialect.prefetch_template.format(ptr=f'i0_next + l_ * {line}')};")
    depth, shift = K, ""
    splits = ops.op.params.get(K_SPLITS, 1)
    if splits > 1:
        kc = k_chunk(K, splits)
        lines.append(f"  const int k0_ = bt / {gemm.batch // splits} * {kc}, "
                     f"kd_ = {K} - k0_ < {kc} ? {K} - k0_ : {kc};")
        depth, shift = "kd_", "k += k0_; "
    elif not gemv and prefetches_gathered_rows(ops.op):        # (a tile of a k range only takes no hint)
        lines.append(_gathered_rows_prefetch(ops, tm, M, K))
    lines.append(f"  auto sc = [&](int m, int n, {acc} v) {{ {gemm.store} }};")
    loaders = [f"  auto la = [&](int m, int k) -> {acc} {{ {shift}{gemm.load_a} }};",     # (the wide tile may add
               f"  auto lb = [&](int k, int n) -> {acc} {{ {shift}{gemm.load_b} }};"]     # the address loaders pa, pb)
    size = 8 if acc == "long long" else 4
    if gemv:
        kmajor = gemm.b_contiguous_k
        # gdsl_gemv_tile's column threads CT, k slices KS, and k slices of a column within a warp
        ctn = min(tn & -tn, max(1, block // warp_size) if kmajor else block)
        ks = block // ctn
        lanes = min(ks, warp_size) if kmajor else (warp_size // ctn if ctn < warp_size else 1)
        slots = ks // lanes
        kc = ops.op.params.get(utasks.K_CHUNK, gemm.gemv_kc)     # (the whole k at once: thin_gemv_params)
        if SHALLOW_GEMV_CHUNK and splits == 1 and K < kc:
            kc = K          # (a shallow k is one chunk of its own depth: see SHALLOW_GEMV_CHUNK)
        need = (M * kc + (slots * M * tn if slots > 1 else 0)) * size
        # (a tile that stages its whole k at once prefetches all of its B values where the scheduler let it:
        # utasks.thin_gemv_params; the template's default is GEMV_PREFETCH)
        held = kc * tn // block
        prefetch = f", {held}" if utasks.K_CHUNK in ops.op.params and held > GEMV_PREFETCH else ""
        if a_in_place is None:
            rule = gemm.a_shared if GEMV_A_IN_PLACE == "shared" else GEMV_A_IN_PLACE == "plain" and gemm.a_plain
            a_in_place = rule and M == 1 and kc >= K
        call = (f"  gdsl_gemv_tile<{M}, {tn}, {block}, {kc}, {acc}, {str(kmajor).lower()}{prefetch}>({N}, {K}, "
                f"{col0}, la, lb, sc, {scratch}{', true' if a_in_place else ''});")
        # (the tile's last statement is a block barrier after the reduction's stores when SLOTS > 1; the call
        # is this body's last statement, and a published output's flag words are written by the stores)
        ops.ends_with_block_barrier = slots > 1
    elif (warps := pipelined_warps(tm, tn, block, ops.dialect, gemm, acc, ops.op.params["tile_n"])) is not None:
        wr, wc = warps
        bres = in_place_b(gemm, tn, ops.op.params["tile_n"])
        pitch = gemm.resident_pitch or tn
        loaders.append(f"  auto pa = [&](int m, int k) -> const float* {{ {shift}{gemm.address_a} }};")
        if not bres:
            loaders.append(f"  auto pb = [&](int k, int n) -> const float* {{ {shift}{gemm.address_b} }};")
        need = TC_STAGES * (tm * (TC_BK + 4) + (0 if bres else TC_BK * (tn + 8))) * size
        call = (f"  gdsl_gemm_tile_tcp<{tm}, {tn}, {TC_BK}, {TC_STAGES}, {block}, {wr}, {wc}, {str(bres).lower()}, "
                f"{pitch}>"
                f"({M}, {N}, {depth}, ti * {tm}, {col0}, la, lb, pa, {'pa' if bres else 'pb'}, sc, "
                f"{gemm.resident_b if bres else 'nullptr'}, {scratch});")
    elif (wide := wide_tile(tm, tn, block) if acc == "float" else None) is not None:
        rm, rn, groups = wide
        contiguous = f"{str(gemm.a_contiguous_k).lower()}, {str(gemm.b_contiguous_k).lower()}"
        # B read in place from its resident tile (never staged) where the tile is the resident one, whole stages
        # deep (the stages read k0 .. k0 + GEMM_BK of it) and rows of whole four-element groups
        bres = in_place_b(gemm, tn, ops.op.params["tile_n"], GEMM_BK) and tn % 4 == 0
        vec = WIDE_VECTOR_LOADS and gemm.address_a is not None and gemm.a_contiguous_k and K % 4 == 0 and (
            bres or gemm.address_b is not None and (gemm.b_contiguous_k or N % 4 == 0))
        names = "la, lb, la, lb"
        if vec:
            names = "la, lb, pa, pa" if bres else "la, lb, pa, pb"     # (with bres the tile loads no B)
            loaders.append(f"  auto pa = [&](int m, int k) -> const float* {{ {shift}{gemm.address_a} }};")
            if not bres:
                loaders.append(f"  auto pb = [&](int k, int n) -> const float* {{ {shift}{gemm.address_b} }};")
        staged_b = 0 if bres else tn + 4
        need = max(GEMM_BK * (tm + 4 + staged_b) * size, groups // 2 * tm * tn * size)
        pitch = f", {gemm.resident_pitch}" if bres and gemm.resident_pitch else ""     # (padded resident rows)
        call = (f"  gdsl_gemm_tile_wide<{tm}, {tn}, {GEMM_BK}, {block}, {rm}, {rn}, {groups}, {str(vec).lower()}, "
                f"{str(bres).lower()}, {contiguous}, {acc}{pitch}>({M}, {N}, {depth}, ti * {tm}, {col0}, {names}, sc, "
                f"{gemm.resident_b if bres else 'nullptr'}, {scratch});")
    else:
        rm, rn = micro_tile(tm, tn, block)
        contiguous = f"{str(gemm.a_contiguous_k).lower()}, {str(gemm.b_contiguous_k).lower()}"
        small = rm * rn < TENSOR_CORE_BELOW
        warps = tensor_core_warps(tm, tn, block, ops.dialect) if acc == "float" and small else None
        if warps is None:
            need = GEMM_BK * (tm + 1 + tn + 1) * size
            call = (f"  gdsl_gemm_tile<{tm}, {tn}, {GEMM_BK}, {block}, {rm}, {rn}, {contiguous}, {acc}>"
                    f"({M}, {N}, {depth}, ti * {tm}, {col0}, la, lb, sc, {scratch});")
        else:
            wr, wc = warps
            k_groups = block // ops.dialect.warp_size // (wr * wc)
            need = max(GEMM_BK * (tm + 8 + tn + 8) * size, (k_groups - 1) * tm * tn * size)
            call = (f"  gdsl_gemm_tile_tc<{tm}, {tn}, {GEMM_BK}, {block}, {wr}, {wc}, {rm}, {rn}, {contiguous}>"
                    f"({M}, {N}, {depth}, ti * {tm}, {col0}, la, lb, sc, {scratch});")
    if gemm.k_table is not None:      # (after the tile's own shared memory, 16-byte aligned)
        base = -(-need // 16) * 16
        need = base + 8 * K
        lines += [f"  int* kt_ = (int*)(smem + {base});",
                  f"  {ops.dialect.block_barrier}   // (the vEU's previous uTask may still read this memory)",
                  f"  for (int k = {ops.dialect.thread_index}; k < {K}; k += {block}) "
                  f"{{ int* e_ = kt_ + 2 * k; {gemm.k_table} }}",
                  f"  {ops.dialect.block_barrier}"]
    ops.smem = max(ops.smem, need)
    return "\n".join(lines + loaders + [call]) + "\n"


def in_place_b(gemm: Gemm, tn: int, tile_n: int, stage_k: int = 1) -> bool:
    """Does a tile tn wide read B in place from its resident tile (tile_n wide): the uTask's resident tile is the one
    it computes, and its depth whole stages of stage_k rows (1: any depth, the pipelined tile reading no row past
    K)."""
    return gemm.resident_b is not None and tn == tile_n and gemm.K % stage_k == 0


def pipelined_warps(tm: int, tn: int, threads: int, dialect, gemm: Gemm, acc: str,
                    tile_n: int) -> tuple[int, int] | None:
    """The warp grid (WR, WC) of a tile on gdsl_gemm_tile_tcp (TC_PIPELINE), None where it does not take the
    tile: not a program that takes it (dialect.pipelined_tiles: pipelined_program), more than TC_MAX_ROWS rows, not
    float32 with A's addresses in global memory along k and B's along n or B read in place from the uTask's own
    resident tile (in_place_b; another uTask's tile it could neither read in place nor copy, cp.async reading global
    memory only), or no grid of all the block's warps over whole 16 x 8 fragments. The squarest warp tile, fewer
    warp rows on a tie."""
    b_known = in_place_b(gemm, tn, tile_n) if gemm.resident_b is not None else \
        gemm.address_b is not None and not gemm.b_contiguous_k
    a_known = gemm.address_a is not None and gemm.a_contiguous_k and not gemm.a_shared    # (cp.async reads global)
    if not (dialect.pipelined_tiles and acc == "float" and tm <= TC_MAX_ROWS and a_known and b_known):
        return None
    warps = threads // dialect.warp_size
    shapes = [(wr, warps // wr) for wr in range(1, warps + 1)
              if warps % wr == 0 and tm % (16 * wr) == 0 and tn % (8 * (warps // wr)) == 0]
    return min(shapes, key=lambda s: (abs(tm // s[0] - tn // s[1]), s[0])) if shapes else None


def pipelined_program(dialect, program) -> bool:
    """Do `program`'s GEMM tiles take gdsl_gemm_tile_tcp (lower.py sets dialect.pipelined_tiles from it): TC_PIPELINE
    and the dialect's tensor cores, and a matmul of more rows than a GEMV's (utasks.GEMV_ROWS) inside a loop (a
    recurrence's batch-64 products, what the tile is for) or a program without loops. Its stages crowd out resident
    weights (pipelined_scratch), so a program whose loops run only GEMVs (the LSTM at batch 1, whose hoisted input
    GEMM is outside its loop) keeps the FFMA tiles and its budget."""
    if not (TC_PIPELINE and dialect.tensor_cores):
        return False
    loops = [sub for eqn in walk_eqns(program.jaxpr) if eqn.primitive is while_p for sub in subjaxprs(eqn)]
    return not loops or any(eqn.primitive is matmul_p and utasks.gemm_shaped(eqn.inputs[0].aval)
                            for loop in loops for eqn in walk_eqns(loop))


def pipelined_scratch(dialect, staged_b: bool = True) -> int:
    """The most shared memory a gdsl_gemm_tile_tcp tile stages (with `staged_b` B too, else A alone; the largest tile
    of the scheduler's menu at most TC_MAX_ROWS tall) where the lowering's program takes the tile
    (dialect.pipelined_tiles), else 0: what each vEU's resident-weight budget leaves it (lower.py)."""
    if not dialect.pipelined_tiles:
        return 0
    return max(TC_STAGES * (tm * (TC_BK + 4) + (TC_BK * (tn + 8) if staged_b else 0)) * 4
               for tm, tn in utasks.gemm_tile_menu() if tm <= TC_MAX_ROWS)


def tensor_core_warps(tm: int, tn: int, threads: int, dialect) -> tuple[int, int] | None:
    """The warp grid (WR, WC) of a float32 tile on the dialect's tensor cores (gdsl_gemm_tile_tc: 16 x 8
    fragments, the warps left over split k), None where the FFMA tile computes it: a dialect without tensor
    cores, a tile that is not whole fragments, or one with fewer fragments than a quarter of the warps (too
    little work to pay for the split operands and the partial sums)."""
    if not dialect.tensor_cores or tm % 16 or tn % 8:
        return None
    warps = threads // dialect.warp_size
    rows, cols = tm // 16, tn // 8
    over = min(warps, rows * cols)
    if 4 * over < warps or warps % over:
        return None
    shapes = [(wr, over // wr) for wr in range(1, over + 1)
              if over % wr == 0 and rows % wr == 0 and cols % (over // wr) == 0]
    if not shapes:
        return None
    # The squarest warp tile (fewest fragment loads per mma), rows before columns on a tie.
    return min(shapes, key=lambda s: (abs(tm // s[0] - tn // s[1]), s[0]))


def wide_tile(tm: int, tn: int, threads: int) -> tuple[int, int, int] | None:
    """The register tile (RM, RN) and k groups KS of a float32 tile on gdsl_gemm_tile_wide, None where it does
    not fit: RM and RN multiples of 4 dividing the tile, (tm/RM) * (tn/RN) threads a group, KS a power of two
    dividing GEMM_BK, at most WIDE_MAX_GROUPS. The largest register tile first (most FFMAs per shared-memory
    load), at most WIDE_MAX_REGISTERS; on a tie the fewest groups. Under utasks.ODD_GEMM_TILES, RN may also
    be one of WIDE_ODD_COLUMNS (at most WIDE_ODD_REGISTERS outputs) where no multiple of 4 fits."""
    best = None
    odd = WIDE_ODD_COLUMNS if utasks.ODD_GEMM_TILES else ()
    for rm in (4, 8):
        for rn in (4, 8) + odd:
            most = WIDE_MAX_REGISTERS if rn % 4 == 0 else WIDE_ODD_REGISTERS
            if tm % rm or tn % rn or rm * rn > most:
                continue
            group = (tm // rm) * (tn // rn)
            groups = threads // group
            if group * groups != threads or groups & (groups - 1) or GEMM_BK % groups or groups > WIDE_MAX_GROUPS:
                continue
            key = (rn % 4 == 0, rm * rn, -groups, rm)
            if best is None or key > best[0]:
                best = (key, (rm, rn, groups))
    return None if best is None else best[1]


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def micro_tile(tm: int, tn: int, threads: int) -> tuple[int, int]:
    """The register tile (RM, RN) of each computing thread: as many computing threads as fit in the block
    ((tm/RM) * (tn/RN) <= threads), then the squarest tile."""
    best = None
    for rm in (d for d in range(1, tm + 1) if tm % d == 0):
        for rn in (d for d in range(1, tn + 1) if tn % d == 0):
            used = (tm // rm) * (tn // rn)
            if used > threads:
                continue
            key = (used, -abs(rm - rn), -rm)
            if best is None or key > best[0]:
                best = (key, (rm, rn))
    return best[1]
