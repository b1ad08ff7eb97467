"""Index wraps of values that are never negative: an IR-to-IR pass the scheduler runs first (option
`index_ranges`, on unless `index_ranges=False`).

`gnp.take(table, i)` wraps negative indices as numpy does: `where(i < 0, i + n, i)`, three elementwise
equations before the gather. When `i` can never be negative the test is always false and the `where` is `i`
itself. At batch 64 Seq2seq's token (an argmax, carried from step to step) is such an index: the wrap is an
op of its own, a wave before the embedding gather, which waits for it behind a grid barrier.

A variable is known non-negative (an integer) when it is: a literal >= 0; the result of argmax / argmin; a
broadcast, reshape, slice or dynamic slice of a non-negative array; a dynamic_update_slice of a non-negative
array by a non-negative update; a select between non-negative values; an int-to-int convert of a
non-negative value of no wider type; a loop carry whose initial value and whose value after the body both
are (found by iterating from "every carry that starts non-negative" until nothing changes), or a loop's
const that is. Then `lt(x, 0)` is always false, and `select(p, a, b)` of such a `p` is `b` (of the same
type): its readers read `b` and the equations left unread go. Integer additions are not followed (they may
wrap around), nor anything inside conds and recursive functions (their sub-programs are left as they are).
"""
from __future__ import annotations

import numpy as np

from gdsl import dtypes
from gdsl.core.ir import Eqn, Jaxpr, Lit, Program, Var
from gdsl.primitives.control import while_p
from gdsl.primitives.elementwise import convert_p, lt_p, select_p
from gdsl.primitives.reductions import ARG_REDUCE, REDUCE_PRIMS
from gdsl.primitives.structural import (
    broadcast_p,
    dynamic_slice_p,
    dynamic_update_slice_p,
    reshape_p,
    slice_p,
)
from gdsl.schedule.loops import without_dead_eqns

# The primitives whose result is an index into their operand (never negative).
_INDEX_RESULTS = frozenset(REDUCE_PRIMS[name] for name in ARG_REDUCE)
# The primitives whose result holds elements of their first operand only (non-negative when it is).
_MOVES_FIRST = frozenset({broadcast_p, reshape_p, slice_p, dynamic_slice_p})


def drop_index_wraps(program: Program) -> Program:
    """`program` with every `where(i < 0, ..., i)` of a never-negative integer `i` replaced by `i` (the same
    Program when there is none)."""
    jaxpr = _simplified(program.jaxpr, set())
    if jaxpr is program.jaxpr:
        return program
    return Program(jaxpr, program.consts, program.in_tree, program.out_tree, program.name, program.meta)


def _non_negative_literal(atom) -> bool:
    return isinstance(atom, Lit) and dtypes.is_int(atom.aval.dtype) and bool(np.all(np.asarray(atom.val) >= 0))


class _Facts:
    """What is known about the variables of one Jaxpr: the non-negative integers, the always-false booleans,
    and the variables replaced by another atom."""

    def __init__(self, non_negative):
        self.non_negative = set(non_negative)
        self.always_false: set = set()
        self.replaced: dict = {}

    def atom(self, a):
        return self.replaced.get(a, a) if isinstance(a, Var) else a

    def is_non_negative(self, a) -> bool:
        a = self.atom(a)
        return _non_negative_literal(a) or (isinstance(a, Var) and a in self.non_negative)

    def selected(self, eqn: Eqn, inputs) -> bool:
        """Is `eqn` (reading `inputs`) a select whose predicate is always false? Its result is then its third
        operand, which its readers read instead (noted here)."""
        if eqn.primitive is not select_p or not isinstance(inputs[0], Var) or inputs[0] not in self.always_false \
                or inputs[2].aval != eqn.outs[0].aval:
            return False
        self.replaced[eqn.outs[0]] = inputs[2]
        if self.is_non_negative(inputs[2]):
            self.non_negative.add(eqn.outs[0])
        return True

    def note(self, eqn: Eqn):
        """Enter what `eqn` (its inputs already replaced) tells about its results."""
        prim, ins, out = eqn.primitive, eqn.inputs, eqn.outs[0] if len(eqn.outs) == 1 else None
        if out is None or not (dtypes.is_int(out.aval.dtype) or out.aval.dtype == dtypes.bool_):
            return
        if prim in _INDEX_RESULTS:
            self.non_negative.add(out)
        elif prim in _MOVES_FIRST and self.is_non_negative(ins[0]):
            self.non_negative.add(out)
        elif prim is dynamic_update_slice_p and self.is_non_negative(ins[0]) and self.is_non_negative(ins[1]):
            self.non_negative.add(out)
        elif prim is select_p and all(self.is_non_negative(a) for a in ins[1:]):
            self.non_negative.add(out)
        elif prim is convert_p and dtypes.is_int(out.aval.dtype) and dtypes.is_int(ins[0].aval.dtype) and \
                np.dtype(out.aval.dtype).itemsize >= np.dtype(ins[0].aval.dtype).itemsize and \
                self.is_non_negative(ins[0]):
            self.non_negative.add(out)
        elif prim is lt_p and self.is_non_negative(ins[0]) and isinstance(ins[1], Lit) and \
                np.all(np.asarray(ins[1].val) <= 0):
            self.always_false.add(out)


def _simplified(jaxpr: Jaxpr, non_negative: set) -> Jaxpr:
    """`jaxpr` simplified, its binders in `non_negative` known to be non-negative integers (the same object
    when nothing changed)."""
    facts = _Facts(non_negative)
    eqns: list[Eqn] = []
    changed = False
    for eqn in jaxpr.eqns:
        inputs = tuple(facts.atom(a) for a in eqn.inputs)
        if facts.selected(eqn, inputs):
            changed = True
            continue
        new = eqn if inputs == eqn.inputs else Eqn(eqn.primitive, inputs, eqn.params, eqn.outs)
        if new.primitive is while_p:
            new = _simplified_while(new, facts)
        changed |= new is not eqn
        eqns.append(new)
        facts.note(new)
    if not changed:
        return jaxpr
    outs = tuple(facts.atom(a) for a in jaxpr.outs)
    return without_dead_eqns(Jaxpr(jaxpr.in_binders, tuple(eqns), outs))


def _simplified_while(eqn: Eqn, outer: _Facts) -> Eqn:
    """A while equation with its condition and body simplified under what is known of its carries; its
    results that are non-negative carries enter `outer`."""
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_j, body_j = p["cond_jaxpr"], p["body_jaxpr"]
    cond_consts, body_consts, inits = eqn.inputs[:nc], eqn.inputs[nc:nc + nb], eqn.inputs[nc + nb:]
    carries = {k for k, a in enumerate(inits) if outer.is_non_negative(a)}
    body_known = {b for b, a in zip(body_j.in_binders[:nb], body_consts) if outer.is_non_negative(a)}
    while True:                # the carries that stay non-negative through the body
        known = body_known | {body_j.in_binders[nb + k] for k in carries}
        facts = _Facts(known)
        for inner in body_j.eqns:         # (a loop inside: its results unknown, which is safe)
            inputs = tuple(facts.atom(a) for a in inner.inputs)
            if not facts.selected(inner, inputs):
                facts.note(Eqn(inner.primitive, inputs, inner.params, inner.outs))
        kept = {k for k in carries if facts.is_non_negative(body_j.outs[k])}
        if kept == carries:
            break
        carries = kept
    body = _simplified(body_j, body_known | {body_j.in_binders[nb + k] for k in carries})
    cond_known = {b for b, a in zip(cond_j.in_binders[:nc], cond_consts) if outer.is_non_negative(a)}
    cond = _simplified(cond_j, cond_known | {cond_j.in_binders[nc + k] for k in carries})
    outer.non_negative.update(eqn.outs[k] for k in carries)
    if body is body_j and cond is cond_j:
        return eqn
    return Eqn(eqn.primitive, eqn.inputs, dict(p, cond_jaxpr=cond, body_jaxpr=body), eqn.outs)
