"""A step's read-only operands fetched into L1 before the step's waits (render.PREFETCH_STEP_READS).

In a top-level loop of a device-control kernel, an op often reads a buffer that no statement of the loop
writes: an input, a const, or a temp written before the loop, maybe at a run-time offset (the hoisted input
projections of an RNN cell, `t1[2048*clamp(u9, 0, 999) + 256 +: 256]`; an embedding row). Its uTask loads it
from L2 only after the step's flag waits and whatever runs before it: a dependent L2 round trip on the step's
critical path. The dialect's prefetch (`prefetch.global.L1` on CUDA: fire and forget, no register) issued by
the vEU at the top of the step, after the uniform statements that compute the offsets and before the first
wait, makes those loads hit L1.

A grid barrier invalidates L1 (its __threadfence is MEMBAR.SC.GPU + CCTL.IVALL on sm_90): a line fetched
before one is gone after it. So an op's prefetch goes at the top of the step only when no grid barrier
(`fences`) lies between the top and the op, else right after the last one before the op; and only when a
wave lies between that point and the op (else the uTask's own loads follow at once: nothing to overlap). A
flag sync (volatile loads, no fence) and a block barrier keep L1.

Which elements: shares.read_share gives what uTask t reads of each operand; a prefetch is emitted when the
shares are one pattern moved by a constant stride per uTask (`share(t) == share(0) + t * stride`, clipped
to the operand: the last uTask of a ragged split), else none. One prefetch per 128-byte line (the line of
each element known when the operand's start is known modulo a line; else the first element of every 128
bytes of each contiguous run and its last), spread over the vEU's threads, at most MAX_LINES per vEU per
step: the operands at a run-time offset first (a static one is likely still in L1 from the last step).
Never for a buffer the loop writes (or a view of one), a block-local temp, a frame buffer, a permuted or
gathered view, a resident matmul weight (read from shared memory), or an operand whose offset uses a
uniform the step assigns before the op; nor in a loop with a call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gdsl.schedule.plan import Assign, Call, Fork, Sync, Uniform, Uniforms, Wave, walk
from gdsl.schedule.resident import RESIDENT
from gdsl.schedule.shares import read_share

LINE = 128                # bytes of an L1 line
MAX_LINES = 64            # prefetches per vEU per step at most (and at most one per thread of the vEU)
MAX_UTASKS = 1024         # ops of more uTasks are not examined (the share of each uTask is compared)


@dataclass(frozen=True)
class Operand:
    """An operand to prefetch for each uTask t of a task: elements `offset(t) + e` of the value (`points`,
    sorted, `offset(t) = t * stride`), each clamped to `size - 1` when `clip`; `lines` per uTask."""
    task: object
    index: int
    at: int                   # the loop body's statement the prefetch goes before
    stride: int
    points: tuple
    clip: bool

    @property
    def lines(self) -> int:
        return len(self.points)


def insertion_index(body) -> int:
    """Where a step's prefetches go: after the body's leading uniform statements (Uniforms, Assign)."""
    return next((i for i, s in enumerate(body) if not isinstance(s, (Uniforms, Assign))), len(body))


def fences(body, demoted=frozenset()) -> set:
    """Indices of the statements of `body` that invalidate L1 on some path: a grid barrier (not one of the
    `demoted` indices, rendered as a block barrier), or a statement holding one."""
    return {i for i, s in enumerate(body) if i not in demoted and
            any(isinstance(n, Sync) and n.scope == "grid" for n in walk([s]))}


def _assigned(stmts) -> set:
    """The uniforms `stmts` (and their nested statements) assign."""
    out = set()
    for s in walk(stmts):
        if isinstance(s, Uniforms):
            out |= {u.output.storage for u in s.ops}
        elif isinstance(s, Assign):
            out.add(s.dst.storage)
    return {u for u in out if isinstance(u, Uniform)}


def pattern(op, k: int, n: int):
    """(stride, first uTask's elements, clipped) when every uTask t < n of `op` reads of input k the first
    uTask's elements moved by t * stride (clipped to the operand), else None."""
    size = op.inputs[k].aval.size
    first = read_share(op, k, 0)
    if first is None or len(first) == 0:
        return None
    first = np.unique(np.asarray(first, np.int64))
    stride, clipped = 0, False
    for t in range(1, n):
        share = read_share(op, k, t)
        if share is None:
            return None
        share = np.unique(np.asarray(share, np.int64))
        if t == 1:
            stride = int(share[0] - first[0]) if len(share) else 0
        moved = first + t * stride
        inside = moved[moved < size]
        clipped |= len(inside) < len(moved)
        if len(share) != len(inside) or not np.array_equal(share, inside):
            return None
    return stride, first, clipped


def line_points(first, itemsize: int, phase: int | None) -> tuple:
    """The elements whose lines cover `first` (sorted element numbers): with the operand's start `phase`
    bytes into a line, the first element in each line; without (unknown), the first element of every
    LINE bytes of each contiguous run, and the run's last."""
    if phase is not None:
        lines = (phase + first * itemsize) // LINE
        keep = np.concatenate([[True], lines[1:] != lines[:-1]])
        return tuple(int(e) for e in first[keep])
    per_line = max(LINE // itemsize, 1)
    points = []
    breaks = np.flatnonzero(np.diff(first) != 1) + 1
    for run in np.split(first, breaks):
        a, last = int(run[0]), int(run[-1])
        points += list(range(a, last + 1, per_line))
        if points[-1] != last:
            points.append(last)
    return tuple(points)


def progressions(points) -> list:
    """`points` as arithmetic progressions (start, step, count), greedily."""
    out = []
    for p in points:
        if out:
            start, step, count = out[-1]
            if count == 1 and p > start:
                out[-1] = (start, p - start, 2)
                continue
            if p == start + step * count:
                out[-1] = (start, step, count + 1)
                continue
        out.append((p, 1, 1))
    return out


class StepPrefetch:
    """The prefetches of the steps of a Renderer's top-level loops (Renderer.prefetched); `max_lines`: per vEU
    per step (MAX_LINES when None), at most one per thread."""

    def __init__(self, renderer, max_lines: int | None = None):
        self.r = renderer
        self.max_lines = min(MAX_LINES if max_lines is None else max_lines, renderer.plan.block)

    def root(self, buf):
        """The buffer a renderer view (views.find_views) points into, through views of views."""
        while buf in self.r.views:
            buf = self.r.views[buf].source.buffer
        return buf

    def operands(self, loop) -> list:
        """The Operands of the steps of `loop` to prefetch, in the order they are chosen."""
        stmts = list(walk(loop.cond + loop.body))
        if any(isinstance(s, (Call, Fork)) for s in stmts):
            return []
        written = {self.root(v.buffer) for s in stmts if isinstance(s, Wave) for t in s.tasks
                   for v in t.op.outputs if v.buffer is not None}
        body = loop.body
        start, fenced = insertion_index(body), fences(body, self.r.demoted(body))
        found = []
        for i in range(start, len(body)):
            at = max([start] + [j + 1 for j in fenced if j < i])
            if not isinstance(body[i], Wave) or not any(isinstance(s, Wave) for s in body[at:i]):
                continue
            changed = _assigned(body[at:i])
            for task in body[i].tasks:
                found += [c for k in range(len(task.op.inputs))
                          if (c := self.operand(task, k, at, written, changed)) is not None]
        found.sort(key=lambda c: not c.task.op.inputs[c.index].terms)       # run-time offsets first (stable)
        load = [0] * self.r.plan.grid
        chosen, seen = [], set()
        for c in found:
            n, count = c.task.op.n_utasks, c.task.count
            key = (repr(c.task.op.inputs[c.index]), c.task.first, count, n, c.stride, c.points)
            if key in seen:             # the same lines for the same uTasks (two ops reading one bias)
                continue
            veus = range(c.task.first, c.task.first + min(n, count))
            lines = c.lines * math.ceil(n / count)
            if max(load[v] for v in veus) + lines <= self.max_lines:
                chosen.append(c)
                seen.add(key)
                for v in veus:
                    load[v] += lines
        return chosen

    def operand(self, task, k: int, at: int, written: set, changed: set):
        """The Operand of input k of `task`, prefetched before statement `at`, if it is one to prefetch (module
        docstring; `changed`: the uniforms assigned from `at` to the task), else None."""
        op, v = task.op, task.op.inputs[k]
        buf = v.buffer
        if buf is None or op.outputs[0].buffer in self.r.views or v.perm is not None or v.rows is not None:
            return None
        view = self.r.views.get(buf)
        if view is not None and view.perm is not None:
            return None
        root = self.root(buf)
        if root in written or root in self.r.local or root.kind == "frame" or buf.kind == "frame":
            return None
        if k == 1 and RESIDENT in op.params:
            return None
        if any(term.index.storage in changed for term in v.terms if isinstance(term.index.storage, Uniform)):
            return None
        if op.n_utasks > MAX_UTASKS:
            return None
        found = pattern(op, k, op.n_utasks)
        if found is None:
            return None
        stride, first, clip = found
        itemsize = v.aval.dtype.itemsize      # (the start's line phase is known when every offset keeps it)
        aligned = view is None and all(term.stride * itemsize % LINE == 0 for term in v.terms) and \
            stride * itemsize % LINE == 0
        phase = v.offset * itemsize % LINE if aligned else None
        return Operand(task, k, at, stride, line_points(first, itemsize, phase), clip)

    def lines(self, loop) -> dict:
        """The C lines of `loop`'s prefetches by the index of the body statement they go before, one statement
        per task."""
        r, thread = self.r, self.r.dialect.thread_index
        by_task: dict = {}
        for c in self.operands(loop):
            by_task.setdefault((c.at, id(c.task)), (c.at, c.task, []))[2].append(c)
        slot = [0] * r.plan.grid
        out: dict = {}
        for at, task, operands in sorted(by_task.values(), key=lambda x: x[0]):
            veus = range(task.first, task.first + min(task.op.n_utasks, task.count))
            first_slot = max(slot[v] for v in veus)
            lines = sum(c.lines for c in operands)
            for v in veus:
                slot[v] = first_slot + lines

            def statement(t, task=task, operands=operands, first_slot=first_slot):
                parts, s = [], first_slot
                for c in operands:
                    value = task.op.inputs[c.index]
                    for start, step, count in progressions(c.points):
                        parts.append(self.prefetch(value, c, t, start, step, count, s, thread))
                        s += count
                return "{ " + " ".join(parts) + " }"
            if at not in out:
                out[at] = ["// prefetch into L1 what this vEU's uTasks read this step of buffers the loop does "
                           "not write (render.PREFETCH_STEP_READS)"]
            out[at] += r.over_utasks(task, statement)
        return out

    def prefetch(self, value, c: Operand, t: str, start: int, step: int, count: int, slot: int, thread) -> str:
        """One progression of prefetches: thread slot + j fetches element t * stride + start + j * step."""
        terms = [f"({t})" if c.stride == 1 else f"({t}) * {c.stride}"] if c.stride else []
        terms += [str(start)] if start else []
        if count == 1:
            test = f"{thread} == {slot}"
        else:
            j = f"((int){thread} - {slot})" if slot else f"(int){thread}"
            test = f"(unsigned)({j}) < {count}u" if slot else f"{thread} < {count}"
            terms.append(j if step == 1 else f"{j} * {step}")
        index = " + ".join(terms) or "0"
        if c.clip:
            size = value.aval.size
            index = f"({index}) < {size} ? ({index}) : {size - 1}"
        pointer = f"{self.r.ptr(value)} + ({index})" if terms else self.r.ptr(value)
        return f"if ({test}) {self.r.dialect.prefetch_template.format(ptr=pointer)}"
