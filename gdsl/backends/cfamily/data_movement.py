"""Lowering rules of the data-movement and gather families (and the scheduler's copy): each output element
is one input element at an index map known at compile time or from scalar starts.

"utask" rules write the body of the Op's device function through `OpRenderer.per_element` (C lines for flat
output element i); "uniform" rules write the scalar of a one-element op every vEU computes itself:
`rule(renderer, uniform_op, out) -> lines`, `out` the C name of the result.
"""
from __future__ import annotations

import math

from gdsl.backends.cfamily import types as c_types
from gdsl.backends.cfamily.ops import OpRenderer, coords, offset, strides
from gdsl.primitives.registry import register_lowering
from gdsl.schedule.plan import COPY


# ---------------------------------------------------------------------------------- uTask rules
@register_lowering((COPY, "reshape"), backend="cfamily")
def copy(ops: OpRenderer) -> str:
    """Element i of the input to element i of the output (a reshape keeps the flat order; the scheduler
    makes reshapes aliases, so one reaches a uTask only through a copy)."""
    return ops.per_element([ops.outs[0].store("i", ops.ins[0].at("i"))])


@register_lowering("transpose", backend="cfamily")
def transpose(ops: OpRenderer) -> str:
    x, out = ops.ins[0], ops.outs[0]
    perm = ops.op.params["permutation"]
    in_st = strides(x.aval.shape)
    src = offset(coords(out.aval.shape, "i"), [in_st[p] for p in perm])
    return ops.per_element([out.store("i", x.at(src))])


@register_lowering("slice", backend="cfamily")
def slice_(ops: OpRenderer) -> str:
    x, out = ops.ins[0], ops.outs[0]
    p = ops.op.params
    cs = coords(out.aval.shape, "i")
    terms = [f"({b} + {c} * {s})" if s != 1 else f"({b} + {c})" for b, c, s in zip(p["start"], cs, p["step"])]
    return ops.per_element([out.store("i", x.at(offset(terms, strides(x.aval.shape))))])


@register_lowering("dynamic_slice", backend="cfamily")
def dynamic_slice(ops: OpRenderer) -> str:
    x, out = ops.ins[0], ops.outs[0]
    starts = ops.window_starts(x.aval.shape, ops.op.params["sizes"], ops.ins[1:], "s")
    cs = coords(out.aval.shape, "i")
    src = offset([f"(s{d} + {c})" for d, c in enumerate(cs)], strides(x.aval.shape))
    return ops.per_element([out.store("i", x.at(f"(int)({src})"))], before=starts)


@register_lowering("take", backend="cfamily")
def take(ops: OpRenderer) -> str:
    x, ind, out = ops.ins[0], ops.ins[1], ops.outs[0]
    axis = ops.op.params["axis"]
    d = x.aval.shape[axis]
    post = math.prod(x.aval.shape[axis + 1:])
    n_ind = ind.aval.size
    return ops.per_element([
        f"const int post = i % {post};" if post != 1 else "const int post = 0;",
        f"const int j = (i / {post}) % {n_ind};",
        f"const int pre = i / {post * n_ind};",
        f"long long k = (long long)({ind.at('j')});",
        f"k = k < 0 ? 0 : (k > {d - 1} ? {d - 1} : k);",
        out.store("i", x.at(f"(int)((pre * {d} + k) * {post} + post)"))])


@register_lowering("concatenate", backend="cfamily")
def concatenate(ops: OpRenderer) -> str:
    out, axis = ops.outs[0], ops.op.params["axis"]
    a_total = out.aval.shape[axis]
    post = math.prod(out.aval.shape[axis + 1:])
    lines = [f"const int post = i % {post};" if post != 1 else "const int post = 0;",
             f"const int a = (i / {post}) % {a_total};",
             f"const int pre = i / {post * a_total};"]
    start = 0
    for x in ops.ins:
        n = x.aval.shape[axis]
        if n == 0:
            continue
        cond = f"if (a < {start + n}) " if start + n < a_total else ""
        lines.append(f"{'' if start == 0 else 'else '}{cond}"
                     f"{out.store('i', x.at(f'(pre * {n} + a - {start}) * {post} + post'))}")
        start += n
    return ops.per_element(lines)


@register_lowering("dynamic_update_slice", backend="cfamily")
def dynamic_update_slice(ops: OpRenderer) -> str:
    """In place (params["in_place"]): uTasks split the update's elements; else they split the output's and
    each element comes from the update or the operand."""
    x, upd, out = ops.ins[0], ops.ins[1], ops.outs[0]
    idx = ops.ins[2:]
    shape, ushape = x.aval.shape, upd.aval.shape
    drop = ops.op.params["mode"] == "drop"
    before = []
    if drop:
        conds = [f"(long long)({a.at('0')}) < 0 || (long long)({a.at('0')}) > {n - u}"
                 for a, n, u in zip(idx, shape, ushape)]
        before.append(f"const bool dropped = {' || '.join(conds) or 'false'};")
    before += ops.window_starts(shape, ushape, idx, "s")
    if ops.op.params.get("in_place"):
        if drop:
            before.append("if (dropped) return;")
        cs = coords(ushape, "i")
        dst = offset([f"(s{d} + {c})" for d, c in enumerate(cs)], strides(shape))
        return ops.per_element([out.store(f"(int)({dst})", upd.at("i"))], before=before, size=upd.aval.size)
    cs = coords(shape, "i")
    inside = " && ".join([f"{c} >= s{d} && {c} < s{d} + {u}" for d, (c, u) in enumerate(zip(cs, ushape))])
    inside = inside or "true"
    if drop:
        inside = f"!dropped && {inside}"
    src = offset([f"({c} - s{d})" for d, c in enumerate(cs)], strides(ushape))
    body = [f"if ({inside}) {out.store('i', upd.at(f'(int)({src})'))}",
            f"else {out.store('i', x.at('i'))}"]
    return ops.per_element(body, before=before, size=x.aval.size)


# ---------------------------------------------------------------------------------- uniform rules
@register_lowering(("reshape", "broadcast_to", "transpose"), backend="cfamily", role="uniform")
def uniform_only_element(renderer, u, out: str) -> list[str]:
    """One element in, the same element out."""
    return [f"{out} = {renderer.elem(u.inputs[0])};"]


@register_lowering("iota", backend="cfamily", role="uniform")
def uniform_iota(renderer, u, out: str) -> list[str]:
    return [f"{out} = {c_types.literal(0, u.output.aval.dtype)};"]


@register_lowering("slice", backend="cfamily", role="uniform")
def uniform_slice(renderer, u, out: str) -> list[str]:
    x = u.inputs[0]
    start = sum(b * s for b, s in zip(u.params["start"], strides(x.aval.shape)))
    return [f"{out} = {renderer.elem(x, str(start))};"]


@register_lowering("dynamic_slice", backend="cfamily", role="uniform")
def uniform_dynamic_slice(renderer, u, out: str) -> list[str]:
    x, idx = u.inputs[0], u.inputs[1:]
    terms = []
    for n, z, st, v in zip(x.aval.shape, u.params["sizes"], strides(x.aval.shape), idx):
        if n - z > 0:
            e = f"(long long)({renderer.elem(v)})"
            terms.append(f"({e} < 0 ? 0LL : ({e} > {n - z} ? {n - z}LL : {e})) * {st}")
    index = f"(int)({' + '.join(terms)})" if terms else "0"
    return [f"{out} = {renderer.elem(x, index)};"]


@register_lowering("take", backend="cfamily", role="uniform")
def uniform_take(renderer, u, out: str) -> list[str]:
    x, ind = u.inputs
    n = x.aval.shape[u.params["axis"]]
    e = f"(long long)({renderer.elem(ind)})"
    return [f"{out} = {renderer.elem(x, f'(int)({e} < 0 ? 0LL : ({e} > {n - 1} ? {n - 1}LL : {e}))')};"]


@register_lowering("concatenate", backend="cfamily", role="uniform")
def uniform_concatenate(renderer, u, out: str) -> list[str]:
    x = next(v for v in u.inputs if v.aval.size)      # the one operand with an element
    return [f"{out} = {renderer.elem(x)};"]
