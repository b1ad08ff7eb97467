"""The one primitive registry, its families, and the lowering rules of every backend.

A primitive is a name plus one rule per interpretation. Every primitive has two rules of its own:
`abstract_eval` (input types -> output types, raising TypeError on a mismatch) and `impl` (the numpy
reference). Rules take arrays positionally and static metadata by keyword, and return lists.

Each primitive declares its **family**; passes and backends ask for families (`kinds_of`), never for
primitive names typed out by hand:

    elementwise    output element i from the same (broadcast) element of each input: add, exp, select, ...
    data_movement  each output element is one element of one input at an index map known at compile
                   time (or from scalar starts): reshape, transpose, broadcast_to, slice, dynamic_slice,
                   concatenate, iota (no input)
    gather         an index read from an array: take; dynamic_update_slice (a scatter of one window)
    window         a small reduction over a window of the input: avg_pool2d, max_pool2d
    reduce         whole reductions along axes: reduce_sum/max/min, argmax/argmin
    contraction    matmul
    convolution    conv2d (implicit GEMM)
    control        while, cond, recurse, recurse_call (sub-programs; the scheduler turns them into plan nodes)

Two flags refine a family: `fusible` (it can sit inside a fused elementwise chain) and `uniform` (with a
one-element output every vEU can compute it itself, with no uTask and no barrier).

The scheduler adds uTask kinds that are not primitives ("fused", "copy", "row_chain": `op_kind`); a plan's Op
has a kind that is either. An `optional` kind ("row_chain") is made only for a backend that has a rule for it
(the scheduler asks `has_lowering` first), so a backend without one has no gap. **Lowering rules** are
registered per kind per backend (`register_lowering`, as JAX does with
`mlir.register_lowering(prim, rule, platform=...)`), in one table for each role ("utask": the body of a
uTask; "uniform": the scalar value of a uniform op; "epilogue": how a contraction's uTask applies an
elementwise epilogue as it stores its output, see gdsl/schedule/plan.py: the scheduler folds an epilogue
into a contraction only for a backend with this rule; "view": how a backend reads a window of this kind in
place at a run-time offset, plan.Value.terms: the scheduler makes such windows views instead of ops only
for a backend with this rule; "k_parts" and "row_gather", for matmul: how its tiles load a left operand read
in parts, plan.K_PARTS, or as rows gathered at run-time indices, plan.ROW_INDEX; "n_parts", for matmul: how
its tiles load and store the columns of sibling matmuls computed as one op, plan.N_PARTS; "row_block", for an
elementwise-like kind or a cell chain: that its uTask body takes 2-D chunks, plan.ROW_BLOCK). A backend looks rules up
through a chain of names (the HIP dialect: "hip", then "cfamily"), so a dialect overrides a rule by registering its own.
A kind with no rule is a NotImplementedError naming the kind and the backend. tests/test_registry.py
walks the registry and fails on any gap.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

ELEMENTWISE = "elementwise"
DATA_MOVEMENT = "data_movement"
GATHER = "gather"
WINDOW = "window"
REDUCE = "reduce"
CONTRACTION = "contraction"
CONVOLUTION = "convolution"
CONTROL = "control"
FAMILIES = (ELEMENTWISE, DATA_MOVEMENT, GATHER, WINDOW, REDUCE, CONTRACTION, CONVOLUTION, CONTROL)
ROLES = ("utask", "uniform", "epilogue", "view", "k_parts", "row_gather", "n_parts", "row_block")

REGISTRY: dict[str, Primitive] = {}
OP_KINDS: dict[str, OpKind] = {}      # every uTask kind: the primitives and the scheduler's own kinds
LOWERINGS: dict[tuple[str, str, str], Callable] = {}   # (backend, role, kind name) -> rule


@dataclass(eq=False)
class OpKind:
    """A kind of Op in a plan: a primitive, or a kind the scheduler makes (a fused chain, a copy)."""
    name: str
    family: str
    fusible: bool = False
    uniform: bool = False
    optional: bool = False      # made by the scheduler only for backends with a rule for it

    def __repr__(self):
        return self.name


@dataclass(eq=False, repr=False)
class Primitive(OpKind):
    abstract_eval: Callable | None = None
    impl: Callable | None = None

    def def_abstract_eval(self, fn):
        self.abstract_eval = fn
        return fn

    def def_impl(self, fn):
        self.impl = fn
        return fn


def _declare(kind: OpKind) -> OpKind:
    if kind.family not in FAMILIES:
        raise ValueError(f"{kind.name!r}: unknown family {kind.family!r} (families: {', '.join(FAMILIES)})")
    if kind.name in OP_KINDS:
        raise ValueError(f"op kind {kind.name!r} declared twice")
    OP_KINDS[kind.name] = kind
    return kind


def primitive(name: str, family: str, *, fusible: bool = False, uniform: bool = False) -> Primitive:
    """Declare a primitive. Its rules are attached with `@p.def_abstract_eval` / `@p.def_impl`.
    Elementwise primitives are always fusible and uniform."""
    if family == ELEMENTWISE:
        fusible = uniform = True
    p = _declare(Primitive(name, family, fusible, uniform))
    REGISTRY[name] = p
    return p


def op_kind(name: str, family: str, *, optional: bool = False) -> OpKind:
    """Declare a uTask kind that is not a primitive (the scheduler's "fused", "copy" and "row_chain"); `optional`:
    the scheduler makes it only for a backend that has a "utask" rule for it."""
    return _declare(OpKind(name, family, optional=optional))


def kinds_of(*families: str) -> frozenset[str]:
    """The names of the op kinds (primitives and scheduler kinds) in any of `families`."""
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}")
    return frozenset(name for name, k in OP_KINDS.items() if k.family in families)


def family_of(kind: str) -> str:
    return OP_KINDS[kind].family


def is_fusible(kind: str) -> bool:
    return OP_KINDS[kind].fusible


def is_uniform(kind: str) -> bool:
    return OP_KINDS[kind].uniform


def _names(kinds) -> list[str]:
    if isinstance(kinds, (str, OpKind)):
        kinds = [kinds]
    names = [k.name if isinstance(k, OpKind) else k for k in kinds]
    for name in names:
        if name not in OP_KINDS:
            raise ValueError(f"no op kind {name!r} is declared")
    return names


def register_lowering(kinds, *, backend: str, role: str = "utask"):
    """Decorator: `rule` lowers every kind in `kinds` (an OpKind, a kind name, or an iterable of them) on
    `backend` in `role`. The rule's signature is the backend's own; it receives the op kind's name."""
    if role not in ROLES:
        raise ValueError(f"unknown lowering role {role!r} (roles: {', '.join(ROLES)})")

    def register(rule):
        for name in _names(kinds):
            if (backend, role, name) in LOWERINGS:
                raise ValueError(f"{role} lowering of {name!r} on {backend!r} registered twice")
            LOWERINGS[backend, role, name] = rule
        return rule
    return register


def lowering_rule(kind: str, backends: Iterable[str] | str, role: str = "utask") -> Callable:
    """The rule for `kind` from the first of `backends` that has one; NotImplementedError if none has."""
    chain = (backends,) if isinstance(backends, str) else tuple(backends)
    for backend in chain:
        rule = LOWERINGS.get((backend, role, kind))
        if rule is not None:
            return rule
    raise NotImplementedError(f"no {role} lowering rule for op kind {kind!r} on backend {chain[0]!r}")


def has_lowering(kind: str, backends: Iterable[str] | str, role: str = "utask") -> bool:
    try:
        lowering_rule(kind, backends, role)
    except NotImplementedError:
        return False
    return True


def apply_impl(prim: Primitive, args, params, out_avals) -> list:
    """Run `prim`'s numpy rule and give each result exactly its declared shape and dtype."""
    outs = prim.impl(*args, **params)
    results = []
    for out, aval in zip(outs, out_avals):
        out = np.asarray(out)
        if out.dtype != aval.dtype:
            out = out.astype(aval.dtype)
        assert out.shape == aval.shape, (prim.name, out.shape, aval)
        results.append(out)
    return results
