"""Repeated C text as one copy plus a table of what differs (render.ROLL_REPEATS, render.MERGE_KERNELS).

A plan that unrolls the same block many times (a ResNet's identical bottlenecks, the gated blocks of SkipNet)
renders as many copies of the same statements that differ only in which buffers they read and write, a few
integer constants, and the names of the uniforms each copy defines for itself. NVRTC's time grows with the
copies (every copy inlines its uTask functions again), so the renderer emits the text once and picks each
copy's values at run time:

    for (int gdsl_r1 = 0; gdsl_r1 < k; ++gdsl_r1) {             # k repetitions
      const float* gdsl_r1_0; int gdsl_r1_1;
      switch (gdsl_r1) { case 0: gdsl_r1_0 = in5; gdsl_r1_1 = 0; break; ... }
      <the first repetition's text, every differing argument replaced by its gdsl_r1_* variable>
    }

This module works on the rendered text only (so whatever the renderer decided for one copy, the loop runs
exactly that): `Template` splits a text into tokens and marks the holes (buffer pointers, plain decimal
integers, uniform names), `find_repeats` finds the runs of consecutive pieces whose templates agree, and
`Repetition` checks one such run and writes its loop or its argument switch.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# C tokens: a line comment (kept whole: it must agree as it is), identifiers, pp-numbers (1.0f, 0LL, 1e-5f
# stay one token), two-character operators (so that a lone "=" is an assignment), blanks, any other character.
TOKEN = re.compile(r"//[^\n]*|[A-Za-z_]\w*|\.?\d(?:[eE][+-]|[\w.])*|==|!=|<=|>=|&&|\|\||[-+*/%&|^]=|<<|>>|->|"
                   r"\+\+|--|\s+|.", re.S)
INT_LITERAL = re.compile(r"\d+")
INT_MAX = 2**31 - 1
POINTER, INTEGER, UNIFORM = "pointer", "int", "uniform"


@dataclass(frozen=True)
class Hole:
    """One token of a text that may differ between repetitions: its position, kind and C type, and for a
    uniform whether this occurrence assigns it (`u = ...`)."""
    position: int
    kind: str
    c_type: str
    writes: bool = False


@dataclass
class Template:
    """A text as tokens with its holes; `key` is the same for two texts that differ only in their holes'
    values (and the holes' kinds and types agree)."""
    tokens: list
    holes: list

    @functools.cached_property
    def key(self) -> tuple:
        at = {h.position: h for h in self.holes}
        return tuple((at[i].kind, at[i].c_type) if i in at else t for i, t in enumerate(self.tokens))

    def values(self) -> list[str]:
        return [self.tokens[h.position] for h in self.holes]

    def text(self, replace: dict) -> str:
        """The text with the tokens at the positions in `replace` (position -> text) replaced."""
        return "".join(replace.get(i, t) for i, t in enumerate(self.tokens))


def template(text: str, pointers: dict, uniforms: dict) -> Template:
    """The Template of `text`: the names in `pointers` and `uniforms` (name -> C type) and every decimal
    integer that fits an int (not a `case` label, which must stay a constant) are holes."""
    tokens = TOKEN.findall(text)
    holes = []
    previous = ""
    for i, token in enumerate(tokens):
        if token in pointers:
            holes.append(Hole(i, POINTER, pointers[token]))
        elif token in uniforms:
            holes.append(Hole(i, UNIFORM, uniforms[token], _assigned(tokens, i)))
        elif INT_LITERAL.fullmatch(token) and previous != "case" and int(token) <= INT_MAX:
            holes.append(Hole(i, INTEGER, "int"))
        if not token.isspace():
            previous = token
    return Template(tokens, holes)


def joined(templates: list) -> Template:
    """The Template of the texts of `templates` joined by newlines (empty ones left out), without tokenizing
    them again."""
    tokens, holes = [], []
    for t in templates:
        if not t.tokens:
            continue
        if tokens:
            tokens.append("\n")
        holes += [Hole(h.position + len(tokens), h.kind, h.c_type, h.writes) for h in t.holes]
        tokens += t.tokens
    return Template(tokens, holes)


def _assigned(tokens, i) -> bool:
    """Is the token at `i` set by a plain assignment that does not read it (`u = ...;` without u on the right;
    not `==` nor `+=`)?"""
    rest = [t for t in tokens[i + 1:] if not t.isspace()]
    if not rest or rest[0] != "=":
        return False
    right = rest[1:rest.index(";")] if ";" in rest else rest[1:]
    return tokens[i] not in right


def find_repeats(keys: list, accept, longest_period: int = 512) -> list[tuple[int, int, int]]:
    """Runs of repeated pieces in `keys` (one hashable key per piece), left to right, not overlapping:
    (start, period, count) with keys[start + j*period + i] the same for every j < count, i < period, count >= 2.
    `accept(start, period, count) -> count'` (count' <= count) says how many leading repetitions of a candidate
    may share one text (fewer than 2: none). At each position the accepted run that covers the most pieces
    beyond its first repetition wins (the shortest period among equals); a position no run starts at is
    skipped."""
    positions: dict = {}
    for i, key in enumerate(keys):
        positions.setdefault(key, []).append(i)
    runs, start, n = [], 0, len(keys)
    while start < n:
        best = None
        for other in positions[keys[start]]:
            period = other - start
            if period <= 0:
                continue
            if period > longest_period or start + 2 * period > n:
                break
            same = 0
            while other + same < n and keys[start + same] == keys[other + same]:
                same += 1
            count = 1 + same // period
            if count < 2 or (best and (count - 1) * period <= (best[2] - 1) * best[1]):
                continue
            count = accept(start, period, count)
            if count >= 2 and (best is None or (count - 1) * period > (best[2] - 1) * best[1]):
                best = (start, period, count)
        if best:
            runs.append(best)
            start += best[1] * best[2]
        else:
            start += 1
    return runs


OWN, LIVE = "own", "live"


class Repetition:
    """Repetitions of one template (one Template per repetition, their keys equal). A hole whose value is the
    same in every repetition stays as it is; a pointer or integer that differs becomes a variable picked by
    the repetition's index. A uniform whose name differs must be each repetition's own and assigned before it
    is read there: `own(name, j)` says OWN (no statement outside repetition j uses it), LIVE (statements after
    the run read it too and repetition j assigns it unconditionally) or None. The loop computes it in a
    variable of its own, zero at the start of each repetition (as the uniform is before its repetition), and
    copies it into the repetition's uniform where that is LIVE."""

    def __init__(self, templates: list, own):
        self.templates = templates
        self.own = own

    def count_valid(self) -> int:
        """How many leading repetitions can share the first one's text (the uniforms' names agree up to a
        consistent renaming, and each renamed one is its repetition's own)."""
        names = [t.values() for t in self.templates]
        for j in range(len(self.templates)):
            if not self._same_shape(names[0], names[j]):
                return j
            for k in self._uniform_classes().values():
                renamed = names[1][k] != names[0][k]
                if renamed and not (self._assigned_first(j, names[j][k]) and self.own(names[j][k], j)):
                    return j
                if not renamed and names[j][k] != names[0][k]:
                    return j
        return len(self.templates)

    def _uniform_classes(self) -> dict:
        """The first repetition's uniform names -> the index (among its holes) of each one's first use."""
        first = self.templates[0]
        classes = {}
        for k, (hole, name) in enumerate(zip(first.holes, first.values())):
            if hole.kind == UNIFORM:
                classes.setdefault(name, k)
        return classes

    def _same_shape(self, first, other) -> bool:
        """Do the uniform holes of two repetitions name the same variable exactly where the other does?"""
        pairs = {}
        for k, hole in enumerate(self.templates[0].holes):
            if hole.kind == UNIFORM and pairs.setdefault(first[k], other[k]) != other[k]:
                return False
        return len(set(pairs.values())) == len(pairs)

    def _assigned_first(self, j, name) -> bool:
        template = self.templates[j]
        return next(h for h, value in zip(template.holes, template.values()) if value == name).writes

    def body(self, index: str) -> tuple[list[str], str, list[str]]:
        """(the declarations and switch that set the varying arguments from `index`, the first repetition's
        text with the varying holes replaced by variables named `index`_n, the switch that copies the LIVE
        uniforms out)."""
        first = self.templates[0]
        columns = list(zip(*(t.values() for t in self.templates)))
        variables, renamed, replace = {}, {}, {}
        for hole, values in zip(first.holes, columns):
            if len(set(values)) == 1:
                continue
            table = renamed if hole.kind == UNIFORM else variables
            number = table.setdefault((hole.c_type, values), len(variables) + len(renamed))
            replace[hole.position] = f"{index}_{number}"
        declarations = [f"{c_type} {index}_{n};" for (c_type, _), n in variables.items()]
        declarations += [f"{c_type} {index}_{n}{{}};" for (c_type, _), n in renamed.items()]
        picks = self._switch(index, [[f"{index}_{n} = {values[j]};" for (_, values), n in variables.items()]
                                     for j in range(len(self.templates))])
        live = [[f"{values[j]} = {index}_{n};" for (_, values), n in renamed.items()
                 if self.own(values[j], j) == LIVE] for j in range(len(self.templates))]
        return [" ".join(declarations)] * bool(declarations) + picks, first.text(replace), self._switch(index, live)

    @staticmethod
    def _switch(index: str, statements: list) -> list[str]:
        """A switch on `index` running statements[j] (C statements) for index j; none if all are empty."""
        if not any(statements):
            return []
        last = len(statements) - 1
        cases = [f"  {'default' if j == last else f'case {j}'}: {' '.join(s)} break;"
                 for j, s in enumerate(statements) if s]
        return [f"switch ({index}) {{", *cases, "}"]
