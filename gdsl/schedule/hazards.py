"""Which barrier a wave boundary needs, from the uTasks' own reads and writes.

A grid barrier orders every vEU's accesses before it against every vEU's after it. Between two waves of a
segment that is more than needed when each vEU, in the next wave, touches only elements that no *other*
vEU wrote since the last grid barrier, and overwrites only elements that no other vEU read since then: a
vEU-local sync (the block barrier, which orders the vEU's own threads) is enough. The scheduler places ops
so that this holds where it can (a chain of elementwise ops stays on its producers' vEUs, see
Scheduler._homes) and asks `Hazards` at every barrier.

`Hazards` keeps, per buffer element, the vEU that wrote it and the vEU that read it since the last grid
barrier (-1: none, -2: several). An op's accesses are computed for all its elements at once (numpy), as
pairs (storage elements, vEU of each): writes exactly from the split (utasks.py: the uTask that writes an
element, `first + t % count` its vEU); reads exactly for elementwise ops and fused chains (numpy
broadcasting from the output elements) and static data movement (the primitive run on element numbers);
every other read (a matmul's operands, a reduction's, a dynamic window, a gather) conservatively as the
whole operand read by several vEUs (by the op's one vEU when it has one); likewise a write into a window at
a run-time offset (an in-place update, or an output stored into a window: plan.StoreWindow). A slice, dynamic slice or
transpose, which a backend may render as a pointer into its source instead of a copy
(gdsl/backends/cfamily/views.py), counts as a read of that source wherever its result is read. Frame copies
of a recursive function's buffers are not told apart (over-approximated as the same elements; a view
spanning adjacent frames wraps around onto them).
"""
from __future__ import annotations

import numpy as np

from gdsl.primitives.linalg import matmul_p
from gdsl.primitives.registry import ELEMENTWISE, family_of
from gdsl.primitives.structural import dynamic_slice_p, slice_p, transpose_p
from gdsl.schedule import shares, utasks
from gdsl.schedule.plan import (
    COPY,
    FUSED,
    ROW_SHAPE,
    ROWS,
    Buffer,
    Value,
    Wave,
    chunk_utask,
    epilogue_operands,
    parts_of_tasks,
    row_chunk,
    row_count,
    sibling_parts,
)
from gdsl.schedule.shares import MOVES, broadcast_source, moved_from, row_chain_reads

NONE, SEVERAL = -1, -2
MAX_TRACKED = 1 << 23        # elements tracked per segment; beyond it every barrier stays a grid barrier
MAX_OP_ELEMENTS = 1 << 18    # an op writing more is not latency-bound: its barriers stay grid barriers
MAYBE_VIEWS = frozenset(p.name for p in (slice_p, dynamic_slice_p, transpose_p))


def storage_elements(value, flat):
    """shares.storage_elements with the frame copies told apart by nothing: the elements of a view spanning
    adjacent frames (concatenated call results) taken modulo the storage's size."""
    if value.dynamic:       # a window known at run time only: anywhere in its storage
        return slice(None)
    if value.perm is not None and flat is None:
        flat = np.arange(value.aval.size)
    elements = shares.storage_elements(value, flat)
    size = value.storage.aval.size
    if not isinstance(elements, slice) and value.offset + value.aval.size > size:
        return elements % size
    return elements


class TooLarge(Exception):
    """The accesses of a segment are too many to track: assume every access conflicts."""


class Hazards:
    def __init__(self):
        self.writer: dict = {}           # Buffer -> int32 array over its elements
        self.reader: dict = {}
        self.view_sources: dict = {}     # Buffer -> the Values a view Op of it reads (see the module docstring)
        self.given_up = False
        self.written_here: set = set()   # the buffers the segment's waves write: only their reads matter

    def start(self, waves):
        """A new segment of `waves` begins (behind a grid barrier)."""
        self.clear()
        self.written_here = {v.storage for wave in waves for task in wave.tasks for v in task.op.outputs}

    def clear(self):
        """After a grid barrier: nothing is pending."""
        self.writer, self.reader, self.given_up = {}, {}, False
        self.pending: list = []          # waves recorded but not yet entered in the tables (see _flush)
        self.wrote: set = set()          # the buffers written and read since the last grid barrier
        self.read_from: set = set()

    # ---------------------------------------------------------------------------------------- accesses
    def _accesses(self, wave: Wave):
        """(buffer, storage elements, vEU per element or one vEU for all, is_write) of every op of `wave`."""
        for task in parts_of_tasks(wave.tasks):      # (a GEMV_ROWS_GEMV op's parts: what each of them reads)
            op = task.op
            if op.outputs[0].aval.size > MAX_OP_ELEMENTS:
                raise TooLarge
            out_veus = _output_veus(task)
            for k, value in enumerate(op.inputs):
                if isinstance(value.storage, Buffer):
                    elements, veus = _read(task, k, out_veus)
                    for source, where in self._read_through(value, elements):
                        if source.storage in self.written_here:
                            yield source.storage, where, veus if where is elements else _one_or_several(task), \
                                False
            for number, value in enumerate(op.outputs):
                if out_veus is None or value.dynamic:    # (a window known at run time only)
                    yield value.storage, storage_elements(value, None), _one_or_several(task), True
                else:
                    veus = out_veus if number == 0 else _output_veus(task, number)
                    yield value.storage, storage_elements(value, np.arange(value.aval.size)), veus, True

    def _read_through(self, value: Value, elements):
        """(Value, its storage elements) a read of `value`'s `elements` may touch: its own, and, when it is
        the result of a possible view, all of that view's sources (recursively)."""
        yield value, elements
        for source in self.view_sources.get(value.storage, ()):
            yield from self._read_through(source, storage_elements(source, None))

    def note_views(self, wave: Wave):
        """Remember the sources of the ops that a backend may render as views."""
        for task in wave.tasks:
            if task.op.kind in MAYBE_VIEWS:
                sources = [v for v in task.op.inputs if isinstance(v.storage, Buffer)]
                self.view_sources.setdefault(task.op.outputs[0].storage, []).extend(sources[:1])

    def _array(self, table, buf):
        if buf not in table:
            if sum(a.size for a in self.writer.values()) + sum(a.size for a in self.reader.values()) + \
                    buf.aval.size > MAX_TRACKED:
                raise TooLarge
            table[buf] = np.full(buf.aval.size, NONE, np.int32)
        return table[buf]

    # ---------------------------------------------------------------------------------------- queries
    def record(self, wave: Wave):
        """Note that `wave` ran since the last grid barrier (its accesses are computed when a query needs
        them: most waves end a segment, behind a grid barrier, and are never asked about)."""
        self.note_views(wave)
        self.pending.append(wave)
        self.wrote |= {v.storage for task in wave.tasks for v in task.op.outputs}
        self.read_from |= self._storages_read(wave)

    def _storages_read(self, wave: Wave) -> set:
        out = set()
        for value in (v for task in wave.tasks for v in task.op.inputs if isinstance(v.storage, Buffer)):
            out |= {source.storage for source, _ in self._read_through(value, None)}
        return out

    def _flush(self):
        """Enter the pending waves' accesses in the tables."""
        waves, self.pending = self.pending, []
        if self.given_up:
            return
        try:
            for wave in waves:
                for buf, elements, veus, is_write in self._accesses(wave):
                    table = self._array(self.writer if is_write else self.reader, buf)
                    elements, veus = _merged(elements, veus, buf.aval.size)
                    seen = table[elements]
                    table[elements] = np.where((seen == NONE) | (seen == veus), veus, SEVERAL)
        except TooLarge:
            self.given_up = True

    def local(self, wave: Wave) -> bool:
        """Can `wave` run after a vEU-local sync: does each of its uTasks touch only elements that no other
        vEU wrote (or, for its writes, read) since the last grid barrier?"""
        writes = {v.storage for task in wave.tasks for v in task.op.outputs}
        if not (self._storages_read(wave) & self.wrote or writes & (self.wrote | self.read_from)):
            return True                  # (it touches nothing touched since the last grid barrier)
        self._flush()
        if self.given_up:
            return False
        try:
            for buf, elements, veus, is_write in self._accesses(wave):
                for table in (self.writer, self.reader) if is_write else (self.writer,):
                    seen = table.get(buf)
                    if seen is None:
                        continue
                    seen = seen[elements]
                    if np.any((seen != NONE) & ((seen != veus) | (np.asarray(veus) == SEVERAL))):
                        return False
        except TooLarge:
            return False
        return True

    def written(self, values) -> bool:
        """Does any of `values` (read by every vEU: a uniform op's inputs) have an element written since the
        last grid barrier?"""
        values = [v for v in values if isinstance(v.storage, Buffer)]
        if not any(source.storage in self.wrote for v in values for source, _ in self._read_through(v, None)):
            return False
        self._flush()
        if self.given_up:
            return True
        for value in values:
            if isinstance(value.storage, Buffer):
                for source, elements in self._read_through(value, storage_elements(value, None)):
                    seen = self.writer.get(source.storage)
                    if seen is not None and np.any(seen[elements] != NONE):
                        return True
        return False


# ------------------------------------------------------------------------------------------------ per op

def _one_or_several(task) -> int:
    """The vEU of an op that runs on one, else SEVERAL."""
    return task.first if min(task.count, task.op.n_utasks) == 1 else SEVERAL


def _output_veus(task, number=0) -> np.ndarray | None:
    """The vEU that writes each element (row-major) of output `number`, from the split; None for an in-place
    window."""
    op = task.op
    if len(parts := sibling_parts(op)) > 1:     # sibling matmuls (plan.N_PARTS): output `number` is part's
        op, number = parts[number], 0
    out = op.outputs[number].aval
    if utasks.in_place_update(op.kind, op.params):
        return None
    e = np.arange(out.size)
    if op.kind == ROWS.name:
        t = _row_utask(op, out.size, e)
    elif op.kind in utasks.GEMM_KINDS:
        t = _gemm_utask(op)
    elif op.kind in utasks.REDUCE_KINDS:
        t = e // op.params["rows"]
    else:
        t = chunk_utask(op.params, out.shape, e)      # (2-D with plan.ROW_BLOCK)
    return task.first + t % task.count


def _row_utask(op, size, e):
    """The uTask of a ROWS op that computes element e of an array of `size` elements laid out by its rows
    (or by its chunks of the row shape: row_chunk)."""
    if row_chunk(op) is not None:
        return chunk_utask(op.params, op.params[ROW_SHAPE], e)
    return e // (op.params["rows"] * (size // max(row_count(op), 1)))


def _gemm_utask(op):
    """The uTask writing each output element (row-major) of a matmul or conv2d (utasks.py's tile order),
    from the tile of its row and of its column, broadcast over the output's axes (not divided per element)."""
    out = op.outputs[0].aval
    batch, m, n, _ = utasks.gemm_dims(op.kind, [v.aval for v in op.inputs], out, op.params)
    tm, tn = op.params["tile_m"], op.params["tile_n"]
    tiles_m, tiles_n = -(-m // tm), -(-n // tn)
    if op.kind == matmul_p.name:          # (batch, row, column)
        first = np.arange(batch) * (0 if utasks.gathers_batch(op.params) else tiles_m)
        row_tile = first[:, None, None] + (np.arange(m) // tm)[None, :, None]
        col_tile = (np.arange(n) // tn)[None, None, :]
    else:       # conv2d (slice, image, channel, y*x): GEMM row (image, y, x), column = channel; split-K's slices
        *_, images, channels, ho, wo = out.shape    # (plan.K_SPLITS) are batch elements in front (utasks.gemm_dims)
        first = np.arange(batch) * tiles_m
        row_tile = first[:, None, None, None] + (np.arange(images * ho * wo) // tm).reshape(1, images, 1, ho * wo)
        col_tile = (np.arange(channels) // tn)[None, None, :, None]
    return (row_tile * tiles_n + col_tile).reshape(-1)


def _read(task, k, out_veus):
    """(storage elements of input k, the vEU reading each) for the whole op; see the module docstring."""
    op, value = task.op, task.op.inputs[k]
    in_aval, out = value.aval, op.outputs[0].aval
    if value.dynamic:       # a view at a run-time offset (plan.Value.terms): its whole storage, conservatively
        return storage_elements(value, None), _one_or_several(task)
    if op.kind == ROWS.name and value.aval.size > 1:      # read by each row's vEU (shares.row_chain_reads)
        shape = op.params[ROW_SHAPE]
        e = np.arange(int(np.prod(shape)))
        veus = task.first + _row_utask(op, e.size, e) % task.count
        sources = row_chain_reads(op, k, e)
        return storage_elements(value, np.concatenate(sources)), np.tile(veus, len(sources))
    if out_veus is not None and (op.kind in (FUSED.name, COPY.name) or family_of(op.kind) == ELEMENTWISE or
                                 k in epilogue_operands(op)):
        if in_aval.size == 1:
            return storage_elements(value, np.zeros(1, np.int64)), _one_or_several(task)
        return storage_elements(value, broadcast_source(out.shape, in_aval.shape, None)), out_veus
    if out_veus is not None and op.kind in MOVES and utasks.first_start(op.kind) is None:
        moved = moved_from(op, k)
        keep = moved >= 0
        return storage_elements(value, moved[keep]), out_veus[keep]
    return storage_elements(value, None), _one_or_several(task)


def _merged(elements, veus, size):
    """(elements, vEU of each) with each element once: SEVERAL where different vEUs touch it."""
    if isinstance(elements, slice) or np.ndim(veus) == 0 or len(elements) == 0:
        return elements, veus
    order = np.argsort(elements, kind="stable")
    elements, veus = elements[order], veus[order]
    starts = np.flatnonzero(np.r_[True, elements[1:] != elements[:-1]])
    if len(starts) == len(elements):
        return elements, veus
    low = np.minimum.reduceat(veus, starts)
    high = np.maximum.reduceat(veus, starts)
    return elements[starts], np.where(low == high, low, SEVERAL)
