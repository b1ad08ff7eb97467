"""Speculation: small work on the program's inputs leaves its branches, an IR-to-IR pass the scheduler runs
before loop-invariant code motion (licm.py).

A branch often starts with work that reads nothing but the program's inputs (weights) and literals: a batch
norm's `gamma / sqrt(var + eps)` in a gated residual block. Inside the branch it is a wave of its own and a
barrier before the branch's first real op, paid every time the branch runs. Computed before the cond it
reads the same values, and the scheduler places it where its operands exist (`_cond_inputs_early`): with
the kernel's first wave, on vEUs that are idle there, so it costs no wave and no barrier; LICM moves it out
of any loop around the cond first. Every gdsl primitive is pure, so this changes no result; the work runs
even when the branch does not, which is why only **small** work is moved: an elementwise or data-movement
equation of at most `MAX_ELEMENTS` results (a per-channel vector, not an activation), whose inputs are all
**static** -- literals, the program's inputs and consts, or results of equations hoisted so. A cond operand is
static where the value bound to it is; a loop's consts are where theirs are; a recursive function's arguments
never are (its body is left alone). What the program computes from its inputs outside the branch is not:
small work on it (BlockDrop's `1 - mask` of a policy column) is recomputed in the epilogue that reads it, in
the branch, at no cost, and moved out it would be an op of its own, a wave after its producer's.

Nested conds are handled inside out: an inner branch gives up its static work to the enclosing branch, which
gives it up in turn when it is static there too.
"""
from __future__ import annotations

import math

from gdsl.core.ir import Eqn, Jaxpr, Program, Var
from gdsl.primitives.control import cond_p, while_p
from gdsl.primitives.registry import CONTROL, DATA_MOVEMENT, ELEMENTWISE
from gdsl.primitives.structural import reshape_p

# The most result elements of an equation that runs whether or not its branch does.
MAX_ELEMENTS = 1 << 14


def hoist_branches(program: Program) -> Program:
    """`program` with the small static work of its branches moved in front of their conds (the same
    Program when there is none)."""
    jaxpr = _jaxpr(program.jaxpr, set(program.jaxpr.in_binders), _has_first_wave(program.jaxpr))
    if jaxpr is program.jaxpr:
        return program
    return Program(jaxpr, program.consts, program.in_tree, program.out_tree, program.name, program.meta)


def _has_first_wave(jaxpr: Jaxpr) -> bool:
    """Does the program compute arrays (not only scalars, which every vEU computes itself) before its first
    control-flow equation? Then its kernel has a first wave that speculated work can join."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.family == CONTROL:
            return False
        if eqn.primitive is not reshape_p and any(math.prod(v.aval.shape) > 1 for v in eqn.outs):
            return True
    return False


def _small(eqn: Eqn) -> bool:
    return eqn.primitive.family in (ELEMENTWISE, DATA_MOVEMENT) and \
        sum(math.prod(v.aval.shape) for v in eqn.outs) <= MAX_ELEMENTS


def _reads_static(eqn: Eqn, static: set) -> bool:
    return all(not isinstance(a, Var) or a in static for a in eqn.inputs)


def _jaxpr(jaxpr: Jaxpr, static: set, free: bool) -> Jaxpr:
    """`jaxpr` with the conds in it (at any depth outside recursive functions) giving up their small static
    work; `static` holds its static variables on entry and gains the results of hoisted work. `free`: whether
    the work of conds outside loops may move (the program has a first wave for it to join, _has_first_wave);
    inside a loop it always may (LICM then takes it out of the loop: it runs once instead of every step)."""
    eqns: list[Eqn] = []
    changed = False
    for eqn in jaxpr.eqns:
        if eqn.primitive is cond_p:
            new = _cond(eqn, static, free)
        elif eqn.primitive is while_p:
            new = [_while(eqn, static)]
        else:
            new = [eqn]
        changed |= new != [eqn]
        eqns += new
    return Jaxpr(jaxpr.in_binders, tuple(eqns), jaxpr.outs) if changed else jaxpr


def _while(eqn: Eqn, static: set) -> Eqn:
    """The while equation with its condition's and body's conds transformed (their consts static where the
    outer values are; the carries never)."""
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    outer = eqn.inputs

    def inner(j: Jaxpr, consts) -> Jaxpr:
        return _jaxpr(j, {b for b, a in zip(j.in_binders, consts) if isinstance(a, Var) and a in static}, True)
    cond_j, body_j = inner(p["cond_jaxpr"], outer[:nc]), inner(p["body_jaxpr"], outer[nc:nc + nb])
    if cond_j is p["cond_jaxpr"] and body_j is p["body_jaxpr"]:
        return eqn
    return Eqn(eqn.primitive, eqn.inputs, dict(p, cond_jaxpr=cond_j, body_jaxpr=body_j), eqn.outs)


def _cond(eqn: Eqn, static: set, free: bool) -> list[Eqn]:
    """The equations hoisted out of a cond's branches (reading the outer values, fresh result variables),
    then the cond, whose branches read their results as new operands (one binder per hoisted result in
    every branch; the branch it came from binds the equation's original variable, so nothing inside needs
    rewriting). Not a result of the branch: the branch would copy it where it computed it."""
    operands = eqn.inputs[1:]
    hoisted: list[Eqn] = []
    new_operands: list = []
    added: list[list] = []            # per branch: its binder for every new operand
    branches = []
    for branch in eqn.params["branches"]:
        inner_static = {b for b, a in zip(branch.in_binders, operands) if isinstance(a, Var) and a in static}
        movable = set(inner_static)           # what a hoisted equation may read: static binders, hoisted results
        branch = _jaxpr(branch, inner_static, free)
        outer = dict(zip(branch.in_binders, operands))       # inner Var -> the outer atom
        returned = {a for a in branch.outs if isinstance(a, Var)}
        results, kept = [], []
        for e in branch.eqns:
            if free and e.primitive not in (cond_p, while_p) and _small(e) and _reads_static(e, movable) and \
                    not returned.intersection(e.outs):
                outs = tuple(Var(v.aval) for v in e.outs)
                hoisted.append(Eqn(e.primitive, tuple(outer.get(a, a) for a in e.inputs), e.params, outs))
                outer.update(zip(e.outs, outs))
                movable.update(e.outs)
                results += e.outs
            else:
                kept.append(e)
        read = {a for e in kept for a in e.inputs if isinstance(a, Var)} | \
            {a for a in branch.outs if isinstance(a, Var)}
        own = [v for v in results if v in read]
        for prior in added:                    # the earlier branches ignore this one's results
            prior += [Var(v.aval) for v in own]
        added.append([Var(v.aval) for v in new_operands] + own)
        new_operands += [outer[v] for v in own]
        branches.append(branch if not results else Jaxpr(branch.in_binders, tuple(kept), branch.outs))
    if not hoisted and all(a is b for a, b in zip(branches, eqn.params["branches"])):
        return [eqn]
    for e in hoisted:
        static.update(e.outs)
    branches = [Jaxpr(b.in_binders + tuple(extra), b.eqns, b.outs) for b, extra in zip(branches, added)]
    cond = Eqn(eqn.primitive, eqn.inputs + tuple(new_operands), dict(eqn.params, branches=tuple(branches)),
               eqn.outs)
    return hoisted + [cond]
