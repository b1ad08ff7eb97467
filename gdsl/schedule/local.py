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

Staged carries (`smem_carries`, with smem_temps where the switch SMEM_CARRIES is on): a partitioned loop's output
or temp that it writes, whose every access by the uTasks on vEU v lies in v's slice [v * size, (v + 1) * size),
size = the buffer's elements / the loop's partitions (Attention bs1's K/V caches and x: head h on vEU h), is kept
in the vEU's shared memory while the loop runs (Loop.staged, past the block-local temps): each vEU copies its
slice in when the loop is entered and back when it ends. The accesses are replayed as for temps, a run-time window
counted over its whole range of starts; the slices must be 16-byte multiples (vector loads stay aligned); a grid
barrier (or the kernel's start and end) must stand on both sides of the loop, so that the copy in reads what
every vEU wrote before and the copy out is seen by every vEU after (before the loop, a wave of the loop's
initial carry copies between a grid barrier and a block sync will do where each vEU writes its own slices).
The simulator checks each access of a staged buffer against its vEU's slice (BarrierError). The C-family
renderer copies with gdsl_copy_block and renders the loop in a scope where the buffer's name is a pointer into
the shared copy, shifted by the vEU's slice, so the loop's code indexes it as before.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from gdsl.schedule import utasks
from gdsl.schedule.flags import published_in
from gdsl.schedule.hazards import MAYBE_VIEWS
from gdsl.schedule.plan import Assign, Branch, Buffer, Loop, Staged, Sync, Uniforms, Wave, plan_statements, walk
from gdsl.schedule.resident import ALIGN, region_bytes
from gdsl.schedule.shares import read_share, storage_elements, write_share

NONE, SEVERAL = -1, -2
LOOPS = "loops"     # the scheduler's smem_temps value for "only temps a loop body touches"
# Partitioned loops keep the buffers they write in their vEUs' shared memory too (smem_carries), with smem_temps.
# Off: on the H200 (session 15, ncu kernel times, same call) Attention bs1 ran 103.7 us with its K/V caches and x
# staged and 103.5 without (the only zoo plan it changes): its ops' ~0.5 us each is instruction overhead, not L2.
SMEM_CARRIES = False
# A partitioned loop's temps whose uTask t touches only its partition's slice, where a vEU runs several partitions
# (rounds: Attention bs64's q and context rows, 256 B a partition each, whose whole index space, 196 KB, fits no
# vEU): kept a slot per round, uTask t's slice in slot t // count (Plan.local_slots; the C family passes each
# call a pointer shifted by its uTask). Off: timed in session 34 (H200, kernel µs) it fits on 264 vEUs, where it gave
# 293.7 -> 285.3, but not on the default 396 (partitions in flight), which run 272.6 without it.
SLOTTED_TEMPS = False


def block_local(plan, budget: int, loops_only: bool = False):
    """`plan` with its block-local temporaries (module docstring) in Plan.block_local, within `budget` bytes
    per vEU of shared memory (the resident-weight budget, less what the resident weights take); with
    `loops_only`, only those that a wave in a loop's body touches."""
    if plan.control != "device" or plan.functions or len(plan.kernels) != 1:
        return plan
    room = budget - -(-region_bytes(plan) // ALIGN) * ALIGN
    body = plan.kernels[0].body
    placed, slots, end = [], [], 0
    if SLOTTED_TEMPS:           # (first: a slot a round is smaller than the whole index space)
        found = slotted_buffers(body, _not_movable(body))
        for buf, size, count, rounds in sorted(found, key=lambda c: (c[3] * c[1], c[0].name)):
            nbytes = rounds * size * buf.aval.dtype.itemsize
            if end + nbytes > room:
                break
            placed.append((buf, end))
            slots.append((buf, size, count, rounds))
            end = -(-(end + nbytes) // ALIGN) * ALIGN
    taken = {buf for buf, _ in placed}
    found = local_buffers(body, room - end, _touched_in_loops(body) if loops_only else None)
    for buf in sorted((b for b in found if b not in taken), key=lambda b: (_nbytes(b), b.name)):
        if end + _nbytes(buf) > room:
            break
        placed.append((buf, end))
        end = -(-(end + _nbytes(buf)) // ALIGN) * ALIGN
    return dataclasses.replace(plan, block_local=tuple(placed), local_slots=tuple(slots)) if placed else plan


def local_bytes(plan) -> int:
    """Bytes of the block-local region of `plan`, its temps' and its loops' staged carries' (0: none)."""
    staged = (s.offset + s.size * s.buffer.aval.dtype.itemsize for loop in plan_statements(plan)
              if isinstance(loop, Loop) for s in loop.staged)
    slotted = {buf: rounds * size * buf.aval.dtype.itemsize for buf, size, _, rounds in plan.local_slots}
    return max([offset + slotted.get(buf, _nbytes(buf)) for buf, offset in plan.block_local] + list(staged),
               default=0)


def slotted_buffers(body: tuple, excluded: set) -> list:
    """(Buffer, elements a slot, vEU count, rounds) of the temps that only the waves of one partitioned loop in
    `body` touch, all of them tasks of its partitions (uTask p = partition p) on the same vEUs in more than one
    round, each uTask t within [t * size, (t + 1) * size), size = elements / partitions (a multiple of 16 bytes:
    vector loads stay aligned in every slot), through plain values."""
    uses: dict = {}                                     # Buffer -> [(task, Value)]
    for stmt in walk(body):
        if isinstance(stmt, Wave):
            for task in stmt.tasks:
                for v in task.op.inputs + task.op.outputs:
                    if isinstance(v.storage, Buffer):
                        uses.setdefault(v.storage, []).append((task, v))
    found = []
    for loop in (s for s in walk(body) if isinstance(s, Loop) and s.parts):
        inside = {id(t) for w in walk(loop.cond + loop.body) if isinstance(w, Wave) for t in w.tasks}
        for buf, pairs in uses.items():
            first, count = pairs[0][0].first, pairs[0][0].count
            size = buf.aval.size // loop.parts
            movable = buf.kind == "temp" and buf.frame_of is None and buf not in excluded
            sliced = buf.aval.size % loop.parts == 0 and size * buf.aval.dtype.itemsize % ALIGN == 0
            in_rounds = count < loop.parts and all(
                id(task) in inside and (task.first, task.count) == (first, count) and task.op.n_utasks == loop.parts
                and not (v.offset or v.dynamic or v.perm is not None) for task, v in pairs)
            if movable and sliced and in_rounds and all(_within_own_slice(task, buf, size) for task, _ in pairs):
                found.append((buf, size, count, -(-loop.parts // count)))
    return found


def _within_own_slice(task, buf, size: int) -> bool:
    """Does every uTask t of `task` touch `buf` only within [t * size, (t + 1) * size)?"""
    op = task.op
    if utasks.first_start(op.kind) is not None:         # (a dynamic start: any element)
        return False
    shares = [(v, lambda t, k=k: write_share(op, t, k)) for k, v in enumerate(op.outputs) if v.storage is buf]
    shares += [(v, lambda t, k=k: read_share(op, k, t)) for k, v in enumerate(op.inputs) if v.storage is buf]
    for t in range(op.n_utasks):
        for value, share in shares:
            flat = share(t)
            if flat is None:
                return False
            elements = storage_elements(value, np.asarray(flat, np.int64))
            elements = np.arange(buf.aval.size)[elements] if isinstance(elements, slice) else elements
            if len(elements) and not t * size <= int(elements.min()) <= int(elements.max()) < (t + 1) * size:
                return False
    return True


def smem_carries(plan, budget: int):
    """`plan` with the buffers each partitioned loop writes kept in its vEUs' shared memory while it runs
    (Loop.staged; module docstring), past the block-local temps, within what `budget` bytes per vEU leave
    past the resident weights."""
    if not SMEM_CARRIES or plan.control != "device" or plan.functions or len(plan.kernels) != 1:
        return plan
    kernel = plan.kernels[0]
    room = budget - _aligned(region_bytes(plan))
    excluded = _not_movable(kernel.body) | {buf for buf, _ in plan.block_local}
    state = {"end": _aligned(local_bytes(plan)), "room": room, "excluded": excluded}
    body = _stage_block(kernel.body, state, top=True)
    if body == kernel.body:
        return plan
    return dataclasses.replace(plan, kernels=(dataclasses.replace(kernel, body=body),) + plan.kernels[1:])


def _stage_block(block: tuple, state: dict, top: bool = False) -> tuple:
    """`block` with its partitioned loops' carries staged where a grid barrier (or the kernel's start or
    end) stands on each side of the loop: the copy in then reads what every vEU wrote before, and every vEU
    reads the copy out only after the barrier that follows."""
    out = list(block)
    for i, stmt in enumerate(block):
        if isinstance(stmt, Branch):
            out[i] = dataclasses.replace(stmt, branches=tuple(_stage_block(b, state) for b in stmt.branches))
        elif isinstance(stmt, Loop) and not stmt.parts:
            out[i] = dataclasses.replace(stmt, cond=_stage_block(stmt.cond, state),
                                         body=_stage_block(stmt.body, state))
        elif isinstance(stmt, Loop):
            def fenced(j):       # a grid barrier at block[j], or the kernel's start or end there
                return (j < 0 or j >= len(block)) and top or 0 <= j < len(block) and \
                    isinstance(block[j], Sync) and block[j].always_grid
            # (or, before the loop, a wave between a grid barrier and a block sync whose uTasks on vEU v write
            # the buffers within v's slices: the loop's initial carry copies, scheduler.PARTITIONED_INITS)
            prelude = block[i - 2] if i >= 2 and isinstance(block[i - 1], Sync) and \
                isinstance(block[i - 2], Wave) and fenced(_before_uniforms(block, i - 3)) else None
            if (fenced(i - 1) or prelude is not None) and fenced(i + 1):
                out[i] = _staged_loop(stmt, state, prelude)
    return tuple(out)


def _before_uniforms(block: tuple, j: int) -> int:
    """The index of the last statement at or before block[j] that is not a uniform statement (which writes no
    memory: the loop's scalar carries set before it), -1 where there is none."""
    while j >= 0 and (isinstance(block[j], Uniforms) or isinstance(block[j], Assign) and block[j].dst.is_uniform):
        j -= 1
    return j


def _staged_loop(loop: Loop, state: dict, prelude: Wave | None = None) -> Loop:
    """`loop` with the buffers it writes staged where every vEU's accesses to one stay in its own slice (in
    the loop, and in the `prelude` wave before it)."""
    staged = []
    for buf in sorted(_own_slices(loop, state["excluded"], prelude), key=lambda b: b.name):
        size = buf.aval.size // loop.parts
        end = _aligned(state["end"]) + size * buf.aval.dtype.itemsize
        if end > state["room"]:
            continue
        staged.append(Staged(buf, _aligned(state["end"]), size))
        state["end"] = end
    return dataclasses.replace(loop, staged=tuple(staged)) if staged else loop


def _own_slices(loop: Loop, excluded: set, prelude: Wave | None = None) -> list:
    """The output and temp buffers `loop` writes whose every element the loop's uTasks (and the `prelude`'s)
    on vEU v touch lies in [v * size, (v + 1) * size), size = the buffer's elements / the loop's partitions (a
    run-time offset counted at both ends of its range; a share shares.py does not know exactly: the whole
    operand)."""
    waves = [s for s in walk(loop.cond + loop.body) if isinstance(s, Wave)]
    values = [v for wave in waves for task in wave.tasks for v in task.op.inputs + task.op.outputs]
    written = {v.storage for wave in waves for task in wave.tasks for v in task.op.outputs}
    gathered = {v.storage for v in values if v.rows is not None}       # (rows anywhere in their storage)
    candidates = {b for b in written - gathered if isinstance(b, Buffer) and b.kind in ("output", "temp")
                  and b.frame_of is None and b not in excluded and b.aval.size % loop.parts == 0
                  and b.aval.size // loop.parts * b.aval.dtype.itemsize % ALIGN == 0}   # (16-byte loads stay aligned)
    for wave in waves + ([prelude] if prelude is not None else []):
        for task in wave.tasks:
            for buf, lo, hi, veu in _spans(task, candidates):
                size = buf.aval.size // loop.parts
                if not veu * size <= lo <= hi < (veu + 1) * size:
                    candidates.discard(buf)
    return list(candidates)


def _spans(task, buffers: set):
    """(Buffer, first and last storage element, vEU) of each uTask's accesses of `buffers` in `task`."""
    op = task.op
    operands = [(v, lambda t, k=k: write_share(op, t, k)) for k, v in enumerate(op.outputs)]
    dynamic = utasks.first_start(op.kind) is not None
    operands += [(v, lambda t, k=k: None if dynamic else read_share(op, k, t)) for k, v in enumerate(op.inputs)]
    for value, share in operands:
        if value.storage not in buffers:
            continue
        fixed = dataclasses.replace(value, terms=())
        low = sum(min(0, term.stride * term.high) for term in value.terms)
        high = sum(max(0, term.stride * term.high) for term in value.terms)
        for t in range(op.n_utasks):
            flat = share(t)
            elements = storage_elements(fixed, None if flat is None else np.asarray(flat, np.int64))
            elements = np.arange(value.storage.aval.size)[elements] if isinstance(elements, slice) else elements
            if len(elements):
                yield value.storage, int(elements.min()) + low, int(elements.max()) + high, \
                    task.first + t % task.count


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _nbytes(buf: Buffer) -> int:
    return buf.aval.size * buf.aval.dtype.itemsize


def local_buffers(body: tuple, max_bytes: int, among: set | None = None) -> list:
    """The temps of a device-control kernel `body` of at most `max_bytes` (and in `among`, when given) that one
    vEU each touches."""
    stmts = list(walk(body))
    owners: dict = {}                                   # Buffer -> vEU per element (NONE, SEVERAL)
    excluded = _not_movable(body)
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


def _not_movable(body: tuple) -> set:
    """The buffers of a kernel `body` that must stay where every vEU's plain pointer finds them: read by a
    uniform statement, an assignment or a run-time offset, published by a flag sync, or an operand of an op a
    backend may render as a view (hazards.MAYBE_VIEWS)."""
    excluded = set(published_in(body))
    for stmt in walk(body):
        if isinstance(stmt, Wave):
            for task in stmt.tasks:
                if task.op.kind in MAYBE_VIEWS:
                    excluded |= {v.storage for v in task.op.inputs + task.op.outputs}
                excluded |= {term.index.storage for v in task.op.inputs + task.op.outputs for term in v.terms}
        elif not isinstance(stmt, (Sync, Loop)):        # uniform ops, assignments, branch indices
            excluded |= {v.storage for v in _other_values(stmt)}
    return excluded


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
