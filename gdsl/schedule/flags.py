"""Flag syncs: producer/consumer flags in place of a loop's grid barrier where only a carry crosses it (the
scheduler option `flags`; the idea of NCCL's low-latency protocol).

In a loop body under device control a grid barrier often orders one thing only: the state that this step's
elementwise / cell ops wrote, read by the next step's matmuls as their left operand (NASRNN's `m`, the LSTM's
`h`). Such a barrier becomes `Sync("flags", published=(buffers...))`: a vEU-local sync, plus, for each
*published* buffer, a shadow of 64-bit words (value bits | tag << 32) that its one writer op stores with the
value (one 8-byte store, single-copy atomic: no fence), and that its readers' A loaders spin on until the tag
says the element is this step's (cfamily/render.py, gemm.py). Nothing else is ordered across it.

A barrier is converted when (all found from the plan, any program):
- the loop is a top-level loop of a device-control kernel, not partitioned, behind a grid barrier (or at the
  kernel's start), its condition and body only waves, syncs and uniform statements that read no buffer (with
  UNIFORM_READERS the body's uniform ops may read buffers: reads by every vEU in the proof), a sync between
  any two waves (around the back edge too), no op that a backend may render as a view;
- the buffers published are those the wave right before it writes that: are float32 temps or outputs of at
  most MAX_PUBLISHED elements, written whole by one elementwise-like op (each element stored once, by one
  thread: fused / elementwise / copy, a cell chain) and by no other op of the loop; and are read by matmuls of
  the loop only as their left operand (the whole buffer, or a whole part of a left operand read in parts, not
  gathered rows), in other waves: those reads wait for the flags; any other read (an elementwise op's, reading
  the plain buffer) must be ordered otherwise;
- and every pair of conflicting accesses of different vEUs in the loop (read/write, write/read, write/write,
  from the hazards module's exact shares, `hazards._read` and `_output_veus`, a whole operand read by every
  vEU of its task where it knows no better) is still ordered (`_unordered` finds none): by a grid barrier
  left between them, or by a chain of flag waits. A vEU whose matmul read an element published by vEU i
  knows, from its next wave on, everything i did before the wave that wrote it (and what i knew then); its own
  program order is the syncs'. The check runs vector clocks over three iterations of the body from no
  knowledge at all (conservative) and requires, at the start of the fourth, every vEU to know all of the first
  iteration of each vEU its accesses conflict with: the pairs further apart are then ordered too. Where pairs
  are left unordered, FlagWaits may order them (`_waits_needed`: a vEU waits at a flag sync for a buffer that
  the other vEU published after its access, reading nothing; plan.FlagWait). Conversions are tried all
  together, then one at a time (greedy).

Tags (the renderer's): the kernel zeroes the shadows when it starts (then the grid barrier this pass puts first
in the kernel), a loop counts its
iterations `it` (0, 1, ...); a writer stores tag it + 1; a reader whose writer comes earlier in the body waits
for it + 1, one whose writer comes later (the carry of the back edge) for it, and in the first iteration (it =
0) reads the plain buffer instead, written before the loop behind its grid barrier. A tag is never 0 while the
loop runs and never repeats within a launch below 2^32 - 1 iterations (a stale word holds a smaller tag, or 0;
a buffer is published by one loop of a kernel only). The plain buffer is written too: after the loop a grid
barrier (added when the statement after the loop is not one) orders it for the readers there.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from gdsl.primitives.linalg import matmul_p
from gdsl.primitives.registry import ELEMENTWISE, family_of
from gdsl.schedule import hazards, shares, utasks
from gdsl.schedule.hazards import MAYBE_VIEWS, SEVERAL, Hazards, TooLarge
from gdsl.schedule.plan import (
    COPY,
    FUSED,
    K_SPLITS,
    ROW_INDEX,
    ROW_SHAPE,
    ROWS,
    STEP_OUTPUTS,
    STEPS,
    Assign,
    Buffer,
    FlagWait,
    Loop,
    Sync,
    Uniforms,
    Wave,
    a_parts,
    walk,
)

FLAGS = "flags"
ITERATIONS = 3           # iterations of the body the vector clocks run over (then one more wave)
# A buffer of more elements is never published: each waiting uTask spins on every element it reads, one 8-byte
# load each, without the tile's four-element loads, which pays for a carried row (NASRNN bs1's 256 elements:
# 3.85 -> 2.83 ms on the H200, session 11) and not for a batch of them (NASRNN bs64 with owner=True, 64 x 256
# published: 19.3 -> 29.9 ms). It also bounds the proof's cost (the LSTM bs64's would take ~15 s of lowering).
MAX_PUBLISHED = 4096
# FlagWaits (plan.FlagWait): a vEU whose later write would overwrite what another vEU read, with no flag wait
# ordering the two, may wait at a flag sync in between for a published buffer that the reader wrote after its
# read, reading nothing (the back pressure of a skewed stack laid out by owner-computes: layer l overwrites its
# state only after layer l + 1 has read it). The proof adds them in at most this many rounds (each round: every
# unordered pair's wait, then the proof again); off (0): a barrier needing one stays a grid barrier.
WAIT_ROUNDS = 4
WAIT_TASK = -2           # (the task and input number of a FlagWait's waiting reads in the proof's accesses)
MAX_UNORDERED = 20000    # (the proof stops collecting unordered pairs past this many)
# A matmul's results may be published too (its tiles store each element once), and elementwise-like ops may wait
# for a published matmul result they read (their loads spin on its flag words, as a matmul's A loader does): a
# loop's barrier between its matmuls and the cell that reads their results may become a flag sync. Of the zoo only
# the LSTM bs1's plan changes: its loop keeps no grid barrier (2 flag syncs a half-step: gates -> cells, h ->
# GEMVs, with FlagWaits). Predicted on the H200: -0.6 to -1.0 µs a half-step (a grid barrier's ~1.2-1.8 µs wait
# against a flag wait's ~0.5-0.7), LSTM bs1 321 -> ~250-280 µs. Measured (session 24, benchmarks/kernel_ab.py,
# ncu kernel time): 783.5 against the default's 319.6 µs, then 630.2 against 331.9 with the flag reads loading
# first and checking after (gdsl_flag_load / gdsl_flag_finish / gdsl_flag_wait): off (docs/schedule.md, "Cell waits").
CELL_WAITS = False
# Loops whose body has uniform statements reading buffers (Seq2seq bs1's every-vEU argmax of the logits) are tried
# too: such a statement is one more position of the proof, a read of the whole of each input by every vEU.
# Seq2seq bs1's cell -> logits barrier then becomes a flag sync: its kernel 97.9 -> 90.7 us on the H200 (session
# 16, benchmarks/kernel_ab.py); the default since session 17 (GPU suite and bench with it on, docs/performance.md).
UNIFORM_READERS = True


@dataclass(frozen=True)
class LoopFlags:
    """The flag roles in one loop: writer Op -> its published output numbers; reader Op (a matmul whose left
    operand, or a part of it, is published; with CELL_WAITS an elementwise-like op reading a published matmul
    result) -> {input number: wraps} (wraps: its writer comes later in the body, it reads the previous
    iteration's); flag Sync -> ((FlagWait, wraps), ...) of its waits."""
    writers: dict
    readers: dict
    published: tuple
    waits: dict = dataclasses.field(default_factory=dict)


def published_in(stmts) -> tuple:
    """The buffers the flag syncs among `stmts` and the statements inside them publish, each once, in order."""
    return tuple(dict.fromkeys(b for s in walk(stmts) if isinstance(s, Sync) for b in s.published))


def loop_flags(loop: Loop) -> LoopFlags | None:
    """The roles of a loop's flag syncs (None: it has none)."""
    published = published_in(loop.body)
    if not published:
        return None
    waves = [s for s in loop.body if isinstance(s, Wave)]
    writers, wave_of = {}, {}
    for k, wave in enumerate(waves):
        for task in wave.tasks:
            numbers = tuple(n for n, v in enumerate(task.op.outputs) if v.storage in published)
            if numbers:
                writers[task.op] = numbers
                wave_of.update((task.op.outputs[n].storage, k) for n in numbers)
    readers, products = {}, matmul_results(waves)
    for k, wave in enumerate(waves):
        for task in wave.tasks:
            for number in waiting_inputs(task.op, products):
                if task.op.inputs[number].storage in wave_of:
                    readers.setdefault(task.op, {})[number] = wave_of[task.op.inputs[number].storage] >= k
    waits, before = {}, 0                  # (before: the waves ahead of the statement in the body)
    for stmt in loop.body:
        before += isinstance(stmt, Wave)
        if isinstance(stmt, Sync) and stmt.waits:
            waits[stmt] = tuple((w, wave_of[w.buffer] >= before) for w in stmt.waits)
    return LoopFlags(writers, readers, published, waits)


def a_inputs(op) -> list:
    """The input numbers of a matmul's left operand (its parts: plan.a_parts); none for other kinds."""
    return [number for number, _, _ in a_parts(op)] if op.kind == matmul_p.name else []


def waiting_inputs(op, products) -> list:
    """The input numbers whose reads may wait for flags: a matmul's left operand; with CELL_WAITS also each
    input of an elementwise-like op (fused, copy, elementwise, row chain) that reads a matmul's result (a
    buffer of `products`) as a static window (no run-time offset, permutation or gathered rows): its loads
    spin on the flag words one element each. (What elementwise ops write and read stays unpublished there:
    the cell's own carries, on its own vEUs.)"""
    if op.kind == matmul_p.name:
        return a_inputs(op)
    if CELL_WAITS and _elementwise_reader(op):
        return [n for n, v in enumerate(op.inputs) if v.storage in products and _static_window(v)]
    return []


def matmul_results(waves) -> set:
    """The buffers the matmuls of `waves` (Wave statements) write."""
    return {v.storage for w in waves for t in w.tasks if t.op.kind == matmul_p.name for v in t.op.outputs}


def _elementwise_reader(op) -> bool:
    return op.kind in (FUSED.name, COPY.name, ROWS.name) or \
        family_of(op.kind) == ELEMENTWISE and not utasks.in_place_update(op.kind, op.params)


def _static_window(value) -> bool:
    return value.window is None and not value.terms and value.perm is None and value.rows is None


def flag_syncs(plan):
    """`plan` with the grid barriers that only carries cross made flag syncs (module docstring)."""
    if plan.control != "device":
        return plan
    kernels = tuple(_kernel(k, plan.grid) for k in plan.kernels)
    if all(a is b for a, b in zip(kernels, plan.kernels)):
        return plan
    def syncs(ks, scope):
        return sum(1 for k in ks for s in walk(k.body) if isinstance(s, Sync) and s.scope == scope)
    grid = plan.stats.get("grid_syncs", 0) + syncs(kernels, "grid") - syncs(plan.kernels, "grid")
    return dataclasses.replace(plan, kernels=kernels,
                               stats=dict(plan.stats, flag_syncs=syncs(kernels, FLAGS), grid_syncs=grid))


def _kernel(kernel, grid: int):
    body, changed, used = [], False, set()
    for i, stmt in enumerate(kernel.body):
        if isinstance(stmt, Loop) and (i == 0 or _is_grid(kernel.body[i - 1])):
            loop = _loop(stmt, grid)
            published = set(published_in(loop.body))
            if loop is not stmt and not published & used:    # (the words are zeroed once per launch)
                used |= published
                changed = True
                body.append(loop)
                if i + 1 == len(kernel.body) or not _is_grid(kernel.body[i + 1]):
                    body.append(Sync("grid"))       # the plain buffers, for the readers after the loop
                continue
        body.append(stmt)
    if not changed:
        return kernel
    # The kernel zeroes the flag words of its published buffers when it starts (the renderer's flag_prologue,
    # before the first statement), then this grid barrier: part of the plan, so the plan says what runs.
    return dataclasses.replace(kernel, body=(Sync("grid"),) + tuple(body))


def _is_grid(stmt) -> bool:
    return isinstance(stmt, Sync) and stmt.always_grid


def _loop(loop: Loop, grid: int) -> Loop:
    if loop.parts or not _simple(loop):
        return loop
    body = loop.body
    positions = [i for i, s in enumerate(body) if isinstance(s, Wave) or _reads_buffers(s)]
    if sum(isinstance(body[i], Wave) for i in positions) < 2:
        return loop
    candidates = {}
    for i, stmt in enumerate(body):
        if _is_grid(stmt):
            k = max((k for k, p in enumerate(positions) if p < i), default=len(positions) - 1)
            published = _publishable(body, positions, k)
            if published:
                candidates[i] = published
    if not candidates:                     # (before the accesses: they cost seconds on a batch-64 loop)
        return loop
    written = {v.storage for i in positions for t in _tasks(body[i]) for v in t.op.outputs}
    try:
        accesses = [_wave_accesses(body[i], written) if isinstance(body[i], Wave) else
                    _uniform_accesses(body[i], written, grid) for i in positions]
    except TooLarge:
        return loop
    if np.unique(np.concatenate([v for acc in accesses for _, v, *_ in acc.values()] or [np.zeros(0, int)])).size < 2:
        return loop                        # (one vEU: the renderer makes its barriers block syncs anyway)
    chosen, waits = {}, {}
    for trial in ([candidates] if len(candidates) > 1 else []) + [{i: p} for i, p in candidates.items()]:
        attempt = {**chosen, **trial}
        found = _waits_needed(body, positions, accesses, attempt, grid) if attempt != chosen else None
        if found is not None:
            chosen, waits = attempt, found
    if not chosen:
        return loop
    new = tuple(Sync(FLAGS, published=chosen[i], waits=waits.get(i, ())) if i in chosen else s
                for i, s in enumerate(body))
    return dataclasses.replace(loop, body=new)


def _waits_needed(body, positions, accesses, chosen: dict, grid: int) -> dict | None:
    """The FlagWaits ({body index of a chosen sync: FlagWaits}) with which the flag syncs `chosen` order every
    conflict, found in at most WAIT_ROUNDS rounds ({}: none needed); None when they do not."""
    needed: dict = {}                      # (sync index, buffer) -> {vEU: (start, stop)}
    for _ in range(WAIT_ROUNDS + 1):
        waits = _flag_waits(needed)
        unordered = _unordered(body, positions, accesses, chosen, grid, waits)
        if not unordered:
            return waits
        if not _add_waits(needed, unordered, body, positions, accesses, chosen):
            return None
    return None


def _add_waits(needed: dict, unordered, body, positions, accesses, chosen: dict) -> bool:
    """Enter in `needed` a FlagWait for each unordered pair (a, i, b, j) where one orders it: at the last
    chosen sync before position b past which a published buffer that vEU i wrote after position a is
    seen, vEU j waits for i's elements of the one i wrote last. Did any wait grow?"""
    n = len(positions)
    published = list(dict.fromkeys(b for i in sorted(chosen) for b in chosen[i]))
    writer_wave, writer_veu = _writers(accesses, set(published))
    syncs = [[i for i in _between(body, positions, k) if i in chosen] for k in range(n)]
    added = False
    for a, i, b, j in sorted(set(unordered)):
        for p in range(b, a, -1):
            if not syncs[p % n]:
                continue
            seen = [(_source(n, writer_wave[buf], p), buf) for buf in published if (writer_veu[buf] == i).any()]
            at, buf = max(seen, key=lambda x: x[0], default=(-1, None))
            if at <= a:                    # (the latest write of i seen there: what it knows most of)
                continue
            mine = np.nonzero(writer_veu[buf] == i)[0]
            where = needed.setdefault((syncs[p % n][-1], buf), {})
            old = where.get(j)
            lo, hi = int(mine.min()), int(mine.max()) + 1
            where[j] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
            added |= where[j] != old
            break
    return added


def _flag_waits(needed: dict) -> dict:
    """{sync index: FlagWaits} of `needed` ((sync index, buffer) -> {vEU: (start, stop)}), consecutive vEUs
    waiting for the same elements as one."""
    out: dict = {}
    for (i, buf), where in sorted(needed.items(), key=lambda kv: (kv[0][0], kv[0][1].name)):
        runs: list = []
        for veu in sorted(where):
            if runs and runs[-1][0] + runs[-1][1] == veu and runs[-1][2] == where[veu]:
                runs[-1][1] += 1
            else:
                runs.append([veu, 1, where[veu]])
        out[i] = out.get(i, ()) + tuple(FlagWait(buf, first, count, *span) for first, count, span in runs)
    return {i: tuple(sorted(w, key=lambda w: w.first)) for i, w in out.items()}


def _between(body, positions, k: int) -> list:
    """The body indices between wave k - 1 and wave k of the positions (around the back edge for k = 0)."""
    prev, p = positions[k - 1], positions[k]
    return list(range(prev + 1, p)) if k else [*range(prev + 1, len(body)), *range(p)]


def _source(n: int, kw: int, pos: int) -> int:
    """The position of the write, by wave kw of an n-wave body, that a waiting read at position pos sees
    (< 0: none)."""
    kr = pos % n
    return pos - kr + kw - (n if kw >= kr else 0)


def _writers(accesses, published: set) -> tuple:
    """({published buffer: the wave that writes it}, {published buffer: the vEU writing each element, -1 none})."""
    writer_wave = {b: k for k, acc in enumerate(accesses) for b in acc if b in published and acc[b][2].any()}
    writer_veu = {}
    for b, k in writer_wave.items():
        e, v, w = accesses[k][b][:3]
        table = np.full(b.aval.size, -1, np.int64)
        table[e[w]] = v[w]
        writer_veu[b] = table
    return writer_wave, writer_veu


def _simple(loop: Loop) -> bool:
    """Only waves, syncs (grid or block, not by return site) and uniform statements reading no buffer in the
    body (with UNIFORM_READERS also uniform ops reading buffers), only the latter in the condition; a sync
    between any two waves; no op a backend may read as a view."""
    def uniform(s):
        if isinstance(s, Uniforms):
            return not _reads_buffers(s)
        return isinstance(s, Assign) and not isinstance(s.src.storage, Buffer) and \
            not isinstance(s.dst.storage, Buffer)
    if not all(uniform(s) for s in loop.cond):
        return False
    synced = True
    for s in loop.body + loop.body:          # (twice: around the back edge)
        if isinstance(s, Wave):
            if not synced or any(t.op.kind in MAYBE_VIEWS for t in s.tasks):
                return False
            synced = False
        elif isinstance(s, Sync):
            if s.scope not in ("grid", "block") or s.sites is not None:
                return False
            synced = True
        elif not (uniform(s) or UNIFORM_READERS and _reads_buffers(s)):
            return False
    return True


def _tasks(stmt) -> tuple:
    """A wave's tasks; none for a uniform statement (a position of the proof with UNIFORM_READERS)."""
    return stmt.tasks if isinstance(stmt, Wave) else ()


def _reads_buffers(stmt) -> bool:
    """Is `stmt` a Uniforms statement with an op reading a buffer (every vEU reads it)?"""
    return isinstance(stmt, Uniforms) and any(isinstance(v.storage, Buffer) for u in stmt.ops for v in u.inputs)


def _uniform_accesses(stmt: Uniforms, written: set, grid: int) -> dict:
    """_wave_accesses of a uniform statement: every vEU reads each buffer input whole (task number -1)."""
    parts: dict = {}
    found = [(v.storage, hazards.storage_elements(v, None), SEVERAL, k) for u in stmt.ops
             for k, v in enumerate(u.inputs) if isinstance(v.storage, Buffer) and v.storage in written]
    _add_accesses(parts, found, np.arange(grid), -1)
    return {b: tuple(np.concatenate(x) for x in zip(*p)) for b, p in parts.items()}


def _stores_once(op) -> bool:
    """Does `op` store each element of its outputs once, by one thread, at its own flat index? (A matmul's
    tiles do, with CELL_WAITS counted, unless split-K sums its partial products into them.)"""
    if op.kind in (FUSED.name, COPY.name):
        return True
    if op.kind == matmul_p.name:
        return CELL_WAITS and K_SPLITS not in op.params
    if op.kind == ROWS.name:
        steps = op.params[STEPS]
        return all(steps[k].reduce is None and not steps[k].per_row(op.params[ROW_SHAPE])
                   for k in op.params[STEP_OUTPUTS])
    return family_of(op.kind) == ELEMENTWISE and not utasks.in_place_update(op.kind, op.params)


def _whole(value) -> bool:
    return (value.offset == 0 and value.window is None and not value.terms and value.perm is None and
            value.rows is None and value.aval.size == value.storage.aval.size)


def _publishable(body, positions, k: int) -> tuple:
    """The buffers wave k of the body writes that may be published (module docstring)."""
    ops = [(j, t.op) for j, p in enumerate(positions) for t in _tasks(body[p])]
    products = matmul_results([body[p] for p in positions if isinstance(body[p], Wave)])
    out = []
    for task in _tasks(body[positions[k]]):
        op = task.op
        if not _stores_once(op):
            continue
        for value in op.outputs:
            b = value.storage
            if not (isinstance(b, Buffer) and b.kind in ("temp", "output") and not b.frame_of and
                    b.aval.dtype == np.float32 and b.aval.size <= MAX_PUBLISHED and _whole(value)):
                continue
            writes = sum(1 for _, o in ops for v in o.outputs if v.storage is b)
            waits = [(j, o, n) for j, o in ops for n in waiting_inputs(o, products) if o.inputs[n].storage is b]
            if writes == 1 and waits and all(j != k and ROW_INDEX not in o.params and (
                    o.kind != matmul_p.name or _whole(o.inputs[n]) and sum(v.storage is b for v in o.inputs) == 1)
                    for j, o, n in waits):
                out.append(b)
    return tuple(out)


# ------------------------------------------------------------------------------------------ the proof
def _wave_accesses(wave: Wave, written: set) -> dict:
    """Buffer -> (elements, vEU, is_write, task number, input number or -1) arrays of every access of `wave`
    to a buffer the loop writes (Hazards._accesses, input by input); a read the hazards module only knows as
    "the whole operand by several vEUs" by every vEU of its task."""
    hz = Hazards()
    hz.written_here = written
    parts: dict = {}
    for number, task in enumerate(wave.tasks):
        op = task.op
        if op.outputs[0].aval.size > hazards.MAX_OP_ELEMENTS:
            raise TooLarge
        veus = np.arange(task.first, task.first + min(task.count, op.n_utasks))
        out_veus = hazards._output_veus(task)
        found = []
        for k, value in enumerate(op.inputs):
            if isinstance(value.storage, Buffer) and value.storage in written:
                elements, who = hazards._read(task, k, out_veus)
                found.append((value.storage, elements, who, k))
        for n, value in enumerate(op.outputs):
            if out_veus is None or value.dynamic:
                found.append((value.storage, hazards.storage_elements(value, None), hazards._one_or_several(task), -1))
            else:
                who = out_veus if n == 0 else hazards._output_veus(task, n)
                found.append((value.storage, hazards.storage_elements(value, np.arange(value.aval.size)), who, -1))
        _add_accesses(parts, found, veus, number)
    return {b: tuple(np.concatenate(x) for x in zip(*p)) for b, p in parts.items()}


def _add_accesses(parts: dict, found, veus, number: int) -> None:
    """Enter the accesses `found` ((buffer, storage elements, vEU per element or SEVERAL: every vEU of `veus`,
    input number or -1 for a write)) of task `number` in `parts` (buffer -> the arrays of _wave_accesses)."""
    for buf, elements, who, k in found:
        elements = np.arange(buf.aval.size)[elements] if isinstance(elements, slice) else \
            np.asarray(elements, np.int64)
        if np.ndim(who) == 0 and who == SEVERAL:
            e, v = np.tile(elements, veus.size), np.repeat(veus, elements.size)
        else:
            e, v = elements, np.broadcast_to(np.asarray(who, np.int64), elements.shape)
        parts.setdefault(buf, []).append((e, v, np.full(e.size, k < 0), np.full(e.size, number), np.full(e.size, k)))


def _unordered(body, positions, accesses, chosen: dict, grid: int, waits: dict) -> list:
    """The conflicting accesses of different vEUs left unordered with the grid barriers of `chosen` made flag
    syncs and the FlagWaits `waits` ({body index of a chosen sync: FlagWaits}) at them (module docstring),
    [(a, i, b, j)]: vEU j at position b does not know vEU i's access at position a (positions count waves
    from the first iteration's first; the last check's pairs with b = ITERATIONS * n). One refinement of
    "from the next wave on": a matmul whose every uTask reads the whole published buffer (a full waiter)
    stores its results only after all its waits (the tile routines stage A, then sync, then store), so its
    writes know what its waits told. A FlagWait is a waiting read of
    its elements by its vEUs at the wave after its sync, known from that wave on. (A writer's reads come
    before its published stores in the same thread too, a data dependence, but that is not used: the
    simulator could not check it.)"""
    n = len(positions)
    waves = [body[p] for p in positions]
    products = matmul_results([w for w in waves if isinstance(w, Wave)])
    grid_before, waits_before = [], []     # per wave: a grid barrier left between it and the previous one;
    for k in range(n):                     # the FlagWaits of the chosen syncs in between
        between = _between(body, positions, k)
        grid_before.append(any(_is_grid(body[i]) and i not in chosen for i in between))
        waits_before.append([w for i in between for w in waits.get(i, ())])
    published = {b for p in chosen.values() for b in p}
    writer_wave, writer_veu = _writers(accesses, published)
    accesses = [_with_wait_reads(acc, ws) for acc, ws in zip(accesses, waits_before)]

    def source(b, pos):                    # the position of the write a waiting read at pos sees (< 0: none)
        return _source(n, writer_wave[b], pos)

    last = ITERATIONS * n
    vc = np.full((grid, grid), -1, np.int64)
    writers = {}                           # (task, input) -> (full, [(vEU, the writers of what it reads)])
    known, op_known = [], {}               # vc entering each position; (pos, task) -> a full waiter's rows
    for pos in range(last + 1):
        k = pos % n
        if grid_before[k] and pos:
            vc[:, :] = pos - 1
        np.fill_diagonal(vc, pos - 1)
        for wait in waits_before[k]:
            at = source(wait.buffer, pos)
            ids = np.unique(writer_veu[wait.buffer][wait.start:wait.stop])
            ids = ids[ids >= 0]
            if at >= 0 and ids.size:
                veus = slice(wait.first, wait.first + wait.count)
                vc[veus] = np.maximum(vc[veus], known[at][ids].max(axis=0))
                vc[veus, ids] = np.maximum(vc[veus, ids], at - 1)
        known.append(vc.copy())
        pending = vc.copy()
        for number, task, part, b in _waits(_tasks(waves[k]), published, products):
            at = source(b, pos)
            if at < 0:
                continue
            if (task, part) not in writers:
                full, reads = _waiting_reads(task, part)
                writers[task, part] = full, [(veu, np.unique(writer_veu[b][e])) for veu, e in reads]
            full, reads = writers[task, part]
            mine = known[pos].copy()
            for veu, ids in reads:
                ids = ids[ids >= 0]
                if ids.size:
                    mine[veu] = np.maximum(mine[veu], known[at][ids].max(axis=0))
                    mine[veu, ids] = np.maximum(mine[veu, ids], at - 1)
            pending = np.maximum(pending, mine)
            if full:
                op_known[pos, number] = np.maximum(op_known.get((pos, number), mine), mine)
        vc = pending
    out = []
    for a in range(n):
        for b in range(a + 1, last):
            pairs = _unordered_pairs(accesses[a], accesses[b % n], a, b, known[b], published, source, op_known,
                                     _tasks(waves[b % n]), products)
            out += [(a, i, b, j) for i, j in pairs]
            if len(out) > MAX_UNORDERED:
                return out
    # The pairs further apart: ordered when, at the start of the fourth iteration, every vEU knows all of the
    # first iteration of each vEU whose accesses conflict with its own (the knowledge only grows from one
    # iteration to the next; vEUs with no conflicting access, a skewed stack's layers far apart, need nothing).
    conflict = _conflicts(accesses, grid)
    i, j = np.nonzero(conflict & (known[last].T < n - 1))
    return out + [(n - 1, int(a), last, int(b)) for a, b in zip(i, j) if a != b]


def _with_wait_reads(acc: dict, waits) -> dict:
    """A wave's accesses with the FlagWaits of the sync before it as waiting reads (task and input number -2)."""
    if not waits:
        return acc
    acc = dict(acc)
    for wait in waits:
        e = np.tile(np.arange(wait.start, wait.stop), wait.count)
        v = np.repeat(np.arange(wait.first, wait.first + wait.count), wait.stop - wait.start)
        new = (e, v, np.zeros(e.size, bool), np.full(e.size, WAIT_TASK), np.full(e.size, WAIT_TASK))
        old = acc.get(wait.buffer)
        acc[wait.buffer] = new if old is None else tuple(np.concatenate(x) for x in zip(old, new))
    return acc


def _conflicts(accesses, grid: int):
    """[i, j]: do vEUs i and j access an element of a buffer in the loop, at least one of them writing it?"""
    out = np.zeros((grid, grid), bool)
    merged: dict = {}
    for acc in accesses:
        for buf, (e, v, w, *_) in acc.items():
            merged.setdefault(buf, []).append((e, v, w))
    for parts in merged.values():
        e, v, w = (np.concatenate(x) for x in zip(*parts))
        users = np.unique(np.stack([e, v]), axis=1)               # (element, vEU), sorted by element
        writes = np.unique(np.stack([e[w], v[w]]), axis=1)
        lo = np.searchsorted(users[0], writes[0], "left")
        counts = np.searchsorted(users[0], writes[0], "right") - lo
        where = np.repeat(lo, counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        writer, user = np.repeat(writes[1], counts), users[1][where]
        out[writer, user] = out[user, writer] = True
    return out


@functools.lru_cache(maxsize=256)
def _waiting_reads(task, part: int) -> tuple:
    """(is it a matmul whose every uTask reads all of it, [(vEU, storage elements of input `part`)] per uTask)
    of a waiting task."""
    op, value = task.op, task.op.inputs[part]
    size = value.aval.size
    reads = []
    for t in range(op.n_utasks):
        share = shares.read_share(op, part, t)
        share = np.arange(size) if share is None else np.asarray(share)
        reads.append((task.first + t % task.count, np.asarray(hazards.storage_elements(value, share), np.int64)))
    return op.kind == matmul_p.name and all(e.size == size for _, e in reads), reads


def _waits(tasks, published, products):
    """(task number, task, input number, buffer) of each read of a published buffer that waits (a matmul's
    left operand or part of it)."""
    return [(number, task, part, task.op.inputs[part].storage) for number, task in enumerate(tasks)
            for part in waiting_inputs(task.op, products) if task.op.inputs[part].storage in published]


def _unordered_pairs(first: dict, second: dict, a: int, b: int, known, published, source, op_known,
                     waves_b, products) -> set:
    """The (earlier vEU i, later vEU j) of the conflicts between the accesses `first` (position a) and
    `second` (position b > a) of different vEUs that are not ordered: known[j, i] < a (_unordered's
    refinements aside). A published element's write and the waiting read that sees it need nothing."""
    out = set()
    for buf in first.keys() & second.keys():
        ea, va, wa = first[buf][:3]
        eb, vb, wb, tb, kb = second[buf]
        exempt = buf in published and source(buf, b) == a
        waiting = None
        if exempt:
            waiting = (tb == WAIT_TASK) & (kb == WAIT_TASK)
            for number, _, part, _ in _waits(waves_b, {buf}, products):
                waiting |= (tb == number) & (kb == part)
        for mask_a, mask_b in ((wa, np.ones_like(wb)), (~wa, wb)):
            if not mask_a.any() or not mask_b.any():
                continue
            order = np.argsort(eb[mask_b], kind="stable")
            xb = eb[mask_b][order]
            lo, hi = np.searchsorted(xb, ea[mask_a], "left"), np.searchsorted(xb, ea[mask_a], "right")
            counts = hi - lo
            if not counts.any():
                continue
            where = np.repeat(lo, counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            i = np.repeat(va[mask_a], counts)
            j, j_writes, task_b = (x[mask_b][order][where] for x in (vb, wb, tb))
            bad = (i != j) & (known[j, i] < a)
            if exempt and mask_a is wa:       # (a published write, read by the waiting reads that see it)
                bad &= ~waiting[mask_b][order][where]
            for number in np.unique(task_b[bad & j_writes]):    # writes of a full waiter, after its waits
                rows = op_known.get((b, int(number)))
                if rows is not None:
                    hit = bad & j_writes & (task_b == number)
                    bad[hit] = rows[j[hit], i[hit]] < a
            out.update(zip(i[bad].tolist(), j[bad].tolist()))
    return out
