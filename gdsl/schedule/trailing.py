"""Trailing reductions: a sum / max / min over the last two axes or more becomes a reduction over the last
axis of a reshape, an IR-to-IR pass the scheduler runs first.

`mean(x, axis=(2, 3))` of an `[N, C, H, W]` activation (a global average pool) reduces the rows of
`x.reshape(N, C, H * W)`: the same elements in the same memory order, so the reshape is a view and costs
nothing. In that form the row-chain fusion (rows.py: a reduction over the last axis and the per-row steps
that read it) sees the pool's sum and its division by H * W as one op, one wave, where they were two ops
with a barrier between them. A reduction that keeps no axis, or reduces one axis, or axes that are not the
last ones, stays as it is.
"""
from __future__ import annotations

import math

from gdsl.core.ir import Eqn, Jaxpr, Program, ShapedArray, Var
from gdsl.primitives.reductions import AXES_REDUCTIONS
from gdsl.primitives.structural import reshape_p
from gdsl.schedule.loops import WhileRewriter

# The fewest trailing axes a reduction must reduce to be flattened (a larger number flattens fewer: a switch
# for measuring what the pass gives).
MIN_AXES = 2


def flatten_trailing_reductions(program: Program) -> Program:
    """`program` with its reductions over two or more trailing axes over one (the same Program when none)."""
    return _Flattener().program(program)


def _flattened(eqn: Eqn) -> list[Eqn] | None:
    """[reshape, reduction over its last axis] for a reduction over the trailing axes k.. (k >= 1, two axes
    or more), else None."""
    if eqn.primitive not in AXES_REDUCTIONS or not isinstance(eqn.inputs[0], Var):
        return None
    x = eqn.inputs[0].aval
    axes = tuple(sorted(eqn.params["axes"]))
    first = x.ndim - len(axes)
    if len(axes) < max(MIN_AXES, 2) or first < 1 or axes != tuple(range(first, x.ndim)):
        return None
    rows = Var(ShapedArray(tuple(x.shape[:first]) + (math.prod(x.shape[first:]),), x.dtype))
    return [Eqn(reshape_p, eqn.inputs, {"new_shape": rows.aval.shape}, (rows,)),
            Eqn(eqn.primitive, (rows,), dict(eqn.params, axes=(first,)), eqn.outs)]


class _Flattener(WhileRewriter):
    """Every Jaxpr at any depth (loop bodies, branches, recursive functions: WhileRewriter's walk), its
    sub-programs first."""

    def rewrite_while(self, eqn: Eqn) -> list[Eqn]:
        return [eqn]

    def jaxpr(self, jaxpr: Jaxpr) -> Jaxpr:
        jaxpr = super().jaxpr(jaxpr)
        eqns: list[Eqn] = []
        changed = False
        for eqn in jaxpr.eqns:
            new = _flattened(eqn)
            changed |= new is not None
            eqns += new or [eqn]
        return Jaxpr(jaxpr.in_binders, tuple(eqns), jaxpr.outs) if changed else jaxpr
