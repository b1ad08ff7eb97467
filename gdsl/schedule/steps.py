"""Hoisting across iterations: a loop's per-step product with a loop-invariant matrix, done for all steps at
once before the loop (an IR-to-IR pass; what cuDNN does with an RNN's input projection).

In a counted loop (`loops.counted_loop`), a matmul whose left operand is row block i of a loop-invariant
array -- `xs[i] @ W` with `xs[N, m, K]` and `W[..., K, n]` consts of the body -- reads nothing that
changes from step to step but the index. It becomes, before the loop, one GEMM over all N row blocks,

    Y = reshape(xs, (N*m, K)) @ W            # [..., N*m, n]

and, inside the loop, the window `Y[..., i*m : i*m + m, :]` (a dynamic_slice: the same rows, clamped the
same way as `xs[i]` was). With W batched (stacked gates, `W[g, K, n]`) the product is laid out step by step,
`Y[i] = xs[i] @ W` of shape `[N, g, m, n]`, so that a step's window is one contiguous run (read in place under
device control: a pointer, no copy). When a step's row block is GEMV-shaped (m <= BY_GATE_MAX_ROWS: batch 1),
computing it that way would be N*g GEMVs of m rows (NASRNN batch 1: 8000 one-row GEMVs in 31 rounds of the
grid); it is computed gate by gate instead, one GEMM of N*m rows per gate, and transposed into the step-major
layout before the loop (one copy of the product):

    Y = transpose(reshape(reshape(xs, (N*m, K)) @ W, (g, N, m, n)), (1, 0, 2, 3))

The step's own matmul, its wave and its grid barrier leave the loop; the GEMM before it has N times the rows,
which fills the grid where a step's GEMV could not. Applied when the loop runs at least N steps (every row
block is then read, so no work is wasted) and the product is at most HOIST_MAX_BYTES; the slice and reshape
of `xs` that fed only the matmul are dropped.
"""
from __future__ import annotations

from gdsl.core.ir import Eqn, Jaxpr, Lit, ShapedArray, Var
from gdsl.primitives.elementwise import mul_p
from gdsl.primitives.linalg import matmul_p
from gdsl.primitives.structural import dynamic_slice_p, reshape_p, transpose_p
from gdsl.schedule.loops import WhileRewriter, counted_loop, without_dead_eqns
from gdsl.schedule.utasks import GEMV_ROWS

# The largest product hoisted. A larger one does not stay in the GPU's L2 (50 MB on the H100 and H200): the
# GEMM before the loop writes it to DRAM and every step reads its window back from there, where the step's
# own matmul reads only L2-resident operands. Measured on the H200 (same call, ms): NASRNN batch 64's
# 512 MiB product 13.39 hoisted, 11.91 not; the 8 MiB of NASRNN batch 1 (4.52 against 5.40) and the LSTM's
# 64 KiB / 16 MiB (0.48 / 3.11 against 0.63 / 3.96) pay.
HOIST_MAX_BYTES = 32 << 20

# The most rows a step's block may have for its batched-W product to be computed gate by gate and transposed
# (GEMV-shaped steps, utasks.GEMV_ROWS); 0: always a batched GEMM of every step with every W. (The transpose
# passes the product through twice, GEMM output and copy: at most 2 x HOIST_MAX_BYTES.)
BY_GATE_MAX_ROWS = GEMV_ROWS


def hoist_step_products(program):
    """`program` with every per-step `xs[i] @ W` of its counted loops computed for all steps before the
    loop (the same Program when there is none)."""
    return _StepHoister().program(program)


class _StepHoister(WhileRewriter):
    def rewrite_while(self, eqn: Eqn) -> list[Eqn]:
        counted = counted_loop(eqn)
        if counted is None:
            return [eqn]
        _, lo, hi = counted
        p = eqn.params
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        body = p["body_jaxpr"]
        outer = dict(zip(body.in_binders[:nb], eqn.inputs[nc:nc + nb]))    # const binder -> outer atom
        producer = {v: e for e in body.eqns for v in e.outs}
        before, new_binders, new_consts, replaced = [], [], [], {}
        for e in body.eqns:
            match = _step_product(e, producer, outer, hi - lo)
            if match is None:
                continue
            xs, index, w = match
            rows, k = e.inputs[0].aval.shape
            steps = xs.aval.shape[0]
            batch = w.aval.shape[:-2]
            # Unbatched W: one GEMM over the flattened row blocks, `[steps*rows, n]` (a step's rows are one run).
            # Batched W (stacked gates): laid out step by step, `[steps, *batch, rows, n]`, so that a step's
            # window is one run too, not one per batch element (in the loop it is then read in place: a
            # pointer under device control, no copy, no share of vEUs); computed as a batched GEMM of every
            # step with every W, or, GEMV-shaped steps, gate by gate over all steps and transposed.
            by_gate = bool(batch) and rows <= BY_GATE_MAX_ROWS
            shape = (steps * rows, k) if not batch or by_gate else (steps,) + (1,) * len(batch) + (rows, k)
            flat = Var(ShapedArray(shape, xs.aval.dtype))
            (product_aval,) = matmul_p.abstract_eval(flat.aval, w.aval)
            if product_aval.size * product_aval.dtype.itemsize > HOIST_MAX_BYTES:
                continue
            before.append(Eqn(reshape_p, (outer[xs],), {"new_shape": flat.aval.shape}, (flat,)))
            product = Var(product_aval)
            before.append(Eqn(matmul_p, (flat, outer[w]), {}, (product,)))
            if by_gate:
                before += _step_major_eqns(product, steps, rows)
                product = before[-1].outs[0]
            binder = Var(product.aval)
            new_binders.append(binder)
            new_consts.append(product)
            replaced[e] = _step_window_eqns(binder, index, e.outs[0]) if batch else \
                _window_eqns(binder, index, rows, e.outs[0])
        if not replaced:
            return [eqn]
        eqns = []
        for e in body.eqns:
            eqns += replaced.get(e, [e])
        new_body = without_dead_eqns(Jaxpr(body.in_binders[:nb] + tuple(new_binders) + body.in_binders[nb:],
                                           tuple(eqns), body.outs))
        inputs = eqn.inputs[:nc + nb] + tuple(new_consts) + eqn.inputs[nc + nb:]
        params = dict(p, body_jaxpr=new_body, body_nconsts=nb + len(new_binders))
        return before + [Eqn(eqn.primitive, inputs, params, eqn.outs)]


def _step_product(e: Eqn, producer, outer, trips: int):
    """(xs, index, W) when `e` is `reshape(dynamic_slice(xs, index, 0, ...)) @ W` with xs and W consts of
    the body, the slice one whole row block of xs, the block a matrix, and at most `trips` blocks."""
    if e.primitive is not matmul_p:
        return None
    a, w = e.inputs
    if w not in outer or not isinstance(a, Var) or a.aval.ndim != 2 or w.aval.ndim < 2:
        return None
    flatten = producer.get(a)
    if flatten is None or flatten.primitive is not reshape_p:
        return None
    window = producer.get(flatten.inputs[0])
    if window is None or window.primitive is not dynamic_slice_p:
        return None
    xs, index, *rest = window.inputs
    if xs not in outer or any(not isinstance(s, Lit) or s.val != 0 for s in rest):
        return None
    if tuple(window.params["sizes"]) != (1,) + xs.aval.shape[1:] or a.aval.shape != xs.aval.shape[1:]:
        return None
    if xs.aval.shape[0] > trips:
        return None
    return xs, index, w


def _step_major_eqns(product: Var, steps: int, rows: int) -> list[Eqn]:
    """`product[*batch, steps*rows, n]` (gate by gate) transposed into `[steps, *batch, rows, n]`."""
    *batch, _, n = product.aval.shape
    gate_major = Var(ShapedArray((*batch, steps, rows, n), product.aval.dtype))
    nb = len(batch)
    permutation = (nb,) + tuple(range(nb)) + (nb + 1, nb + 2)
    step_major = Var(ShapedArray((steps, *batch, rows, n), product.aval.dtype))
    return [Eqn(reshape_p, (product,), {"new_shape": gate_major.aval.shape}, (gate_major,)),
            Eqn(transpose_p, (gate_major,), {"permutation": permutation}, (step_major,))]


def _step_window_eqns(stacked: Var, index, out: Var) -> list[Eqn]:
    """`out = stacked[index]` (clamped like the original index) for a product laid out step by step."""
    zero = Lit.of(0, index.aval.dtype)
    window = Var(ShapedArray((1,) + out.aval.shape, out.aval.dtype))
    return [Eqn(dynamic_slice_p, (stacked, index) + (zero,) * out.aval.ndim, {"sizes": window.aval.shape},
                (window,)),
            Eqn(reshape_p, (window,), {"new_shape": out.aval.shape}, (out,))]


def _window_eqns(product: Var, index, rows: int, out: Var) -> list[Eqn]:
    """`out = product[..., index*rows : index*rows + rows, :]` (the starts clamp like the original index)."""
    eqns = []
    start = index
    if rows != 1:
        start = Var(index.aval)
        eqns.append(Eqn(mul_p, (index, Lit.of(rows, index.aval.dtype)), {}, (start,)))
    zero = Lit.of(0, index.aval.dtype)
    starts = (zero,) * (product.aval.ndim - 2) + (start, zero)
    eqns.append(Eqn(dynamic_slice_p, (product,) + starts, {"sizes": out.aval.shape}, (out,)))
    return eqns
