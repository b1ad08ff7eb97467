"""The gdsl IR: typed, closed, immutable, jaxpr-like.

    Var        a value with a type (ShapedArray); identity is the object itself
    Lit        a scalar constant
    Eqn        outs = primitive[params](inputs)
    Jaxpr      in_binders -> eqns -> outs; closed: it reads nothing but its binders
    FunctionDef  a named recursive function (a Jaxpr); `recurse` eqns carry it, and calls inside its
               body (`recurse_call`) name it, so no IR object ever contains itself
    Program    the traced main Jaxpr with its constant values and the argument/result pytrees

Sub-programs (loop bodies, branches, recursive functions) are params of their equation.
Names are given to variables only when printing (see printer.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gdsl import dtypes


@dataclass(frozen=True)
class ShapedArray:
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))   # (np.prod was ~0.4 s of SkipNet's lowering)

    def __str__(self):
        return f"{dtypes.SHORT_NAMES[self.dtype]}[{','.join(map(str, self.shape))}]"


class Var:
    __slots__ = ("aval",)

    def __init__(self, aval: ShapedArray):
        object.__setattr__(self, "aval", aval)

    def __setattr__(self, name, value):  # immutable like the rest of the IR; identity is the object
        raise AttributeError(f"Var is immutable: cannot set {name!r}")

    def __repr__(self):
        return f"Var({self.aval})"


@dataclass(frozen=True, eq=False)
class Lit:
    val: Any  # a numpy scalar of aval.dtype
    aval: ShapedArray

    @staticmethod
    def of(value, dtype) -> Lit:
        dtype = np.dtype(dtype)
        return Lit(np.asarray(value, dtype=dtype)[()], ShapedArray((), dtype))


Atom = Var | Lit


@dataclass(frozen=True, eq=False)
class Eqn:
    primitive: Any  # gdsl.primitives.registry.Primitive
    inputs: tuple[Atom, ...]
    params: dict
    outs: tuple[Var, ...]


@dataclass(frozen=True, eq=False)
class Jaxpr:
    in_binders: tuple[Var, ...]
    eqns: tuple[Eqn, ...]
    outs: tuple[Atom, ...]

    @property
    def in_avals(self) -> tuple[ShapedArray, ...]:
        return tuple(v.aval for v in self.in_binders)

    @property
    def out_avals(self) -> tuple[ShapedArray, ...]:
        return tuple(v.aval for v in self.outs)

    def __str__(self):
        from gdsl.core.printer import print_jaxpr
        return print_jaxpr(self)


@dataclass(frozen=True, eq=False)
class FunctionDef:
    """A recursive function. Its jaxpr takes `nconsts` captured values (the same in every frame) and then
    the call arguments; recursive calls in the body pass only the arguments."""
    name: str
    jaxpr: Jaxpr
    nconsts: int
    max_depth: int

    @property
    def arg_avals(self):
        return self.jaxpr.in_avals[self.nconsts:]

    @property
    def result_avals(self):
        return self.jaxpr.out_avals


@dataclass(frozen=True, eq=False)
class Program:
    """A traced function: `jaxpr` takes `consts` (numpy arrays) first, then the flattened arguments."""
    jaxpr: Jaxpr
    consts: tuple[np.ndarray, ...]
    in_tree: Any
    out_tree: Any
    name: str = "main"
    meta: dict = field(default_factory=dict)

    @property
    def nconsts(self) -> int:
        return len(self.consts)

    def __str__(self):
        from gdsl.core.printer import print_program
        return print_program(self)


def subjaxprs(eqn: Eqn):
    """The sub-programs an equation carries (loop bodies, branches, a recursive function's body)."""
    for value in eqn.params.values():
        if isinstance(value, Jaxpr):
            yield value
        elif isinstance(value, FunctionDef):
            yield value.jaxpr
        elif isinstance(value, tuple):
            yield from (v for v in value if isinstance(v, Jaxpr))


def walk_eqns(jaxpr: Jaxpr):
    """Every equation of `jaxpr` and of its sub-programs, outer first."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in subjaxprs(eqn):
            yield from walk_eqns(sub)
