"""Base cases at the call site: an IR-to-IR pass the scheduler runs first (option `peel`, on by default).

A recursive function whose body ends in a `cond` that is its result, where some branches make no call (base
cases: RAE's leaf, `x[n]`), pays a whole call for every base case: the argument, the push, the frame switch,
the branch inside the callee, the return. Each call of the function from its own body,

    r = f(a)

becomes the function's own branch on `a`, with the base cases written out and the call kept for the others:

    i = index(a)                    # the body's equations that compute the branch index, for `a`
    r = cond[peeled=f](i, ..., a)   # base branch k: its equations for `a`; any other branch: f(a)

Every gdsl primitive is pure and `f(a)` is that branch of `f`'s body, so this changes no result. The `cond`
carries `peeled=f`: entering it checks `f`'s depth as the call would (a base case at the call site holds no
frame, but a call from a frame at max_depth still raises gdsl.RecursionDepthError, on every backend).

Eligible: a function whose body is equations without control flow, then one `cond` whose results are the
body's results; a base branch has no control flow and at most PEEL_MAX_EQNS equations (it is written out at
every call site). Calls inside loops of the body keep their calls (the loop's consts are not threaded); the
call from outside the function (the recursion's entry) stays a call. The function's consts that the index and
the base branches read enter each `cond` around a call site as operands of their own.
"""
from __future__ import annotations

from gdsl.core.ir import Eqn, FunctionDef, Jaxpr, Var
from gdsl.primitives.control import cond_p, recurse_call_p
from gdsl.primitives.registry import CONTROL
from gdsl.schedule.loops import WhileRewriter

PEEL_MAX_EQNS = 16        # the most equations of a base branch written out at each call site


def peel_program(program):
    """`program` with the base cases of its recursive functions evaluated at their call sites (the same
    Program when none is eligible)."""
    return _Peeler().program(program)


class _Peeler(WhileRewriter):
    def __init__(self):
        super().__init__()
        self.peeled: dict = {}             # id(FunctionDef) -> its peeled FunctionDef (one for all its entries)

    def rewrite_while(self, eqn: Eqn) -> list[Eqn]:
        return [eqn]

    def function(self, fn: FunctionDef) -> FunctionDef:
        if id(fn) not in self.peeled:
            inner = super().function(fn)           # (functions defined inside this one's body first)
            peel = _Peel.of(inner)
            self.peeled[id(fn)] = inner if peel is None else \
                FunctionDef(inner.name, peel.body(), inner.nconsts, inner.max_depth)
        return self.peeled[id(fn)]


class _Peel:
    """What a call site of `fn` inlines: the body's equations up to the cond that the index and the base
    branches read (`pre`), the cond (`cond`), and which of its branches are base cases (`base`)."""

    def __init__(self, fn: FunctionDef, pre: list, cond: Eqn, base: frozenset, operands: list, consts: list):
        self.fn, self.pre, self.cond, self.base = fn, pre, cond, base
        self.operands = operands        # the cond's operands (positions) that a base branch reads
        self.consts = consts            # the function's consts (positions) that the call site needs

    @staticmethod
    def of(fn: FunctionDef) -> _Peel | None:
        body = fn.jaxpr
        if not body.eqns or body.eqns[-1].primitive is not cond_p:
            return None
        cond = body.eqns[-1]
        if tuple(body.outs) != tuple(cond.outs) or any(e.primitive.family == CONTROL for e in body.eqns[:-1]):
            return None
        branches = cond.params["branches"]
        base = frozenset(k for k, b in enumerate(branches)
                         if len(b.eqns) <= PEEL_MAX_EQNS and all(e.primitive.family != CONTROL for e in b.eqns))
        if not base or len(base) == len(branches):
            return None
        operands = [j for j in range(len(cond.inputs) - 1)
                    if any(_reads(branches[k], branches[k].in_binders[j]) for k in base)]
        read = {a for a in [cond.inputs[0]] + [cond.inputs[1 + j] for j in operands] if isinstance(a, Var)}
        pre = []
        for eqn in reversed(body.eqns[:-1]):
            if any(v in read for v in eqn.outs):
                pre.append(eqn)
                read.update(a for a in eqn.inputs if isinstance(a, Var))
        consts = [k for k, v in enumerate(body.in_binders[:fn.nconsts]) if v in read]
        return _Peel(fn, pre[::-1], cond, base, operands, consts)

    def body(self) -> Jaxpr:
        """The function's body with every call of itself (outside loops) peeled."""
        body = self.fn.jaxpr
        consts = body.in_binders[:self.fn.nconsts]
        return self._block(body, {k: consts[k] for k in self.consts})

    def _block(self, jaxpr: Jaxpr, scope: dict) -> Jaxpr:
        """`jaxpr` with its call sites peeled; `scope`: const number -> the atom that holds it in `jaxpr`."""
        eqns, changed = [], False
        for eqn in jaxpr.eqns:
            if eqn.primitive is recurse_call_p and eqn.params["name"] == self.fn.name:
                eqns += self._site(eqn, scope)
                changed = True
            elif eqn.primitive is cond_p and _calls(eqn, self.fn.name):
                eqns.append(self._threaded(eqn, scope))
                changed = True
            else:
                eqns.append(eqn)
        return Jaxpr(jaxpr.in_binders, tuple(eqns), jaxpr.outs) if changed else jaxpr

    def _threaded(self, eqn: Eqn, scope: dict) -> Eqn:
        """A cond whose branches call the function: the consts a call site needs enter it as operands."""
        order = sorted(scope)
        branches = []
        for branch in eqn.params["branches"]:
            binders = [Var(scope[k].aval) for k in order]
            inner = self._block(Jaxpr(branch.in_binders + tuple(binders), branch.eqns, branch.outs),
                                dict(zip(order, binders)))
            branches.append(inner)
        return Eqn(cond_p, eqn.inputs + tuple(scope[k] for k in order), dict(eqn.params, branches=tuple(branches)),
                   eqn.outs)

    def _site(self, call: Eqn, scope: dict) -> list[Eqn]:
        """The equations that replace `r = f(a)`: the index for `a`, and the cond of base branches and calls."""
        fn, body = self.fn, self.fn.jaxpr
        env = {body.in_binders[k]: scope[k] for k in self.consts}
        env.update(zip(body.in_binders[fn.nconsts:], call.inputs))
        eqns = [_renamed(e, env) for e in self.pre]
        operands = tuple(env.get(a, a) for a in (self.cond.inputs[1 + j] for j in self.operands)) + tuple(call.inputs)
        branches = []
        for k, branch in enumerate(self.cond.params["branches"]):
            binders = tuple(Var(a.aval) for a in operands)
            if k in self.base:
                inner = {branch.in_binders[j]: b for j, b in zip(self.operands, binders)}
                inner_eqns = tuple(_renamed(e, inner) for e in branch.eqns)
                branches.append(Jaxpr(binders, inner_eqns, tuple(inner.get(a, a) for a in branch.outs)))
            else:
                args = binders[len(operands) - len(call.inputs):]
                outs = tuple(Var(v.aval) for v in call.outs)
                branches.append(Jaxpr(binders, (Eqn(recurse_call_p, args, call.params, outs),), outs))
        index = env.get(self.cond.inputs[0], self.cond.inputs[0])
        params = dict(self.cond.params, branches=tuple(branches), peeled=fn.name)
        return eqns + [Eqn(cond_p, (index,) + operands, params, call.outs)]


def _renamed(eqn: Eqn, env: dict) -> Eqn:
    """`eqn` reading env's atoms for its inputs, with fresh result variables (recorded in env)."""
    outs = tuple(Var(v.aval) for v in eqn.outs)
    new = Eqn(eqn.primitive, tuple(env.get(a, a) for a in eqn.inputs), eqn.params, outs)
    env.update(zip(eqn.outs, outs))
    return new


def _reads(jaxpr: Jaxpr, var) -> bool:
    return any(var is a for e in jaxpr.eqns for a in e.inputs) or any(var is a for a in jaxpr.outs)


def _calls(eqn: Eqn, name: str) -> bool:
    """Does cond `eqn` call `name` from a branch, outside loops (through nested conds)?"""
    for branch in eqn.params["branches"]:
        for e in branch.eqns:
            if (e.primitive is recurse_call_p and e.params["name"] == name) or \
                    (e.primitive is cond_p and _calls(e, name)):
                return True
    return False

