"""The reference interpreter: evaluates the IR with numpy. It is the oracle every backend is checked
against, and what eager (un-jitted) calls run.

Sub-programs (loop bodies, branches, recursive calls) are not evaluated by Python recursion: a recursion
200,000 levels deep would overflow the C stack. Each evaluation is a generator that *yields* the
sub-evaluation it needs and receives its result; `_run` keeps those generators on an explicit stack (a
list), so the depth the interpreter reaches is bounded by memory and `max_depth`, not by Python.
"""
from __future__ import annotations

import threading

import numpy as np

from gdsl.core.ir import Jaxpr, Lit
from gdsl.errors import RecursionDepthError
from gdsl.primitives.control import cond_p, recurse_call_p, recurse_p, while_p
from gdsl.primitives.registry import apply_impl

_frames = threading.local()  # active recursive-function frames: list of (FunctionDef, consts, depth)


def _frame_stack() -> list:
    if not hasattr(_frames, "stack"):
        _frames.stack = []
    return _frames.stack


def _run(evaluation):
    """Drive a generator-based evaluation to its result with an explicit stack of generators.

    A generator yields another generator when it needs that sub-evaluation's result; the result is sent
    back to it. An exception travels down the stack (thrown into each waiting generator in turn), so
    their `finally` blocks run as they would with ordinary calls."""
    stack = [evaluation]
    value, error = None, None
    while True:
        top = stack[-1]
        try:
            request = top.throw(error) if error is not None else top.send(value)
        except StopIteration as done:
            stack.pop()
            value, error = done.value, None
            if not stack:
                return value
            continue
        except BaseException as raised:  # noqa: BLE001 - re-raised below or thrown into the caller's generator
            stack.pop()
            if not stack:
                raise
            value, error = None, raised
            continue
        stack.append(request)
        value = None


def _evaluate(jaxpr: Jaxpr, args):
    """Generator: evaluate `jaxpr` on `args`; returns its outputs."""
    env = {}

    def read(atom):
        return np.asarray(atom.val) if isinstance(atom, Lit) else env[atom]

    for var, value in zip(jaxpr.in_binders, args, strict=True):
        env[var] = value
    for eqn in jaxpr.eqns:
        inputs = [read(a) for a in eqn.inputs]
        out_avals = [v.aval for v in eqn.outs]
        control = _CONTROL_RULES.get(eqn.primitive)
        if control is None:
            outs = apply_impl(eqn.primitive, inputs, eqn.params, out_avals)
        else:
            outs = _conform((yield control(inputs, **eqn.params)), out_avals)
        env.update(zip(eqn.outs, outs))
    return [read(a) for a in jaxpr.outs]


def _conform(outs, avals) -> list:
    """Each result as exactly its declared dtype (what apply_impl does for ordinary primitives)."""
    return [np.asarray(out, dtype=aval.dtype) for out, aval in zip(outs, avals, strict=True)]


def _while(args, *, cond_jaxpr, body_jaxpr, cond_nconsts, body_nconsts):
    cond_consts = list(args[:cond_nconsts])
    body_consts = list(args[cond_nconsts:cond_nconsts + body_nconsts])
    carry = list(args[cond_nconsts + body_nconsts:])
    while (yield _evaluate(cond_jaxpr, cond_consts + carry))[0]:
        carry = yield _evaluate(body_jaxpr, body_consts + carry)
    return carry


def _cond(args, *, branches, peeled=None):
    if peeled is not None:                 # a call's base case at its call site (schedule/peel.py)
        fn, _, depth = next(frame for frame in reversed(_frame_stack()) if frame[0].name == peeled)
        _check_depth(fn, depth + 1)
    index = int(np.clip(int(args[0]), 0, len(branches) - 1))
    return (yield _evaluate(branches[index], list(args[1:])))


def _call(fn, consts, args, depth):
    """Generator: one frame of recursive function `fn` at recursion depth `depth`."""
    _check_depth(fn, depth)
    stack = _frame_stack()
    stack.append((fn, consts, depth))
    try:
        return (yield _evaluate(fn.jaxpr, list(consts) + list(args)))
    finally:
        stack.pop()


def _check_depth(fn, depth):
    if depth > fn.max_depth:
        raise RecursionDepthError.of(fn)


def _recurse(args, *, fn):
    """Entering `fn` from outside it: depth 1, or one below an enclosing frame of the same function."""
    depth = next((d for f, _, d in reversed(_frame_stack()) if f is fn), 0) + 1
    return (yield _call(fn, args[:fn.nconsts], args[fn.nconsts:], depth))


def _recurse_call(args, *, name, arg_avals, result):
    for fn, consts, depth in reversed(_frame_stack()):
        if fn.name == name:
            return (yield _call(fn, consts, args, depth + 1))
    raise RuntimeError(f"recursive call of {name!r} outside its function")  # the typechecker prevents it


_CONTROL_RULES = {while_p: _while, cond_p: _cond, recurse_p: _recurse, recurse_call_p: _recurse_call}


# ----------------------------------------------------------------------------------------------------------
# Entry points


def eval_jaxpr(jaxpr: Jaxpr, args) -> list:
    return _run(_evaluate(jaxpr, args))


def run_program(program, flat_args) -> list:
    """The program's flat results. A result that is (or views) an argument or constant is copied, as the
    compiled backends return fresh arrays: writing to a result never changes an input."""
    inputs = list(program.consts) + list(flat_args)
    outs = eval_jaxpr(program.jaxpr, inputs)
    return [out.copy() if any(np.may_share_memory(out, x) for x in inputs if isinstance(x, np.ndarray)) else out
            for out in outs]


def run_while(args, **params):
    return _run(_while(args, **params))


def run_cond(args, **params):
    return _run(_cond(args, **params))


def run_recurse(args, **params):
    return _run(_recurse(args, **params))


def run_recurse_call(args, **params):
    return _run(_recurse_call(args, **params))
