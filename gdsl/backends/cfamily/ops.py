"""One `__device__` function per Op: uTask `t` of the Op, computed by all threads of the calling block.

Each function computes exactly the share written in gdsl/schedule/utasks.py:

    elementwise-like kinds   output elements [t*chunk, min((t+1)*chunk, size))
    matmul / conv2d          output tile unravel(t, (batch, ceil(M/tile_m), ceil(N/tile_n)))
    reductions, argmax/min   output elements [t*rows, (t+1)*rows), each a whole reduction
    dynamic_update_slice     in place: update elements [t*chunk, ...)

The body of an Op's function comes from the "utask" lowering rule of its kind (gdsl/primitives/registry.py),
looked up through the dialect's `lowering_chain`: `rule(op_renderer) -> str`. Elementwise primitives of the
dialect's elementwise table need no rule: they are one C expression per element (`expression_body`), as are
fused chains. This module holds that machinery and the elementwise family's rules; data_movement.py,
reductions.py and gemm.py hold the other families'.

Shapes are compile-time constants (one function per Op). Functions that use shared memory end with a
block barrier, so the next uTask or Op on the same vEU may reuse it.
"""
from __future__ import annotations

import math

from gdsl import dtypes
from gdsl.backends.cfamily import types as c_types
from gdsl.backends.cfamily.elementwise import c_expression
from gdsl.primitives.elementwise import convert_p
from gdsl.primitives.registry import lowering_rule, register_lowering
from gdsl.primitives.structural import broadcast_p, iota_p
from gdsl.schedule.plan import COPY, FUSED, RESULT, ROW_BLOCK, ROWS, STEP, Expr


def strides(shape) -> list[int]:
    out, s = [], 1
    for d in reversed(shape):
        out.append(s)
        s *= d
    return out[::-1]


def coords(shape, i: str) -> list[str]:
    """C expressions of the row-major coordinates of flat index `i` in `shape`."""
    out = []
    for d, (n, s) in enumerate(zip(shape, strides(shape))):
        if n == 1:
            out.append("0")
        elif d == 0:
            out.append(f"({i} / {s})" if s != 1 else i)
        else:
            out.append(f"(({i} / {s}) % {n})" if s != 1 else f"({i} % {n})")
    return out


def broadcast_index(out_shape, in_shape, i: str) -> str:
    """Flat index into an array of `in_shape` broadcast (numpy, right-aligned) to `out_shape`, at flat
    output index `i`. Runs of dimensions where the input is full collapse into one term."""
    out_shape, in_shape = tuple(out_shape), tuple(in_shape)
    if in_shape == out_shape:
        return i
    if math.prod(in_shape) == 1:
        return "0"
    lead = len(out_shape) - len(in_shape)
    full = [k >= lead and in_shape[k - lead] != 1 for k in range(len(out_shape))]
    out_st = strides(out_shape)
    in_st = strides(in_shape)
    terms, d = [], 0
    while d < len(out_shape):
        if not full[d]:
            d += 1
            continue
        e = d
        while e + 1 < len(out_shape) and full[e + 1]:
            e += 1
        span = math.prod(out_shape[d:e + 1])
        coord = f"({i} / {out_st[e]})" if out_st[e] != 1 else i
        if d > 0:
            coord = f"({coord} % {span})"
        stride = in_st[e - lead]
        terms.append(coord if stride == 1 else f"{coord} * {stride}")
        d = e + 1
    return " + ".join(terms) or "0"


def offset(coord_exprs, strides_) -> str:
    terms = [f"{c} * {s}" if s != 1 else c for c, s in zip(coord_exprs, strides_) if c != "0"]
    return " + ".join(terms) or "0"


class Arg:
    """An Op operand as a parameter of its device function: a pointer (buffer) or a scalar (uniform/Lit)."""

    def __init__(self, value, name: str, dialect, output=False, read_only=(), remap=None, flag=False,
                 preloaded=False, on_chip=False):
        self.value, self.name, self.output = value, name, output
        # A published buffer (a flag sync's, gdsl/schedule/flags.py): stores also write its flag words, loads
        # wait for them (the function's parameters `<name>_f`, its words, and `<name>_tag`).
        self.flag = flag
        # An input the calling thread loaded one wave early (gdsl/schedule/preload.py): its element is the
        # parameter `<name>_p`, the thread's own element of the uTask (one a thread).
        self.preloaded = preloaded
        self.remap = remap      # (shape, source shape, perm): read a transposed view through the source
        self.on_chip = on_chip  # a block-local temp: in the vEU's shared memory (local.py)
        self.aval = value.aval
        self.dtype = value.aval.dtype
        self.scalar = value.is_uniform
        buf = value.buffer
        self.read_only = buf is not None and (buf.kind in ("input", "const") or buf in read_only)
        self.dialect = dialect

    def decl(self) -> str:
        if self.scalar:
            return f"{c_types.compute(self.dtype)} {self.name}"
        const = "" if self.output else "const "
        return f"{const}{c_types.storage(self.dtype)}* {self.name}"

    def at(self, idx: str, first: str | None = None) -> str:
        """Element `idx` in the compute type (of a published buffer: `first`, where given, names its word's
        first load, flag_first's, which the read then only finishes)."""
        if self.scalar:
            return self.name
        if self.preloaded:
            return f"{self.name}_p"
        idx = self._source_index(idx)
        ref = f"{self.name}[{idx}]"
        if self.read_only:
            ref = self.dialect.ldg(self.dtype, f"{self.name} + {idx}" if idx != "0" else self.name)
        if self.flag:         # tag 0: the first iteration reads what was written before the loop
            word, tag = f"{self.name}_f + ({idx})", f"{self.name}_tag"
            value = f"gdsl_flag_get({word}, {tag})" if first is None else f"gdsl_flag_finish({word}, {first}, {tag})"
            ref = f"({tag} ? GDSL_U2F({value}) : {ref})"
        return c_types.from_storage(self.dtype, ref)

    def flag_first(self, idx: str) -> str:
        """The first load of element `idx`'s flag word (a published buffer's), for at(idx, first=...)."""
        return f"({self.name}_tag ? gdsl_flag_load({self.name}_f + ({self._source_index(idx)})) : 0ull)"

    def _source_index(self, idx: str) -> str:
        """Element `idx`'s index in the buffer (through a transposed view: in its source)."""
        if self.remap is None:
            return idx
        shape, src_shape, perm = self.remap
        src_st = strides(src_shape)
        return f"({offset(coords(shape, f'({idx})'), [src_st[p] for p in perm])})"

    def flag_decls(self) -> list[str]:
        const = "" if self.output else "const "
        return [f"{const}unsigned long long* {self.name}_f", f"unsigned {self.name}_tag"] if self.flag else []

    def preload_decls(self) -> list[str]:
        return [f"{c_types.compute(self.dtype)} {self.name}_p"] if self.preloaded else []

    def address(self, idx: str, source: bool = False) -> str:
        """The address of element `idx` of a buffer operand (through a transposed view: in its source, where
        `idx` already is with `source`, as for at_source)."""
        return f"({self.name} + {idx if source else self._source_index(idx)})"

    def at_source(self, idx: str) -> str:
        """Element `idx` of the source a remapped (transposed) view reads, in the compute type."""
        ref = f"{self.name}[{idx}]"
        if self.read_only:
            ref = self.dialect.ldg(self.dtype, f"{self.name} + {idx}" if idx != "0" else self.name)
        return c_types.from_storage(self.dtype, ref)

    def store(self, idx: str, expr: str) -> str:
        if self.flag:         # the value and, in one 8-byte store, the value with its tag
            return (f"{{ const int f_ = {idx}; const float v_ = {c_types.to_storage(self.dtype, expr)}; "
                    f"{self.name}[f_] = v_; gdsl_flag_put({self.name}_f + f_, GDSL_F2U(v_), {self.name}_tag); }}")
        return f"{self.name}[{idx}] = {c_types.to_storage(self.dtype, expr)};"


class OpRenderer:
    """Renders the device function of one Op; its kind's lowering rule writes the body."""

    def __init__(self, op, dialect, block: int, read_only=(), remap=None, flags=None, preload=(), next_window=False,
                 on_chip=()):
        self.op, self.dialect, self.block = op, dialect, block      # block: threads per vEU
        # The uTask prefetches the next window of its left operand (views.prefetches_next_window): the parameter
        # `i0_next` points at it.
        self.next_window = next_window
        remap = remap or {}
        flags = flags or {}       # {"publish": outputs, "wait": inputs} of a flag sync (Renderer.flag_roles)
        # (on_chip: the block-local temps, kept in each vEU's shared memory)
        self.ins = [Arg(v, f"i{k}", dialect, read_only=read_only, remap=remap.get(k), flag=k in flags.get("wait", ()),
                        preloaded=k in preload, on_chip=v.buffer is not None and v.buffer in on_chip)
                    for k, v in enumerate(op.inputs)]
        self.outs = [Arg(v, f"o{k}", dialect, output=True, flag=k in flags.get("publish", ()))
                     for k, v in enumerate(op.outputs)]
        self.smem = 0
        # Set by a lowering rule whose body ends with a block barrier after its last store (a GEMV tile whose k
        # slices reduce through shared memory): the plan's block barrier right after may be left out.
        self.ends_with_block_barrier = False

    def render(self) -> tuple[str, str]:
        """(parameter list, body) of the uTask function; ops with the same pair share one function."""
        body = self.utask_rule()(self)
        flags = [d for a in self.outs + self.ins for d in a.flag_decls()]
        preloaded = [d for a in self.ins for d in a.preload_decls()]
        nxt = [f"const {c_types.storage(self.ins[0].dtype)}* i0_next"] if self.next_window else []
        params = ", ".join([a.decl() for a in self.outs + self.ins] + flags + preloaded + nxt + ["int t", "char* smem"])
        return params, body

    def utask_rule(self):
        if self.op.kind in self.dialect.elementwise:     # table-driven: one C expression per element
            return expression_body
        return lowering_rule(self.op.kind, self.dialect.lowering_chain, "utask")

    def per_element(self, element: list[str], before=(), size: int | None = None) -> str:
        """The body of an elementwise-like uTask: `element` (C lines writing flat output element i) for each
        i in [t*chunk, min((t+1)*chunk, size)), the block's threads striding through; `before` (C lines)
        runs once first. `size` defaults to the output's."""
        size = self.outs[0].aval.size if size is None else size
        chunk = self.op.params.get("chunk", size)
        if ROW_BLOCK in self.op.params:
            return self._per_block_element(element, before, size)
        lines = [f"  const int lo = t * {chunk};",
                 f"  const int hi = lo + {chunk} < {size} ? lo + {chunk} : {size};"]
        lines += ["  " + line for line in before]
        lines.append(f"  for (int i = lo + (int){self.dialect.thread_index}; i < hi; i += {self.block}) {{")
        lines += ["    " + line for line in element]
        lines.append("  }")
        return "\n".join(lines) + "\n"

    def _per_block_element(self, element: list[str], before, size: int) -> str:
        """per_element over a 2-D chunk (plan.ROW_BLOCK): uTask t's block of R rows by its column range of
        the output as [rows, n] (n the first output's last axis), the block's threads striding through its
        elements, flat element i = row * n + column."""
        n = self.outs[0].aval.shape[-1] if self.outs[0].aval.ndim else 1
        rows, block, chunk = size // max(n, 1), self.op.params[ROW_BLOCK], self.op.params["chunk"]
        lines = [f"  const int r0 = t / {-(-n // chunk)} * {block}, j0 = t % {-(-n // chunk)} * {chunk};",
                 f"  const int w = j0 + {chunk} < {n} ? {chunk} : {n} - j0;",
                 f"  const int h = r0 + {block} < {rows} ? {block} : {rows} - r0;"]
        lines += ["  " + line for line in before]
        lines.append(f"  for (int e = (int){self.dialect.thread_index}; e < h * w; e += {self.block}) {{")
        lines.append(f"    const int i = (r0 + e / w) * {n} + j0 + e % w;")
        lines += ["    " + line for line in element]
        lines.append("  }")
        return "\n".join(lines) + "\n"

    def expr(self, node, i, root=False, result=None, shape=None, step=None, leaf=None) -> str:
        """The C expression of Expr `node` at flat output index `i` (`root`: stored as is, not rounded;
        `result`: the C expression an epilogue's RESULT leaves stand for; `shape`: the shape `i` indexes
        and the inputs broadcast to, the first output's by default; `step(node)`: the C expression of a
        ROWS op's STEP leaf; `leaf(arg, index)`: what stands for an input leaf's element, given its Arg and
        the C index of the element, arg.at(index), its load, by default)."""
        out_shape = self.outs[0].aval.shape if shape is None else shape
        if node.op == RESULT:
            return result
        if node.op == STEP:
            return step(node)
        if node.op == "input":
            arg = self.ins[node.params["index"]]
            index = broadcast_index(out_shape, arg.aval.shape, i)
            return arg.at(index) if leaf is None else leaf(arg, index)
        if node.op == "literal":
            return c_types.literal(node.params["value"], node.aval.dtype)
        if node.op == broadcast_p.name:
            return self.expr(node.args[0], i, result=result, shape=shape, step=step, leaf=leaf)
        if node.op == iota_p.name:
            iota_shape, dim = node.aval.shape, node.params["dimension"]
            lead = len(out_shape) - len(iota_shape)
            if iota_shape[dim] == 1:
                return c_types.literal(0, node.aval.dtype)
            c = coords(out_shape, i)[dim + lead]
            return c_types.convert(c, dtypes.int32, node.aval.dtype)
        args = [self.expr(a, i, result=result, shape=shape, step=step, leaf=leaf) for a in node.args]
        if node.op == convert_p.name:
            return c_types.convert(args[0], node.args[0].aval.dtype, node.aval.dtype)
        operand = node.args[-1].aval.dtype
        text = c_expression(self.dialect.elementwise, node.op, c_types.klass(operand), c_types.compute(operand), args)
        return text if root else c_types.rounded(node.aval.dtype, text)

    def window_starts(self, shape, sizes, idx_args, prefix) -> list[str]:
        """Declarations of the window starts clamped into the array (JAX's rule)."""
        lines = []
        for d, (n, z, a) in enumerate(zip(shape, sizes, idx_args)):
            lines.append(f"long long {prefix}{d} = (long long)({a.at('0')});")
            lines.append(f"{prefix}{d} = {prefix}{d} < 0 ? 0 : ({prefix}{d} > {n - z} ? {n - z} : {prefix}{d});")
        return lines


# ---------------------------------------------------------------------------------- elementwise family rules
@register_lowering((FUSED, COPY, ROWS, convert_p, broadcast_p, iota_p), backend="cfamily", role="row_block")
def takes_row_blocks(ops: OpRenderer) -> bool:
    """The "row_block" rule: these kinds' uTask bodies (per_element; a ROWS op's when split in chunks, a cell
    chain's: reductions._cell_chunk) take 2-D chunks (plan.ROW_BLOCK). The scheduler only asks that it exists."""
    return True


@register_lowering((FUSED, convert_p, broadcast_p, iota_p), backend="cfamily")
def expression_body(ops: OpRenderer) -> str:
    """A fused chain, or one unfused elementwise-like primitive as a one-node expression."""
    expr = ops.op.expr
    if expr is None:
        leaves = tuple(Expr("input", (), {"index": k}, a.aval) for k, a in enumerate(ops.ins))
        expr = Expr(ops.op.kind, leaves, ops.op.params, ops.outs[0].aval)
    return ops.per_element([ops.outs[0].store("i", ops.expr(expr, "i", root=True))])


@register_lowering(convert_p, backend="cfamily", role="uniform")
def uniform_convert(renderer, u, out: str) -> list[str]:
    x = u.inputs[0]
    return [f"{out} = {c_types.convert(renderer.elem(x), x.aval.dtype, u.output.aval.dtype)};"]
