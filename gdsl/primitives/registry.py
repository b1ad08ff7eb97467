"""The one primitive registry.

A primitive is a name plus one rule per interpretation. Here live the two rules every primitive must
have: `abstract_eval` (input types -> output types, raising TypeError on a mismatch) and `impl` (the numpy
reference). Backends keep their own lowering tables keyed by primitive name; tests/test_registry.py walks
REGISTRY and fails on any primitive that lacks a rule anywhere.

Rules take arrays positionally and static metadata by keyword, and return lists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

REGISTRY: dict[str, "Primitive"] = {}


@dataclass(eq=False)
class Primitive:
    name: str
    family: str  # "elementwise", "reduce", "structural", "linalg", "nn", "control"
    abstract_eval: Callable | None = None
    impl: Callable | None = None

    def __repr__(self):
        return self.name


def primitive(name: str, family: str) -> Primitive:
    """Declare a primitive. Its rules are attached with `@p.def_abstract_eval` / `@p.def_impl`."""
    if name in REGISTRY:
        raise ValueError(f"primitive {name!r} declared twice")
    p = Primitive(name, family)
    REGISTRY[name] = p
    return p


def _attach(attr):
    def decorator_factory(self, fn):
        setattr(self, attr, fn)
        return fn
    return decorator_factory


Primitive.def_abstract_eval = _attach("abstract_eval")
Primitive.def_impl = _attach("impl")
