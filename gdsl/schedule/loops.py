"""What the IR-to-IR loop passes (licm.py, steps.py, wavefront.py) share: the walk that hands every `while`
equation, at any depth, innermost first, to the pass, which replaces it by a list of equations; the
recognition of counted loops; dead-equation removal.

Sub-programs are rewritten before the equation that carries them, so a pass sees a loop whose inner loops
are already transformed. A recursive function's body is rewritten once and shared by all its calls."""
from __future__ import annotations

from gdsl.core.ir import Eqn, FunctionDef, Jaxpr, Lit, Program
from gdsl.primitives.control import while_p
from gdsl.primitives.elementwise import add_p, lt_p
from gdsl.primitives.registry import CONTROL


def counted_loop(eqn: Eqn) -> tuple[int, int, int] | None:
    """(counter, lo, hi) when the while equation `eqn` is `for counter in range(lo, hi)` with literal bounds
    (fori_loop's shape: carry number `counter` starts at the literal lo, the body adds 1 to it, the
    condition is `counter < hi`), else None."""
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond, body = p["cond_jaxpr"], p["body_jaxpr"]
    if len(cond.eqns) != 1:
        return None
    test = cond.eqns[0]
    if test.primitive is not lt_p or cond.outs != test.outs or not isinstance(test.inputs[1], Lit):
        return None
    cond_carries = cond.in_binders[nc:]
    if test.inputs[0] not in cond_carries:
        return None
    counter = cond_carries.index(test.inputs[0])
    init = eqn.inputs[nc + nb + counter]
    step = body.outs[counter]
    increments = [e for e in body.eqns if e.outs == (step,)]
    if not isinstance(init, Lit) or not increments or increments[0].primitive is not add_p \
            or increments[0].inputs[0] is not body.in_binders[nb + counter] \
            or not isinstance(increments[0].inputs[1], Lit) or increments[0].inputs[1].val != 1:
        return None
    return counter, int(init.val), int(test.inputs[1].val)


def without_dead_eqns(jaxpr: Jaxpr) -> Jaxpr:
    """`jaxpr` without the equations whose results nothing reads (every gdsl primitive is pure)."""
    live = {a for a in jaxpr.outs}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        if any(v in live for v in eqn.outs):
            kept.append(eqn)
            live.update(eqn.inputs)
    if len(kept) == len(jaxpr.eqns):
        return jaxpr
    return Jaxpr(jaxpr.in_binders, tuple(reversed(kept)), jaxpr.outs)


class WhileRewriter:
    """Subclasses implement `rewrite_while(eqn) -> list[Eqn]` (the equations that replace `eqn`, in order;
    `[eqn]` keeps it). Unchanged parts of the IR keep their identity, so `program(p) is p` when nothing
    changed."""

    def __init__(self):
        self.functions: dict = {}          # id(FunctionDef) -> its transformed FunctionDef (shared by calls)

    def rewrite_while(self, eqn: Eqn) -> list[Eqn]:
        raise NotImplementedError

    def program(self, program: Program) -> Program:
        jaxpr = self.jaxpr(program.jaxpr)
        if jaxpr is program.jaxpr:
            return program
        return Program(jaxpr, program.consts, program.in_tree, program.out_tree, program.name, program.meta)

    def jaxpr(self, jaxpr: Jaxpr) -> Jaxpr:
        """`jaxpr` with the loops in it (at any depth) transformed; the same object when nothing changed."""
        eqns: list[Eqn] = []
        changed = False
        for eqn in jaxpr.eqns:
            if eqn.primitive.family != CONTROL:
                eqns.append(eqn)
                continue
            new = self.control_eqn(eqn)
            replaced = self.rewrite_while(new) if new.primitive is while_p else [new]
            changed |= replaced != [eqn]
            eqns += replaced
        return Jaxpr(jaxpr.in_binders, tuple(eqns), jaxpr.outs) if changed else jaxpr

    def control_eqn(self, eqn: Eqn) -> Eqn:
        """`eqn` with its sub-programs transformed (the same object when none changed)."""
        params, changed = {}, False
        for key, value in eqn.params.items():
            new = self.param(value)
            changed |= new is not value
            params[key] = new
        return Eqn(eqn.primitive, eqn.inputs, params, eqn.outs) if changed else eqn

    def param(self, value):
        if isinstance(value, Jaxpr):
            return self.jaxpr(value)
        if isinstance(value, FunctionDef):
            return self.function(value)
        if isinstance(value, tuple) and any(isinstance(v, Jaxpr) for v in value):
            new = tuple(self.jaxpr(v) if isinstance(v, Jaxpr) else v for v in value)
            return value if all(a is b for a, b in zip(new, value)) else new
        return value

    def function(self, fn: FunctionDef) -> FunctionDef:
        """A recursive function's body holds loops too; every call of one function gets the same result."""
        if id(fn) not in self.functions:
            self.functions[id(fn)] = fn      # (a body that names itself sees the original while in progress)
            body = self.jaxpr(fn.jaxpr)
            self.functions[id(fn)] = fn if body is fn.jaxpr else \
                FunctionDef(fn.name, body, fn.nconsts, fn.max_depth)
        return self.functions[id(fn)]
