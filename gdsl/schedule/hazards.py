"""Which barrier a wave boundary needs, from the uTasks' own reads and writes (shares.py).

A grid barrier orders every vEU's accesses before it against every vEU's after it. Between two waves of a
segment that is more than needed when each vEU, in the next wave, touches only elements that no *other*
vEU wrote since the last grid barrier, and overwrites only elements that no other vEU read since then: a
vEU-local sync (the block barrier, which orders the vEU's own threads) is enough. The scheduler places ops
so that this holds where it can (a chain of elementwise ops stays on its producers' vEUs, see
Scheduler._homes) and asks `Hazards` at every barrier.

`Hazards` keeps, per buffer element, the vEU that wrote it and the vEU that read it since the last grid
barrier (-1: none, -2: several). It is conservative where the shares are: an op whose share is not known
exactly (a dynamic window before its start is known, a convolution's input) touches its whole operand, and
a slice, dynamic slice or transpose, which a backend may render as a pointer into its source instead of a
copy (gdsl/backends/cfamily/views.py), counts as read wherever its result is read. Frame copies of a
recursive function's buffers are not told apart (over-approximated as the same elements).
"""
from __future__ import annotations

import numpy as np

from gdsl.primitives.structural import dynamic_slice_p, slice_p, transpose_p
from gdsl.schedule import utasks
from gdsl.schedule.plan import Buffer, Value, Wave
from gdsl.schedule.shares import read_share, storage_elements, write_share

NONE, SEVERAL = -1, -2
MAX_TRACKED = 1 << 22        # elements tracked per segment; beyond it every barrier stays a grid barrier
MAX_UTASKS = 1 << 14         # uTasks per wave whose shares are computed; beyond it likewise
MAYBE_VIEWS = frozenset(p.name for p in (slice_p, dynamic_slice_p, transpose_p))


class TooLarge(Exception):
    """The shares of a wave are too many to track: assume every access conflicts."""


class Hazards:
    def __init__(self):
        self.writer: dict = {}           # Buffer -> int array over its elements
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

    # ---------------------------------------------------------------------------------------- accesses
    def _accesses(self, wave: Wave):
        """(vEU, buffer, storage elements, is_write) of every uTask of `wave`."""
        if sum(task.op.n_utasks for task in wave.tasks) > MAX_UTASKS:
            raise TooLarge
        for task in wave.tasks:
            op = task.op
            dynamic = utasks.first_start(op.kind) is not None
            for t in range(op.n_utasks):
                veu = task.first + t % task.count
                for k, value in enumerate(op.inputs):
                    if not isinstance(value.storage, Buffer):
                        continue
                    share = None if dynamic else read_share(op, k, t)
                    for source, elements in self._read_through(value, share):
                        if source.storage in self.written_here:
                            yield veu, source.storage, elements, False
                for value in op.outputs:
                    if utasks.in_place_update(op.kind, op.params):
                        share = None           # (its window is known at run time only)
                    else:
                        share = write_share(op, t)
                    yield veu, value.storage, storage_elements(value, share), True

    def _read_through(self, value: Value, share):
        """The storage a read of `value` may touch: its own, and, when it is the result of a possible view,
        all of that view's sources (recursively)."""
        yield value, storage_elements(value, share)
        for source in self.view_sources.get(value.storage, ()):
            yield from self._read_through(source, None)

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
        """Enter the accesses of `wave` (it ran since the last grid barrier)."""
        self.note_views(wave)
        if self.given_up:
            return
        try:
            for veu, buf, elements, is_write in self._accesses(wave):
                table = self._array(self.writer if is_write else self.reader, buf)
                seen = table[elements]
                table[elements] = np.where((seen == NONE) | (seen == veu), veu, SEVERAL)
        except TooLarge:
            self.given_up = True

    def local(self, wave: Wave) -> bool:
        """Can `wave` run after a vEU-local sync: does each of its uTasks touch only elements that no other
        vEU wrote (or, for its writes, read) since the last grid barrier?"""
        if self.given_up:
            return False
        try:
            for veu, buf, elements, is_write in self._accesses(wave):
                tables = (self.writer, self.reader) if is_write else (self.writer,)
                for table in tables:
                    seen = table.get(buf)
                    if seen is not None and np.any((seen[elements] != NONE) & (seen[elements] != veu)):
                        return False
        except TooLarge:
            return False
        return True

    def written(self, values) -> bool:
        """Does any of `values` (read by every vEU: a uniform op's inputs) have an element written since the
        last grid barrier?"""
        if self.given_up:
            return True
        for value in values:
            if isinstance(value.storage, Buffer):
                for source, elements in self._read_through(value, None):
                    seen = self.writer.get(source.storage)
                    if seen is not None and np.any(seen[elements] != NONE):
                        return True
        return False
