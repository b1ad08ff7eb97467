"""The reference interpreter: evaluates the IR with numpy. It is the oracle every backend is checked
against, and what eager (un-jitted) calls run."""
from __future__ import annotations

import sys
import threading

import numpy as np

from gdsl.core.ir import Jaxpr, Lit
from gdsl.errors import RecursionDepthError
from gdsl.primitives.registry import apply_impl

_frames = threading.local()  # active recursive-function frames: list of (FunctionDef, consts)


def _frame_stack() -> list:
    if not hasattr(_frames, "stack"):
        _frames.stack = []
    return _frames.stack


def eval_jaxpr(jaxpr: Jaxpr, args) -> list:
    env = {}

    def read(atom):
        return np.asarray(atom.val) if isinstance(atom, Lit) else env[atom]

    for var, value in zip(jaxpr.in_binders, args, strict=True):
        env[var] = value
    for eqn in jaxpr.eqns:
        outs = apply_impl(eqn.primitive, [read(a) for a in eqn.inputs], eqn.params,
                          [v.aval for v in eqn.outs])
        env.update(zip(eqn.outs, outs))
    return [read(a) for a in jaxpr.outs]


def run_program(program, flat_args) -> list:
    return eval_jaxpr(program.jaxpr, list(program.consts) + list(flat_args))


def run_while(args, *, cond_jaxpr, body_jaxpr, cond_nconsts, body_nconsts):
    cond_consts = list(args[:cond_nconsts])
    body_consts = list(args[cond_nconsts:cond_nconsts + body_nconsts])
    carry = list(args[cond_nconsts + body_nconsts:])
    while eval_jaxpr(cond_jaxpr, cond_consts + carry)[0]:
        carry = eval_jaxpr(body_jaxpr, body_consts + carry)
    return carry


def run_cond(args, *, branches):
    index = int(np.clip(int(args[0]), 0, len(branches) - 1))
    return eval_jaxpr(branches[index], list(args[1:]))


def _call(fn, consts, args):
    stack = _frame_stack()
    depth = sum(1 for f, _ in stack if f is fn) + 1
    if depth > fn.max_depth:
        raise RecursionDepthError(
            f"recursive function {fn.name!r} went deeper than max_depth={fn.max_depth}; "
            f"raise max_depth in @gdsl.recurse(...) if the data needs it")
    # Each gdsl frame takes a few Python frames; keep Python's own limit out of the way.
    needed = 64 + 8 * len(stack) + 8
    if sys.getrecursionlimit() < needed * 4:
        sys.setrecursionlimit(needed * 4)
    stack.append((fn, consts))
    try:
        return eval_jaxpr(fn.jaxpr, list(consts) + list(args))
    finally:
        stack.pop()


def run_recurse(args, *, fn):
    return _call(fn, args[:fn.nconsts], args[fn.nconsts:])


def run_recurse_call(args, *, name, arg_avals, result):
    for fn, consts in reversed(_frame_stack()):
        if fn.name == name:
            return _call(fn, consts, args)
    raise RuntimeError(f"recursive call of {name!r} outside its function")  # the typechecker prevents it
