"""Affine kinds: each output element combines input elements read at affine index maps.

    fused chains, broadcast_to, iota    an elementwise expression over inputs broadcast to the output
    copy, reshape                       numpy broadcasting, or element by element between shapes of one size
    transpose, slice, dynamic_slice     one input read through permuted, stepped or shifted strides

A kind's rule builds its "leaves" (each read at base + sum(idx[d] * strides[d])) and a combination of their
values; emit_affine walks the uTask's share of the output with every leaf's strides, collapsed where the
dimensions are contiguous, so the innermost loop vectorises.
"""
from __future__ import annotations

from gdsl import dtypes
from gdsl.backends.cpu.ir import affine, const, convert, round_to, strides
from gdsl.backends.cpu.lowerings import LOWERINGS
from gdsl.backends.cpu.operands import broadcast_strides, collapse, for_chunk
from gdsl.primitives.elementwise import convert_p, select_p
from gdsl.primitives.registry import ELEMENTWISE, is_uniform, kinds_of, register_lowering
from gdsl.primitives.structural import iota_p
from gdsl.schedule.plan import RESULT, Expr

# The elementwise primitives (the elementwise table, lowerings.py, lowers each); the scheduler's fused chains
# share their family but are no primitive.
ELEMENTWISE_PRIMITIVES = sorted(k for k in kinds_of(ELEMENTWISE) if is_uniform(k))


class Leaf:
    def __init__(self, strides_, load, base=0):
        self.strides, self.load, self.base = tuple(strides_), load, base


def eval_expr(fn, expr, leaf_value):
    """The compute-type value of a fused Expr tree; leaf_value(node) gives input and iota nodes (and an
    epilogue's RESULT leaves)."""
    memo: dict = {}

    def ev(node):
        if id(node) in memo:
            return memo[id(node)]
        if node.op in ("input", iota_p.name, RESULT):
            v = leaf_value(node)
        elif node.op == "literal":
            v = const(node.aval.dtype, node.params["value"])
        else:
            args = [ev(a) for a in node.args]
            operand = node.args[1] if node.op == select_p.name else node.args[0]
            v = LOWERINGS[node.op](fn, operand.aval.dtype, args, node.params)
            if node.op != convert_p.name:
                v = round_to(fn, node.aval.dtype, v)
        memo[id(node)] = v
        return v
    return ev(expr)


def iota_leaf(fn, shape, dimension, dtype, out_shape):
    """iota's value is its index along `dimension`: a leaf whose "offset" is that index."""
    st = [0] * len(out_shape)
    pad = len(out_shape) - len(shape)
    if shape[dimension] != 1:
        st[pad + dimension] = 1
    return Leaf(st, lambda off: convert(fn, str(off), dtypes.int64, dtype))


def _broadcastable(shape, out_shape) -> bool:
    pad = len(out_shape) - len(shape)
    return pad >= 0 and all(d in (1, out_shape[pad + k]) for k, d in enumerate(shape))


# ---------------------------------------------------------------------------------- leaves of each kind
# leaves(fn, ops, params, out_aval) -> (leaves, combine(values) -> value)

def expression_leaves(fn, ops, expr, out_aval):
    """An elementwise expression: a leaf per distinct input and per iota node."""
    out_shape = out_aval.shape
    leaves, slot = [], {}

    def key(node):
        return ("input", node.params["index"]) if node.op == "input" else ("node", id(node))

    def collect(node):
        if node.op in ("input", iota_p.name) and key(node) not in slot:
            slot[key(node)] = len(leaves)
            if node.op == "input":
                k = node.params["index"]
                leaves.append(Leaf(broadcast_strides(ops.aval(k).shape, out_shape),
                                   lambda off, k=k: ops.load(k, off)))
            else:
                leaves.append(iota_leaf(fn, node.params["shape"], node.params["dimension"],
                                         node.params["dtype"], out_shape))
        for a in node.args:
            collect(a)
    collect(expr)

    def combine(values):
        return eval_expr(fn, expr, lambda node: values[slot[key(node)]])
    return leaves, combine


def one_primitive(kind, ops, params, out_aval) -> Expr:
    """The expression of primitive `kind` applied to the op's inputs in order."""
    args = tuple(Expr("input", (), {"index": k}, ops.aval(k)) for k in range(len(ops.in_values)))
    return Expr(kind, args, params, out_aval)


def _first_input(ops):
    return lambda off: ops.load(0, off)


def _unchanged(values):
    return values[0]


def copy_leaves(fn, ops, params, out_aval):
    """numpy broadcasting; between shapes of one size (a reshape), element by element."""
    src, out_shape = ops.aval(0), out_aval.shape
    st = broadcast_strides(src.shape, out_shape) if _broadcastable(src.shape, out_shape) else strides(out_shape)
    return [Leaf(st, _first_input(ops))], lambda values: convert(fn, values[0], src.dtype, out_aval.dtype)


def transpose_leaves(fn, ops, params, out_aval):
    xs = strides(ops.aval(0).shape)
    return [Leaf([xs[p] for p in params["permutation"]], _first_input(ops))], _unchanged


def slice_leaves(fn, ops, params, out_aval):
    xs = strides(ops.aval(0).shape)
    base = sum(b * s for b, s in zip(params["start"], xs))
    return [Leaf([st * s for st, s in zip(params["step"], xs)], _first_input(ops), base)], _unchanged


def dynamic_slice_leaves(fn, ops, params, out_aval):
    src = ops.aval(0)
    xs = strides(src.shape)
    starts = [fn.clamp(ops.index(1 + d), 0, n - z) for d, (n, z) in enumerate(zip(src.shape, params["sizes"]))]
    return [Leaf(xs, _first_input(ops), affine(fn, 0, zip(starts, xs)))], _unchanged


# -------------------------------------------------------------------------------------- walking them

def emit_affine(fn, ops, op, leaves, combine, t):
    """uTask t of an affine op: output[idx] = combine(leaf values at idx) over its chunk of elements."""
    out_aval = op.outputs[0].aval
    shape, sets = collapse(out_aval.shape, [leaf.strides for leaf in leaves] + [strides(out_aval.shape)])

    def element(idx, linear):
        values = [leaf.load(affine(fn, leaf.base, zip(idx, st))) for leaf, st in zip(leaves, sets)]
        ops.store(0, affine(fn, 0, zip(idx, sets[-1])), combine(values))
    for_chunk(fn, shape, op.params["chunk"], t, element)


def first_element(leaves, combine):
    """Element 0 of an affine kind (a uniform op)."""
    return combine([leaf.load(leaf.base) for leaf in leaves])


# ------------------------------------------------------------------------------------------- rules

@register_lowering("fused", backend="cpu")
def fused_utask(fn, ops, op, t):
    emit_affine(fn, ops, op, *expression_leaves(fn, ops, op.expr, op.outputs[0].aval), t)


@register_lowering(("broadcast_to", "iota"), backend="cpu")
def unfused_expression_utask(fn, ops, op, t):
    """broadcast_to and iota outside a fused chain: the expression of the one primitive."""
    out_aval = op.outputs[0].aval
    emit_affine(fn, ops, op, *expression_leaves(fn, ops, one_primitive(op.kind, ops, op.params, out_aval),
                                                out_aval), t)


@register_lowering(("copy", "reshape"), backend="cpu")
def copy_utask(fn, ops, op, t):
    emit_affine(fn, ops, op, *copy_leaves(fn, ops, op.params, op.outputs[0].aval), t)


@register_lowering("transpose", backend="cpu")
def transpose_utask(fn, ops, op, t):
    emit_affine(fn, ops, op, *transpose_leaves(fn, ops, op.params, op.outputs[0].aval), t)


@register_lowering("slice", backend="cpu")
def slice_utask(fn, ops, op, t):
    emit_affine(fn, ops, op, *slice_leaves(fn, ops, op.params, op.outputs[0].aval), t)


@register_lowering("dynamic_slice", backend="cpu")
def dynamic_slice_utask(fn, ops, op, t):
    emit_affine(fn, ops, op, *dynamic_slice_leaves(fn, ops, op.params, op.outputs[0].aval), t)


@register_lowering(ELEMENTWISE_PRIMITIVES, backend="cpu", role="uniform")
def elementwise_uniform(fn, ops, kind, params, out_aval):
    return first_element(*expression_leaves(fn, ops, one_primitive(kind, ops, params, out_aval), out_aval))


@register_lowering(("reshape", "transpose", "broadcast_to"), backend="cpu", role="uniform")
def first_input_uniform(fn, ops, kind, params, out_aval):
    """A one-element reshape, transpose or broadcast is its input's one element."""
    return ops.load(0, 0)


@register_lowering("iota", backend="cpu", role="uniform")
def iota_uniform(fn, ops, kind, params, out_aval):
    return const(out_aval.dtype, 0)


@register_lowering("slice", backend="cpu", role="uniform")
def slice_uniform(fn, ops, kind, params, out_aval):
    return first_element(*slice_leaves(fn, ops, params, out_aval))


@register_lowering("dynamic_slice", backend="cpu", role="uniform")
def dynamic_slice_uniform(fn, ops, kind, params, out_aval):
    return first_element(*dynamic_slice_leaves(fn, ops, params, out_aval))
