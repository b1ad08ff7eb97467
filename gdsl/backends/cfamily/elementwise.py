"""The elementwise table: one C expression per elementwise primitive, shared by every C-family dialect.

An entry is a template over the operands' C expressions `{0} {1} {2}` (already in the compute type, see
`types.compute_type`) and `{T}` (that compute type); a dict entry picks by the operands' class: "f" (floats,
computed in float), "i" (int32 / int64), "b" (bool). Dialects override entries by dict merge
(`Dialect.elementwise`). The numpy rules in gdsl/primitives/elementwise.py are the semantics.
"""
from __future__ import annotations

ELEMENTWISE: dict[str, object] = {
    "neg": {"f": "(-{0})", "i": "(({T})(0 - (unsigned long long){0}))", "b": "{0}"},
    "exp": "expf({0})",
    "log": "logf({0})",
    "tanh": "tanhf({0})",
    "logistic": "(1.0f / (1.0f + expf(-{0})))",
    "sqrt": "sqrtf({0})",
    "rsqrt": "(1.0f / sqrtf({0}))",
    "erf": "erff({0})",
    "abs": {"f": "fabsf({0})", "i": "({0} < 0 ? ({T})(0 - (unsigned long long){0}) : {0})", "b": "{0}"},
    "sign": {"f": "gdsl_fsign({0})", "i": "(({T})(({0} > 0) - ({0} < 0)))", "b": "{0}"},
    "not": {"i": "(~{0})", "b": "(!{0})"},
    "add": {"f": "({0} + {1})", "i": "(({T})((unsigned long long){0} + (unsigned long long){1}))",
            "b": "({0} || {1})"},
    "sub": {"f": "({0} - {1})", "i": "(({T})((unsigned long long){0} - (unsigned long long){1}))",
            "b": "({0} != {1})"},
    "mul": {"f": "({0} * {1})", "i": "(({T})((unsigned long long){0} * (unsigned long long){1}))",
            "b": "({0} && {1})"},
    "div": "({0} / {1})",
    "floor_divide": {"f": "gdsl_floordiv_py({0}, {1})", "i": "gdsl_ifloordiv<{T}>({0}, {1})",
                     "b": "({0} && {1})"},
    "rem": {"f": "gdsl_fmod_py({0}, {1})", "i": "gdsl_imod<{T}>({0}, {1})", "b": "false"},
    "pow": {"f": "powf({0}, {1})", "i": "gdsl_ipow<{T}>({0}, {1})", "b": "({0} || !{1})"},
    "max": {"f": "gdsl_fmax({0}, {1})", "i": "gdsl_imax<{T}>({0}, {1})", "b": "({0} || {1})"},
    "min": {"f": "gdsl_fmin({0}, {1})", "i": "gdsl_imin<{T}>({0}, {1})", "b": "({0} && {1})"},
    "and": {"i": "({0} & {1})", "b": "({0} && {1})"},
    "or": {"i": "({0} | {1})", "b": "({0} || {1})"},
    "eq": "({0} == {1})",
    "ne": "({0} != {1})",
    "lt": "({0} < {1})",
    "le": "({0} <= {1})",
    "gt": "({0} > {1})",
    "ge": "({0} >= {1})",
    "select": "({0} ? {1} : {2})",
}


def c_expression(table: dict, name: str, klass: str, ctype: str, args) -> str:
    """The C expression of elementwise primitive `name` on operand expressions `args`."""
    entry = table[name]
    if isinstance(entry, dict):
        entry = entry.get(klass) or entry.get("i" if klass == "b" else "f")
    return entry.format(*args, T=ctype)
