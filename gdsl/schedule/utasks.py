"""How each operator splits into uTasks (one thread block's share of its output), and what a uTask costs.

One table, keyed by Op kind. Every backend renders uTask `t` of an Op to exactly the share written here:

    elementwise-like kinds   output elements [t*chunk, min((t+1)*chunk, size)) in row-major order
    elementwise, row_block   rows [i*R, (i+1)*R) x columns [j*chunk, (j+1)*chunk) of the output as [rows, n],
                             (i, j) = divmod(t, ceil(n/chunk)) (plan.ROW_BLOCK: a column layout of several
                             rows, owner.py; a cell chain's "rows" op so too, of its row shape)
    matmul / conv2d          output tile (b, i, j) = unravel(t, (batch, ceil(M/tile_m), ceil(N/tile_n)));
                             conv2d as implicit GEMM: M = N*HO*WO, N = O, K = C*KH*KW, batch = 1
    matmul / conv2d,         (s, b, i, j) = unravel(t, (S, batch, ceil(M/tile_m), ceil(N/tile_n))): tile (b, i, j)
      k_splits = S           of the product over k in plan.k_range(K, S, s), stored in P[s] (the output P is
                             (S, *out_shape): S is one more batch axis in front; split-K, splitk.py)
    matmul, gather_batch     output tiles (i, j) = unravel(t, (ceil(M/tile_m), ceil(N/tile_n))) of EVERY
                             batch element b (one GEMM of A's rows by the batch*tile_n gathered columns;
                             A is broadcast over the batch, so all of them read the same rows of A)
    reductions, argmax/min   output elements [t*rows, (t+1)*rows) (each a full reduction)
    rows (a row chain)       rows [t*rows, (t+1)*rows) of its row shape: of each output, the elements of
                             those rows (a whole row each, or one element per row)
    dynamic_update_slice     in place: update elements [t*chunk, ...); otherwise like elementwise

Costs are a rough roofline per uTask on one vEU (ns), used to size vEU ranges within a wave. `split` picks
an Op's split for the whole grid; `split_options` lists the splits a wave's balancing (balance.py) may take
instead, each with a time that counts memory round trips (ROUND_TRIP_NS).
"""
from __future__ import annotations

import math

import gdsl.primitives  # noqa: F401  (registers every primitive, so the family sets below are complete)
from gdsl.primitives.linalg import matmul_p
from gdsl.primitives.registry import (
    CONTRACTION,
    CONVOLUTION,
    DATA_MOVEMENT,
    ELEMENTWISE,
    GATHER,
    OP_KINDS,
    REDUCE,
    REGISTRY,
    WINDOW,
    kinds_of,
)
from gdsl.primitives.structural import dynamic_slice_p, dynamic_update_slice_p
from gdsl.schedule import plan  # (declares the scheduler's own kinds: "fused", "copy", "rows")
from gdsl.schedule.rows import row_group

# One vEU's share of an H100 (132 SMs): ~3 TB/s and ~50 TFLOP/s fp32 spread over the SMs.
BYTES_PER_NS_PER_VEU = 3000 / 132
FLOPS_PER_NS_PER_VEU = 50000 / 132

# The kinds split into chunks of output elements (everything but reductions and GEMMs).
ELEMENTWISE_KINDS = kinds_of(ELEMENTWISE, DATA_MOVEMENT, GATHER, WINDOW)
REDUCE_KINDS = kinds_of(REDUCE)
# The primitives split into GEMM tiles (the scheduler's GEMV_ROWS_GEMV, a contraction too, is made of split ops).
GEMM_KINDS = frozenset(name for name in kinds_of(CONTRACTION, CONVOLUTION) if name in REGISTRY)

# A matmul with at most this many rows is GEMV-shaped: its uTask is a tile of whole rows (gdsl_gemv_tile).
GEMV_ROWS = 8


def gemm_shaped(a_aval) -> bool:
    """Is a matmul whose left operand is `a_aval` GEMM-shaped: more rows than a GEMV's (its uTasks GEMM tiles)?"""
    return a_aval.shape[-2] > GEMV_ROWS

# Where the scalar start operands of a dynamic window op begin (the operands before them are arrays).
DYNAMIC_STARTS = {dynamic_slice_p: 1, dynamic_update_slice_p: 2}


def contiguous_window(shape, sizes) -> bool:
    """Is a window of `sizes` (any start) of a row-major array of `shape` one contiguous run of it?"""
    k = next((d for d, z in enumerate(sizes) if z != 1), len(sizes))
    return all(sizes[d] == shape[d] for d in range(k + 1, len(shape)))


def viewable_buffers(op) -> bool:
    """Could op's output be a window into its source, as far as their storage goes: the output a temp (no
    other storage to fill), the source a buffer outside recursive frames (cfamily/views.py's terms)."""
    out, src = op.outputs[0].buffer, op.inputs[0].buffer
    return out is not None and out.kind == "temp" and src is not None and src.kind != "frame"


def first_start(kind) -> int | None:
    """The operand number of the first start index of a dynamic window op, None for other kinds."""
    return DYNAMIC_STARTS.get(OP_KINDS[kind])


def in_place_update(kind, params) -> bool:
    """Is this a dynamic_update_slice that writes only its window into its operand's own storage?"""
    return kind == dynamic_update_slice_p.name and bool(params.get("in_place"))


def _cost(bytes_moved, flops=0.0):
    return max(bytes_moved / BYTES_PER_NS_PER_VEU, flops / FLOPS_PER_NS_PER_VEU, 1.0)


def gemm_dims(kind, in_avals, out_aval, params):
    """(batch, M, N, K) of a matmul or conv2d (`in_avals` may go on with an epilogue's operands). The partial
    products of split-K (plan.K_SPLITS) are S more batch elements in front (their output P is (S, *out_shape));
    K is the whole depth (k_depth: each uTask's)."""
    if kind == matmul_p.name:
        b = in_avals[1]          # (K from B: A may be the first of several parts, plan.K_PARTS)
        batch = math.prod(out_aval.shape[:-2])
        return batch, out_aval.shape[-2], out_aval.shape[-1], b.shape[-2]
    x, w = in_avals[:2]
    *splits, n, o, ho, wo = out_aval.shape
    return math.prod(splits), n * ho * wo, o, w.shape[1] * w.shape[2] * w.shape[3]


def k_depth(k: int, params) -> int:
    """The depth one uTask of a GEMM of depth k contracts: KC under split-K (plan.K_SPLITS), else k."""
    splits = params.get(plan.K_SPLITS, 1)
    return plan.k_chunk(k, splits) if splits > 1 else k


def _gemm_split(kind, in_avals, out_aval, params, grid, block, thin=False, gather_tiny=False):
    batch, m, n, k = gemm_dims(kind, in_avals, out_aval, params)
    k = k_depth(k, params)
    # (An empty output, m == 0, still gets tiles of a row: zero of them, so no uTask runs.)
    rows = max(m, 1)
    outputs_read = len(in_avals) - plan.contraction_operands(params)    # an epilogue's, read at the tile's elements
    tiny = gather_tiny and TINY_GEMV_GATHER and tiny_gathered_gemv(kind, in_avals, out_aval, outputs_read)
    if m <= GEMV_ROWS and tiny:
        return 1, {"tile_m": rows, "tile_n": n, GATHER_BATCH: True}, \
            _gemv_tile_cost(rows, batch * n, k, outputs_read)
    if m <= GEMV_ROWS:
        # GEMV-shaped: largest tile that still gives every vEU work, else the smallest one (its uTasks are
        # a few dependent memory round trips long: more of them at once is faster). Thin tiles (`thin`)
        # go below 16 columns where they stage their k in one chunk (thin_columns), unless 16 columns are
        # one uTask (one vEU's work: the barriers around it may stay block syncs), and a tile stages its k
        # in one chunk where it can (thin_gemv_params).
        thinner = thin_columns(rows, k, block) if thin and batch * math.ceil(n / 16) > 1 else ()
        for tn in (128, 64, 32, 16) + thinner:
            count = batch * math.ceil(m / rows) * math.ceil(n / tn)     # (none when m == 0)
            if count >= grid:
                break
        moved = 4 * (rows * k + k * tn + rows * tn * (1 + outputs_read))
        split = {"tile_m": rows, "tile_n": tn, **(thin_gemv_params(rows, tn, k, block) if thin else {})}
        return count, split, _cost(moved, 2 * rows * tn * k)
    # GEMM tiles: the fewest rounds of uTasks times a tile's time, and among equals the smaller tile (more
    # vEUs at work, less on each). A tile takes at least its stages' memory round trips, so a wave of tiles
    # slightly more than the vEUs runs better as one round of the next larger tile than as two rounds.
    best = None
    for tm, tn in gemm_tile_menu(m):
        count = batch * math.ceil(m / tm) * math.ceil(n / tn)
        cost = _gemm_tile_cost(tm, tn, k, outputs_read)
        key = (math.ceil(count / grid) * cost, tm * tn)
        if best is None or key < best[0]:
            best = (key, count, {"tile_m": tm, "tile_n": tn}, cost)
    return best[1:]


# Split-K (splitk.py, plan.K_SPLITS): a GEMM whose output tiles are too few for the grid and whose k is deep runs
# as S partial products over ranges of k (S uTasks per tile, each KC deep) and a "fused" op of the next wave that
# sums them. The S tried, the least depth KC a range may have, the grid barrier between the two ops, and how much
# faster than one product the estimate must be to take it (the estimate is rough: SkipNet's 16 x 16 x 2304 conv
# tiles, 38 us measured on the H200, are 50 us here). FORCE_K_SPLITS (a module switch, tests and ablations): that
# S on every eligible GEMM (as many as its depth allows, k_splits_allowed), whatever the estimate.
# The least depth is 256, not the estimate's 64: on the H200 (session 13, two rounds of one call) SkipNet took
# 1.892 / 2.061 ms with ranges down to 64 deep, 1.846 / 1.919 down to 128, 1.705 / 1.693 down to 256 (2.27 / 2.26
# unsplit): a split uTask took 13-27 us whatever its depth (the profile: 64 x 64 tiles 64 deep 13-18 us, where
# the estimate says 2-3), so shallow ranges add uTasks, partial products and their sum without shortening any.
K_SPLIT_CHOICES = (1, 2, 4, 8, 16)
K_SPLIT_MIN_DEPTH = 256
K_SPLIT_BARRIER_NS = 1300.0
K_SPLIT_GAIN = 0.75
FORCE_K_SPLITS: int | None = None


def k_splits_allowed(k: int, splits: int) -> bool:
    """Does a depth k split in `splits` ranges of whole stages leave every range non-empty?"""
    return splits == 1 or (splits - 1) * plan.k_chunk(k, splits) < k


def k_split_eligible(kind, in_avals, out_aval, params) -> bool:
    """May this GEMM be split over its depth: GEMM-shaped (more rows than a GEMV), a float32 output (the
    partial products' accumulator), its operands read plainly (no K_PARTS, N_PARTS, ROW_INDEX, resident B or
    gathered batch), not split already?"""
    if kind not in GEMM_KINDS or str(out_aval.dtype) != "float32" or plan.K_SPLITS in params:
        return False
    if any(key in params for key in (plan.K_PARTS, plan.N_PARTS, plan.ROW_INDEX, GATHER_BATCH, RESIDENT)):
        return False
    return gemm_dims(kind, in_avals, out_aval, params)[1] > GEMV_ROWS


def k_split_time(kind, in_avals, out_aval, params, grid, block, splits) -> float:
    """The estimated time of a GEMM split in `splits` ranges of its depth (1: not split) on `grid` vEUs: the
    best tile of the menu for its uTasks, rounds times a tile's time at depth KC (its stages' round trips or
    its arithmetic, gemm_tile_time), plus for splits > 1 the sum op (one chunk op over the output reading the
    S slices and the epilogue's operands) and the grid barrier between them."""
    batch, m, n, k = gemm_dims(kind, in_avals, out_aval, params)
    depth = plan.k_chunk(k, splits) if splits > 1 else k
    outputs_read = len(in_avals) - plan.contraction_operands(params)    # (the epilogue's: on the sum op if split)
    tiles = min(math.ceil(batch * math.ceil(m / tm) * math.ceil(n / tn) * splits / grid) *
                gemm_tile_time(tm, tn, depth, block, 0 if splits > 1 else outputs_read)
                for tm, tn in gemm_tile_menu(m))
    if splits == 1:
        return tiles
    size, chunk = out_aval.size, 4 * block
    sums = math.ceil(math.ceil(size / chunk) / grid) * chunk_cost(chunk, splits + outputs_read, block, size)
    return tiles + sums + K_SPLIT_BARRIER_NS


def k_splits(kind, in_avals, out_aval, params, grid, block) -> int:
    """S for a GEMM (split-K, splitk.py; 1: not split): FORCE_K_SPLITS where set, else the S of
    K_SPLIT_CHOICES (ranges at least K_SPLIT_MIN_DEPTH deep) with the least k_split_time, when that is below
    K_SPLIT_GAIN of the unsplit time."""
    if not k_split_eligible(kind, in_avals, out_aval, params):
        return 1
    k = gemm_dims(kind, in_avals, out_aval, params)[3]
    if FORCE_K_SPLITS is not None:
        return max(s for s in range(1, max(FORCE_K_SPLITS, 1) + 1) if k_splits_allowed(k, s))
    choices = [s for s in K_SPLIT_CHOICES if s == 1 or (k / s >= K_SPLIT_MIN_DEPTH and k_splits_allowed(k, s))]
    times = {s: k_split_time(kind, in_avals, out_aval, params, grid, block, s) for s in choices}
    best = min(choices, key=lambda s: (times[s], s))
    return best if times[best] < K_SPLIT_GAIN * times[1] else 1


# A memory round trip that a uTask waits for (L2, or HBM behind it): a GEMM stage, a GEMV tile's operands,
# one pass of an elementwise uTask's loop (its threads take chunk / block passes one after another: a store
# may alias the next pass's loads, so they do not overlap).
ROUND_TRIP_NS = 700.0

# The output tiles a GEMM uTask may take (gdsl_gemm_tile), and the time of one stage of it beyond its
# arithmetic: a dependent round trip to L2 for the next k slice (GEMM_BK deep in the C-family renderer).
GEMM_TILES = ((64, 64), (32, 64), (32, 32), (16, 32), (16, 16))
GEMM_STAGE_K, GEMM_STAGE_NS = 32, ROUND_TRIP_NS

# Tiles of widths that are not powers of two (module switch ODD_GEMM_TILES, on: the LSTM bs64 on the H200, session
# 12, two rounds of one call, 2.819 / 2.835 -> 2.629 / 2.608 ms, predicted 2.2-2.5; no other zoo plan changes): on
# the menu too, so that a wave whose power-of-two tiles come out in two rounds on its vEUs may take one round of
# these, each a little more work (the LSTM's batch-64 step: 19 matmuls of 4 x 64 x 256 on 13 vEUs each, 16 tiles
# of 64 x 64 in 2 rounds, or 12 of 64 x 96 in one). A matrix's last tile may be narrower (256 = 2 x 96 + 64). The wide
# FFMA tile computes them with register tiles of 4 x 6 and 4 x 5 (gemm.WIDE_ODD_COLUMNS).
ODD_GEMM_TILES = True
GEMM_ODD_TILES = ((64, 96), (64, 80))


# Tall tiles (module switch TALL_GEMM_TILES): the 64 x 64 tile's 4096 outputs (a 4 x 4 register tile on each of
# 256 threads) as 128 x 32 and 256 x 16, and half of it as 64 x 32 and 128 x 16, for GEMMs of many rows and few
# columns, where a 64-wide tile computes columns past N: a convolution's M = images x pixels against N = 16 or 32
# channels (BlockDrop's batch-64 first-stage convs, M = 65536, N = 16, K = 144: 1024 tiles of 64 x 64, three
# quarters of each past N, 18.2 us a tile in four rounds on the H200, session 20's profile). Offered only to a
# GEMM of at least tm rows: a tile taller than the matrix would compute rows that do not exist.
# The tallest of them offered: GEMM_TALL_MAX_ROWS (a 256-row tile stages 32 elements of A a thread a stage, and
# with the implicit GEMM's index arithmetic ptxas spilled 568 bytes a thread under the 128 registers of two vEUs
# an SM: BlockDrop's 256 x 16 conv tiles ran at 72-75 us, long-scoreboard stalls on the spill reloads).
TALL_GEMM_TILES = True
GEMM_TALL_TILES = ((256, 16), (128, 32), (128, 16), (64, 32))
GEMM_TALL_MAX_ROWS = 128


# Tiles whose outputs only a tensor-core tile holds in registers (the FFMA tiles would take 32 a thread), offered
# under the switch WIDE_TC_TILES (off: for measuring the C-family backends' pipelined tensor-core tile,
# gemm.TC_PIPELINE, on fewer, larger tiles: the LSTM's batch-64 GEMMs in one round of 152 tiles; a program that
# does not take that tile computes them on the plain FFMA tile).
WIDE_TC_TILES = False
GEMM_TC_TILES = ((64, 128),)


def gemm_tile_menu(m: int | None = None) -> tuple[tuple[int, int], ...]:
    """The output tiles a GEMM uTask of `m` rows may take (None: any number): GEMM_TILES, GEMM_ODD_TILES under
    ODD_GEMM_TILES, under TALL_GEMM_TILES those of GEMM_TALL_TILES at most m and GEMM_TALL_MAX_ROWS tall, and
    GEMM_TC_TILES under WIDE_TC_TILES."""
    tall = tuple(t for t in GEMM_TALL_TILES if t[0] <= GEMM_TALL_MAX_ROWS and (m is None or t[0] <= m)) \
        if TALL_GEMM_TILES else ()
    return GEMM_TILES + (GEMM_ODD_TILES if ODD_GEMM_TILES else ()) + tall + (GEMM_TC_TILES if WIDE_TC_TILES else ())


# The rate at which one vEU's GEMM tile computes with a 4 x 4 register tile per thread, measured (H200, a
# 64x64x256 FFMA tile of 256 threads in 12 us): a third of an SM's fp32 peak, which _cost's roofline assumes.
# The balancing's choice between one round of large tiles and two of small ones rests on it.
GEMM_TILE_FLOPS_PER_NS = 175.0


def gemm_tile_rate(tm: int, tn: int, block: int) -> float:
    """Flops per ns of a tm x tn GEMM tile of `block` threads: GEMM_TILE_FLOPS_PER_NS scaled by its register
    tile's FMAs per shared-memory load (rm * rn / (rm + rn), 2 for 4 x 4), with which a smaller tile computes
    more slowly: 2 x 4 at two thirds, 2 x 2 at half."""
    per_thread = max(1, tm * tn // block)
    rm = 1 << ((per_thread.bit_length() - 1) // 2)
    rn = per_thread // rm
    return GEMM_TILE_FLOPS_PER_NS * (rm * rn / (rm + rn)) / 2

# The column counts a GEMV uTask may take when a wave is balanced (gdsl/schedule/balance.py), and the bytes
# per ns one vEU reads on chip (a loop's GEMV weights stay in L2 or in its shared memory: resident.py).
GEMV_COLUMNS = (16, 32, 48, 64, 96, 128, 256)
ONCHIP_BYTES_PER_NS_PER_VEU = 60.0

# Thin GEMV tiles (the scheduler option `thin_gemv`): the column counts below GEMV_COLUMNS' that a GEMV may
# also take, so that one whose 16-column tiles leave vEUs idle spreads over more of them (RAE's node GEMV,
# 512 columns: 32 vEUs of 132 at 16 columns, 64 at 8). Under the option every GEMV tile also stages all of
# its k in one chunk (split param K_CHUNK, gdsl_gemv_tile's KC) when each thread's B values fit in
# THIN_GEMV_REGISTERS registers and the A rows in THIN_GEMV_A_BYTES of shared memory: one dependent round
# trip to L2 instead of one per GEMV_KC (RAE's K = 1024 at 8 columns: four before). Such a tile prefetches all
# of its B values (gemm.py passes gdsl_gemv_tile its PF). 64 registers: SkipNet's gate GEMVs (one 16-column
# uTask, K = 1024, a one-vEU chain) stage K at once where 32 staged it in four chunks: 4.06 -> 2.56 µs each on
# the H200 (session 20, profiles in docs/); of the zoo only SkipNet's plan changes (and its classifier's GEMV).
THIN_GEMV_COLUMNS = (8,)
GEMV_KC = 256       # k chunk of A rows a GEMV tile stages in shared memory by default (gdsl_gemv_tile's KC)
THIN_GEMV_REGISTERS = 64
THIN_GEMV_A_BYTES = 16 * 1024
K_CHUNK = "k_chunk"


def thin_gemv_params(rows: int, tn: int, k: int, block: int) -> dict:
    """The extra split params of a GEMV tile of `rows` x `tn` under the option thin_gemv: {K_CHUNK: k} when
    its k, deeper than one default chunk, fits one staged chunk (a thread of `block` holds k * tn / block B
    values), else none."""
    if GEMV_KC < k and k * tn <= THIN_GEMV_REGISTERS * block and 4 * rows * k <= THIN_GEMV_A_BYTES:
        return {K_CHUNK: k}
    return {}


def thin_columns(rows: int, k: int, block: int) -> tuple[int, ...]:
    """The THIN_GEMV_COLUMNS a GEMV of `rows` x k may take: those whose tile stages all of its k at once
    (thin_gemv_params). Where it would not, a thinner tile only adds uTasks: NASRNN's batch-1 GEMV (k = 256,
    weights resident) took 4.73 ms in 16-column tiles and 4.90 in 8 (H200, same call), RAE's node GEMV (k =
    1024) 0.117 -> 0.091 ms over the bench trees."""
    return tuple(tn for tn in THIN_GEMV_COLUMNS if thin_gemv_params(rows, tn, k, block))


def _gemm_tile_cost(tm: int, tn: int, k: int, outputs_read: int = 0) -> float:
    """One uTask's time: its roofline (operands, result and `outputs_read` arrays read at the result's
    elements by an epilogue; flops), at least one round trip per k stage."""
    moved = 4 * (tm * k + k * tn + tm * tn * (1 + outputs_read))
    return max(_cost(moved, 2 * tm * tn * k), math.ceil(k / GEMM_STAGE_K) * GEMM_STAGE_NS)


def gemm_tile_time(tm: int, tn: int, k: int, block: int, outputs_read: int = 0) -> float:
    """A GEMM tile's time with its arithmetic at the tile's own rate (gemm_tile_rate) counted too."""
    return max(_gemm_tile_cost(tm, tn, k, outputs_read), 2 * tm * tn * k / gemm_tile_rate(tm, tn, block))


def _gemv_tile_cost(rows: int, tn: int, k: int, outputs_read: int = 0) -> float:
    """One GEMV uTask's time: a round trip for its operands, then its weights read on chip."""
    moved = 4 * (rows * k + k * tn + rows * tn * (1 + outputs_read))
    return ROUND_TRIP_NS + max(moved / ONCHIP_BYTES_PER_NS_PER_VEU, 2 * rows * tn * k / FLOPS_PER_NS_PER_VEU)


def chunk_cost(chunk: int, arrays: int, block: int, size: int) -> float:
    """One elementwise uTask's time (chunks of `chunk` of `size` elements, `arrays` operands): its passes'
    round trips, or its bytes, whichever is longer."""
    chunk = min(chunk, max(size, 1))
    return max(math.ceil(chunk / block) * ROUND_TRIP_NS, _cost(4 * chunk * (arrays + 1)))


def split_options(kind, in_avals, out_avals, params, block, thin=False) -> list[tuple[int, dict, float]]:
    """The splits a wave's balancing (gdsl/schedule/balance.py) may choose for an Op, as (n_uTasks, split
    params, ns per uTask) with round trips counted: GEMM tiles, GEMV widths (with `thin`, THIN_GEMV_COLUMNS'
    too), elementwise chunks of one to four elements per thread (in that order: larger uTasks first).
    Reductions: none (their split stays)."""
    out = out_avals[0]
    if kind in GEMM_KINDS:
        batch, m, n, k = gemm_dims(kind, in_avals, out, params)
        k = k_depth(k, params)          # (split-K keeps its k_splits: the scheduler's params stay beside these)
        outputs_read = len(in_avals) - plan.contraction_operands(params)
        if m <= GEMV_ROWS:
            rows = max(m, 1)
            columns = GEMV_COLUMNS + (thin_columns(rows, k, block) if thin else ())
            widths = [tn for tn in sorted(columns, reverse=True) if tn <= n] or [min(columns)]
            return [(batch * math.ceil(m / rows) * math.ceil(n / tn),
                     {"tile_m": rows, "tile_n": tn, **(thin_gemv_params(rows, tn, k, block) if thin else {})},
                     _gemv_tile_cost(rows, tn, k, outputs_read)) for tn in widths]
        return [(batch * math.ceil(m / tm) * math.ceil(n / tn), {"tile_m": tm, "tile_n": tn},
                 gemm_tile_time(tm, tn, k, block, outputs_read)) for tm, tn in gemm_tile_menu(m)]
    if kind == plan.ROWS.name:           # (a kind of the reduce family, but with a split of its own)
        return row_split_options(in_avals, out_avals, params, block)
    if kind in REDUCE_KINDS:
        return []
    size = in_avals[1].size if in_place_update(kind, params) else out.size
    return [(max(1, math.ceil(size / chunk)), {"chunk": chunk}, chunk_cost(chunk, len(in_avals), block, size))
            for chunk in (block * 4, block * 2, block)]


# The lanes of a warp in the cost model's picture of a ROWS uTask (rows.row_group; CUDA's warp: a HIP wave of 64
# groups rows of up to 64 lanes, which the model then prices as two passes where the card makes one).
WARP_LANES = 32

# Price a ROWS uTask by its block passes (rows.row_group: a block takes block // group short rows at once), not
# by its rows one after another. Off (every row a pass): SkipNet's traced ungated program (session 19) put 23
# gate pools of 1024 rows of 196 at one row a uTask, 103 rounds on 10 vEUs each, where eight rows a uTask take
# the one pass that one row takes.
ROW_PASSES = True
# A row or reduction uTask takes at most the op's rows: a default of more (the block's four elements a thread,
# 102 rows of 10 for SkipNet's gate cell of one row) made the C family's grouped row loop run its empty passes.
CLAMP_ROWS = True
# A cell chain whose block takes each row whole (rows.row_group None: no reduction, rows of a block's elements or
# more) is priced as one pass for a uTask of up to this many elements a lane (a row's slots are loaded together,
# reductions.PRELOAD_ROW_LEAVES; the C-family row loop takes a uTask's rows one after another). Priced a pass a
# row, the LSTM's batch-64 cells (10 ops of 64 rows of 256, one wave) took one row a uTask, 3 rounds on 22 vEUs
# each. H200, session 24, ncu kernel time, 2 processes x 10 launches (µs): 2463.0 -> 2376.3 with 4 rows a uTask,
# one round on 16 vEUs each; rendered with the four rows' loads explicitly together (one slot array over the rows,
# built and measured, not kept) 2376.5: the same. Why the row loop costs no more is not known (its loads are plain
# loads; the SASS was not read).
CELL_ROW_SLOTS = 4


def cell_rows_at_once(params, block: int) -> int:
    """The rows of a ROWS op priced as one pass of the block when its rows are not grouped (CELL_ROW_SLOTS): more
    than one for a cell chain of rows short enough, else 1."""
    shape = params[plan.ROW_SHAPE]
    if not plan.is_cell_chain(params.get(plan.STEPS, ()), shape):
        return 1
    return max(1, CELL_ROW_SLOTS // -(-shape[-1] // block))


def row_split_options(in_avals, out_avals, params, block) -> list[tuple[int, dict, float]]:
    """A ROWS op's splits for the balancing: row_split's rows per uTask (or as many as one pass of the block
    takes, when that is more), then halved down to one row, so that a chain over few rows (a recurrent cell
    at batch 64: 64 rows of 256) can spread over as many vEUs as the elementwise ops it replaced (row_split
    alone put NASRNN's cell on 16 vEUs, 4 rows each one after another: 13.3 -> 23.4 ms on the H200). A
    uTask's time is its block passes, each a round trip (or its bytes, when that is more)."""
    if plan.ROW_SHAPE not in params:
        return []
    shape = params[plan.ROW_SHAPE]
    length, n_rows = shape[-1], math.prod(shape[:-1])
    per_row = sum(a.size for a in list(in_avals) + list(out_avals)) / max(n_rows, 1)
    reduces = any(step.reduce is not None for step in params.get(plan.STEPS, ()))
    group = row_group(length, reduces, block, WARP_LANES) if ROW_PASSES else None
    if group:                                                  # rows in one pass of the block
        at_once = block // group
    else:
        at_once = cell_rows_at_once(params, block) if ROW_PASSES else 1
    halved = [row_split(in_avals, out_avals, params, block)[1]["rows"]]
    while halved[-1] > 1:
        halved.append(halved[-1] // 2)
    one_pass = min(at_once, n_rows)
    options = []
    for rows in ([one_pass] if one_pass > halved[0] else []) + halved:
        passes = math.ceil(rows / at_once) * (1 if group or at_once > 1 else math.ceil(length / block))
        cost = max(passes * ROUND_TRIP_NS, _cost(4 * rows * per_row))
        options.append((max(1, math.ceil(n_rows / rows)), {"rows": rows}, cost))
    return options


def rows_a_utask(n_rows: int, length: int, block: int) -> int:
    """A row or reduction uTask's rows of `length` elements: about four elements a thread, a whole row at least,
    and never more rows than the op has (CLAMP_ROWS)."""
    rows = max(1, (block * 4) // length)
    return min(rows, max(n_rows, 1)) if CLAMP_ROWS else rows


def row_split(in_avals, out_avals, params, block, parts=0):
    """The split of a ROWS op: rows per uTask like a reduction's (about four elements per thread, at least a
    whole row), or its rows spread evenly over `parts` partitions; every operand and output moved once."""
    shape = params[plan.ROW_SHAPE]
    length, n_rows = shape[-1], math.prod(shape[:-1])
    rows = max(1, n_rows // parts) if parts else rows_a_utask(n_rows, length, block)
    count = parts if parts else max(1, math.ceil(n_rows / rows))
    per_row = sum(a.size for a in list(in_avals) + list(out_avals)) / max(n_rows, 1)
    return count, {"rows": rows}, _cost(4 * rows * per_row)


def split(kind, in_avals, out_avals, params, grid, block, thin=False, gather_tiny=False):
    """(n_utasks, split params, cost of one uTask in ns) for an Op (`thin`: GEMVs may take thin tiles;
    `gather_tiny`: a tiny batched GEMV may be one gathered uTask, tiny_gathered_gemv)."""
    out = out_avals[0]
    if kind == plan.ROWS.name:
        return row_split(in_avals, out_avals, params, block)
    if kind in GEMM_KINDS:
        return _gemm_split(kind, in_avals, out, params, grid, block, thin, gather_tiny)
    if kind in REDUCE_KINDS:
        x = in_avals[0]
        length = max(1, x.size // max(out.size, 1))
        rows = rows_a_utask(out.size, length, block)
        count = max(1, math.ceil(out.size / rows))
        return count, {"rows": rows}, _cost(4 * rows * (length + 1))
    size = in_avals[1].size if in_place_update(kind, params) else out.size
    chunk = block * 4
    count = max(1, math.ceil(size / chunk))
    return count, {"chunk": chunk}, _cost(4 * chunk * (len(in_avals) + 1))


def partition_tile_ok(m: int, n: int) -> bool:
    """Can one uTask compute a whole m x n matmul output (a partitioned loop's GEMV or GEMM tile)?"""
    return (m <= 8 and n <= 512) or (m <= 64 and n <= 64)


def gemv_tile_cost(m: int, n: int, k: int) -> float:
    """The cost of a uTask computing one whole m x n tile of a matmul of depth k (a partition's, or sibling
    matmuls' at once: siblings.py): its A, B and output moved once."""
    return _cost(4 * (m * k + k * n + m * n), 2 * m * n * k)


def partition_split(kind, in_avals, out_avals, params, parts):
    """The split of an op of a partitioned loop (gdsl/schedule/partition.py): uTask p is partition p,
    the output elements [p*size/parts, (p+1)*size/parts) (for matmul: batch element p, one whole tile)."""
    out = out_avals[0]
    if kind == plan.ROWS.name:
        return row_split(in_avals, out_avals, params, 0, parts)
    if kind in GEMM_KINDS:
        _, m, n, k = gemm_dims(kind, in_avals, out, params)
        return parts, {"tile_m": m, "tile_n": n}, gemv_tile_cost(m, n, k)
    if kind in REDUCE_KINDS:
        rows = out.size // parts
        return parts, {"rows": rows}, _cost(4 * (in_avals[0].size + out.size) / parts)
    size = in_avals[1].size if in_place_update(kind, params) else out.size
    chunk = size // parts
    return parts, {"chunk": chunk}, _cost(4 * chunk * (len(in_avals) + 1))


# The split param of a matmul whose uTask covers its column range in every batch element (the table above).
GATHER_BATCH = "gather_batch"
RESIDENT = "resident"       # (resident.RESIDENT, which imports this module: a matmul whose B waits on chip)


def gathers_batch(params) -> bool:
    """Does a matmul with these split params take each column range of every batch element at once?"""
    return bool(params.get(GATHER_BATCH))


def can_gather_batch(kind, in_avals, out_aval) -> bool:
    """Can a uTask of this op cover a column range of every batch element at once: a batched matmul whose
    left operand is broadcast over the batch (one A for all, staged once). With a batched A the gathered
    tile would be a block diagonal of A's batch elements: not expressed (such a matmul keeps one tile per
    batch element)."""
    if kind != matmul_p.name or len(out_aval.shape) < 3:
        return False
    return math.prod(out_aval.shape[:-2]) > 1 and math.prod(in_avals[0].shape[:-2]) == 1


# A batched GEMV whose A is broadcast over the batch and whose whole work one vEU does in about one memory round
# trip runs as ONE uTask covering every batch element (GATHER_BATCH) instead of one uTask per batch element on
# vEUs of their own: a chain of such tiny ops (SkipNet's gate: 1 x 10 @ [4, 10, 10] between ops on one vEU) then
# stays on one vEU, and the grid barriers around it become block syncs. The scheduler asks for it (split's
# `gather_tiny`) outside loop bodies only: inside them the owner layouts (owner.py) place such chains.
TINY_GEMV_GATHER = True


def tiny_gathered_gemv(kind, in_avals, out_aval, outputs_read: int = 0) -> bool:
    """Is this a batched GEMV (A broadcast over the batch, can_gather_batch) that one uTask computes for every
    batch element within two memory round trips (_gemv_tile_cost)?"""
    if not can_gather_batch(kind, in_avals, out_aval):
        return False
    batch, m, n, k = gemm_dims(kind, in_avals, out_aval, {})
    return _gemv_tile_cost(max(m, 1), batch * n, k, outputs_read) <= 2 * ROUND_TRIP_NS


def tiles_per_batch(params, batch: int) -> int:
    """How many batch elements one uTask of a matmul covers (all of them when gathered, else one)."""
    return batch if gathers_batch(params) else 1


def column_split(kind, in_avals, out_avals, tile_n, block, b_onchip=True, params=None, row_block=None):
    """The split of an op in a column layout (owner.py): each uTask writes within one range of `tile_n`
    columns (the output's last axis). A matmul takes tiles of all its M rows by tile_n columns, of every
    batch element at once where it can (can_gather_batch: one staging of A and one reduction per uTask);
    any other kind chunks of tile_n elements (a row's range when tile_n divides the row length, or the row
    has one; a cell chain's of its row shape, each output's). `b_onchip`: the matmul's weights are read
    from the vEU's shared memory (resident.py), else from L2 at a vEU's share of its bandwidth. `row_block`
    (R): the layout's uTasks take blocks of R rows by the column range instead of all rows: a matmul's tiles
    R x tile_n, any other kind 2-D chunks (plan.ROW_BLOCK), uTask t = (row block, range) of each alike."""
    out = out_avals[0]
    if kind in GEMM_KINDS:
        batch, m, n, k = gemm_dims(kind, in_avals, out, {})
        tm = max(min(m, row_block or m), 1)
        gather = can_gather_batch(kind, in_avals, out)
        per_utask = batch if gather else 1
        count = batch // per_utask * math.ceil(m / tm) * math.ceil(n / tile_n)
        params = {"tile_m": tm, "tile_n": tile_n, **({GATHER_BATCH: True} if gather else {})}
        columns = per_utask * tile_n
        if tm == m <= GEMV_ROWS:
            cost = _gemv_tile_cost(tm, columns, k, len(in_avals) - plan.contraction_operands(params or {}))
            if not b_onchip:        # its weights' bytes at L2's share instead of the vEU's own memory
                cost += 4 * k * columns * (1 / BYTES_PER_NS_PER_VEU - 1 / ONCHIP_BYTES_PER_NS_PER_VEU)
        else:
            cost = _gemm_tile_cost(tm, columns, k, len(in_avals) - plan.contraction_operands(params or {}))
        return count, params, cost
    if row_block is not None:
        split = {"chunk": tile_n, plan.ROW_BLOCK: row_block}
        count = plan.chunk_count(split, out.shape)
        rows = max(1, out.size // max(out.shape[-1], 1))
        elements = min(row_block, rows) * min(tile_n, out.shape[-1])
        arrays = len(in_avals) + len(out_avals) - 1
        return count, split, chunk_cost(elements, arrays, block, out.size)
    count = max(1, math.ceil(out.size / tile_n))
    arrays = len(in_avals) + len(out_avals) - 1      # (chunk_cost counts one output)
    return count, {"chunk": tile_n}, chunk_cost(tile_n, arrays, block, out.size)
