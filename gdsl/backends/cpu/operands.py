"""How a uTask's code reaches its operands, and how it walks its share of the output.

What one uTask of each Op kind computes (the shares of gdsl/schedule/utasks.py):

    affine kinds (affine.py)        output elements [t*chunk, min((t+1)*chunk, size)) in row-major order,
    gathers and pools (gather.py,   walked row by row so the innermost loop has constant strides (and
    window.py)                      vectorises)
    reductions (reductions.py)      output elements [t*rows, ...), each a full reduction
    matmul / conv2d (gemm.py,       output tile (b, i, j) = unravel(t, (batch, ceil(M/tile_m), ceil(N/tile_n)))
    conv.py)
    dynamic_update_slice in place   update elements [t*chunk, ...)

Every rule reads its operands through an `Operands` (a pointer, a uniform scalar or a literal per input),
so the same code evaluates a uniform op (one element, in the kernel) and a uTask (in its own function).
The rules are registered per op kind (gdsl.primitives.registry.register_lowering, backend "cpu"):

    role "utask"     rule(fn, ops, op, t): the body of op's uTask function for uTask number t (i64 SSA name)
    role "uniform"   rule(fn, ops, kind, params, out_aval) -> the SSA value of a one-element op
"""
from __future__ import annotations

import math

from gdsl.backends.cpu.ir import compute_type, const, load_element, store_element, strides, unravel
from gdsl.primitives.registry import register_lowering


class Operands:
    """How a piece of code reaches an Op's inputs and outputs: per value ("ptr", SSA pointer),
    ("scalar", SSA compute-type value) or ("lit", numpy scalar)."""

    def __init__(self, fn, in_values, in_access, out_values=(), out_access=()):
        self.fn = fn
        self.in_values, self.in_access = list(in_values), list(in_access)
        self.out_values, self.out_access = list(out_values), list(out_access)

    def aval(self, k):
        return self.in_values[k].aval

    def load(self, k, offset):
        access, x = self.in_access[k]
        dtype = self.aval(k).dtype
        if access == "ptr":
            return load_element(self.fn, dtype, x, offset)
        if access == "scalar":
            return x
        return const(dtype, x)

    def index(self, k):
        """Input k (an integer scalar) as i64."""
        return self.fn.ext_index(self.load(k, 0), compute_type(self.aval(k).dtype))

    def store(self, j, offset, value):
        _, ptr = self.out_access[j]
        store_element(self.fn, self.out_values[j].aval.dtype, ptr, offset, value)

    def is_pointer(self, k) -> bool:
        """Whether input k is reached through a pointer (vector loads and prefetches need one)."""
        return self.in_access[k][0] == "ptr"

    def input_pointer(self, k) -> str:
        return self.in_access[k][1]

    def output_pointer(self, j) -> str:
        return self.out_access[j][1]


# ------------------------------------------------------------------------------------------ iteration

def for_chunk(fn, shape, chunk, t, element):
    """element(idx, linear) for the output elements [t*chunk, min((t+1)*chunk, size)) of `shape`, row by
    row: the inner loop runs over the last dimension with constant bounds when rows do not straddle chunks."""
    size = math.prod(shape)
    if size == 0:
        return
    if len(shape) == 0:
        element([], 0)
        return
    whole = chunk >= size
    start = 0 if whole else fn.op(f"mul nsw i64 {t}, {chunk}")
    end = size if whole else fn.imin(fn.op(f"add nsw i64 {start}, {chunk}"), size)
    if len(shape) == 1:
        fn.loop(start, end, lambda j: element([j], j))
        return
    width, outer_shape = shape[-1], shape[:-1]

    def row(r, lo, hi):
        outer = unravel(fn, r, outer_shape)
        base = fn.op(f"mul nsw i64 {r}, {width}")
        fn.loop(lo, hi, lambda j: element(outer + [j], fn.op(f"add nsw i64 {base}, {j}")))

    if whole or chunk % width == 0:
        first_row = 0 if whole else fn.op(f"udiv i64 {start}, {width}")
        end_row = size // width if whole else fn.op(f"udiv i64 {end}, {width}")
        fn.loop(first_row, end_row, lambda r: row(r, 0, width))
        return
    first_row = fn.op(f"udiv i64 {start}, {width}")
    end_row = fn.op(f"udiv i64 {fn.op(f'add nsw i64 {end}, {width - 1}')}, {width}")

    def partial_row(r):
        row_start = fn.op(f"mul nsw i64 {r}, {width}")
        lo = fn.imax(fn.op(f"sub nsw i64 {start}, {row_start}"), 0)
        hi = fn.imin(fn.op(f"sub nsw i64 {end}, {row_start}"), width)
        row(r, lo, hi)
    fn.loop(first_row, end_row, partial_row)


class ElementRules:
    """The uTask and uniform rules of a kind computed element by element: output element idx is
    element(fn, ops, params, out_aval, idx). uTask t computes the op.params[share] elements from t * share
    on; a uniform op is element 0."""

    def __init__(self, element, share="chunk"):
        self.element, self.share = element, share

    def register(self, kinds, *, uniform=True):
        """Register these rules for `kinds` on the cpu backend: the uTask rule, and the uniform one."""
        register_lowering(kinds, backend="cpu")(self.utask)
        if uniform:
            register_lowering(kinds, backend="cpu", role="uniform")(self.uniform)
        return self

    def utask(self, fn, ops, op, t):
        out_aval = op.outputs[0].aval
        for_chunk(fn, out_aval.shape, op.params[self.share], t,
                  lambda idx, linear: ops.store(0, linear, self.element(fn, ops, op.params, out_aval, idx)))

    def uniform(self, fn, ops, kind, params, out_aval):
        return self.element(fn, ops, params, out_aval, [0] * out_aval.ndim)


def broadcast_strides(shape, out_shape) -> tuple[int, ...]:
    """Element strides that read a row-major `shape` broadcast (numpy rules) to `out_shape`."""
    own = strides(shape)
    pad = len(out_shape) - len(shape)
    return tuple(0 if d < pad or shape[d - pad] == 1 else own[d - pad] for d in range(len(out_shape)))


def collapse(shape, stride_sets):
    """Merge adjacent dimensions that every stride set walks contiguously; drop unit dimensions."""
    dims = [(n, [s[d] for s in stride_sets]) for d, n in enumerate(shape) if n != 1]
    merged: list = []
    for n, ss in dims:
        if merged and all(prev == cur * n for prev, cur in zip(merged[-1][1], ss)):
            merged[-1] = (merged[-1][0] * n, ss)
        else:
            merged.append((n, ss))
    return tuple(n for n, _ in merged), [tuple(ss[k] for _, ss in merged) for k in range(len(stride_sets))]
