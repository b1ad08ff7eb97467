"""Gather-like kinds: output elements read from positions computed at run time.

    take                    x indexed along `axis` by an index array (indices clamped)
    concatenate             each output element from the input whose slab along `axis` holds it
    dynamic_update_slice    x with a window replaced by `update` at clamped (or, mode="drop", checked) starts;
                            in place (its output is x's storage) it writes only the window

Each output element is computed on its own (operands.ElementRules); a uniform take or concatenate is
the same code at index 0.
"""
from __future__ import annotations

from gdsl.backends.cpu.ir import affine, compute_type, strides
from gdsl.backends.cpu.operands import ElementRules, for_chunk
from gdsl.primitives.registry import register_lowering


def take_element(fn, ops, params, out_aval, idx):
    x, ind = ops.aval(0), ops.aval(1)
    axis, r = params["axis"], ind.ndim
    xs = strides(x.shape)
    i = ops.load(1, affine(fn, 0, zip(idx[axis:axis + r], strides(ind.shape))))
    i = fn.clamp(fn.ext_index(i, compute_type(ind.dtype)), 0, x.shape[axis] - 1)
    pos = list(idx[:axis]) + [i] + list(idx[axis + r:])
    return ops.load(0, affine(fn, 0, zip(pos, xs)))


def concatenate_element(fn, ops, params, out_aval, idx):
    """Every non-empty input is read at the clamped position; the last one whose slab starts at or
    before idx[axis] is selected."""
    axis = params["axis"]
    value, first = None, 0
    for k in range(len(ops.in_values)):
        a = ops.aval(k)
        n = a.shape[axis]
        if n == 0:
            continue
        pos = list(idx)
        pos[axis] = fn.clamp(fn.op(f"sub nsw i64 {idx[axis]}, {first}") if first else idx[axis], 0, n - 1)
        v = ops.load(k, affine(fn, 0, zip(pos, strides(a.shape))))
        if value is None:
            value = v
        else:
            take = fn.op(f"icmp sge i64 {idx[axis]}, {first}")
            value = fn.op(f"select i1 {take}, {compute_type(a.dtype)} {v}, {compute_type(a.dtype)} {value}")
        first += n
    return value


def _in_window(fn, idx, starts, sizes):
    conds = []
    for i, s, z in zip(idx, starts, sizes):
        rel = fn.op(f"sub nsw i64 {i}, {s}")
        conds.append(fn.op(f"icmp ult i64 {rel}, {z}"))   # 0 <= i - s < z
    acc = "true"
    for c in conds:
        acc = c if acc == "true" else fn.op(f"and i1 {acc}, {c}")
    return acc


def _update_starts(fn, ops, params):
    """Clamped start indices of a dynamic_update_slice, and an i1 that is true when mode='drop' drops it."""
    x, u = ops.aval(0), ops.aval(1)
    raw = [ops.index(2 + d) for d in range(x.ndim)]
    starts = [fn.clamp(r, 0, n - z) for r, n, z in zip(raw, x.shape, u.shape)]
    dropped = "false"
    if params["mode"] == "drop":
        for r, n, z in zip(raw, x.shape, u.shape):
            bad = fn.op(f"or i1 {fn.op(f'icmp slt i64 {r}, 0')}, {fn.op(f'icmp sgt i64 {r}, {n - z}')}")
            dropped = bad if dropped == "false" else fn.op(f"or i1 {dropped}, {bad}")
    return starts, dropped


def updated_element(fn, ops, starts, dropped, idx, linear):
    """Output element idx of a dynamic_update_slice: update's element inside the (kept) window, else x's."""
    x, u = ops.aval(0), ops.aval(1)
    old = ops.load(0, linear)
    if u.size == 0:
        return old
    inside = fn.op(f"and i1 {_in_window(fn, idx, starts, u.shape)}, {fn.op(f'xor i1 {dropped}, true')}")
    rel = [fn.clamp(fn.op(f"sub nsw i64 {i}, {s}"), 0, z - 1) for i, s, z in zip(idx, starts, u.shape)]
    new = ops.load(1, affine(fn, 0, zip(rel, strides(u.shape))))
    ty = compute_type(x.dtype)
    return fn.op(f"select i1 {inside}, {ty} {new}, {ty} {old}")


def emit_update_in_place(fn, ops, op, t):
    """dynamic_update_slice whose output is its operand's storage: write only the window."""
    x, u = ops.aval(0), ops.aval(1)
    starts, dropped = _update_starts(fn, ops, op.params)
    xs = strides(x.shape)

    def body():
        def element(idx, linear):
            pos = [fn.op(f"add nsw i64 {s}, {i}") if i != 0 else s for s, i in zip(starts, idx)]
            ops.store(0, affine(fn, 0, zip(pos, xs)), ops.load(1, linear))
        for_chunk(fn, u.shape, op.params["chunk"], t, element)
    if dropped == "false":
        body()
    else:
        fn.if_(fn.op(f"xor i1 {dropped}, true"), body)


# ------------------------------------------------------------------------------------------- rules

ElementRules(take_element).register("take")
ElementRules(concatenate_element).register("concatenate")


@register_lowering("dynamic_update_slice", backend="cpu")
def dynamic_update_slice_utask(fn, ops, op, t):
    if op.params.get("in_place"):
        emit_update_in_place(fn, ops, op, t)
        return
    starts, dropped = _update_starts(fn, ops, op.params)
    for_chunk(fn, op.outputs[0].aval.shape, op.params["chunk"], t, lambda idx, linear: ops.store(
        0, linear, updated_element(fn, ops, starts, dropped, idx, linear)))
