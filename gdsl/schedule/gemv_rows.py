"""A row chain between two GEMVs, computed as one uTask (plan.GEMV_ROWS_GEMV).

Attention's `softmax(q · Kᵀ) · V` for one query row is three ops a step in a partitioned loop: the scores (a
GEMV), the softmax (a row chain, rows.py) and the weighted sum (a GEMV), each uTask t on vEU t, a block
barrier between them. Each is a few hundred cycles of latency: B loaded, A staged, a block barrier, a reduction
through shared memory, a store, the barrier after the op; the row chain's one row takes one warp while the
others wait. As one uTask the second GEMV's B is loaded first, with the first's (one memory round trip, not
two after each other), the scores go to shared memory, every warp runs the row chain on the whole row itself
(warp shuffles, no block barrier), and the second GEMV reads the chain's values from the lanes that hold them
(cfamily/gemv_rows.py): three block barriers where there were seven, and nothing stored but the result.

The pattern, found in a block of the finished plan (the innermost loop body or anywhere else), nothing here
knowing a model:

    wave [op1]   a matmul, one uTask per batch element of one output row ([..., 1, L]), whole (tile_n >= L),
                 its output a plain temp
    sync block
    wave [op2]   a ROWS op on op1's output rows (row shape [..., 1, L], one row a uTask, one output: a row
                 step), its row on chip (L <= warp x ROW_SLOTS)
    sync block
    wave [op3]   a matmul whose left operand is op2's output (a plain temp), one uTask per batch element of
                 one output row [..., 1, N] (N <= the block's threads)

each wave of that one task, the three tasks on the same vEUs with the same uTasks, and the two temps read
by nothing else in the plan (not outputs, not carries). Each uTask t then reads what uTask t of the three ops
read and writes what op3's writes, on the same vEU (shares.py and hazards.py look through the parts), so the
barriers the plan chose around them stay right. Only for a backend whose lowering chain has the op's "utask"
rule (the C family's); ENABLED is the switch (on; `benchmarks/kernel_ab.py` flips it).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from gdsl.primitives.linalg import matmul_p
from gdsl.schedule import utasks
from gdsl.schedule.plan import (
    CHAIN_INPUTS,
    CHAIN_PARTS,
    GEMV_ROWS_GEMV,
    K_PARTS,
    K_SPLITS,
    N_PARTS,
    ROW_INDEX,
    ROW_SHAPE,
    ROWS,
    STEP_OUTPUTS,
    STEPS,
    Assign,
    Op,
    Sync,
    Task,
    Uniforms,
    Wave,
    plan_statements,
    rewrite_blocks,
    row_chunk,
)
from gdsl.schedule.rows import ROW_SLOTS

ENABLED = True
# The lanes the C family's lowering gives the row (a warp; its narrowest, CUDA's, bounds the row's length).
WARP = 32
# The params that make a matmul Op something other than a product of A and B by whole tiles.
_EXCLUDED = frozenset({K_PARTS, ROW_INDEX, N_PARTS, K_SPLITS, utasks.GATHER_BATCH})


def fuse_gemv_rows(plan):
    """`plan` with every GEMV -> row chain -> GEMV of the module docstring as one op; the plan's stats count them
    (`gemv_rows_gemv`)."""
    readers = _readers(plan)
    count = [0]

    def fold(out):
        if len(out) >= 5 and (task := _fused(out[-5:], readers, plan.block)) is not None:
            out[-5:] = [Wave((task,))]
            count[0] += 1

    def block(stmts):
        return rewrite_blocks(stmts, fold)

    kernels = tuple(dataclasses.replace(k, body=block(k.body),
                                        functions=tuple(dataclasses.replace(f, body=block(f.body))
                                                        for f in k.functions)) for k in plan.kernels)
    functions = tuple(dataclasses.replace(f, body=block(f.body)) for f in plan.functions)
    if not count[0]:
        return plan
    stats = dict(plan.stats, **{GEMV_ROWS_GEMV.name: count[0]})
    for key in ("ops", "waves", "block_syncs"):          # (each pattern: three ops, waves and two syncs -> one)
        stats[key] = stats.get(key, 0) - 2 * count[0]
    return dataclasses.replace(plan, kernels=kernels, functions=functions, stats=stats)


def _readers(plan) -> dict:
    """Storage -> how many times the plan reads it (op inputs, uniform ops, assignments, the plan's outputs)."""
    counts: dict = {}

    def note(value):
        counts[value.storage] = counts.get(value.storage, 0) + 1

    for stmt in plan_statements(plan):
        if isinstance(stmt, Wave):
            for task in stmt.tasks:
                for value in task.op.inputs:
                    note(value)
        elif isinstance(stmt, Uniforms):
            for u in stmt.ops:
                for value in u.inputs:
                    note(value)
        elif isinstance(stmt, Assign):
            note(stmt.src)
    for value in plan.outputs:
        note(value)
    return counts


def _fused(stmts, readers, block) -> Task | None:
    """The one Task for [wave, sync, wave, sync, wave] when they are the pattern (module docstring), else None."""
    w1, s1, w2, s2, w3 = stmts
    if not (isinstance(w1, Wave) and isinstance(w2, Wave) and isinstance(w3, Wave) and
            all(isinstance(s, Sync) and s.scope == "block" for s in (s1, s2)) and
            len(w1.tasks) == len(w2.tasks) == len(w3.tasks) == 1):
        return None
    tasks = (w1.tasks[0], w2.tasks[0], w3.tasks[0])
    if any(t.preload or (t.first, t.count, t.op.n_utasks) != (tasks[0].first, tasks[0].count, tasks[0].op.n_utasks)
           for t in tasks):
        return None
    op1, op2, op3 = (t.op for t in tasks)
    if op1.kind != matmul_p.name or op2.kind != ROWS.name or op3.kind != matmul_p.name:
        return None
    scores, chained = op1.outputs[0] if len(op1.outputs) == 1 else None, op2.outputs[0]
    if not (_gemv_row(op1) and _gemv_row(op3) and scores is not None and _private(scores, readers) and
            len(op2.outputs) == 1 and _private(chained, readers) and op3.inputs[0].storage is chained.storage and
            _whole(op3.inputs[0])):
        return None
    length = scores.aval.shape[-1]
    p = op2.params
    if row_chunk(op2) is not None or p.get("rows") != 1 or tuple(p[ROW_SHAPE]) != scores.aval.shape or \
            length > WARP * ROW_SLOTS or p[STEPS][p[STEP_OUTPUTS][0]].per_row(p[ROW_SHAPE]):
        return None
    reads = [k for k, v in enumerate(op2.inputs) if v.storage is scores.storage]
    if len(reads) != 1 or not _whole(op2.inputs[reads[0]]) or \
            op3.outputs[0].aval.shape[-1] > block or op3.outputs[0].aval.shape[:-2] != scores.aval.shape[:-2]:
        return None
    if not all(v.aval.dtype == np.float32 for v in (scores, chained, op3.outputs[0])):
        return None
    inputs = [(0, k) for k in range(len(op1.inputs))] + [(1, k) for k in range(len(op2.inputs)) if k != reads[0]] + \
        [(2, k) for k in range(1, len(op3.inputs))]
    parts = (op1, op2, op3)
    op = Op(f"{op1.name.split('_', 1)[0]}_{GEMV_ROWS_GEMV.name}", GEMV_ROWS_GEMV.name,
            tuple(parts[i].inputs[k] for i, k in inputs), op3.outputs,
            {CHAIN_PARTS: parts, CHAIN_INPUTS: tuple(inputs)}, op1.n_utasks, op1.cost + op2.cost + op3.cost)
    return Task(op, tasks[0].first, tasks[0].count)


def _gemv_row(op) -> bool:
    """Is matmul `op` one whole output row per uTask, one uTask per batch element, of plain operands and output?"""
    out = op.outputs[0].aval
    return not (_EXCLUDED & op.params.keys()) and len(op.outputs) == 1 and out.shape[-2] == 1 and \
        op.params.get("tile_n", 0) >= out.shape[-1] and op.n_utasks == math.prod(out.shape[:-2])


def _private(value, readers) -> bool:
    """Is `value` a whole temp outside recursive frames that the plan reads once (its reader in the pattern)?"""
    buf = value.buffer
    return _whole(value) and buf.kind == "temp" and buf.frame_of is None and readers.get(buf, 0) == 1


def _whole(value) -> bool:
    """Is `value` its whole buffer as it is: no window, offset, permutation or gathered rows?"""
    buf = value.buffer
    return buf is not None and value.aval == buf.aval and not value.offset and not value.terms and \
        value.perm is None and value.window is None and value.rows is None
