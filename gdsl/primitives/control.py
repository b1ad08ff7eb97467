"""Control-flow primitives. Their sub-programs are params; their numpy rules run the interpreter.

    while[cond_jaxpr, body_jaxpr, cond_nconsts, body_nconsts]  cond_consts.. body_consts.. carry..
    cond[branches, peeled]                                     index operands..   (index clamped; peeled:
                                                               a recursive call's base cases, peel.py)
    recurse[fn]                                                fn_consts.. args..  (entry into fn)
    recurse_call[name, result]                                 args..              (call inside fn's body)
"""
from __future__ import annotations

from gdsl import dtypes
from gdsl.primitives.registry import CONTROL, primitive

while_p = primitive("while", CONTROL)
cond_p = primitive("cond", CONTROL)
recurse_p = primitive("recurse", CONTROL)
recurse_call_p = primitive("recurse_call", CONTROL)


def _types(avals):
    return "(" + ", ".join(map(str, avals)) + ")"


def check_avals(expected, got, what):
    if tuple(expected) != tuple(got):
        raise TypeError(f"{what}: expected {_types(expected)}, got {_types(got)}")


@while_p.def_abstract_eval
def _while(*avals, cond_jaxpr, body_jaxpr, cond_nconsts, body_nconsts):
    cond_consts = avals[:cond_nconsts]
    body_consts = avals[cond_nconsts:cond_nconsts + body_nconsts]
    carry = avals[cond_nconsts + body_nconsts:]
    check_avals(cond_jaxpr.in_avals, cond_consts + carry, "while: cond_fun inputs")
    if len(cond_jaxpr.outs) != 1 or cond_jaxpr.out_avals[0].shape != () or \
            cond_jaxpr.out_avals[0].dtype != dtypes.bool_:
        raise TypeError(f"while: cond_fun must return a bool scalar, got {_types(cond_jaxpr.out_avals)}")
    check_avals(body_jaxpr.in_avals, body_consts + carry, "while: body_fun inputs")
    check_avals(carry, body_jaxpr.out_avals, "while: body_fun must return the carry's types")
    return list(carry)


@cond_p.def_abstract_eval
def _cond(index, *operands, branches, peeled=None):
    if index.shape != () or index.dtype != dtypes.int32:
        raise TypeError(f"cond: the branch index must be an int32 scalar, got {index}")
    out = branches[0].out_avals
    for i, branch in enumerate(branches):
        check_avals(branch.in_avals, operands, f"cond: branch {i} inputs")
        check_avals(out, branch.out_avals, f"cond: branch {i} must return the same types as branch 0")
    return list(out)


@recurse_p.def_abstract_eval
def _recurse(*avals, fn):
    check_avals(fn.jaxpr.in_avals, avals, f"recurse: arguments of {fn.name}")
    return list(fn.result_avals)


@recurse_call_p.def_abstract_eval
def _recurse_call(*avals, name, arg_avals, result):
    check_avals(arg_avals, avals, f"recursive call of {name}: arguments")
    return list(result)


def _interpreter():
    from gdsl import interpreter
    return interpreter


while_p.def_impl(lambda *args, **params: _interpreter().run_while(args, **params))
cond_p.def_impl(lambda *args, **params: _interpreter().run_cond(args, **params))
recurse_p.def_impl(lambda *args, **params: _interpreter().run_recurse(args, **params))
recurse_call_p.def_impl(lambda *args, **params: _interpreter().run_recurse_call(args, **params))
