"""Pytrees: nested tuples, lists, dicts (sorted keys) and None, with arrays at the leaves."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TreeDef:
    kind: str               # "leaf", "none", "tuple", "list", "dict"
    aux: Any = None          # dict keys
    children: tuple = ()

    @property
    def num_leaves(self) -> int:
        if self.kind == "leaf":
            return 1
        return sum(c.num_leaves for c in self.children)

    def __str__(self):
        if self.kind == "leaf":
            return "*"
        if self.kind == "none":
            return "None"
        inner = ", ".join(map(str, self.children))
        if self.kind == "dict":
            inner = ", ".join(f"{k!r}: {c}" for k, c in zip(self.aux, self.children))
            return "{" + inner + "}"
        return f"({inner},)" if self.kind == "tuple" else f"[{inner}]"


LEAF = TreeDef("leaf")


def tree_flatten(tree) -> tuple[list, TreeDef]:
    leaves: list = []

    def visit(x) -> TreeDef:
        if x is None:
            return TreeDef("none")
        if isinstance(x, (tuple, list)) and not hasattr(x, "_fields"):
            return TreeDef("tuple" if isinstance(x, tuple) else "list", None, tuple(visit(c) for c in x))
        if isinstance(x, tuple):  # namedtuple: keep its type so it comes back as itself
            return TreeDef("namedtuple", type(x), tuple(visit(c) for c in x))
        if isinstance(x, dict):
            keys = tuple(sorted(x))
            return TreeDef("dict", keys, tuple(visit(x[k]) for k in keys))
        leaves.append(x)
        return LEAF

    treedef = visit(tree)
    return leaves, treedef


def tree_unflatten(treedef: TreeDef, leaves) -> Any:
    it = iter(leaves)

    def build(t: TreeDef):
        if t.kind == "leaf":
            return next(it)
        if t.kind == "none":
            return None
        children = [build(c) for c in t.children]
        if t.kind == "dict":
            return dict(zip(t.aux, children))
        if t.kind == "namedtuple":
            return t.aux(*children)
        return tuple(children) if t.kind == "tuple" else children

    out = build(treedef)
    return out


def tree_map(fn, tree):
    leaves, treedef = tree_flatten(tree)
    return tree_unflatten(treedef, [fn(x) for x in leaves])
