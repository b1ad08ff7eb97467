"""Loop-invariant matmul weights kept in each vEU's shared memory for the whole loop.

A batch-1 matmul in a loop (`h @ W`, M <= GEMV_ROWS rows) is bound by reading W: the uTask's FMAs are few,
and W comes from L2 every iteration (the skewed 10-layer LSTM reads 21 MB per iteration, at L2's
bandwidth). When W is not written inside the loop, each vEU can copy its uTasks' column tiles of W into its
own shared memory once, when the loop starts, and read them from there in every iteration. A GEMM-shaped
matmul (batch 64: tiles of many rows, GEMM_TILES) does the same where its tiles fit; its tile then stages only
A, one L2 round trip less per stage.

The plan says where: the Op carries the param RESIDENT = (offset, count, slots): its uTask t reads its tile
of B at byte `offset + (t // count % slots) * tile_bytes` of the vEU's resident region (t // count is the
round in which the vEU runs it; `count` is the Task's vEU count). `slots` is the number of rounds, or 1 where
every round of a vEU reads the same tile (`slots`, `tile_period`: a partitioned loop's 768 (batch, head) partitions
of Attention on 264 vEUs, whose three rounds on a vEU are one head's). Regions are packed per vEU: ops on
disjoint vEUs may share offsets. Backends that have no such memory get a budget of 0 and plans without the
param.

A recursive function's body is entered once per call, so its weights are staged once per kernel instead:
with the option `resident_calls` (`keep_resident_in_functions`), a GEMV-shaped matmul of a function body whose
B is an input or const the plan never writes (RAE's `W`, read by every inner node) keeps its tiles in the
shared memory of the vEUs that run it, copied when the kernel starts (the C-family renderer's `function_preload`). Those
regions live for the whole kernel, so they start past every loop's region (loops stage theirs at each entry
and would overwrite them otherwise). Not in a plan with Forks: a forked call runs a plan vEU's uTasks on
whichever vEU of its group stands for it, not on the vEU that staged the tiles. For the same reason the loops
of a forked function's body keep no resident tiles either (`without_resident`): a vEU of a group smaller than
the loop's task stands for several plan vEUs, whose tiles would share its one region.
"""
from __future__ import annotations

import dataclasses
import math

from gdsl.primitives.linalg import matmul_p
from gdsl.schedule import utasks
from gdsl.schedule.plan import (
    K_SPLITS,
    N_PARTS,
    Assign,
    Branch,
    Buffer,
    Call,
    Fork,
    Loop,
    Task,
    Wave,
    parts_of_tasks,
    plan_statements,
    rewrite_blocks,
    walk,
)

RESIDENT = "resident"
# GEMM-shaped matmuls (batch 64's tiles of many rows) keep their B tiles resident too, where they fit: the
# C-family wide tile then stages only A and reads B in place. H200, same call, alternated twice (ms): NASRNN bs64
# 11.95 / 11.98 -> 11.12 / 11.10, Seq2seq bs64 0.949 / 0.948 -> 0.853 / 0.861; the LSTM's 64 x 64 tiles (two
# rounds of 64 KiB on 264 vEUs) do not fit, and on 132 vEUs, where they do, the LSTM is slower either way.
GEMM_TILES = True
# Resident tiles start at multiples of this many bytes (the wide tile reads them four floats at a time).
ALIGN = 16
# Partitioned loops keep their weights resident too unless the option resident_partitioned says otherwise (all of a
# loop's or none: keep_resident), sibling matmuls still merged (siblings.py).
PARTITIONED = True
# A vEU whose rounds of a resident matmul read the same tile keeps it once (slots), not once a round: Attention at
# batch 64, 768 partitions on 264 vEUs, then keeps its head's weights (64 KiB) where three rounds' did not fit.
SHARED_SLOTS = True
# A GEMM-shaped matmul's resident rows (K x tile_n) `pad` elements apart more than tile_n where the scheduler is
# given a pad (the option resident_pad: the C-family backends' pipelined tensor-core tile, whose fragment loads of
# rows tile_n apart would fall four lanes to a bank): the op's param RESIDENT_PITCH, the row pitch in elements.
RESIDENT_PITCH = "resident_pitch"


def tile_bytes(op) -> int:
    """Bytes of one uTask's tile of B (K rows x tile_n columns, rows RESIDENT_PITCH apart where the op has one) of a
    matmul; of a matmul gathering its batch (utasks.GATHER_BATCH), the tiles of every batch element, one after
    another ([batch][K][tile_n])."""
    b = op.inputs[1].aval           # (K from B: A may be read in parts, plan.K_PARTS)
    batch = utasks.tiles_per_batch(op.params, math.prod(op.outputs[0].aval.shape[:-2]))
    return batch * b.shape[-2] * op.params.get(RESIDENT_PITCH, op.params["tile_n"]) * b.dtype.itemsize


def tile_period(op) -> int | None:
    """A p for which uTasks t and t + p of a tiled matmul read the same tile of B (the tile `stage_resident`
    copies; uTasks run batch element by batch element, row tile by row tile, column tile by column tile), or
    None where no short one exists: one B (no batch) repeats its tiles every `column tiles` uTasks, a B
    broadcast over the output's leading batch dims only ([h, K, N] under [b, h, M, K]) every `tiles of a batch
    element x prod(B's batch dims)`."""
    out, b = op.outputs[0].aval, op.inputs[1].aval
    tiles_n = -(-out.shape[-1] // op.params["tile_n"])
    if utasks.gathers_batch(op.params):                  # every batch element's columns in one tile
        return tiles_n
    out_batch, b_batch = out.shape[:-2], b.shape[:-2]
    lead = len(out_batch) - len(b_batch)
    if any(d != 1 for d in b_batch) and (b_batch[0] == 1 or b_batch != out_batch[lead:]):
        return None                                      # (B broadcast in a middle or last batch dim)
    if N_PARTS in op.params:                             # (one uTask a batch element: siblings.py)
        return math.prod(b_batch)
    if math.prod(b_batch) == 1:                          # (one B: a uTask's tile is its column range)
        return tiles_n
    return -(-out.shape[-2] // op.params["tile_m"]) * tiles_n * math.prod(b_batch)


def slots(op, count: int) -> int:
    """How many tiles of B each vEU keeps for `op` run on `count` vEUs: one a round, or one for all its rounds
    where they read the same tile (`count` a multiple of tile_period)."""
    rounds = -(-op.n_utasks // count)
    period = tile_period(op) if SHARED_SLOTS and rounds > 1 else None
    return 1 if period and count % period == 0 else rounds


def _eligible(op) -> bool:
    """A GEMV-shaped matmul (the split's tile covers its few rows), or with GEMM_TILES any tiled matmul, not
    made resident yet, nor split over its depth (plan.K_SPLITS: its uTasks read ranges of B's rows)."""
    if op.kind != matmul_p.name or RESIDENT in op.params or K_SPLITS in op.params or "tile_m" not in op.params:
        return False
    m = op.inputs[0].aval.shape[-2]
    return GEMM_TILES or (m <= utasks.GEMV_ROWS and op.params["tile_m"] == m)


def _written(loop: Loop) -> set | None:
    """The buffers a loop writes (None when it calls a function: anything may be written then)."""
    statements = list(walk(loop.cond + loop.body))
    if any(isinstance(stmt, Call) for stmt in statements):
        return None
    return _written_by(statements)


def keep_resident(loop: Loop, budget: int, partitioned: bool = False, pad: int = 0) -> Loop:
    """`loop` with the weights of its body's GEMV-shaped matmuls resident where `budget` bytes per vEU
    allow, in program order (the first waves of an iteration first). A partitioned loop (Loop.parts) only
    with `partitioned` (the option resident_partitioned, on by default: PARTITIONED): there uTask p of every op
    runs on vEU p mod grid, its rounds as in any Task, so the tiles are the same per vEU (Attention's
    heads: each vEU keeps its head's W_q, W_k, W_v and W_o, 64 KB at head size 64). There it is all or none:
    a partition's ops run one after another on its vEU, and where only some fit (Attention at batch 64, three
    rounds of partitions a vEU), the resident ones would split the sibling matmuls of a wave (siblings.py merges
    resident siblings only with resident ones) and the chain would wait on both kinds. `pad`: RESIDENT_PITCH's."""
    written = _written(loop) if budget > 0 and (partitioned or not loop.parts) else None
    if written is None:
        return loop
    # A loop's regions start past those of the loops nested in it (placed first: loops are scheduled inside out),
    # whose tiles each iteration stages anew while this loop's must hold from its start to its end.
    start = _regions_end(walk(loop.cond + loop.body))
    used: dict[int, int] = {}            # vEU -> bytes of its resident region taken (from `start`)
    placed: dict = {}                    # the same tiles on the same vEUs -> their offset (_tiles_key)
    body, left = [], 0                   # (left: eligible tasks that did not fit)
    for stmt in loop.body:
        if isinstance(stmt, Wave):
            tasks = tuple(_resident_task(task, written, used, placed, budget, pad, start) for task in stmt.tasks)
            left += sum(_candidate(task, written) and RESIDENT not in task.op.params for task in tasks)
            stmt = Wave(tasks)
        body.append(stmt)
    if loop.parts and left:
        return loop
    return dataclasses.replace(loop, body=tuple(body))


def _candidate(task: Task, written: set) -> bool:
    """May `task`'s B wait in shared memory: an eligible matmul whose B is a plain buffer the loop never writes."""
    if not _eligible(task.op):
        return False
    b = task.op.inputs[1]
    return isinstance(b.storage, Buffer) and b.storage not in written and not b.dynamic and not b.perm


def _resident_task(task: Task, written: set, used: dict, placed: dict, budget: int, pad: int = 0,
                   start: int = 0) -> Task:
    if not _candidate(task, written):
        return task
    op = task.op
    plain_tiles = N_PARTS not in op.params and not utasks.gathers_batch(op.params)   # ([K][tile_n] tiles)
    if pad and utasks.gemm_shaped(op.inputs[0].aval) and plain_tiles:
        op = dataclasses.replace(op, params={**op.params, RESIDENT_PITCH: op.params["tile_n"] + pad})
    key = _tiles_key(task)
    offset, n_slots = placed.get(key), slots(op, task.count)
    if offset is None:
        size = tile_bytes(op) * n_slots
        veus = range(task.first, task.first + min(task.count, task.op.n_utasks))
        offset = -(-max(used.get(v, start) for v in veus) // ALIGN) * ALIGN
        if offset + size > budget:
            return task
        for v in veus:
            used[v] = offset + size
        placed[key] = offset
    op = dataclasses.replace(op, params={**op.params, RESIDENT: (offset, task.count, n_slots)})
    return Task(op, task.first, task.count)


def _tiles_key(task: Task) -> tuple:
    """What decides the tiles each vEU of a matmul task keeps: the weight (B's storage and view), the split
    and the vEU range. Two tasks with the same key (a matmul twice in a body unrolled twice, unroll.py)
    share one resident region."""
    b = task.op.inputs[1]
    split = tuple(sorted((k, v) for k, v in task.op.params.items()
                         if k in ("tile_m", "tile_n", utasks.GATHER_BATCH)))
    return b.storage, b.offset, b.aval, split, task.op.n_utasks, task.first, task.count


def region_bytes(plan) -> int:
    """The largest resident region any vEU of `plan` needs (0: none)."""
    return _regions_end(plan_statements(plan))


def keep_resident_in_functions(body: tuple, functions: tuple, budget: int, grid: int) -> tuple:
    """`functions` with the weights of their bodies' GEMV-shaped matmuls resident for the whole kernel, where
    `budget` bytes per vEU (of `grid`) allow past the loops' regions (module docstring); unchanged in a plan
    with Forks or without a budget. `body`: the kernel body that calls them (what it writes counts too)."""
    blocks = [body] + [f.body for f in functions]
    statements = [stmt for block in blocks for stmt in walk(block)]
    if budget <= 0 or any(isinstance(stmt, Fork) for stmt in statements):
        return functions
    written = _written_by(statements)
    start = _regions_end(statements)
    used = dict.fromkeys(range(grid), start)      # vEU -> bytes of its resident region taken
    placed: dict = {}
    return tuple(dataclasses.replace(f, body=_resident_block(f.body, written, used, placed, budget))
                 for f in functions)


def without_resident(block: tuple) -> tuple:
    """`block` with none of its matmuls keeping resident tiles (loops included): a forked function's body."""
    def strip(out):
        if isinstance(out[-1], Wave):
            out[-1] = Wave(tuple(_not_resident(task) for task in out[-1].tasks))
    return rewrite_blocks(block, strip)


def _not_resident(task: Task) -> Task:
    if RESIDENT not in task.op.params:
        return task
    params = {k: v for k, v in task.op.params.items() if k != RESIDENT}
    return Task(dataclasses.replace(task.op, params=params), task.first, task.count)


def _written_by(statements) -> set:
    """The buffers that `statements` write (ops' outputs and Assigns' destinations)."""
    out = set()
    for stmt in statements:
        if isinstance(stmt, Wave):
            out |= {v.storage for task in stmt.tasks for v in task.op.outputs}
        elif isinstance(stmt, Assign):
            out.add(stmt.dst.storage)
    return out


def _regions_end(statements) -> int:
    """The end of the largest resident region the resident matmuls among `statements` need (0: none)."""
    end = 0
    for stmt in statements:
        for task in parts_of_tasks(stmt.tasks) if isinstance(stmt, Wave) else ():
            if RESIDENT in task.op.params:
                offset, _, n_slots = task.op.params[RESIDENT]
                end = max(end, offset + n_slots * tile_bytes(task.op))
    return end


def _resident_block(block: tuple, written: set, used: dict, placed: dict, budget: int) -> tuple:
    """`block` with its waves' eligible matmuls resident (through branches; a loop inside stages its own)."""
    out = []
    for stmt in block:
        if isinstance(stmt, Wave):
            stmt = Wave(tuple(_resident_input(task, written, used, placed, budget) for task in stmt.tasks))
        elif isinstance(stmt, Branch):
            stmt = dataclasses.replace(stmt, branches=tuple(_resident_block(b, written, used, placed, budget)
                                                            for b in stmt.branches))
        out.append(stmt)
    return tuple(out)


def _resident_input(task: Task, written: set, used: dict, placed: dict, budget: int) -> Task:
    """`task` resident (as in a loop) when its B is an input or const: only those hold their values from
    the kernel's start, when the tiles are staged."""
    b = task.op.inputs[1].storage if len(task.op.inputs) > 1 else None
    if not isinstance(b, Buffer) or b.kind not in ("input", "const"):
        return task
    return _resident_task(task, written, used, placed, budget)


def function_resident_tasks(block):
    """The tasks of `block` (a recursive function's body) staged when the kernel starts: its resident
    matmuls outside loops (a loop's are staged at the loop)."""
    for stmt in block:
        if isinstance(stmt, Wave):
            yield from (task for task in parts_of_tasks(stmt.tasks) if RESIDENT in task.op.params)
        elif isinstance(stmt, Branch):
            for b in stmt.branches:
                yield from function_resident_tasks(b)
