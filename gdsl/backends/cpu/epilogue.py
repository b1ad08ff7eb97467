"""Elementwise epilogues of matmul / conv2d uTasks (gdsl/schedule/plan.py, EPILOGUE): the GEMM stores the
contraction's result for its tile of the output, then each element of the tile is replaced by the epilogue
of it, the epilogue's other operands read at the same element (broadcast to the output shape).

An operand in the output's own storage (a loop carry updated in place, read by the epilogue at the element
it writes) would be overwritten by the GEMM first: its elements of the tile are copied aside before.
"""
from __future__ import annotations

from gdsl.backends.cpu.affine import eval_expr, iota_leaf
from gdsl.backends.cpu.ir import affine, load_element, mem_type, store_element, unravel
from gdsl.backends.cpu.operands import broadcast_strides
from gdsl.primitives.linalg import matmul_p
from gdsl.primitives.nn import conv2d_p
from gdsl.primitives.registry import register_lowering
from gdsl.primitives.structural import iota_p
from gdsl.schedule.plan import RESULT, epilogue_of, epilogue_operands


@register_lowering((matmul_p, conv2d_p), backend="cpu", role="epilogue")
def with_epilogue(fn, ops, op, rows, cols, max_rows: int, max_cols: int, flat_of, compute) -> None:
    """`compute()` (the uTask's GEMM: it stores the contraction's result at output elements flat_of(r, c)
    for r < rows <= max_rows, c < cols <= max_cols), then the op's epilogue over those elements."""
    expr = epilogue_of(op)
    if expr is None:
        compute()
        return
    out = op.outputs[0]
    overwritten = [k for k in epilogue_operands(op) if ops.is_pointer(k) and op.inputs[k].storage is out.storage
                   and op.inputs[k].frame_offset == out.frame_offset]
    aside = {k: fn.alloca(f"[{max_rows * max_cols} x {mem_type(ops.aval(k).dtype)}]", "aside") for k in overwritten}

    def for_tile(body):          # body(slot of the element in an aside tile, its flat output index)
        fn.loop(0, rows, lambda r: fn.loop(0, cols, lambda c: body(affine(fn, 0, [(r, max_cols), (c, 1)]),
                                                                   flat_of(r, c))))

    def put_aside(slot, flat):
        idx = unravel(fn, flat, out.aval.shape)
        for k, buf in aside.items():
            store_element(fn, ops.aval(k).dtype, buf, slot, ops.load(k, _offset(fn, ops, k, out.aval.shape, idx)))
    if aside:
        for_tile(put_aside)
    compute()

    def finish(slot, flat):
        idx = unravel(fn, flat, out.aval.shape)

        def leaf_value(node):
            if node.op == RESULT:
                return load_element(fn, out.aval.dtype, ops.output_pointer(0), flat)
            if node.op == iota_p.name:      # (the fused ops' iota leaf, at this element)
                leaf = iota_leaf(fn, node.params["shape"], node.params["dimension"], node.params["dtype"],
                                  out.aval.shape)
                return leaf.load(affine(fn, 0, zip(idx, leaf.strides)))
            k = node.params["index"]
            if k in aside:
                return load_element(fn, ops.aval(k).dtype, aside[k], slot)
            return ops.load(k, _offset(fn, ops, k, out.aval.shape, idx))
        ops.store(0, flat, eval_expr(fn, expr, leaf_value))
    for_tile(finish)


def _offset(fn, ops, k, out_shape, idx):
    """Where operand k (broadcast to the output's shape) holds output element `idx` (its indices)."""
    return affine(fn, 0, zip(idx, broadcast_strides(ops.aval(k).shape, out_shape)))
