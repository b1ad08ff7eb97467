"""Lowering rules of the reduce family (whole reductions along axes, argmax/argmin) and the window family
(pooling: a small reduction per output element).

A reduction uTask computes whole output elements ([t*rows, (t+1)*rows)): one row per uTask reduced by the
whole block, or several rows per uTask, a group of up to a warp's lanes each (`reduction_loops`). Each kind
brings its own identity and combine (C over the accumulators a and b); the uniform rules unroll the
reduction of a small operand into one expression chain per vEU. A reduction's results go out through its
"epilogue" rule (`store_result`): into its output, and into the window of a dynamic_update_slice folded
into it (plan.StoreWindow, plan.WINDOW_COPY).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from gdsl import dtypes
from gdsl.backends.cfamily import types as c_types
from gdsl.backends.cfamily.ops import OpRenderer, coords, offset, strides
from gdsl.backends.cfamily.views import window_store_index
from gdsl.primitives.reductions import REDUCE_PRIMS, reduce_max_p, reduce_min_p, reduce_sum_p
from gdsl.primitives.registry import register_lowering
from gdsl.schedule.plan import ROW_SHAPE, ROWS, STEP_OUTPUTS, STEPS, row_chunk
from gdsl.schedule.rows import row_group

# A row chain's lanes load every element they read at their row elements first, in one pass, where that takes at
# most this many registers a lane (values x slots); the steps then compute from registers. Without it each
# step's loads wait behind the step before (a step's slot loop is its own branch, which the compiler does not
# hoist loads across): NASRNN's cell, two steps, paid two L2 round trips. None: off. Measured on the H200
# (session 11, alternated x2 in one call, ms, off -> 32): NASRNN bs64 10.90 / 10.93 -> 9.42 / 9.41, LSTM bs64
# 3.007 / 3.010 -> 2.887 / 2.819, LSTM bs1 0.457 / 0.455 -> 0.436 / 0.402, Attention bs1 0.199 / 0.185 ->
# 0.144 / 0.148; NASRNN bs1, Seq2seq and Attention bs64 within their spread.
PRELOAD_ROW_LEAVES = 32
# After those loads the dialect's issue fence (CUDA: a warp barrier), so that the compiler issues them all there:
# without it ptxas may move loads down to their first use between the steps' math, and each such group waits for
# its own L2 round trip (NASRNN bs64's cell with the SFU logistic of session 22: its 17 loads in five groups, three
# more round trips a step than with the correctly rounded division, whose slow-path call kept them together).
FENCE_ROW_LEAVES = True
# A reduction's lane loads this many of its elements into registers before it folds them (in the same order, so
# the result is the same bit for bit), so that their memory round trips overlap: Seq2seq bs1's argmax over 3797
# logits on one vEU (15 elements a lane) ran 3.2 us a step on the H200 (session 15's profile) with the loads'
# latency on its path. Measured on the H200 (session 16, benchmarks/kernel_ab.py, ncu kernel time, two processes x
# 15 launches): Seq2seq bs1 127.7 -> 110.4 us (predicted -15 to -20). 0 or 1: one element at a time.
LANE_LOAD_BATCH = 8


# ---------------------------------------------------------------------------------- reductions (uTask)
@register_lowering("reduce_sum", backend="cfamily")
def reduce_sum(ops: OpRenderer) -> str:
    return whole_reduction(ops, identity="0", combine="a + b", partial_sums=dtypes.is_float(ops.ins[0].dtype))


@register_lowering("reduce_max", backend="cfamily")
def reduce_max(ops: OpRenderer) -> str:
    dt = ops.ins[0].dtype
    return whole_reduction(ops, identity=c_types.lowest(dt) if dt != dtypes.bool_ else "0",
                           combine="gdsl_fmax(a, b)" if dtypes.is_float(dt) else "(a > b ? a : b)")


@register_lowering("reduce_min", backend="cfamily")
def reduce_min(ops: OpRenderer) -> str:
    dt = ops.ins[0].dtype
    return whole_reduction(ops, identity=c_types.highest(dt) if dt != dtypes.bool_ else "1",
                           combine="gdsl_fmin(a, b)" if dtypes.is_float(dt) else "(a < b ? a : b)")


@register_lowering("argmax", backend="cfamily")
def argmax(ops: OpRenderer) -> str:
    dt = ops.ins[0].dtype
    return arg_reduction(ops, better=">", identity=c_types.lowest(dt) if dt != dtypes.bool_ else "0")


@register_lowering("argmin", backend="cfamily")
def argmin(ops: OpRenderer) -> str:
    dt = ops.ins[0].dtype
    return arg_reduction(ops, better="<", identity=c_types.highest(dt) if dt != dtypes.bool_ else "1")


def _operand_access(ops: OpRenderer, axes) -> tuple[str, str, int, int]:
    """(C expression of output row o's first element, C load of its element r in the accumulator type,
    the reduction's length, the number of outputs)."""
    x, out = ops.ins[0], ops.outs[0]
    n_out = out.aval.size
    length = max(1, x.aval.size) // max(n_out, 1) if x.aval.size else 0
    xshape = x.aval.shape
    kept = [d for d in range(len(xshape)) if d not in axes]
    xst = strides(xshape)
    if axes == tuple(range(len(xshape) - len(axes), len(xshape))):
        base, inner = f"o * {length}" if length != 1 else "o", "r"
    else:
        base = offset(coords([xshape[d] for d in kept], "o"), [xst[d] for d in kept])
        inner = offset(coords([xshape[d] for d in axes], "r"), [xst[d] for d in axes])
    acc = c_types.accumulator(x.dtype)
    load = f"({acc})({x.at(f'base + {inner}' if inner != '0' else 'base')})"
    return base, load, length, n_out


SUM_CHUNK = 256     # elements one lane adds into a partial sum before the partial joins its float total


def whole_reduction(ops: OpRenderer, *, identity: str, combine: str, partial_sums: bool = False) -> str:
    """reduce_sum/max/min over params["axes"]: `combine` folds accumulators a and b, `identity` starts.
    `partial_sums` (float sums): a lane whose run is longer than SUM_CHUNK elements adds them in chunks, each
    into a fresh partial sum, so that its error does not grow with the run's length."""
    acc = c_types.accumulator(ops.ins[0].dtype)
    base, load, length, n_out = _operand_access(ops, tuple(sorted(ops.op.params["axes"])))
    ident = f"({acc})({identity})"
    partial = (f"{acc} p = {ident};", f"p = comb(p, {load});", "v = comb(v, p);") if partial_sums else None
    lines = [f"  auto comb = []({acc} a, {acc} b) -> {acc} {{ return {combine}; }};"]
    lines += reduction_loops(
        ops, length=length, n_out=n_out, base=base, init=f"{acc} v = {ident};",
        step=LaneStep(acc, load, "v = comb(v, x);"), store=store_result(ops, "o", "v"), partial=partial,
        block_combine=f"v = gdsl_block_reduce<{ops.block}>(v, {ident}, comb, smem);",
        group_combine="v = gdsl_group_reduce<{g}>(v, comb);", smem=(ops.block // ops.dialect.warp_size) * 8)
    return "\n".join(lines) + "\n"


def better_lambda(dtype, acc: str, better: str) -> str:
    """C: the lambda `better(v, i, w, j)` of an arg-reduction: is value v at index i before w at j (`better` ">"
    for argmax, "<" for argmin; ties to the lower index, NaN winning as numpy)."""
    test = f"return v {better} w || (v == w && i < j);"
    if dtypes.is_float(dtype):
        test = f"bool vn = v != v, wn = w != w; if (vn || wn) return vn && (!wn || i < j); {test}"
    return f"auto better = []({acc} v, int i, {acc} w, int j) -> bool {{ {test} }};"


def arg_reduction(ops: OpRenderer, *, better: str, identity: str) -> str:
    """argmax (`better` ">") / argmin ("<") along params["axis"]: the first index of the extreme, NaN
    winning as numpy."""
    dt = ops.ins[0].dtype
    acc = c_types.accumulator(dt)
    base, load, length, n_out = _operand_access(ops, (ops.op.params["axis"],))
    lines = [f"  {better_lambda(dt, acc, better)}"]
    lines += reduction_loops(
        ops, length=length, n_out=n_out, base=base, init=f"{acc} v = ({acc})({identity}); int k = 2147483647;",
        step=LaneStep(acc, load, "if (better(x, r, v, k)) { v = x; k = r; }"), store=store_result(ops, "o", "k"),
        block_combine=f"gdsl_block_argreduce<{ops.block}>(v, k, better, smem);",
        group_combine="gdsl_group_argreduce<{g}>(v, k, better);",
        smem=(ops.block // ops.dialect.warp_size) * 16 + 16)
    return "\n".join(lines) + "\n"


@register_lowering(REDUCE_PRIMS.values(), backend="cfamily", role="epilogue")
def store_result(ops: OpRenderer, idx: str, v: str) -> str:
    """C statement: store the reduction's value `v` as its output element `idx`, in each of its outputs:
    its own, and the window of a dynamic_update_slice folded into it (plan.StoreWindow: the element goes
    to its place in the window, views.window_store_index; a window that a start out of range drops has a
    null pointer, views.view_pointer, and stores nothing). A reduction with plan.WINDOW_COPY has both."""
    stores = []
    for out in ops.outs:
        window = out.value.window
        store = out.store(idx if window is None else window_store_index(window, idx), v)
        stores.append(f"if ({out.name} != nullptr) {{ {store} }}" if window is not None and window.drop else store)
    return stores[0] if len(stores) == 1 else f"{{ {' '.join(stores)} }}"


@dataclass(frozen=True)
class LaneStep:
    """What a lane does with element r of its run: `load` (a C expression of r) read as `x` (of type `acc`),
    then `fold` (C statements over x and r); LANE_LOAD_BATCH loads run ahead of their folds."""
    acc: str
    load: str
    fold: str

    def __str__(self):
        return f"const {self.acc} x = {self.load}; {self.fold}"


def _lane_loop(first, length, stride, step: LaneStep, partial) -> str:
    """for r in range(first, length, stride): step; with `partial` = (init, step, flush) and more than
    SUM_CHUNK steps per lane: the steps in chunks of SUM_CHUNK, each folded into a fresh partial, flushed.
    With LANE_LOAD_BATCH and no chunks: LANE_LOAD_BATCH elements loaded, then folded in order."""
    if (partial is None or length <= stride * SUM_CHUNK) and LANE_LOAD_BATCH > 1 and length > stride:
        n = LANE_LOAD_BATCH
        return (f"for (int r0 = {first}; r0 < {length}; r0 += {n * stride}) {{ {step.acc} xs[{n}]; "
                f"for (int u = 0; u < {n}; ++u) {{ const int r = r0 + u * {stride}; "
                f"if (r < {length}) xs[u] = {step.load}; }} "
                f"for (int u = 0; u < {n}; ++u) {{ const int r = r0 + u * {stride}; "
                f"if (r < {length}) {{ const {step.acc} x = xs[u]; {step.fold} }} }} }}")
    if partial is None or length <= stride * SUM_CHUNK:
        return f"for (int r = {first}; r < {length}; r += {stride}) {{ {step} }}"
    init, partial_step, flush = partial
    chunk = stride * SUM_CHUNK
    return (f"for (int r0 = {first}; r0 < {length}; r0 += {chunk}) {{ {init} "
            f"for (int r = r0; r < {length} && r - r0 < {chunk}; r += {stride}) {{ {partial_step} }} {flush} }}")


def reduction_loops(ops: OpRenderer, *, length, n_out, base, init, step, store, block_combine, group_combine,
                    smem, partial=None) -> list[str]:
    """The two layouts of a reduction uTask: one output row per uTask (the whole block reduces it, then
    `block_combine`), or params["rows"] rows per uTask (a group of up to a warp's lanes per row, then
    `group_combine`, formatted with the group size g). `init` starts an accumulator, `step` folds
    element r in, `store` writes output o; `partial`: see _lane_loop."""
    rows = ops.op.params.get("rows", 1)
    thread, block = ops.dialect.thread_index, ops.block
    if rows == 1:
        ops.smem = max(ops.smem, smem)
        return ["  const int o = t;", f"  const int base = {base};", f"  {init}",
                f"  {_lane_loop(thread, length, block, step, partial)}",
                f"  {block_combine}", f"  if ({thread} == 0) {store}"]
    g = min(ops.dialect.warp_size, 1 << max(0, (length - 1).bit_length()))
    return [f"  const int g = {thread} / {g}, lane = {thread} % {g};",
            f"  for (int b = 0; b < {rows}; b += {block // g}) {{",
            f"    const int o = t * {rows} + b + g;",
            f"    const bool ok = b + g < {rows} && o < {n_out};",
            f"    {init}",
            "    if (ok) {",
            f"      const int base = {base};",
            f"      {_lane_loop('lane', length, g, step, partial)}",
            "    }",
            f"    {group_combine.format(g=g)}",
            f"    if (ok && lane == 0) {store}",
            "  }"]


# ---------------------------------------------------------------------------------- pooling (uTask)
@register_lowering("max_pool2d", backend="cfamily")
def max_pool2d(ops: OpRenderer) -> str:
    dt = ops.outs[0].dtype
    combine = "gdsl_fmax(acc, v)" if dtypes.is_float(dt) else "(v > acc ? v : acc)"
    return ops.per_element(_pool(ops, c_types.lowest(dt), combine, "acc"))


@register_lowering("avg_pool2d", backend="cfamily")
def avg_pool2d(ops: OpRenderer) -> str:
    win = ops.op.params["window"]
    return ops.per_element(_pool(ops, "0.0f", "acc + v", f"acc / {win * win}.0f"))


def _pool(ops: OpRenderer, init: str, combine: str, finish: str) -> list[str]:
    """C lines of output element i of a 2-D pooling: fold the window's in-bounds elements v into acc."""
    x, out = ops.ins[0], ops.outs[0]
    p = ops.op.params
    win, s, pad = p["window"], p["stride"], p["padding"]
    _, _, H, W = x.aval.shape
    _, _, HO, WO = out.aval.shape
    return [f"const int wo = i % {WO}, ho = (i / {WO}) % {HO}, nc = i / {WO * HO};",
            f"{c_types.compute(out.dtype)} acc = {init};",
            f"for (int kh = 0; kh < {win}; ++kh) {{",
            f"  const int h = ho * {s} - {pad} + kh;",
            f"  if (h < 0 || h >= {H}) continue;",
            f"  for (int kw = 0; kw < {win}; ++kw) {{",
            f"    const int w = wo * {s} - {pad} + kw;",
            f"    if (w < 0 || w >= {W}) continue;",
            f"    const {c_types.compute(out.dtype)} v = {x.at(f'(nc * {H} + h) * {W} + w')};",
            f"    acc = {combine};",
            "  }",
            "}",
            out.store("i", finish)]


# ---------------------------------------------------------------------------------- reductions (uniform)
@register_lowering("reduce_sum", backend="cfamily", role="uniform")
def uniform_reduce_sum(renderer, u, out: str) -> list[str]:
    return unrolled_reduction(renderer, u, out, "({a} + {b})", identity="0")


@register_lowering("reduce_max", backend="cfamily", role="uniform")
def uniform_reduce_max(renderer, u, out: str) -> list[str]:
    floaty = dtypes.is_float(u.inputs[0].aval.dtype)
    return unrolled_reduction(renderer, u, out, "gdsl_fmax({a}, {b})" if floaty else "({a} > {b} ? {a} : {b})")


@register_lowering("reduce_min", backend="cfamily", role="uniform")
def uniform_reduce_min(renderer, u, out: str) -> list[str]:
    floaty = dtypes.is_float(u.inputs[0].aval.dtype)
    return unrolled_reduction(renderer, u, out, "gdsl_fmin({a}, {b})" if floaty else "({a} < {b} ? {a} : {b})")


@register_lowering("argmax", backend="cfamily", role="uniform")
def uniform_argmax(renderer, u, out: str) -> list[str]:
    return unrolled_arg_reduction(renderer, u, out, ">")


@register_lowering("argmin", backend="cfamily", role="uniform")
def uniform_argmin(renderer, u, out: str) -> list[str]:
    return unrolled_arg_reduction(renderer, u, out, "<")


def _uniform_items(renderer, u) -> tuple[str, list[str]]:
    """(accumulator type, C expression of each operand element in it)."""
    x = u.inputs[0]
    acc = _uniform_acc(x)
    return acc, [f"(({acc}){renderer.elem(x, str(k))})" for k in range(x.aval.size)]


def _uniform_acc(x) -> str:
    """The C type a uniform reduction of `x` accumulates in (bools counted as ints)."""
    return "int" if x.aval.dtype == dtypes.bool_ else c_types.compute(x.aval.dtype)


# A uniform reduction of more elements than this (the scheduler's option uniform_reductions=True lets one read up to
# scheduler.UNIFORM_REDUCTION_MAX_INPUT) is computed by each vEU's threads together: each folds a strided share,
# then a block reduction leaves the result in every thread. Fewer are unrolled into one chain a thread.
UNROLL_MAX = 64


def cooperative_reduction(renderer, u, out: str, *, init: str, fold: str, block_combine: str, result: str,
                          acc: str) -> list[str]:
    """`out` = a reduction of the operand's elements by all threads of the vEU: each thread folds elements
    thread, thread + block, ... (`fold`: C statements over x, the element, and r, its index, into the
    accumulators `init` declares), then `block_combine` leaves the result in every thread; `result` is the C
    value stored. A block barrier first: the uTask before may still read the scratch the combine writes. A thread
    loads LANE_LOAD_BATCH of its elements before it folds them, as a reduction uTask's lanes do."""
    x, d, block = u.inputs[0], renderer.dialect, renderer.plan.block
    renderer.smem = max(renderer.smem, (block // d.warp_size) * 16 + 16)     # (the block combine's scratch)
    load = f"({acc}){renderer.elem(x, 'r')}"
    return [f"{{ {d.block_barrier} {init}",
            f"  {_lane_loop(f'(int){d.thread_index}', x.aval.size, block, LaneStep(acc, load, fold), None)}",
            f"  {block_combine}",
            f"  {out} = {result}; }}"]


def unrolled_reduction(renderer, u, out: str, combine: str, identity: str | None = None) -> list[str]:
    """`out` = the operand's elements folded left to right with `combine` (C over {a}, {b}); by the vEU's
    threads together past UNROLL_MAX elements, from `identity` (None: the first element, for max and min), in
    another order (a float sum may then differ in its last bits)."""
    x = u.inputs[0]
    floaty = dtypes.is_float(x.aval.dtype)
    result = c_types.rounded(u.output.aval.dtype, "v") if floaty else f"({c_types.compute(u.output.aval.dtype)})v"
    if x.aval.size > UNROLL_MAX:
        acc = _uniform_acc(x)
        start = f"({acc})({identity if identity is not None else renderer.elem(x, '0')})"
        return cooperative_reduction(
            renderer, u, out, acc=acc, result=result, fold="v = comb(v, x);",
            init=f"auto comb = []({acc} a, {acc} b) -> {acc} {{ return {combine.format(a='a', b='b')}; }}; "
            f"{acc} v = {start};",
            block_combine=f"v = gdsl_block_reduce<{renderer.plan.block}>(v, {start}, comb, gdsl_smem);")
    acc, items = _uniform_items(renderer, u)
    if not items:
        return [f"{out} = {c_types.literal(0, u.output.aval.dtype)};"]
    lines = [f"{{ {acc} v = {items[0]};"]
    for item in items[1:]:
        lines.append(f"  v = {combine.format(a='v', b=item)};")
    return lines + [f"  {out} = {result}; }}"]


def unrolled_arg_reduction(renderer, u, out: str, better: str) -> list[str]:
    """`out` = the index of the first element that is `better` (">" or "<") than all before it, NaN winning;
    by the vEU's threads together past UNROLL_MAX elements (the same index)."""
    x = u.inputs[0]
    if x.aval.size > UNROLL_MAX:
        acc = _uniform_acc(x)
        return cooperative_reduction(
            renderer, u, out, acc=acc,
            init=f"{better_lambda(x.aval.dtype, acc, better)} {acc} v = ({acc}){renderer.elem(x, '0')}; int k = 0;",
            fold="if (better(x, r, v, k)) { v = x; k = r; }",
            block_combine=f"gdsl_block_argreduce<{renderer.plan.block}>(v, k, better, gdsl_smem);", result="k")
    acc, items = _uniform_items(renderer, u)
    lines = [f"{{ {acc} v = {items[0]}; int k = 0; {acc} w;"]
    for k in range(1, len(items)):
        if dtypes.is_float(u.inputs[0].aval.dtype):
            lines.append(f"  w = {items[k]}; if ((w != w && v == v) || w {better} v) {{ v = w; k = {k}; }}")
        else:
            lines.append(f"  w = {items[k]}; if (w {better} v) {{ v = w; k = {k}; }}")
    return lines + [f"  {out} = k; }}"]


# ---------------------------------------------------------------------------------- row chains (uTask)
# The reductions a row chain may hold (gdsl/schedule/rows.py: float rows only): their identity (of the
# dtype) and their combine, C over the accumulators a and b.
ROW_REDUCTIONS = {
    reduce_sum_p.name: (lambda dt: "0", "a + b"),
    reduce_max_p.name: (c_types.lowest, "gdsl_fmax(a, b)"),
    reduce_min_p.name: (c_types.highest, "gdsl_fmin(a, b)"),
}


@register_lowering(ROWS, backend="cfamily")
def row_chain(ops: OpRenderer) -> str:
    """A ROWS op (gdsl/schedule/plan.py RowStep): uTask t takes rows [t*rows, (t+1)*rows), a group of g lanes
    (at most a warp) per row when a row fits the group's registers (ceil(L / g) <= ROW_SLOTS elements a
    lane: its reductions are warp shuffles, with no block-wide synchronisation; a uTask of one row then
    leaves the other warps idle), else the whole block on each row in turn (`reduction_loops`' two
    layouts). A lane keeps its elements r = lane + k*g of each row step in
    registers (k < ceil(L / g) <= ROW_SLOTS), each per-row value in one register (every lane of the row
    holds it: the group and block reductions leave their result in every lane); only the op's outputs
    are stored, after every step of the row. A cell chain (no reduction) needs no lane group: it takes
    the whole block on each row when a row has at least a block's elements, so that no lane idles (its
    elements then lie as a fused chain's do, lane + k*block). A cell chain split in chunks of its row shape
    (a column layout: plan.row_chunk) runs as a fused chain does, `_cell_chunk`."""
    if row_chunk(ops.op) is not None:
        return _cell_chunk(ops)
    p = ops.op.params
    shape, steps = tuple(p[ROW_SHAPE]), p[STEPS]
    length, n_rows, rows = shape[-1], math.prod(shape[:-1]), p["rows"]
    thread, block = ops.dialect.thread_index, ops.block
    g = row_group(length, any(step.reduce is not None for step in steps), block, ops.dialect.warp_size)
    grouped = g is not None
    if not grouped:
        g = block
    slots = -(-length // g)
    if grouped:
        lines = [f"  const int lane = {thread} % {g}, grp = {thread} / {g};",
                 f"  for (int b = 0; b < {rows}; b += {block // g}) {{",
                 f"    const int o = t * {rows} + b + grp;",
                 f"    const bool ok = b + grp < {rows} && o < {n_rows};"]
    else:
        lines = [f"  const int lane = {thread};",
                 f"  for (int b = 0; b < {rows}; ++b) {{",
                 f"    const int o = t * {rows} + b;",
                 f"    if (o >= {n_rows}) break;",
                 "    const bool ok = true;"]
    body = row_steps(ops, steps, shape, slots, g, grouped)
    outputs = {k: number for number, k in enumerate(p[STEP_OUTPUTS])}
    for k, number in outputs.items():
        out = ops.outs[number]
        if steps[k].per_row(shape):
            body.append(f"if (ok && lane == 0) {out.store('o', f's{k}')}")
        else:
            body.append(_each_slot(slots, g, length, out.store(f"o * {length} + r", f"s{k}[k]")))
    lines += ["    " + line for line in body] + ["  }"]
    return "\n".join(lines) + "\n"


def _cell_chunk(ops: OpRenderer) -> str:
    """A cell chain's uTask t over the elements [t*chunk, (t+1)*chunk) of its row shape, the block's threads
    striding through them: at each element every step in order, each in a register (s<k>), then the stores
    of its outputs (every step is at the element: plan.is_cell_chain)."""
    p = ops.op.params
    shape, steps = tuple(p[ROW_SHAPE]), p[STEPS]
    element = []
    for number, step in enumerate(steps):
        value = ops.expr(step.expr, "i", shape=shape, step=lambda node: f"s{node.params['index']}")
        element.append(f"const {c_types.compute(step.aval.dtype)} s{number} = {value};")
    element += [ops.outs[number].store("i", f"s{k}") for number, k in enumerate(p[STEP_OUTPUTS])]
    return ops.per_element(element, size=math.prod(shape))


def _each_slot(slots: int, g: int, length: int, statement: str) -> str:
    """`statement` for each of a lane's elements r of its row (k: the register slot)."""
    return (f"for (int k = 0; k < {slots}; ++k) {{ const int r = lane + k * {g}; "
            f"if (ok && r < {length}) {{ {statement} }} }}")


def row_steps(ops: OpRenderer, steps, shape, slots: int, g: int, grouped: bool) -> list[str]:
    """C lines computing every step of a row chain, the elements each lane reads first (PRELOAD_ROW_LEAVES)
    where they fit."""
    loads: dict = {}                      # (leaf Arg's name, C index) -> (register slots, Arg, index)

    def leaf(arg, index: str) -> str:
        if (arg.name, index) not in loads:
            loads[arg.name, index] = (f"l{len(loads)}", arg, index)
        return f"{loads[arg.name, index][0]}[k]"

    preload = PRELOAD_ROW_LEAVES is not None
    lines = [line for number, step in enumerate(steps)
             for line in _row_step(ops, step, number, shape, slots, g, grouped, leaf if preload else None)]
    if not preload:
        return lines
    if not loads or len(loads) * slots > PRELOAD_ROW_LEAVES:
        return [line for number, step in enumerate(steps) for line in _row_step(ops, step, number, shape, slots, g,
                                                                                  grouped)]
    # A published leaf (a flag sync's) is loaded as its flag word with the others, and finished (its tag
    # checked, waited for if it is not there yet) after them: its load in flight with theirs.
    flagged = [(name, arg, index) for name, arg, index in loads.values() if arg.flag]
    declarations = [f"{c_types.compute(arg.dtype)} {name}[{slots}];" for name, arg, _ in loads.values()]
    declarations += [f"unsigned long long w{name}[{slots}];" for name, _, _ in flagged]
    fill = " ".join(f"w{name}[k] = {arg.flag_first(index)};" if arg.flag else f"{name}[k] = {arg.at(index)};"
                    for name, arg, index in loads.values())
    finish = " ".join(f"{name}[k] = {arg.at(index, first=f'w{name}[k]')};" for name, arg, index in flagged)
    fence = [ops.dialect.issue_fence] if FENCE_ROW_LEAVES and ops.dialect.issue_fence else []
    return (declarations + [_each_slot(slots, g, shape[-1], fill)] + fence +
            ([_each_slot(slots, g, shape[-1], finish)] if flagged else []) + lines)


def _row_step(ops: OpRenderer, step, number: int, shape, slots: int, g: int, grouped: bool,
              leaf=None) -> list[str]:
    """C lines computing step `number` of a row chain into s<number> (an array of register slots for a row
    step, one value for a per-row step); `leaf`: ops.expr's, for the elements of the row read at the lane's
    elements."""
    length = shape[-1]
    dt = step.aval.dtype
    ctype = c_types.compute(dt)
    steps = ops.op.params[STEPS]

    def step_value(node):
        k = node.params["index"]
        return f"s{k}" if steps[k].per_row(shape) else f"s{k}[k]"

    def at_element(expr, root=False):
        return ops.expr(expr, f"(o * {length} + r)", root=root, shape=shape, step=step_value, leaf=leaf)

    if step.reduce is None and step.per_row(shape):
        value = ops.expr(step.expr, "o", shape=step.aval.shape, step=step_value)
        return [f"{ctype} s{number} = {c_types.literal(0, dt)};", f"if (ok) s{number} = {value};"]
    if step.reduce is None:
        store = f"s{number}[k] = {at_element(step.expr)};"
        return [f"{ctype} s{number}[{slots}];", _each_slot(slots, g, length, store)]
    acc = c_types.accumulator(dt)
    identity, combine = ROW_REDUCTIONS[step.reduce]
    ident = f"({acc})({identity(dt)})"
    if grouped:
        reduce = f"v = gdsl_group_reduce<{g}>(v, comb);"
    else:
        reduce = f"v = gdsl_block_reduce<{ops.block}>(v, {ident}, comb, smem);"
        ops.smem = max(ops.smem, (ops.block // ops.dialect.warp_size) * 8)
    operand = f"({acc})({at_element(step.expr, root=True)})"
    return [f"{ctype} s{number};",
            f"{{ auto comb = []({acc} a, {acc} b) -> {acc} {{ return {combine}; }};",
            f"  {acc} v = {ident};",
            "  " + _each_slot(slots, g, length, f"v = comb(v, {operand});"),
            f"  {reduce}",
            f"  s{number} = {c_types.rounded(dt, 'v')}; }}"]
