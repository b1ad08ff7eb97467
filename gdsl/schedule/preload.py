"""Step preloads: an elementwise op's loads of what its step does not change, issued one wave early.

In a latency-bound loop step each wave waits for the one before (a barrier, a flag wait) and then for its own
loads from memory: NASRNN's cell, one element a vEU, reads eight rows of the input projection computed before
the loop and its carry `c`, an L2 round trip after the GEMV that it waits for. Those elements are known
before the GEMV finishes: nothing between there and the cell writes them. So the thread that will compute an
element loads them into registers before the wave before the op (`Task.preload`: the op's input numbers), and
the op's function takes the values instead of loading them (cfamily: a `<name>_p` parameter a preloaded
input's element reads). The loads are then in flight while the vEU runs the wave before (and waits for its
flags): one round trip less on the step's critical path.

Which ops: the waves of a device-control kernel's top-level loop bodies; elementwise-like ops computed element
by element (fused chains, elementwise primitives, cell chains), in one round of uTasks (each vEU one uTask)
of at most `block` elements (each thread one element), with a wave before them in the body and only barriers
or flag syncs in between, and no more than MAX_PRELOADS_PER_WAVE inputs in all for the wave (all are live
across the wave before; more measured slower). Which inputs: buffers in memory (not shared memory: a
block-local temp, NASRNN's second cell's `c`, gained nothing on the H200) read at the op's own element (the
output's shape: no broadcast, no permuted view), whose elements, where they are written in the loop at all,
are written by the same vEU that reads them (hazards.py's exact shares), by a wave with a barrier between it
and the preload and none of the waves from the preload to the op; a buffer written before the loop counts
when a grid barrier (or a kernel start) lies between that write and the loop.
A view's run-time offset (uniforms) is read where the preload is; no uniform statement lies in between.

Measured on the H200 (session 17, `benchmarks/preload_ab.py`: CUDA events, 60 launches each, alternating): first as
a hand edit of the NASRNN bs1 kernel, 2.75 -> 2.03 and 2.68 -> 1.99 ms in two processes; this pass 2.746 -> 2.059
and 2.675 -> 2.061 (docs/performance.md, session 17).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from gdsl.primitives.registry import ELEMENTWISE, family_of
from gdsl.schedule import hazards
from gdsl.schedule.plan import (
    FUSED,
    ROW_BLOCK,
    ROW_SHAPE,
    ROWS,
    STEPS,
    Assign,
    Buffer,
    Loop,
    Sync,
    Uniforms,
    Wave,
    is_cell_chain,
    walk,
)
from gdsl.schedule.rows import row_group

# Off: no preloads (for A/B timing).
PRELOAD_STEP_READS = True
# The most preloads one wave may have: all of them are live across the wave before (the compiler cannot tell
# that a vEU runs one task of the wave). Measured on the H200 (session 17, benchmarks/preload_ab.py): NASRNN bs1
# with 9 and 8 2.75 -> 2.06 ms; the LSTM bs1's ten cells of a wave with 128 in all 0.367 -> 0.393 ms, with no
# spills either way (ptxas: 128 registers, 0 bytes spilled; why it is slower is not known); so a wave whose tasks
# would take more preloads gets none.
MAX_PRELOADS_PER_WAVE = 16


def step_preloads(plan):
    """`plan` with its top-level loop bodies' preloadable inputs marked (Task.preload)."""
    if not PRELOAD_STEP_READS or plan.control != "device" or not plan.kernels:
        return plan
    local = {buf for buf, _ in plan.block_local}
    kernels, count = [], 0
    for kernel in plan.kernels:
        body = list(kernel.body)
        for index, stmt in enumerate(body):
            if isinstance(stmt, Loop) and not stmt.parts and not stmt.staged and \
                    not any(isinstance(s, Wave) for s in walk(stmt.cond)):    # (the back edge passes cond)
                before = _written_before(body[:index])
                loop_body, marked = _loop_preloads(stmt.body, plan.block, local, before)
                if marked:
                    body[index] = dataclasses.replace(stmt, body=loop_body)
                    count += marked
        kernels.append(dataclasses.replace(kernel, body=tuple(body)))
    if not count:
        return plan
    stats = dict(plan.stats, preloaded_inputs=count)
    return dataclasses.replace(plan, kernels=tuple(kernels), stats=stats)


def _written_before(stmts) -> set:
    """The storages written by the kernel statements `stmts` (before a loop) after their last grid barrier:
    a preload could read them before some barrier of the loop body orders them."""
    written: set = set()
    for stmt in stmts:
        if isinstance(stmt, Sync) and stmt.always_grid:
            written.clear()
        else:           # a wave, or what the waves nested in a loop or a branch write
            written |= {v.storage for s in walk([stmt]) if isinstance(s, Wave) for t in s.tasks
                        for v in t.op.outputs}
    return written


def _loop_preloads(body, block: int, local, before) -> tuple[tuple, int]:
    """(the loop body with its tasks' preloads marked, how many inputs were marked)."""
    body = list(body)
    if any(not isinstance(s, (Wave, Sync, Uniforms, Assign)) for s in body):
        return tuple(body), 0          # nested control flow: not here
    writers = _writers(body)
    marked = 0
    for i, stmt in enumerate(body):
        if not isinstance(stmt, Wave):
            continue
        p = previous_wave(body, i)
        if p is None:
            continue
        tasks = []
        for task in stmt.tasks:
            inputs = () if not _eligible(task, block) else tuple(
                k for k in range(len(task.op.inputs)) if _preloadable(body, task, k, p, i, local, before, writers))
            tasks.append(dataclasses.replace(task, preload=inputs) if inputs else task)
        count = sum(len(t.preload) for t in tasks)
        if 0 < count <= MAX_PRELOADS_PER_WAVE:
            body[i] = dataclasses.replace(stmt, tasks=tuple(tasks))
            marked += count
    return tuple(body), marked


def previous_wave(body, i: int) -> int | None:
    """The index of the wave before body[i] with one sync or more and nothing else between them, else None."""
    j = i - 1
    while j >= 0 and isinstance(body[j], Sync):
        j -= 1
    return j if 0 <= j < i - 1 and isinstance(body[j], Wave) else None


def next_wave(body, i: int) -> int | None:
    """The index of the wave after body[i] with one sync or more and nothing else between them, else None."""
    j = i + 1
    while j < len(body) and isinstance(body[j], Sync):
        j += 1
    return j if i + 1 < j < len(body) and isinstance(body[j], Wave) else None


def _eligible(task, block: int) -> bool:
    """An op computed element by element, one uTask a vEU, each thread at most one element."""
    op = task.op
    if ROW_BLOCK in op.params or op.n_utasks > task.count:
        return False
    if op.kind == ROWS.name:
        shape = op.params[ROW_SHAPE]
        if not is_cell_chain(op.params[STEPS], shape) or not _thread_per_element(shape[-1], block):
            return False
    elif op.kind != FUSED.name and family_of(op.kind) != ELEMENTWISE:
        return False
    return op.params.get("chunk", math.prod(element_shape(op))) <= block


# The warps of the C-family dialects (CUDA's 32 lanes, HIP's 32 or 64): a ROWS uTask lays its rows on groups of
# lanes of one of them (rows.row_group), and the scheduler does not know which.
WARPS = (32, 64)


def _thread_per_element(length: int, block: int) -> bool:
    """Does thread t of a cell chain's uTask of rows `length` long compute element t on every C-family warp: the
    whole block on each row in turn, or a group of lanes exactly as long as the row? (A row of 6 on groups of 8
    lanes: thread 9 computes element 7, and a preload of element 9 for it fed the op another element's value;
    found by a randomized sweep, session 33.)"""
    return all(row_group(length, False, block, warp) in (None, length) for warp in WARPS)


def element_shape(op) -> tuple:
    """The shape an elementwise-like op's uTasks split (a row chain's row shape, else its output's)."""
    return tuple(op.params[ROW_SHAPE]) if op.kind == ROWS.name else op.outputs[0].aval.shape


def _writers(body) -> dict:
    """storage -> [(body index, task, output number)] of every write in the loop body."""
    out: dict = {}
    for j, stmt in enumerate(body):
        if isinstance(stmt, Wave):
            for task in stmt.tasks:
                for number, value in enumerate(task.op.outputs):
                    out.setdefault(value.storage, []).append((j, task, number))
    return out


def _preloadable(body, task, k: int, p: int, i: int, local, before, writers) -> bool:
    """Is input k of `task` (in the wave at body[i]) unchanged from the start of the wave at body[p] to the op,
    and ordered before body[p] wherever the loop writes it (the module docstring)?"""
    value = task.op.inputs[k]
    buf = value.buffer
    if not isinstance(buf, Buffer) or buf in local or value.perm is not None or value.rows is not None \
            or value.window is not None or value.frame_offset or value.aval.shape != element_shape(task.op) \
            or value.storage in before:
        return False
    if any(value.storage is v.storage for v in task.op.outputs):
        return False
    for j, writer, number in writers.get(value.storage, ()):
        if p <= j <= i:                   # written between the preload and the op
            return False
        if not _sync_between(body, j, p) or not _same_veus(task, k, writer, number):
            return False
    return True


def _sync_between(body, j: int, p: int) -> bool:
    """Is there a sync after body[j] and before body[p], going round the loop's back edge if need be?"""
    path = body[j + 1:p] if j < p else body[j + 1:] + body[:p]
    return any(isinstance(s, Sync) for s in path)


def _same_veus(reader, k: int, writer, number: int) -> bool:
    """Does every element of the reader's input k that the writer's output `number` writes get written by the
    vEU that reads it (hazards.py's exact shares)?"""
    out_veus = hazards._output_veus(reader)
    written_veus = hazards._output_veus(writer, number)
    if out_veus is None or written_veus is None or writer.op.outputs[number].dynamic:
        return False
    read, read_veus = hazards._read(reader, k, out_veus)
    wrote = hazards.storage_elements(writer.op.outputs[number], np.arange(writer.op.outputs[number].aval.size))
    if isinstance(read, slice) or isinstance(wrote, slice) or np.ndim(read_veus) == 0:
        return False
    by_element = dict(zip(np.asarray(wrote).tolist(), np.asarray(written_veus).tolist()))
    return all(by_element.get(e, v) == v for e, v in zip(np.asarray(read).tolist(), np.asarray(read_veus).tolist()))
