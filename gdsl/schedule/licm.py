"""Loop-invariant code motion: an IR-to-IR pass the scheduler runs first.

An equation of a while loop's body (or condition) whose inputs are all loop invariants -- literals, the
body's consts, or results of equations hoisted before it -- computes the same value in every iteration.
It moves out of the loop, in front of the `while` equation, and its result enters the loop as a new const
of the body (or condition). All gdsl primitives are pure, so this changes no result; the work runs once
even if the loop runs zero times, which costs time, never correctness. Control-flow equations stay where
they are (their sub-programs are transformed in place instead).

Nested loops are handled inside out: a loop's body is transformed first (its inner loops give up their
invariants to it), and then whatever of the body is invariant in this loop leaves it, so an equation
climbs as many levels as it is invariant for.
"""
from __future__ import annotations

from gdsl.core.ir import Eqn, Jaxpr, Program, Var
from gdsl.primitives.registry import CONTROL
from gdsl.schedule.loops import WhileRewriter


def hoist_program(program: Program) -> Program:
    """`program` with every loop-invariant equation moved out of its loops (the same Program when none)."""
    return _Hoister().program(program)


class _Hoister(WhileRewriter):
    def rewrite_while(self, eqn: Eqn) -> list[Eqn]:
        hoisted, new = _hoist_while(eqn)
        return hoisted + [new]


def _hoist_while(eqn: Eqn) -> tuple[list[Eqn], Eqn]:
    """The equations hoisted out of a while equation's condition and body (to run before it, reading the
    outer values), and the while equation that reads their results as new consts."""
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_consts = eqn.inputs[:nc]
    body_consts = eqn.inputs[nc:nc + nb]
    inits = eqn.inputs[nc + nb:]
    cond_hoisted, cond_j, cond_consts = _hoist_from(p["cond_jaxpr"], cond_consts)
    body_hoisted, body_j, body_consts = _hoist_from(p["body_jaxpr"], body_consts)
    hoisted = cond_hoisted + body_hoisted
    if not hoisted:
        return [], eqn
    params = dict(p, cond_jaxpr=cond_j, body_jaxpr=body_j, cond_nconsts=len(cond_consts),
                  body_nconsts=len(body_consts))
    return hoisted, Eqn(eqn.primitive, tuple(cond_consts) + tuple(body_consts) + tuple(inits), params, eqn.outs)


def _hoist_from(jaxpr: Jaxpr, consts) -> tuple[list[Eqn], Jaxpr, list]:
    """Split `jaxpr` (whose first len(consts) binders are loop invariants, bound to the outer atoms
    `consts`) into the invariant equations -- rewritten to read the outer atoms, with fresh outer result
    variables -- and the rest. The remaining Jaxpr binds each hoisted result it still reads as a new const
    (the hoisted equation's original variable, so no equation inside needs rewriting); `consts` grows by
    the outer variables those binders are fed from."""
    nconsts = len(consts)
    outer = dict(zip(jaxpr.in_binders[:nconsts], consts))   # invariant inner Var -> the outer atom
    hoisted: list[Eqn] = []
    inner_results: list[Var] = []      # the body variables of the hoisted equations' results, in order
    kept: list[Eqn] = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.family != CONTROL and all(not isinstance(a, Var) or a in outer for a in eqn.inputs):
            outs = tuple(Var(v.aval) for v in eqn.outs)
            hoisted.append(Eqn(eqn.primitive, tuple(outer.get(a, a) for a in eqn.inputs), eqn.params, outs))
            outer.update(zip(eqn.outs, outs))
            inner_results += eqn.outs
        else:
            kept.append(eqn)
    if not hoisted:
        return [], jaxpr, list(consts)
    read = {a for e in kept for a in e.inputs if isinstance(a, Var)} | {a for a in jaxpr.outs if isinstance(a, Var)}
    new_binders = [v for v in inner_results if v in read]
    binders = jaxpr.in_binders[:nconsts] + tuple(new_binders) + jaxpr.in_binders[nconsts:]
    consts = list(consts) + [outer[v] for v in new_binders]
    return hoisted, Jaxpr(binders, tuple(kept), jaxpr.outs), consts

