"""Split-K: a GEMM whose output tiles are too few for the grid and whose depth is long runs as partial products.

A small-M, deep-K GEMM (a 3x3 convolution over a 14 x 14 image: M = 196, N = 256, K = 2304) gets few output tiles,
each a long chain of dependent k stages with little arithmetic: most vEUs wait at the next grid barrier. Split-K
computes it as S partial products over ranges of k, S times as many uTasks, each S times shorter, and sums them:

    partial op   the GEMM's kind and own operands, split param plan.K_SPLITS = S, its output a new float32 temp
                 P of shape (S, *out_shape): P[s] = the product over k in plan.k_range(K, S, s). uTask t is tile
                 t % tiles of slice t // tiles (utasks.py's table). No epilogue, no window store.
    sum op       a "fused" elementwise op of the next wave: the GEMM's epilogue (if any) with its RESULT leaf
                 replaced by P[0] + P[1] + ... + P[S-1], added in that order (the same bits on every backend),
                 its inputs the S views P[s] then the epilogue's operands; it writes the GEMM's output.

The scheduler (Scheduler._emit) chooses S per GEMM with utasks.k_splits (a cost rule; the option `split_k`,
utasks.FORCE_K_SPLITS to force one), keeps the partial op in the GEMM's wave and gives the sum op a wave of its
own right after it (every later level moves one further: _shifted_levels). Being an ordinary fused op, the sum
needs nothing new from the backends, the shares or the barriers; the partial op is a GEMM with S more batch
elements in front (utasks.gemm_dims) whose uTasks contract a range of k (the renderers' one change).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from gdsl.core.ir import ShapedArray
from gdsl.primitives.elementwise import add_p
from gdsl.primitives.linalg import matmul_p
from gdsl.primitives.registry import REGISTRY
from gdsl.schedule.plan import RESULT, Expr, Value, fold_expr, k_range


def partial_aval(out_aval, splits: int) -> ShapedArray:
    """The type of a split GEMM's partial products P: (S, *out_shape), float32 (the accumulator)."""
    return ShapedArray((splits,) + tuple(out_aval.shape), np.dtype("float32"))


def slices(partials: Value, out_aval, splits: int) -> list[Value]:
    """The views P[0], ..., P[S-1] of the partial products, each of the GEMM's output shape."""
    size = int(np.prod(out_aval.shape, dtype=np.int64))
    aval = ShapedArray(tuple(out_aval.shape), np.dtype("float32"))
    return [dataclasses.replace(partials, aval=aval, offset=partials.offset + s * size) for s in range(splits)]


def slice_sum(splits: int, aval) -> Expr:
    """P[0] + P[1] + ... + P[S-1] (inputs 0 .. S-1 of the sum op), added left to right."""
    total = Expr("input", (), {"index": 0}, aval)
    for s in range(1, splits):
        total = Expr(add_p.name, (total, Expr("input", (), {"index": s}, aval)), {}, aval)
    return total


def sum_expr(epilogue: Expr | None, splits: int, first_operand: int, out_aval) -> Expr:
    """The sum op's expression: the epilogue (its operands numbered from `first_operand` on, the contraction's
    own operands before them) over the slices' sum in place of its RESULT leaf, the operands renumbered after
    the S slices; just the sum without an epilogue."""
    if epilogue is None:
        return slice_sum(splits, ShapedArray(tuple(out_aval.shape), np.dtype("float32")))

    def renumber(node, args):
        if node.op == RESULT:
            return slice_sum(splits, node.aval)
        if node.op == "input":
            return Expr("input", (), {**node.params, "index": node.params["index"] - first_operand + splits},
                        node.aval)
        return Expr(node.op, tuple(args), node.params, node.aval)
    return fold_expr(epilogue, renumber)


def shifted_levels(levels, split_levels) -> dict:
    """Each wave level's new level when a sum wave follows each of `split_levels` (the levels of split GEMMs):
    every level moves one further per split level before it, so that the order of all waves stays as it was
    (whatever the scheduler decided from it, in-place writes included) and the level after a split level is
    free for its sums."""
    ordered = sorted(set(split_levels))
    return {level: level + sum(1 for s in ordered if s < level) for level in levels}


def partial_products(kind: str, operands, params: dict, splits: int) -> np.ndarray:
    """P of a split GEMM computed with the primitive itself (the plan simulator's reference): P[s] is the product
    with B's (the weights') depths outside slice s's range zeroed, stacked."""
    a, b = operands[:2]
    b = np.asarray(b)
    depth = b.shape[-2] if kind == matmul_p.name else int(np.prod(b.shape[1:]))
    out = []
    for s in range(splits):
        lo, hi = k_range(depth, splits, s)
        if kind == matmul_p.name:
            masked = b.copy()
            masked[..., :lo, :] = 0
            masked[..., hi:, :] = 0
        else:                                    # conv2d: weights O x (C, KH, KW), k their flat (c, kh, kw)
            flat = b.reshape(b.shape[0], -1).copy()
            flat[:, :lo] = 0
            flat[:, hi:] = 0
            masked = flat.reshape(b.shape)
        out.append(np.asarray(REGISTRY[kind].impl(a, masked, **params)[0], np.float32))
    return np.stack(out)
