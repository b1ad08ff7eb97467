"""Loop-invariant matmul weights kept in each vEU's shared memory for the whole loop.

A batch-1 matmul in a loop (`h @ W`, M <= GEMV_ROWS rows) is bound by reading W: the uTask's FMAs are few,
and W comes from L2 every iteration (the skewed 10-layer LSTM reads 21 MB per iteration, at L2's
bandwidth). When W is not written inside the loop, each vEU can copy its uTasks' column tiles of W into its
own shared memory once, when the loop starts, and read them from there in every iteration.

The plan says where: the Op carries the param RESIDENT = (offset, count): its uTask t reads its tile of B
at byte `offset + (t // count) * tile_bytes` of the vEU's resident region (t // count is the round in
which the vEU runs it; `count` is the Task's vEU count). Regions are packed per vEU: ops on disjoint vEUs
may share offsets. Backends that have no such memory get a budget of 0 and plans without the param.
"""
from __future__ import annotations

import dataclasses
import math

from gdsl.primitives.linalg import matmul_p
from gdsl.schedule import utasks
from gdsl.schedule.plan import Assign, Buffer, Call, Loop, Task, Wave, plan_statements, walk

RESIDENT = "resident"


def tile_bytes(op) -> int:
    """Bytes of one uTask's tile of B (K rows x tile_n columns) of a matmul; of a matmul gathering its
    batch (utasks.GATHER_BATCH), the tiles of every batch element, one after another ([batch][K][tile_n])."""
    a, b = op.inputs[0].aval, op.inputs[1].aval
    batch = utasks.tiles_per_batch(op.params, math.prod(op.outputs[0].aval.shape[:-2]))
    return batch * a.shape[-1] * op.params["tile_n"] * b.dtype.itemsize


def _eligible(op) -> bool:
    """A GEMV-shaped matmul (the split's tile covers its few rows) not made resident yet."""
    if op.kind != matmul_p.name or RESIDENT in op.params:
        return False
    m = op.inputs[0].aval.shape[-2]
    return m <= utasks.GEMV_ROWS and op.params.get("tile_m") == m


def _written(loop: Loop) -> set | None:
    """The buffers a loop writes (None when it calls a function: anything may be written then)."""
    out = set()
    for stmt in walk(loop.cond + loop.body):
        if isinstance(stmt, Call):
            return None
        if isinstance(stmt, Wave):
            out |= {v.storage for task in stmt.tasks for v in task.op.outputs}
        elif isinstance(stmt, Assign):
            out.add(stmt.dst.storage)
    return out


def keep_resident(loop: Loop, budget: int) -> Loop:
    """`loop` with the weights of its body's GEMV-shaped matmuls resident where `budget` bytes per vEU
    allow, in program order (the first waves of an iteration first)."""
    written = _written(loop) if budget > 0 and not loop.parts else None
    if written is None:
        return loop
    used: dict[int, int] = {}            # vEU -> bytes of its resident region taken
    placed: dict = {}                    # the same tiles on the same vEUs -> their offset (_tiles_key)
    body = []
    for stmt in loop.body:
        if isinstance(stmt, Wave):
            stmt = Wave(tuple(_resident_task(task, written, used, placed, budget) for task in stmt.tasks))
        body.append(stmt)
    return dataclasses.replace(loop, body=tuple(body))


def _resident_task(task: Task, written: set, used: dict, placed: dict, budget: int) -> Task:
    if not _eligible(task.op) or not isinstance(task.op.inputs[1].storage, Buffer) or \
            task.op.inputs[1].storage in written or task.op.inputs[1].dynamic or task.op.inputs[1].perm:
        return task
    key = _tiles_key(task)
    offset = placed.get(key)
    if offset is None:
        size = tile_bytes(task.op)
        rounds = -(-task.op.n_utasks // task.count)
        veus = range(task.first, task.first + min(task.count, task.op.n_utasks))
        offset = max(used.get(v, 0) for v in veus)
        if offset + rounds * size > budget:
            return task
        for v in veus:
            used[v] = offset + rounds * size
        placed[key] = offset
    op = dataclasses.replace(task.op, params={**task.op.params, RESIDENT: (offset, task.count)})
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
    end = 0
    for stmt in plan_statements(plan):
        if isinstance(stmt, Wave):
            for task in stmt.tasks:
                if RESIDENT in task.op.params:
                    offset, count = task.op.params[RESIDENT]
                    end = max(end, offset + -(-task.op.n_utasks // count) * tile_bytes(task.op))
    return end

