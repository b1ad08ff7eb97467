"""Jaxpr-style text for the IR. Variables get names (a, b, ..., z, ba, ...) only here.

    { lambda a:f32[3] ; b:i32[]. let
        c:f32[3] = mul a a
        d:f32[3] = while[cond_nconsts=0 body_nconsts=1
          cond_jaxpr={ lambda ; e:f32[3]. let ... in (f) }
          body_jaxpr=...
        ] a c
      in (d) }

Consts are the binders before `;`. Recursive functions print once, after the program, as `def name(...)`.
"""
from __future__ import annotations

import numpy as np

from gdsl.core.ir import FunctionDef, Jaxpr, Lit, Program


class _Names:
    def __init__(self):
        self.names: dict = {}

    def __call__(self, var) -> str:
        if var not in self.names:
            self.names[var] = _name(len(self.names))
        return self.names[var]


def _name(k: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        out = letters[k % 26] + out
        k = k // 26
        if k == 0:
            return out
        k -= 1


def _atom(names, atom) -> str:
    if isinstance(atom, Lit):
        v = atom.val
        if v.dtype == np.bool_:
            return "True" if v else "False"
        return f"{v.item()!r}:{atom.aval}"
    return names(atom)


def _binder(names, var) -> str:
    return f"{names(var)}:{var.aval}"


def _param(value) -> str | None:
    if isinstance(value, (Jaxpr, FunctionDef)) or (isinstance(value, tuple) and value and
                                                    isinstance(value[0], Jaxpr)):
        return None  # printed as a block below
    if isinstance(value, np.dtype):
        from gdsl.dtypes import SHORT_NAMES
        return SHORT_NAMES.get(value, str(value))
    if isinstance(value, tuple):
        return "(" + ",".join(_param(v) or "?" for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


class _Printer:
    def __init__(self):
        self.names = _Names()
        self.functions: list[FunctionDef] = []

    def jaxpr(self, jaxpr: Jaxpr, indent: int, nconsts: int = 0) -> str:
        pad = " " * indent
        consts = " ".join(_binder(self.names, v) for v in jaxpr.in_binders[:nconsts])
        args = " ".join(_binder(self.names, v) for v in jaxpr.in_binders[nconsts:])
        lines = [f"{{ lambda {consts}{' ' if consts else ''}; {args}. let"]
        for eqn in jaxpr.eqns:
            lines.append(self.eqn(eqn, indent + 4))
        outs = " ".join(_atom(self.names, a) for a in jaxpr.outs)
        lines.append(f"{pad}  in ({outs}) }}")
        return "\n".join(lines)

    def eqn(self, eqn, indent: int) -> str:
        pad = " " * indent
        outs = " ".join(_binder(self.names, v) for v in eqn.outs)
        ins = " ".join(_atom(self.names, a) for a in eqn.inputs)
        simple = []
        blocks = []
        for key, value in eqn.params.items():
            text = _param(value)
            if text is not None:
                simple.append(f"{key}={text}")
            elif isinstance(value, FunctionDef):
                simple.append(f"fn={value.name}")
                if all(f is not value for f in self.functions):
                    self.functions.append(value)
            elif isinstance(value, Jaxpr):
                nconsts = eqn.params.get(key.replace("_jaxpr", "_nconsts"), 0)
                blocks.append(f"{pad}  {key}={self.jaxpr(value, indent + 2, nconsts)}")
            else:
                for k, sub in enumerate(value):
                    blocks.append(f"{pad}  {key}[{k}]={self.jaxpr(sub, indent + 2)}")
        head = f"{pad}{outs} = {eqn.primitive.name}"
        if simple and not blocks:
            return f"{head}[{' '.join(simple)}] {ins}"
        if not blocks:
            return f"{head} {ins}"
        lines = [f"{head}[{' '.join(simple)}"] + blocks + [f"{pad}] {ins}"]
        return "\n".join(lines)

    def function(self, fn: FunctionDef) -> str:
        return (f"def {fn.name} max_depth={fn.max_depth} = "
                + self.jaxpr(fn.jaxpr, 0, fn.nconsts))


def print_jaxpr(jaxpr: Jaxpr, nconsts: int = 0) -> str:
    p = _Printer()
    text = p.jaxpr(jaxpr, 0, nconsts)
    return _with_functions(p, text)


def _with_functions(p: _Printer, text: str) -> str:
    done = 0
    parts = [text]
    while done < len(p.functions):  # a function's body may name further functions
        parts.append(p.function(p.functions[done]))
        done += 1
    return "\n\n".join(parts)


def print_program(program: Program) -> str:
    p = _Printer()
    return _with_functions(p, p.jaxpr(program.jaxpr, 0, program.nconsts))
