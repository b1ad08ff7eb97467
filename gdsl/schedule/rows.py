"""Row chains: reductions over the last axis and the elementwise steps that read them, fused into one ROWS op.

softmax is four ops on the same rows (reduce_max, exp(x - max), reduce_sum, e / sum), each a wave behind
a barrier and a round trip through memory. A uTask that owns whole rows can run all four on each of its
rows with the intermediates on chip: one wave. The same holds for log_softmax, layer-norm-like chains
(mean, x - mean, var, normalise) and any chain of this shape; nothing here knows a model or a function name.

A chain over the row shape S (rows of length L = S[-1]) has members of three sorts:

    row reduction   a sum / max / min over the last axis of an array of shape S (gdsl.primitives.reductions
                    AXES_REDUCTIONS): one value per row
    row step        an elementwise item (a fused chain) of shape S
    per-row step    an elementwise item with one element per row (shape S[:-1] or S[:-1] + (1,)): the log of
                    a sum, a variance plus epsilon

A member reads another member on chip only at the element it computes: a row step reads row steps (shape S)
and per-row values broadcast along the row (shape S[:-1] + (1,), "keepdims", through reshapes); a per-row
step reads per-row values of its own shape; a reduction reads a row step. Anything else a member reads is an
input of the op, read from memory (broadcast as in a fused chain). A chain grows from each row reduction
forward (an elementwise item that reads a member) and backward (a row step whose only readers are members),
and is kept when it has two members or more, no item outside it both reads a member and feeds one (the op
could not run before and after it), and its rows fit on chip (`max_length`). Only the members read outside
the chain become the op's outputs (the last member always: nothing in the chain reads it).

A **cell chain** is the same op without a reduction: a connected group of elementwise items of one shape S
(the recurrent cell of an LSTM: the new `c`, then `h` from `c`, then the carry selects that read `c`), each
member reading the others only at the element it computes. Such items are separate ops today because a
result has several readers (or is a loop carry, an output): a fused chain has one output. As a ROWS op over
the row shape S, its uTask computes each element's steps in registers, in order, and stores every member
read outside the chain: one op, one wave, one memory round trip. It grows from any elementwise item, forward
and backward as above, after the row chains (their members are taken); any dtype may join (no reduction
needs a float identity), and the last axis of S fits on chip as a row's does. Where an item outside the
group reads a member and feeds another (a matmul between two cells of an unrolled recurrence), the group is
cut before it: the members that would run after it leave (they may form a chain of their own).

The scheduler (Scheduler._fuse_rows) fuses chains only for a backend with a "utask" lowering of ROWS, cell
chains only when asked too (`cells`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gdsl import dtypes
from gdsl.core.ir import Var
from gdsl.primitives.reductions import AXES_REDUCTIONS
from gdsl.primitives.registry import REGISTRY
from gdsl.primitives.structural import broadcast_p
from gdsl.schedule.plan import ROW_SHAPE, STEP, STEP_OUTPUTS, STEPS, Expr, RowStep, fold_expr

# The most elements of a row one thread keeps on chip per row step (registers): a row longer than
# ROW_SLOTS x the block's threads is not fused.
ROW_SLOTS = 8


def row_group(length: int, reduces: bool, block: int, warp: int) -> int | None:
    """The lanes a ROWS uTask gives each of its rows (the C-family layout, reductions.row_chain): a group of
    up to a warp's lanes (the next power of two >= `length`) when the row fits the group's registers
    (ROW_SLOTS elements a lane) and the chain reduces or the row is shorter than the block, its block then
    taking block // group rows at once; None when the whole block takes each row in turn."""
    group = min(warp, 1 << max(0, (length - 1).bit_length()))
    return group if -(-length // group) <= ROW_SLOTS and (reduces or length < block) else None


@dataclass(eq=False)
class RowChain:
    """A chain found in a segment: its members (scheduler items, program order), row shape, steps (their
    expressions read inputs by variable: params["var"]), and the members whose results are read outside."""
    members: list
    row_shape: tuple
    steps: list
    outputs: list                 # the members read outside the chain, in program order


def row_reduction_shape(it) -> tuple | None:
    """The row shape of a scheduler item that is a row reduction (over the last axis of a float array whose
    rows have two elements or more), else None."""
    eqn = it.eqn
    if it.uniform or it.absorbed or eqn.primitive not in AXES_REDUCTIONS:
        return None
    x = eqn.inputs[0].aval
    if x.ndim == 0 or tuple(eqn.params["axes"]) != (x.ndim - 1,) or x.shape[-1] < 2 or \
            not dtypes.is_float(x.dtype):
        return None
    return tuple(x.shape)


def _elementwise(it, any_dtype=False) -> bool:
    """A fused elementwise item (not a contraction's epilogue, not recomputed in a reader) of floats, or of
    any dtype (`any_dtype`: a cell chain's member)."""
    return not it.uniform and not it.absorbed and it.raw_expr is not None and it.contraction is None and \
        len(it.eqn.outs) == 1 and not it.inlined and (any_dtype or dtypes.is_float(it.eqn.outs[0].aval.dtype))


def cell_shape(it, max_length) -> tuple | None:
    """The row shape of a cell chain that scheduler item `it` may seed or join (its output's shape: at least
    one axis, the last of at most `max_length` elements), else None."""
    if not _elementwise(it, any_dtype=True):
        return None
    shape = tuple(it.eqn.outs[0].aval.shape)
    if not shape or not 1 <= shape[-1] <= max_length or math.prod(shape) == 0:
        return None
    return shape


def _input_vars(it) -> list:
    """The variables a candidate item reads, once per read (none for an iota: `arange(1)` is a one-element row)."""
    if it.raw_expr is not None:
        return [node.params["var"] for node in _input_nodes(it.raw_expr)]
    return list(it.eqn.inputs[:1])


def _input_nodes(expr) -> list:
    """The input leaves of `expr`, left to right (fold_expr: no recursion, whatever the depth)."""
    found = []

    def visit(node, args):
        if node.op == "input":
            found.append(node)
    fold_expr(expr, visit)
    return found


class _Finder:
    """The chains of one segment's items (see the module docstring)."""

    def __init__(self, items, producer, reshaped, windows, uses, max_length, cells=False):
        self.items = [it for it in items if not it.absorbed]
        self.producer, self.reshaped, self.windows, self.uses = producer, reshaped, windows, uses
        self.max_length = max_length
        self.cells = cells
        self.inputs: dict = {}          # item -> _input_vars(item), computed once (growth asks again and again)
        # Root variable -> the reads of its aliases by anything but another alias's own read of its source.
        self.alias_reads: dict = {}
        for alias_var, alias in windows.items():
            self.alias_reads[alias.root] = self.alias_reads.get(alias.root, 0) + uses.get(alias_var, 0) - 1
        self.position = {it: k for k, it in enumerate(self.items)}
        self.readers: dict = {}         # variable -> the items that read it (a cell chain grows through them)
        if cells:
            for it in self.items:
                for var in self.input_vars(it):
                    self.readers.setdefault(var, []).append(it)

    def input_vars(self, it) -> list:
        """The variables item `it` reads, once per read (_input_vars, cached)."""
        if it not in self.inputs:
            self.inputs[it] = _input_vars(it)
        return self.inputs[it]

    # ------------------------------------------------------------------------------------------ reads
    def member_read(self, atom, members):
        """(member, its output variable) that `atom` names (the output or a reshape of it), else None."""
        if not isinstance(atom, Var):
            return None
        root = atom
        while root in self.reshaped:
            root = self.reshaped[root]
        m = self.producer.get(root)
        if m in members and root is m.eqn.outs[0]:
            return m, root
        return None

    @staticmethod
    def _per_row_shapes(shape) -> tuple:
        return tuple(shape[:-1]), tuple(shape[:-1]) + (1,)

    def valid_read(self, atom, m, reader_shape, shape) -> bool:
        """May a reader of shape `reader_shape` read member `m` on chip through `atom`?"""
        out_shape = tuple(m.eqn.outs[0].aval.shape)
        if out_shape == shape:                  # a row step: at the element, never reshaped
            return atom is m.eqn.outs[0] and tuple(reader_shape) == shape
        keepdims = self._per_row_shapes(shape)[1]
        wanted = keepdims if tuple(reader_shape) == shape else tuple(reader_shape)
        return tuple(atom.aval.shape) == wanted

    def reads_ok(self, it, members, shape) -> tuple[bool, bool]:
        """(every read of a member by `it` is valid, `it` reads a member)."""
        reader_shape = it.eqn.inputs[0].aval.shape if it.raw_expr is None else it.eqn.outs[0].aval.shape
        any_read = False
        for atom in self.input_vars(it):
            found = self.member_read(atom, members)
            if found is None:
                if self.producer.get(atom) in members:
                    return False, True        # a member read through a view: not on chip
                continue
            any_read = True
            m, _ = found
            if not self.valid_read(atom, m, reader_shape, shape):
                return False, True
        return True, any_read

    def member_reads(self, var, members) -> int:
        """How often the members read `var` (directly or through reshapes)."""
        count = 0
        for m in members:
            for atom in self.input_vars(m):
                found = self.member_read(atom, {self.producer.get(var)})
                if found is not None and found[1] is var:
                    count += 1
        return count

    def reads_outside(self, var, members) -> bool:
        """Is `var` read by anything but the members (an item, a later control equation, an output)?"""
        # (an alias's readers count, the alias's own read of its source does not)
        total = self.uses.get(var, 0) + self.alias_reads.get(var, 0)
        return total > self.member_reads(var, members)

    # ------------------------------------------------------------------------------------------ growth
    def fits(self, it, shape, cell=False) -> bool:
        """Is `it` a candidate member of a chain over `shape` (before looking at what it reads)? A cell
        chain's members are elementwise items of exactly that shape."""
        if cell:
            return cell_shape(it, self.max_length) == shape
        if row_reduction_shape(it) is not None:
            return row_reduction_shape(it) == shape
        if not _elementwise(it):
            return False
        out = tuple(it.eqn.outs[0].aval.shape)
        return out == shape or (out in self._per_row_shapes(shape) and math.prod(out) == math.prod(shape[:-1]))

    def joins(self, it, members, shape, cell=False) -> bool:
        if not self.fits(it, shape, cell):
            return False
        valid, any_read = self.reads_ok(it, members, shape)
        if not valid or not self.read_on_chip_by(it, members, shape):
            return False
        if it.raw_expr is None:           # a reduction: of a row step of the chain
            return any_read
        if any_read:
            return True
        out = it.eqn.outs[0]              # a row step whose only readers are members
        return tuple(out.aval.shape) == shape and self.uses.get(out, 0) > 0 and \
            not self.reads_outside(out, members | {it})

    def read_on_chip_by(self, it, members, shape) -> bool:
        """Can the members that read `it` already (as an input, so far) read it on chip once it joins?"""
        for m in members:
            reader_shape = m.eqn.inputs[0].aval.shape if m.raw_expr is None else m.eqn.outs[0].aval.shape
            for atom in self.input_vars(m):
                found = self.member_read(atom, {it})
                if found is not None and not self.valid_read(atom, it, reader_shape, shape):
                    return False
        return True

    def grow(self, seed, shape, taken) -> list:
        members = {seed}
        changed = True
        while changed:
            changed = False
            for it in self.items:
                if it not in members and it not in taken and self.joins(it, members, shape):
                    members.add(it)
                    changed = True
        return [it for it in self.items if it in members]

    def neighbours(self, it) -> set:
        """The items that read `it`'s result or produce what it reads: the only items that can join a cell
        chain because `it` is a member (its members read each other at the element, never reshaped)."""
        found = set(self.readers.get(it.eqn.outs[0], ()))
        found.update(self.producer[var] for var in self.input_vars(it) if var in self.producer)
        return found & self.position.keys()

    def grow_cell(self, seed, shape, taken) -> list:
        """A cell chain grown from `seed` as `grow` grows a row chain (program order, until nothing joins),
        looking only at the neighbours of its members."""
        members = {seed}
        candidates = self.neighbours(seed)
        changed = True
        while changed:
            changed = False
            for it in sorted(candidates - members, key=self.position.__getitem__):
                if it not in taken and self.joins(it, members, shape, cell=True):
                    members.add(it)
                    candidates |= self.neighbours(it)
                    changed = True
        return [it for it in self.items if it in members]

    def acyclic(self, members) -> bool:
        """Does no item outside the chain both read a member (through its producers) and feed one?"""
        member_set = set(members)
        after: set = set()                   # non-members that run after some member
        for it in self.items:                # (program order: an item's producers come before it)
            if it not in member_set and it.deps & (member_set | after):
                after.add(it)
        return not any(m.deps & after for m in members)

    def before_outside_readers(self, members) -> list:
        """The members that run before every item outside the group that reads a member (directly or through
        other items): a matmul between two steps of an unrolled recurrence (its first step's cell reads the
        carry, the matmul the new h, the second step's cell the matmul) cuts the group there; what stays
        is acyclic (see `acyclic`)."""
        member_set = set(members)
        kept: set = set()
        after: set = set()                   # items (members dropped too) that run after a kept member
        for it in self.items:                # (program order: an item's producers come before it)
            if it in member_set and not it.deps & after:
                kept.add(it)
            elif it.deps & (kept | after):
                after.add(it)
        return [m for m in members if m in kept]

    def no_views_of(self, members) -> bool:
        """Does nothing recompute a member's reader in place through a view (Scheduler._inline_window reads
        its operands' storage through windows: a member there would have to be in memory)?"""
        outs = {id(m.eqn.outs[0]) for m in members}
        for it in self.items:
            for atom in it.leaves:
                if not hasattr(atom, "base"):
                    continue
                while hasattr(atom, "base"):
                    atom = atom.base
                root = self.windows[atom].root if atom in self.windows else atom
                if id(root) in outs:
                    return False
        return True

    def chains(self) -> list[RowChain]:
        taken: set = set()
        found = []
        for seed in self.items:
            shape = row_reduction_shape(seed)
            if shape is None or seed in taken or shape[-1] > self.max_length:
                continue
            members = self.grow(seed, shape, taken)
            if len(members) < 2 or not self.acyclic(members) or not self.no_views_of(members):
                continue
            taken.update(members)
            found.append(self.chain(members, shape))
        if self.cells:
            found += self.cell_chains(taken)
        return found

    def cell_chains(self, taken) -> list[RowChain]:
        """The cell chains among the items no row chain took (see the module docstring)."""
        found = []
        tried: set = set()          # members of a group that could not fuse: they seed no other
        for seed in self.items:
            shape = cell_shape(seed, self.max_length)
            if shape is None or seed in taken or seed in tried:
                continue
            members = self.before_outside_readers(self.grow_cell(seed, shape, taken))
            if len(members) < 2 or not self.no_views_of(members):
                tried.update(members)
                continue
            taken.update(members)
            found.append(self.chain(members, shape))
        return found

    # ------------------------------------------------------------------------------------------ steps
    def chain(self, members, shape) -> RowChain:
        index = {m: k for k, m in enumerate(members)}
        member_set = set(members)
        steps = []
        for m in members:
            if m.raw_expr is None:             # a reduction
                atom = m.eqn.inputs[0]
                found = self.member_read(atom, member_set)
                leaf = Expr(STEP, (), {"index": index[found[0]]}, atom.aval) if found is not None else \
                    Expr("input", (), {"var": atom}, atom.aval)
                steps.append(RowStep(m.eqn.primitive.name, leaf, m.eqn.outs[0].aval))
                continue

            def to_step(node, args):
                if node.op == "input":
                    found = self.member_read(node.params["var"], member_set)
                    if found is not None:
                        return Expr(STEP, (), {"index": index[found[0]]}, node.aval)
                    return node
                return Expr(node.op, tuple(args), node.params, node.aval)
            steps.append(RowStep(None, fold_expr(m.raw_expr, to_step), m.eqn.outs[0].aval))
        outputs = [m for m in members[:-1] if self.reads_outside(m.eqn.outs[0], member_set)] + [members[-1]]
        return RowChain(members, shape, steps, outputs)


def find_row_chains(items, producer, reshaped, windows, uses, max_length, cells=False) -> list[RowChain]:
    """The row chains among a segment's items (scheduler _Items in program order): `producer` maps each
    variable to its item, `reshaped` a reshape's output to its operand, `windows` each alias variable to
    its _Alias (root variable), `uses` each variable to its reads; rows longer than `max_length` stay
    unfused. `cells`: the cell chains too (after the row chains)."""
    return _Finder(items, producer, reshaped, windows, uses, max_length, cells).chains()


def numbered_steps(steps, leaves: list) -> tuple[RowStep, ...]:
    """`steps` with their input leaves numbered by first appearance; `leaves` gets the variables read."""
    number: dict = {}

    def renumber(node, args):
        if node.op != "input":
            return Expr(node.op, tuple(args), node.params, node.aval)
        var = node.params["var"]
        if id(var) not in number:
            number[id(var)] = len(leaves)
            leaves.append(var)
        return Expr("input", (), {"index": number[id(var)]}, node.aval)
    return tuple(RowStep(s.reduce, fold_expr(s.expr, renumber), s.aval) for s in steps)


def rows_params(chain: RowChain, steps) -> dict:
    """The params of the ROWS op of `chain` (before its split), with `steps` numbered (numbered_steps)."""
    position = {m: k for k, m in enumerate(chain.members)}
    return {ROW_SHAPE: chain.row_shape, STEPS: tuple(steps),
            STEP_OUTPUTS: tuple(position[m] for m in chain.outputs)}


def evaluate_rows(params, ins) -> list[np.ndarray]:
    """A ROWS op with numpy (the plan simulator's semantics): every step over all rows, its outputs."""
    shape = params[ROW_SHAPE]
    values: list = []
    for step in params[STEPS]:
        def ev(node, args):
            if node.op == "input":
                return ins[node.params["index"]]
            if node.op == STEP:
                return values[node.params["index"]].reshape(node.aval.shape)
            if node.op == "literal":
                return np.asarray(node.params["value"])
            if node.op == broadcast_p.name:
                return np.broadcast_to(args[0], node.aval.shape)
            return np.asarray(REGISTRY[node.op].impl(*args, **node.params)[0]).astype(node.aval.dtype)
        value = fold_expr(step.expr, ev)
        if step.reduce is not None:
            value = REGISTRY[step.reduce].impl(np.broadcast_to(value, shape), axes=(len(shape) - 1,))[0]
        values.append(np.broadcast_to(value, step.aval.shape).astype(step.aval.dtype))
    return [values[k] for k in params[STEP_OUTPUTS]]
