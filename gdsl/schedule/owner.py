"""Owner-computes placement: column layouts that keep a matmul and its elementwise epilogue on one vEU.

A recurrent cell is a few matmuls (`h @ W` with W's gates stacked on a leading axis: [G, rows, n]) whose
results are read only by elementwise ops, each reading the gate matrices at fixed offsets (`gates[g]`, a
view at g * rows * n) and writing [rows, n]. Split as usual, the matmul's column tile j of gate g and the
epilogue's chunk of the same columns sit on different vEUs: a grid barrier between them. Here the whole
chain takes one *column layout*: every op of it writes within column ranges of `tile_n` of the output's
last axis and runs on the same `count` vEUs from `first`. A matmul's uTask is the tile of all its rows by
range j of EVERY gate at once where A is broadcast over the gates (utasks.GATHER_BATCH: one staging of A
and one reduction for the G gathered column pieces, instead of G uTasks), else of one gate; anything else
takes chunks of tile_n elements, a cell chain too (rows.py: the cell's elementwise ops as one multi-output
ROWS op, split in chunks of its row shape, plan.row_chunk: the vEU then runs ONE uTask for the whole cell of
its columns). Then uTask t of any of them runs on vEU first + (its column range mod
count), for every gate and every row: the vEU that runs the epilogue for columns J computed every gate
column it reads, and the hazards module (hazards.py) finds a vEU-local sync where the grid barrier was.

The vEU count (_count): when uTask t of every op of the chain is range t (gathered matmuls, elementwise
ops of one row: batch 1) any count works, so the chain takes all the vEUs it is given, tile_n =
ceil(n / count) and a shorter last range; with more rows (a row's chunks are uTasks row * ranges + j)
count divides the number of ranges and tile_n divides n (a chunk must not run across a row's end). The
tiling (_tiling) is the one the cost model estimates fastest, B tiles costed from shared memory when the
chain's tiles fit resident.py's budget per vEU and from L2 when not; a chain is laid out only where that
beats its ops on their own splits by the grid barriers it saves (column_layouts: at batch 64, chunks of
a few columns per row would be hundreds of rounds per vEU).

Row blocks (batch > 1): where the backend's lowering chain has the "row_block" rule for every non-matmul op of
the chain (the scheduler option `row_blocks`), the layout may give each uTask a block of R rows by a column
range instead (plan.ROW_BLOCK: 2-D chunks; the matmul's tiles R x tile_n of every gate), uTask t = (row block,
range) of every op alike, so any count works and a vEU runs one cell uTask a step for its rows and columns
(_row_blocks, _tiling; the switch FORCE_ROW_BLOCK forces R).

The chains are found from the segment's dataflow, never from a model: ops are joined when one reads the
other's result column for column (an elementwise op or copy whose input has the same last axis, read at
an offset that is a whole number of rows); a chain is laid out when it holds a matmul of at most MAX_ROWS
rows and an op reading it so. Matmuls *reading* a chain's result (the next layer's `h @ W_ih`) read whole
rows, so they do not join it: each layer of a stacked recurrence is a chain of its own, on vEUs of its own.

Inside a loop this removes the matmul -> epilogue barrier only when nothing else needs it: the next
iteration's matmuls read the whole state that the epilogue overwrites, so the scheduler uses the layout
on loop bodies unrolled twice (unroll.py: the state double-buffered) and keeps the result only where the
plan has fewer grid barriers per step (Scheduler option `owner`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from gdsl.primitives.linalg import matmul_p
from gdsl.primitives.registry import ELEMENTWISE, family_of
from gdsl.primitives.structural import dynamic_update_slice_p
from gdsl.schedule import utasks
from gdsl.schedule.partition import BARRIER_NS, LOCAL_SYNC_NS, UTASK_NS
from gdsl.schedule.plan import COPY, ROW_SHAPE, ROWS, STEPS, Buffer, Value, is_cell_chain

MAX_ROWS = 64          # a matmul with more rows is not latency-bound: its split stays the scheduler's own
MAX_TILE_N = 64        # the widest column range of a layout (the GEMM tile routine's widest tile)
# The blocks of rows a layout of several rows may give each uTask (GEMM tile heights, utasks.GEMM_TILES), besides
# all of its rows (plan.ROW_BLOCK, on a backend with the "row_block" rule).
ROW_BLOCKS = (8, 16, 32)
# Module switch, for tests and measurements: every layout of several rows that may take row blocks takes this
# one (rows per uTask; one at least the rows: all of them) instead of the cost model's choice; None: its choice.
FORCE_ROW_BLOCK: int | None = None


@dataclass(frozen=True)
class Layout:
    """An op's place in a column layout: `tile_n` columns per uTask, on vEUs [first, first + count); with
    `row_block` (R) uTask t = (i, j) covers rows [i*R, (i+1)*R) by column range j (plan.ROW_BLOCK), else all
    rows (a non-matmul op then takes chunks of tile_n elements: a row's range)."""
    first: int
    count: int
    tile_n: int
    row_block: int | None = None


@dataclass(eq=False)
class Node:
    """An op of the segment, as the layout search sees it."""
    key: object                    # the scheduler's item
    kind: str
    inputs: tuple[Value, ...]
    output: Value                  # (a ROWS op's first output: all of a cell chain's have its row shape)
    params: dict = field(default_factory=dict)      # a ROWS op's (its row shape and steps); a matmul's K_PARTS
    more_outputs: tuple[Value, ...] = ()            # a ROWS op's other outputs

    @property
    def outputs(self) -> tuple[Value, ...]:
        return (self.output,) + self.more_outputs


def column_layouts(nodes: list[Node], grid: int, block: int, resident_bytes: int = 0, row_blocks=None) -> dict:
    """key -> Layout for the ops of every chain worth laying out (see the module docstring); the chains
    share the grid in equal parts (`block`: threads per vEU; `resident_bytes`: the shared memory per vEU for
    loop-invariant weights, resident.py; `row_blocks(kind)`: may an op of that kind take 2-D chunks,
    plan.ROW_BLOCK; None: none may). Empty when there is none or the grid is too small to give each one."""
    candidates = [n for n in nodes if _columns(n) is not None]
    writer = {out.storage: n for n in candidates for out in n.outputs}
    parent = {id(n): n for n in candidates}

    def root(n):
        while parent[id(n)] is not n:
            parent[id(n)] = parent[id(parent[id(n)])]
            n = parent[id(n)]
        return n

    consumers = set()
    for n in candidates:
        for value in n.inputs:
            producer = writer.get(value.storage)
            if producer is not None and producer is not n and _reads_columns(n, value, _columns(producer)):
                parent[id(root(n))] = root(producer)
                consumers.add(id(n))
    chains: dict = {}
    for n in candidates:
        chains.setdefault(id(root(n)), []).append(n)
    chains = [c for c in chains.values()
              if any(n.kind == matmul_p.name for n in c) and any(id(n) in consumers for n in c)]
    if not chains or grid // len(chains) < 1:
        return {}
    budget = grid // len(chains)
    layouts, first = {}, 0
    for chain in chains:
        ns, tile_n, count, row_block = _tiling(chain, budget, block, resident_bytes, row_blocks)
        if ns > _unplaced_ns(chain, budget, block) + _steps(chain) * (BARRIER_NS - LOCAL_SYNC_NS):
            continue              # the layout costs more than the grid barriers it saves
        for n in chain:
            layouts[n.key] = Layout(first, count, tile_n, row_block)
        first += count
    return layouts


def _steps(chain: list[Node]) -> int:
    """How many matmul -> reader grid barriers the layout turns into vEU-local syncs: one per step of the
    loop body (a body unrolled twice has two), counted as the longest run of the chain's matmuls one
    reading another's result (through the chain's elementwise ops), plus one."""
    before: dict = {}               # storage -> the most matmuls on a path of chain ops into its writer
    most = 0
    for node in chain:              # (in program order: a storage written later is the last iteration's)
        into = max((before.get(v.storage, 0) for v in node.inputs), default=0)
        if node.kind == matmul_p.name:
            most = max(most, into)
            into += 1
        for out in node.outputs:
            before[out.storage] = into
    return 1 + most


def _unplaced_ns(chain: list[Node], budget: int, block: int) -> float:
    """The chain's time without a layout, for comparison with its layout's (_tiling): each op on its own
    at its best split (utasks.split_options, the balancing's) on `budget` vEUs, its busiest vEU's rounds."""
    total = 0.0
    for node in chain:
        in_avals, out_avals = [v.aval for v in node.inputs], [v.aval for v in node.outputs]
        options = utasks.split_options(node.kind, in_avals, out_avals, node.params, block) or \
            [utasks.split(node.kind, in_avals, out_avals, node.params, budget, block)]
        total += min(-(-n // budget) * (cost + UTASK_NS) for n, _, cost in options)
    return total


def _columns(node: Node) -> int | None:
    """The length of the output's last axis when the op can take a column layout, else None: a matmul
    of at most MAX_ROWS rows, an op split into chunks of output elements, or a cell chain (a ROWS op whose
    steps are all at the element, plan.is_cell_chain: it may be split so too), writing whole buffers."""
    out = node.output
    if not all(_whole_buffer(value) for value in node.outputs):
        return None
    if node.kind == ROWS.name:
        return out.aval.shape[-1] if is_cell_chain(node.params[STEPS], node.params[ROW_SHAPE]) else None
    if node.kind == matmul_p.name:
        return out.aval.shape[-1] if out.aval.ndim >= 2 and out.aval.shape[-2] <= MAX_ROWS else None
    if node.kind in utasks.ELEMENTWISE_KINDS and node.kind != dynamic_update_slice_p.name:
        return out.aval.shape[-1]          # (an update in place is split over its window, not its output)
    return None


def _whole_buffer(value: Value) -> bool:
    """Is `value` a whole buffer of at least one axis and one element?"""
    return value.aval.ndim > 0 and isinstance(value.storage, Buffer) and not value.offset and \
        value.aval.size == value.storage.aval.size and value.aval.size > 0


def _reads_columns(node: Node, value: Value, n: int) -> bool:
    """Does `node` read `value` (a result of length-n rows) column for column: output column j from input
    column j, at any row? (A cell chain reads its inputs broadcast to its row shape, as a fused chain does:
    _columns admits only those ROWS ops.)"""
    if node.kind not in (COPY.name, ROWS.name) and family_of(node.kind) != ELEMENTWISE:
        return False
    shape = value.aval.shape
    return bool(shape) and shape[-1] == n == node.output.aval.shape[-1] and value.offset % n == 0 and \
        not value.dynamic and value.perm is None


def _tiling(chain: list[Node], budget: int, block: int, resident_bytes: int,
            row_blocks=None) -> tuple[float, int, int, int | None]:
    """(estimated ns, tile_n, count, row_block) for a chain whose rows have n columns, on at most `budget`
    vEUs: of the column ranges the layout allows (_count), and of the row blocks (_row_blocks: all rows, or
    with `row_blocks` blocks of rows where every op of the chain can take them), the one the cost model
    (utasks.py) estimates fastest: the busiest vEU's rounds of every op of the chain. Only tilings whose
    matmul uTasks read a multiple of 8 columns compete when there are any (gdsl_gemv_tile's column threads:
    with fewer than 8 a uTask reads B in pieces shorter than a memory sector).

    The weights: a tiling whose matmul tiles (every matmul of the chain, the busiest vEU's rounds of each)
    do not fit the resident budget (resident.py's `resident_bytes` per vEU) is costed with B read from L2
    at a vEU's share of its bandwidth, not rejected: without the budget (resident=False, a backend with no
    shared memory for it) every tiling reads B so, and the layout is still worth its barrier."""
    n = _columns(chain[0])
    options = []
    blocks = _row_blocks(chain, row_blocks)
    for row_block in (None,) * (FORCE_ROW_BLOCK is None or not blocks) + blocks:
        for tile_n in range(1, min(n, MAX_TILE_N) + 1):
            count = _count(chain, n, tile_n, budget, row_block)
            if count is None:
                continue
            onchip = _weight_bytes(chain, tile_n, count, block, row_block) <= resident_bytes
            splits = [utasks.column_split(node.kind, [v.aval for v in node.inputs], [v.aval for v in node.outputs],
                                          tile_n, block, b_onchip=onchip, params=node.params, row_block=row_block)
                      for node in chain]
            ns = sum(-(-utasks_count // count) * (cost + UTASK_NS)
                     for node, (utasks_count, _, cost) in zip(chain, splits))
            aligned = all(_utask_columns(node, tile_n) % 8 == 0 for node in chain if node.kind == matmul_p.name)
            options.append((ns, tile_n, count, row_block or 0, aligned))
    if any(option[-1] for option in options):
        options = [option for option in options if option[-1]]
    ns, tile_n, count, row_block, _ = min(options)
    return ns, tile_n, count, row_block or None


def _row_blocks(chain: list[Node], allowed) -> tuple[int, ...]:
    """The row blocks R (plan.ROW_BLOCK) a chain's layout may take: where every matmul has the same M > 1
    rows, every other op writes M rows and may take 2-D chunks (`allowed(kind)`), and reads the chain's
    results at whole batch elements (so that its row r is row r of each gate), ROW_BLOCKS' below M and M
    itself (all rows by a column range: one uTask per range for the cell as for the matmul); else none."""
    matmuls = [node for node in chain if node.kind == matmul_p.name]
    rows = {node.output.aval.shape[-2] for node in matmuls}
    if allowed is None or len(rows) != 1 or (m := rows.pop()) <= 1:
        return ()
    n = _columns(chain[0])
    written = {out.storage for node in chain for out in node.outputs}
    for node in chain:
        if node.kind == matmul_p.name:
            continue
        if not allowed(node.kind) or any(out.aval.size != m * n for out in node.outputs):
            return ()
        if any(v.storage in written and v.offset % (m * n) for v in node.inputs):
            return ()
    if FORCE_ROW_BLOCK is not None:
        return (min(FORCE_ROW_BLOCK, m),)
    return tuple(r for r in ROW_BLOCKS if r < m) + (m,)


def _count(chain: list[Node], n: int, tile_n: int, budget: int, row_block: int | None = None) -> int | None:
    """The vEUs a chain's layout of `tile_n` columns takes (at most `budget`), None where it cannot take
    that width. uTask t of an op must run on the vEU of its column range j: vEU t mod count when
    (t mod count) == (j mod count) for all of them. An op whose uTask t *is* range t (a matmul gathering
    its batch or having none, an elementwise op of one row) allows any count; a row of several ranges
    (uTask t = row * ranges + j, the same for a batched matmul's tiles) needs count to divide the number
    of ranges. A last range shorter than tile_n is possible only when every elementwise op has one row
    (with more, a chunk of tile_n elements would run across the end of a row). With a `row_block`, uTask t
    of every op is (row block, range) t alike (2-D chunks, a matmul's R-row tiles): any count, or where a
    matmul keeps one tile per batch element one dividing the row blocks times the ranges."""
    ranges = -(-n // tile_n)
    if row_block is not None:
        rows = next(node.output.aval.shape[-2] for node in chain if node.kind == matmul_p.name)
        units = -(-rows // row_block) * ranges
        if all(_range_is_utask(node) for node in chain):
            return min(units, budget)
        return max(d for d in range(1, min(units, budget) + 1) if units % d == 0)
    one_row = all(node.kind == matmul_p.name or node.output.aval.size == n for node in chain)
    if n % tile_n and not one_row:
        return None
    if one_row and all(_range_is_utask(node) for node in chain):
        return min(ranges, budget)
    return max(d for d in range(1, min(ranges, budget) + 1) if ranges % d == 0)


def _range_is_utask(node: Node) -> bool:
    """Is uTask t of this op (in a column layout) column range t of one row?"""
    if node.kind != matmul_p.name:
        return True                    # (elementwise, one row: _count checks)
    out = node.output.aval
    return math.prod(out.shape[:-2]) == 1 or utasks.can_gather_batch(node.kind, [v.aval for v in node.inputs], out)


def _utask_columns(node: Node, tile_n: int) -> int:
    """The columns a matmul's uTask computes in a layout of tile_n: every batch element's when gathered."""
    out = node.output.aval
    gather = utasks.can_gather_batch(node.kind, [v.aval for v in node.inputs], out)
    return tile_n * (math.prod(out.shape[:-2]) if gather else 1)


def _weight_bytes(chain: list[Node], tile_n: int, count: int, block: int, row_block: int | None = None) -> int:
    """The bytes of B tiles the busiest vEU of a layout keeps resident: per distinct weight (a matmul
    repeated in an unrolled loop body reads the same tiles: resident.py shares them), its rounds of
    tiles of K rows by the uTask's columns."""
    weights = {}
    for node in chain:
        if node.kind != matmul_p.name:
            continue
        a, b = node.inputs[0].aval, node.inputs[1].aval
        utasks_count = utasks.column_split(node.kind, [a, b], [node.output.aval], tile_n, block,
                                           row_block=row_block)[0]
        key = (node.inputs[1].storage, node.inputs[1].offset)
        weights[key] = -(-utasks_count // count) * b.shape[-2] * _utask_columns(node, tile_n) * b.dtype.itemsize
    return sum(weights.values())
