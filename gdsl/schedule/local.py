"""Block-local temporaries: workspace buffers that only one vEU ever touches, kept in its shared memory (the
scheduler option `smem_temps`).

A temporary whose every element is written and read by uTasks of one vEU only (Attention bs1's per-head chain
q -> scores -> softmax -> context in a partitioned loop, NASRNN bs1's gate columns between a vEU's GEMV and its
cell) never needs to leave that vEU's SM: each dependent op otherwise pays a store and an L2 round trip. Such a
buffer can live in the vEU's shared memory at the same element indices: every vEU holds a whole copy of the
buffer's index space and touches only its part (no index remapping, no change to any op).

Found from the plan's accesses (shares.py, uTask by uTask, the vEU of uTask t being `first + t % count`): a
buffer is block-local when it is a temp (not an input, output, const or frame), every element any op touches is
touched by one vEU only (a read share shares.py does not know exactly counts as the whole operand), no
uniform statement, assignment or run-time offset reads it, it is not published by a flag sync (flags.py), and
no op a backend may render as a view (hazards.MAYBE_VIEWS) reads or writes it. Only device-control plans of one
kernel without recursive functions. Buffers are taken smallest first while they fit in `budget` bytes per vEU
past the resident weights' region (resident.region_bytes).

With `loops_only` (LOOPS, the C family's default) only buffers that some wave of a loop's body touches are
taken: there each dependent op's round trip recurs every step (Attention bs1 on the H200, session 12: 0.156 /
0.162 -> 0.140 / 0.132 ms, NASRNN bs1 2.87 / 2.82 -> 2.66 / 2.69), while the straight-line temps of BlockDrop
and SkipNet bs1 gained nothing (0.147 / 0.189 -> 0.150 / 0.194 ms; 2.49 / 2.54 -> 2.57 / 2.55, SkipNet's 59
buffers filling its shared memory).

The plan records the choice in Plan.block_local: (Buffer, byte offset) pairs, the offsets from the start of
the block-local region, which a backend places after its resident region (the C family: at
GDSL_LOCAL_BASE of gdsl_smem). Every element is written before it is read within a launch (a program reads
no temp it has not written: the workspace is not cleared between launches either), but the renderer still
zeroes the region when the kernel starts, so that a stale value never differs between the two memories.
Backends without such memory ignore the mark (the CPU backend keeps every buffer in its workspace).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from gdsl.schedule import utasks
from gdsl.schedule.flags import published_in
from gdsl.schedule.hazards import MAYBE_VIEWS
from gdsl.schedule.plan import Buffer, Loop, Sync, Wave, walk
from gdsl.schedule.resident import ALIGN, region_bytes
from gdsl.schedule.shares import read_share, storage_elements, write_share

NONE, SEVERAL = -1, -2
LOOPS = "loops"     # the scheduler's smem_temps value for "only temps a loop body touches"


def block_local(plan, budget: int, loops_only: bool = False):
    """`plan` with its block-local temporaries (module docstring) in Plan.block_local, within `budget` bytes
    per vEU of shared memory (the resident-weight budget, less what the resident weights take); with
    `loops_only`, only those that a wave in a loop's body touches."""
    if plan.control != "device" or plan.functions or len(plan.kernels) != 1:
        return plan
    room = budget - -(-region_bytes(plan) // ALIGN) * ALIGN
    body = plan.kernels[0].body
    found = local_buffers(body, room, _touched_in_loops(body) if loops_only else None)
    chosen = sorted(found, key=lambda b: (_nbytes(b), b.name))
    placed, end = [], 0
    for buf in chosen:
        if end + _nbytes(buf) > room:
            break
        placed.append((buf, end))
        end = -(-(end + _nbytes(buf)) // ALIGN) * ALIGN
    return dataclasses.replace(plan, block_local=tuple(placed)) if placed else plan


def local_bytes(plan) -> int:
    """Bytes of the block-local region of `plan` (0: none)."""
    return max((offset + _nbytes(buf) for buf, offset in plan.block_local), default=0)


def _nbytes(buf: Buffer) -> int:
    return buf.aval.size * buf.aval.dtype.itemsize


def local_buffers(body: tuple, max_bytes: int, among: set | None = None) -> list:
    """The temps of a device-control kernel `body` of at most `max_bytes` (and in `among`, when given) that one
    vEU each touches."""
    stmts = list(walk(body))
    owners: dict = {}                                   # Buffer -> vEU per element (NONE, SEVERAL)
    excluded = set(published_in(body))
    for stmt in stmts:
        if isinstance(stmt, Wave):
            for task in stmt.tasks:
                if task.op.kind in MAYBE_VIEWS:
                    excluded |= {v.storage for v in task.op.inputs + task.op.outputs}
                excluded |= {term.index.storage for v in task.op.inputs + task.op.outputs for term in v.terms}
        elif not isinstance(stmt, (Sync, Loop)):        # uniform ops, assignments, branch indices
            excluded |= {v.storage for v in _other_values(stmt)}
    def wanted(buf):
        return buf.kind == "temp" and buf.frame_of is None and buf not in excluded and _nbytes(buf) <= max_bytes \
            and (among is None or buf in among)

    shared = set()              # buffers already seen on two vEUs: their other shares are not computed
    for stmt in stmts:
        if not isinstance(stmt, Wave):
            continue
        for task in stmt.tasks:
            for buf, elements, veu in _accesses(task, lambda b: wanted(b) and b not in shared):
                owner = owners.setdefault(buf, np.full(buf.aval.size, NONE, np.int32))
                seen = owner[elements]
                owner[elements] = np.where((seen == NONE) | (seen == veu), veu, SEVERAL)
                if np.any(owner[elements] == SEVERAL):
                    shared.add(buf)
    return [buf for buf, owner in owners.items() if buf not in excluded and buf not in shared]


def _touched_in_loops(body: tuple) -> set:
    """The buffers that the waves of the loops in `body` (their tests and bodies) read or write."""
    return {v.storage for loop in walk(body) if isinstance(loop, Loop)
            for wave in walk(loop.cond + loop.body) if isinstance(wave, Wave)
            for task in wave.tasks for v in task.op.inputs + task.op.outputs}


def _other_values(stmt):
    """The Values a statement other than a wave, sync or loop reads or writes."""
    for name in ("ops", "dst", "src", "index", "in_place"):
        item = getattr(stmt, name, None)
        for x in item if isinstance(item, tuple) else (item,) if item is not None else ():
            yield from (x.inputs + (x.output,)) if hasattr(x, "output") else (x,)


def _accesses(task, wanted):
    """(Buffer, its storage elements, vEU) of every uTask's writes and reads of `task` of the buffers
    `wanted` says (shares.py; the whole buffer where a share is not known exactly: a dynamic window, a read
    share of None)."""
    op = task.op
    outs = [(k, v) for k, v in enumerate(op.outputs) if isinstance(v.storage, Buffer) and wanted(v.storage)]
    ins = [(k, v) for k, v in enumerate(op.inputs) if isinstance(v.storage, Buffer) and wanted(v.storage)]
    dynamic = utasks.first_start(op.kind) is not None
    for t in range(op.n_utasks if outs or ins else 0):
        veu = task.first + t % task.count
        for k, value in outs:
            if wanted(value.storage):   # (asked again: a buffer found on two vEUs is no longer wanted)
                exact = not (value.dynamic or value.terms or dynamic)
                yield value.storage, _elements(value, write_share(op, t, k) if exact else None), veu
        for k, value in ins:
            if wanted(value.storage):
                share = None if dynamic or value.dynamic or value.terms else read_share(op, k, t)
                yield value.storage, _elements(value, share), veu


def _elements(value, flat):
    """The storage elements of `value`'s elements `flat` (None: all of its storage, conservatively)."""
    if flat is None:
        return slice(None)
    return storage_elements(value, np.asarray(flat, np.int64))
