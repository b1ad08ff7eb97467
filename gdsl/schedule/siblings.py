"""Sibling matmuls of one wave computed as one op (the scheduler option `siblings`).

Matmuls of a wave that read the same left operand A (one plan Value: the same storage and view) with
different right operands B_i that the loop around them never writes (weights), run on the same vEUs with
the same uTasks, each uTask one whole GEMV tile of a batch element (or a partition), run one after another
on each vEU: A staged, a reduction, a store, three times for Attention's `x @ Wq`, `x @ Wk`, `x @ Wv`. As one
Op (plan.N_PARTS) uTask t stages A once and computes the columns of all of them in one pass, each part's
columns stored where its own op stored them (a window of the K/V cache included, plan.StoreWindow).
Siblings whose B waits in shared memory (resident.py) merge where their tiles lie one after another in the vEUs'
resident regions (keep_resident places a wave's matmuls in order) and each vEU keeps one tile of each (one slot):
the merged op's region is theirs, every part's tile where it was (gemm.stage_resident); resident and read siblings
stay apart.

Each vEU does what it did (the same uTask t of every part, on the same vEU), so the barriers the plan
chose stay right; the pass runs on the finished plan. Only for a backend whose lowering chain has the
"n_parts" rule for matmul (the C family's gemm.py); others keep the separate ops.
"""
from __future__ import annotations

import dataclasses
import math

from gdsl.primitives.linalg import matmul_p
from gdsl.schedule import utasks
from gdsl.schedule.plan import (
    EPILOGUE,
    K_PARTS,
    N_PARTS,
    ROW_INDEX,
    Assign,
    Branch,
    Buffer,
    Call,
    Fork,
    Loop,
    Task,
    Wave,
    walk,
)
from gdsl.schedule.resident import RESIDENT, tile_bytes

# The params that make a matmul Op something other than a plain product of A and B by whole tiles (a resident B,
# RESIDENT, is still one: siblings whose tiles lie one after another in the vEUs' resident regions merge, below).
_EXCLUDED = frozenset({EPILOGUE, K_PARTS, ROW_INDEX, N_PARTS, utasks.GATHER_BATCH})


def merge_siblings(body, functions) -> tuple:
    """(body, functions, merged ops) with every wave's sibling matmuls merged (see the module docstring): a
    B counts as never written in a loop when no statement of that loop (the innermost around the wave)
    writes its storage, and no recursive function does when the loop calls one."""
    function_writes = set().union(*(_writes(f.body) for f in functions)) if functions else set()
    count = [0]
    body = _block(body, None, function_writes, count)
    functions = tuple(dataclasses.replace(f, body=_block(f.body, None, function_writes, count)) for f in functions)
    return body, functions, count[0]


def _writes(block) -> set:
    """The storages that statements of `block` (nested ones included) write."""
    written = set()
    for stmt in walk(block):
        if isinstance(stmt, Wave):
            written |= {v.storage for task in stmt.tasks for v in task.op.outputs}
        elif isinstance(stmt, Assign):
            written.add(stmt.dst.storage)
    return written


def _block(block, written, function_writes, count) -> tuple:
    """`block` with its waves' siblings merged; `written`: what the innermost loop around it writes (None:
    outside loops)."""
    out = []
    for stmt in block:
        if isinstance(stmt, Wave):
            stmt = _wave(stmt, written, count)
        elif isinstance(stmt, Loop):
            inner = _writes(stmt.cond + stmt.body)
            if any(isinstance(s, (Call, Fork)) for s in walk(stmt.cond + stmt.body)):
                inner |= function_writes
            stmt = dataclasses.replace(stmt, cond=_block(stmt.cond, inner, function_writes, count),
                                       body=_block(stmt.body, inner, function_writes, count))
        elif isinstance(stmt, Branch):
            stmt = dataclasses.replace(stmt, branches=tuple(_block(b, written, function_writes, count)
                                                            for b in stmt.branches))
        elif isinstance(stmt, Fork):
            stmt = dataclasses.replace(stmt, first=_block(stmt.first, written, function_writes, count),
                                       between=_block(stmt.between, written, function_writes, count),
                                       second=_block(stmt.second, written, function_writes, count))
        out.append(stmt)
    return tuple(out)


def _key(task, written):
    """What sibling matmul tasks share (None: the task is no candidate): A (its storage and view), the depth,
    the output's batch shape and rows, the types, the vEUs and the uTasks."""
    op = task.op
    if op.kind != matmul_p.name or _EXCLUDED & op.params.keys() or len(op.inputs) != 2 or len(op.outputs) != 1:
        return None
    a, b = op.inputs
    out = op.outputs[0].aval
    m, n = out.shape[-2:]
    one_tile = op.params.get("tile_m", 0) >= m and op.params.get("tile_n", 0) >= n
    if m > utasks.GEMV_ROWS or not one_tile or op.n_utasks != math.prod(out.shape[:-2]):
        return None
    if not isinstance(b.storage, Buffer) or b.dynamic or b.perm is not None or \
            (written is not None and b.storage in written) or not isinstance(a.storage, Buffer):
        return None
    return (id(a.storage), repr(a), a.aval, b.aval.shape[-2], b.aval.dtype, out.shape[:-2], m, out.dtype,
            task.first, task.count, op.n_utasks, op.params.get("tile_m"), op.params.get(utasks.K_CHUNK),
            RESIDENT in op.params)


def _follows(task, group) -> bool:
    """May `task` join `group` as its next part: its B's resident tiles (if any) start where the group's end, so
    that the parts' regions are one region (resident.py): the merged op keeps it, its tiles part by part.
    Only with one slot a vEU: then every part's tile stays where it was, which another op sharing that part's
    region (the same B, split and vEUs: resident._tiles_key) still reads; with a slot a round the merged op would
    lay the region out round by round, not part by part, under that op's reads."""
    if RESIDENT not in task.op.params:
        return True
    start, count, n_slots = group[0].op.params[RESIDENT]
    return n_slots == 1 and task.op.params[RESIDENT] == (start + sum(tile_bytes(t.op) for t in group), count, 1)


def _wave(wave, written, count) -> Wave:
    """`wave` with each group of sibling tasks (the same _key, distinct B, none writing what another reads)
    as one task, at the place of the group's first."""
    groups: dict = {}
    for task in wave.tasks:
        key = _key(task, written)
        if key is not None:
            groups.setdefault(key, []).append(task)
    merged = {}
    for tasks in groups.values():
        group = []
        for task in tasks:
            bs = {t.op.inputs[1].storage for t in group}
            reads = {v.storage for t in group + [task] for v in t.op.inputs}
            writes = {v.storage for t in group + [task] for v in t.op.outputs}
            if task.op.inputs[1].storage not in bs and not reads & writes and (not group or _follows(task, group)):
                group.append(task)
        if len(group) > 1:
            merged[group[0]] = _merged(group)
            merged.update((task, None) for task in group[1:])
            count[0] += len(group) - 1
    if not merged:
        return wave
    return Wave(tuple(merged.get(task, task) for task in wave.tasks if merged.get(task, task) is not None))


def _merged(group) -> Task:
    """One Task computing the matmuls of `group` (siblings) at once (plan.N_PARTS)."""
    first = group[0].op
    widths = tuple(t.op.outputs[0].aval.shape[-1] for t in group)
    out = first.outputs[0].aval
    m, k = out.shape[-2], first.inputs[1].aval.shape[-2]
    params = dict(first.params, tile_n=sum(widths), **{N_PARTS: widths})
    op = dataclasses.replace(first, inputs=(first.inputs[0],) + tuple(t.op.inputs[1] for t in group),
                             outputs=tuple(t.op.outputs[0] for t in group), params=params,
                             cost=utasks.gemv_tile_cost(m, sum(widths), k))
    return Task(op, group[0].first, group[0].count)
