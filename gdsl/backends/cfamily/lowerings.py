"""How every primitive lowers in the C-family backends (tests/test_registry.py checks that none is missing).

Elementwise primitives map to their C expression template (elementwise.py); the others name the renderer
code that handles them.
"""
from gdsl.backends.cfamily.elementwise import ELEMENTWISE

LOWERINGS: dict[str, object] = {
    **ELEMENTWISE,
    "convert_element_type": "types.convert",
    "broadcast_to": "ops.OpRenderer.expr (broadcast index map)",
    "iota": "ops.OpRenderer.expr (coordinate)",
    "reshape": "an alias of its input's storage (no code)",
    "transpose": "ops.OpRenderer.el_transpose",
    "slice": "ops.OpRenderer.el_slice",
    "dynamic_slice": "ops.OpRenderer.el_dynamic_slice",
    "dynamic_update_slice": "ops.OpRenderer.dynamic_update_slice",
    "take": "ops.OpRenderer.el_take",
    "concatenate": "ops.OpRenderer.el_concatenate",
    "reduce_sum": "ops.OpRenderer.reduce",
    "reduce_max": "ops.OpRenderer.reduce",
    "reduce_min": "ops.OpRenderer.reduce",
    "argmax": "ops.OpRenderer.argreduce",
    "argmin": "ops.OpRenderer.argreduce",
    "matmul": "ops.OpRenderer.gemm (prelude gdsl_gemm_tile / gdsl_gemv_tile)",
    "conv2d": "ops.OpRenderer.gemm (implicit GEMM)",
    "avg_pool2d": "ops.OpRenderer.el_avg_pool2d",
    "max_pool2d": "ops.OpRenderer.el_max_pool2d",
    "while": "render.Renderer.block (Loop)",
    "cond": "render.Renderer.block (Branch)",
    "recurse": "render.Renderer.block (Call: the stack machine)",
    "recurse_call": "render.Renderer.block (Call: the stack machine)",
}
