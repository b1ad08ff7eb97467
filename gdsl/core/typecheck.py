"""The IR type checker. Tests run it after tracing and after every transformation (GDSL_CHECK=1 turns it
on everywhere). It re-derives every equation's output types from its inputs and checks that the IR is
closed: a variable is read only after it is bound, and only in the Jaxpr that binds it."""
from __future__ import annotations

from gdsl.core.ir import FunctionDef, Jaxpr, Lit, Program, Var, subjaxprs


class IRTypeError(TypeError):
    pass


def typecheck_program(program: Program) -> None:
    if len(program.consts) != program.nconsts:
        raise IRTypeError("program consts do not match")
    for value, var in zip(program.consts, program.jaxpr.in_binders):
        if tuple(value.shape) != var.aval.shape or value.dtype != var.aval.dtype:
            raise IRTypeError(f"const of shape {value.shape} {value.dtype} bound to {var.aval}")
    typecheck_jaxpr(program.jaxpr)


def typecheck_jaxpr(jaxpr: Jaxpr, functions: dict[str, FunctionDef] | None = None) -> None:
    functions = dict(functions or {})
    env: set = set()
    for v in jaxpr.in_binders:
        if not isinstance(v, Var) or v in env:
            raise IRTypeError("binders must be distinct variables")
        env.add(v)

    def check_atom(a):
        if isinstance(a, Lit):
            if a.aval.shape != () or a.val.dtype != a.aval.dtype:
                raise IRTypeError(f"bad literal {a.val!r}: {a.aval}")
        elif a not in env:
            raise IRTypeError(f"variable of type {a.aval} read before it is bound (or from another Jaxpr)")

    for eqn in jaxpr.eqns:
        for a in eqn.inputs:
            check_atom(a)
        in_avals = [a.aval for a in eqn.inputs]
        try:
            expected = eqn.primitive.abstract_eval(*in_avals, **eqn.params)
        except TypeError as e:
            raise IRTypeError(f"{eqn.primitive.name}: {e}") from None
        if list(expected) != [v.aval for v in eqn.outs]:
            raise IRTypeError(f"{eqn.primitive.name}: outputs {[str(v.aval) for v in eqn.outs]} but the rule "
                              f"gives {[str(a) for a in expected]}")
        inner = functions
        fn = eqn.params.get("fn")
        if isinstance(fn, FunctionDef):
            inner = {**functions, fn.name: fn}
        if eqn.primitive.name == "recurse_call":
            callee = functions.get(eqn.params["name"])
            if callee is None:
                raise IRTypeError(f"recurse_call of {eqn.params['name']!r} outside that function")
            if tuple(eqn.params["arg_avals"]) != tuple(callee.arg_avals) or \
                    tuple(eqn.params["result"]) != tuple(callee.result_avals):
                raise IRTypeError(f"recurse_call of {callee.name}: types differ from its definition")
        for sub in subjaxprs(eqn):
            typecheck_jaxpr(sub, inner)
        for v in eqn.outs:
            if v in env:
                raise IRTypeError("a variable is bound twice")
            env.add(v)
    for a in jaxpr.outs:
        check_atom(a)
