"""Back-edge barriers: the grid barrier that ends a loop body becomes a block barrier where nothing around the back
edge needs it.

A loop body's last segment ends in a grid barrier (Scheduler._emit: what runs after a segment may sit on any
vEU). After it come the body's last uniform statements, the loop's condition, then the body's first
statements up to its first grid barrier (the `head`); on the way out, the condition and the statements after
the loop up to their first grid barrier (the kernel's end counts as one). When no wave of the head touches an
element that another vEU wrote in the last segment (the `tail`: the statements since the body's previous grid
barrier), nor overwrites one another vEU read there (hazards.py, from the uTasks' exact shares), no uniform of
the head reads a buffer element the tail wrote, and no wave of the head writes a buffer the tail's uniforms read
(every vEU reads those), then a block barrier orders all that needs ordering: each vEU's own accesses in program
order, and everything else by the head's first grid barrier, which every vEU passes after its own tail.

Where the exit path fails the check, or is not known here (a loop inside another loop or a branch, with no grid
barrier after it there), a grid barrier goes right after the loop: one a loop instead of one a step. (Only a loop
body's last barrier is demoted, and only when no loop lies between it and the body's grid barrier before it: an
inner loop's exit path that reaches an outer body's barrier never reaches one that is demoted.)

Seq2seq's step ends with its token stored into the output's window by one vEU, which nothing before the next
step's first grid barrier reads: with the argmax a uniform (scheduler.UNIFORM_REDUCTION_MAX_INPUT) the step keeps
three grid barriers of four.

Only a device-control kernel's loops (not partitioned, nothing staged), whose tails and heads are waves,
block barriers and uniform statements; the simulator (simulate.py) checks the result like any plan.
"""
from __future__ import annotations

import dataclasses

from gdsl.schedule.hazards import Hazards
from gdsl.schedule.plan import Assign, Branch, Buffer, Loop, Sync, Uniforms, Wave

# Off: every loop body keeps its last grid barrier (for A/B timing).
DEMOTE_BACK_EDGES = True


def demote_back_edges(body) -> tuple[tuple, int, int]:
    """(`body` with its loops' back-edge barriers demoted where that is safe, barriers demoted, grid barriers
    added after loops for their exits)."""
    counts = [0, 0]

    def block(stmts, after):     # after: what runs once `stmts` is done (None: not known here; []: the end)
        # (A loop's exit path in a nested block is followed where a grid barrier comes before the block's end.)
        out = []
        for i, stmt in enumerate(stmts):
            if isinstance(stmt, Loop):
                rest = list(stmts[i + 1:]) + after if after is not None else \
                    list(stmts[i + 1:]) if any(isinstance(s, Sync) and s.always_grid for s in stmts[i + 1:]) else None
                stmt = dataclasses.replace(stmt, cond=block(stmt.cond, None), body=block(stmt.body, None))
                stmt, exit_sync = _demoted(stmt, rest, counts)
                out.append(stmt)
                if exit_sync:
                    out.append(Sync("grid"))
            elif isinstance(stmt, Branch):
                out.append(dataclasses.replace(stmt, branches=tuple(block(b, None) for b in stmt.branches)))
            else:
                out.append(stmt)
        return tuple(out)

    if not DEMOTE_BACK_EDGES:
        return tuple(body), 0, 0
    body = block(tuple(body), [])
    return body, counts[0], counts[1]


def _demoted(loop: Loop, rest, counts) -> tuple[Loop, bool]:
    """(`loop` with its body's last grid barrier a block barrier, whether its exit needs a grid barrier after
    it), or (`loop`, False) unchanged."""
    if loop.parts or loop.staged:
        return loop, False
    body = list(loop.body)
    grids = [i for i, s in enumerate(body) if isinstance(s, Sync) and s.always_grid]
    if len(grids) < 2:
        return loop, False
    prev, last = grids[-2], grids[-1]
    tail, after_last = body[prev + 1:last], body[last + 1:]
    if not all(_plain(s) for s in tail + after_last):
        return loop, False
    head = _until_grid(after_last + list(loop.cond) + body)
    if head is None or not _unordered_ok(tail, head):
        return loop, False
    exit_path = None if rest is None else _until_grid(after_last + list(loop.cond) + rest)
    exit_sync = exit_path is None or not _unordered_ok(tail, exit_path)
    body[last] = Sync("block")
    counts[0] += 1
    counts[1] += exit_sync
    return dataclasses.replace(loop, body=tuple(body)), exit_sync


def _plain(stmt) -> bool:
    """A statement whose accesses hazards.py and this module follow: a wave, a block barrier, uniform ops, an
    assignment of uniforms."""
    if isinstance(stmt, Assign):
        return not isinstance(stmt.dst.storage, Buffer)
    return isinstance(stmt, (Wave, Uniforms)) or isinstance(stmt, Sync) and stmt.scope == "block"


def _until_grid(stmts) -> list | None:
    """`stmts` up to the first grid barrier (all of them if none); None if another kind of statement comes first
    (a loop, a branch, a call: what they run is not followed here)."""
    out = []
    for stmt in stmts:
        if isinstance(stmt, Sync) and stmt.always_grid:
            return out
        if not _plain(stmt):
            return None
        out.append(stmt)
    return out


def _unordered_ok(tail, head) -> bool:
    """Can `head` run after `tail` with block barriers only between them (see the module docstring)?"""
    hazards = Hazards()
    hazards.start([s for s in tail + head if isinstance(s, Wave)])
    uniform_reads = {v.storage for s in tail for v in _uniform_inputs(s) if isinstance(v.storage, Buffer)}
    for stmt in tail:
        if isinstance(stmt, Wave):
            hazards.record(stmt)
    for stmt in head:
        if isinstance(stmt, Wave):
            if not hazards.local(stmt) or any(v.storage in uniform_reads
                                              for task in stmt.tasks for v in task.op.outputs):
                return False
            hazards.record(stmt)
        elif hazards.written(_uniform_inputs(stmt)):
            return False
    return True


def _uniform_inputs(stmt) -> list:
    """The values a uniform statement reads (on every vEU)."""
    if isinstance(stmt, Uniforms):
        return [v for op in stmt.ops for v in op.inputs]
    if isinstance(stmt, Assign):
        return [stmt.src]
    return []
