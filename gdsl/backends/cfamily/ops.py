"""One `__device__` function per Op: uTask `t` of the Op, computed by all threads of the calling block.

Each function computes exactly the share written in gdsl/schedule/utasks.py:

    elementwise-like kinds   output elements [t*chunk, min((t+1)*chunk, size))
    matmul / conv2d          output tile unravel(t, (batch, ceil(M/tile_m), ceil(N/tile_n)))
    reductions, argmax/min   output elements [t*rows, (t+1)*rows), each a whole reduction
    dynamic_update_slice     in place: update elements [t*chunk, ...)

Shapes are compile-time constants (one function per Op). Functions that use shared memory end with a
block barrier, so the next uTask or Op on the same vEU may reuse it.
"""
from __future__ import annotations

import math

from gdsl import dtypes
from gdsl.backends.cfamily import types as ct
from gdsl.backends.cfamily.elementwise import c_expression
from gdsl.schedule.plan import Expr

GEMM_BK = 32        # k depth of a shared-memory GEMM stage
GEMV_KC = 256       # k chunk of A rows staged in shared memory by the GEMV tile


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

    def __init__(self, value, name: str, dialect, output=False, read_only=(), remap=None):
        self.value, self.name, self.output = value, name, output
        self.remap = remap      # (shape, source shape, perm): read a transposed view through the source
        self.aval = value.aval
        self.dtype = value.aval.dtype
        self.scalar = value.is_uniform
        buf = value.buffer
        self.read_only = buf is not None and (buf.kind in ("input", "const") or buf in read_only)
        self.dialect = dialect

    def decl(self) -> str:
        if self.scalar:
            return f"{ct.compute(self.dtype)} {self.name}"
        const = "" if self.output else "const "
        return f"{const}{ct.storage(self.dtype)}* {self.name}"

    def at(self, idx: str) -> str:
        """Element `idx` in the compute type."""
        if self.scalar:
            return self.name
        if self.remap is not None:
            shape, src_shape, perm = self.remap
            src_st = strides(src_shape)
            idx = f"({offset(coords(shape, f'({idx})'), [src_st[p] for p in perm])})"
        ref = f"{self.name}[{idx}]"
        if self.read_only:
            ref = self.dialect.ldg(self.dtype, f"{self.name} + {idx}" if idx != "0" else self.name)
        return ct.from_storage(self.dtype, ref)

    def store(self, idx: str, expr: str) -> str:
        return f"{self.name}[{idx}] = {ct.to_storage(self.dtype, expr)};"


class OpRenderer:
    """Renders the device function of one Op."""

    def __init__(self, op, dialect, block: int, read_only=(), remap=None):
        self.op, self.dialect, self.nt = op, dialect, block
        remap = remap or {}
        self.ins = [Arg(v, f"i{k}", dialect, read_only=read_only, remap=remap.get(k)) for k, v in enumerate(op.inputs)]
        self.outs = [Arg(v, f"o{k}", dialect, output=True) for k, v in enumerate(op.outputs)]
        self.smem = 0

    def render(self) -> tuple[str, str]:
        """(parameter list, body) of the uTask function; ops with the same pair share one function."""
        kind = self.op.kind
        if kind in ("matmul", "conv2d"):
            body = self.gemm()
        elif kind in ("reduce_sum", "reduce_max", "reduce_min", "argmax", "argmin"):
            body = self.reduce()
        else:
            body = self.elementwise_like()
        params = ", ".join([a.decl() for a in self.outs + self.ins] + ["int t", "char* smem"])
        return params, body

    # ------------------------------------------------------------------------------------ elementwise-like
    def elementwise_like(self) -> str:
        op, out = self.op, self.outs[0]
        kind = op.kind
        size = out.aval.size
        self.pre = []
        if kind == "dynamic_update_slice":
            pre, element, size = self.dynamic_update_slice()
        else:
            element = getattr(self, f"el_{kind}", None)
            if element is None:
                element = self.el_expr
            element = element("i")
            pre = self.pre
        chunk = op.params.get("chunk", size)
        lines = [f"  const int lo = t * {chunk};",
                 f"  const int hi = lo + {chunk} < {size} ? lo + {chunk} : {size};"]
        lines += ["  " + p for p in pre]
        lines.append(f"  for (int i = lo + (int){self.dialect.thread_index}; i < hi; i += {self.nt}) {{")
        lines += ["    " + e for e in element]
        lines.append("  }")
        return "\n".join(lines) + "\n"

    def el_copy(self, i):
        return [self.outs[0].store(i, self.ins[0].at(i))]

    def el_expr(self, i):
        expr = self.op.expr
        if expr is None:   # an elementwise primitive that was not fused: a one-node expression
            leaves = tuple(Expr("input", (), {"index": k}, a.aval) for k, a in enumerate(self.ins))
            expr = Expr(self.op.kind, leaves, self.op.params, self.outs[0].aval)
        return [self.outs[0].store(i, self.expr(expr, i, root=True))]

    def expr(self, node, i, root=False) -> str:
        out_shape = self.outs[0].aval.shape
        if node.op == "input":
            arg = self.ins[node.params["index"]]
            return arg.at(broadcast_index(out_shape, arg.aval.shape, i))
        if node.op == "literal":
            return ct.literal(node.params["value"], node.aval.dtype)
        if node.op == "broadcast_to":
            return self.expr(node.args[0], i)
        if node.op == "iota":
            shape, dim = node.aval.shape, node.params["dimension"]
            lead = len(out_shape) - len(shape)
            if shape[dim] == 1:
                return ct.literal(0, node.aval.dtype)
            c = coords(out_shape, i)[dim + lead]
            return ct.convert(c, dtypes.int32, node.aval.dtype)
        args = [self.expr(a, i) for a in node.args]
        if node.op == "convert_element_type":
            return ct.convert(args[0], node.args[0].aval.dtype, node.aval.dtype)
        operand = node.args[-1].aval.dtype
        text = c_expression(self.dialect.elementwise, node.op, ct.klass(operand), ct.compute(operand), args)
        return text if root else ct.rounded(node.aval.dtype, text)

    def el_transpose(self, i):
        x, out = self.ins[0], self.outs[0]
        perm = self.op.params["permutation"]
        in_st = strides(x.aval.shape)
        src = offset(coords(out.aval.shape, i), [in_st[p] for p in perm])
        return [out.store(i, x.at(src))]

    def el_slice(self, i):
        x, out = self.ins[0], self.outs[0]
        p = self.op.params
        cs = coords(out.aval.shape, i)
        terms = [f"({b} + {c} * {s})" if s != 1 else f"({b} + {c})" for b, c, s in zip(p["start"], cs, p["step"])]
        return [out.store(i, x.at(offset(terms, strides(x.aval.shape))))]

    def _starts(self, shape, sizes, idx_args, prefix) -> list[str]:
        """Declarations of the window starts clamped into the array (JAX's rule)."""
        lines = []
        for d, (n, z, a) in enumerate(zip(shape, sizes, idx_args)):
            lines.append(f"long long {prefix}{d} = (long long)({a.at('0')});")
            lines.append(f"{prefix}{d} = {prefix}{d} < 0 ? 0 : ({prefix}{d} > {n - z} ? {n - z} : {prefix}{d});")
        return lines

    def el_dynamic_slice(self, i):
        x, out = self.ins[0], self.outs[0]
        sizes = self.op.params["sizes"]
        self.pre = self._starts(x.aval.shape, sizes, self.ins[1:], "s")
        cs = coords(out.aval.shape, i)
        src = offset([f"(s{d} + {c})" for d, c in enumerate(cs)], strides(x.aval.shape))
        return [out.store(i, x.at(f"(int)({src})"))]

    def el_take(self, i):
        x, ind, out = self.ins[0], self.ins[1], self.outs[0]
        axis = self.op.params["axis"]
        d = x.aval.shape[axis]
        post = math.prod(x.aval.shape[axis + 1:])
        n_ind = ind.aval.size
        lines = [f"const int post = {i} % {post};" if post != 1 else "const int post = 0;",
                 f"const int j = ({i} / {post}) % {n_ind};",
                 f"const int pre = {i} / {post * n_ind};",
                 f"long long k = (long long)({ind.at('j')});",
                 f"k = k < 0 ? 0 : (k > {d - 1} ? {d - 1} : k);",
                 out.store(i, x.at(f"(int)((pre * {d} + k) * {post} + post)"))]
        return lines

    def el_concatenate(self, i):
        out, axis = self.outs[0], self.op.params["axis"]
        a_total = out.aval.shape[axis]
        post = math.prod(out.aval.shape[axis + 1:])
        lines = [f"const int post = {i} % {post};" if post != 1 else "const int post = 0;",
                 f"const int a = ({i} / {post}) % {a_total};",
                 f"const int pre = {i} / {post * a_total};"]
        start = 0
        for x in self.ins:
            n = x.aval.shape[axis]
            if n == 0:
                continue
            cond = f"if (a < {start + n}) " if start + n < a_total else ""
            lines.append(f"{'' if start == 0 else 'else '}{cond}"
                         f"{out.store(i, x.at(f'(pre * {n} + a - {start}) * {post} + post'))}")
            start += n
        return lines

    def _pool(self, i, init, combine, finish):
        x, out = self.ins[0], self.outs[0]
        p = self.op.params
        win, s, pad = p["window"], p["stride"], p["padding"]
        _, _, H, W = x.aval.shape
        _, _, HO, WO = out.aval.shape
        return [f"const int wo = {i} % {WO}, ho = ({i} / {WO}) % {HO}, nc = {i} / {WO * HO};",
                f"{ct.compute(out.dtype)} acc = {init};",
                f"for (int kh = 0; kh < {win}; ++kh) {{",
                f"  const int h = ho * {s} - {pad} + kh;",
                f"  if (h < 0 || h >= {H}) continue;",
                f"  for (int kw = 0; kw < {win}; ++kw) {{",
                f"    const int w = wo * {s} - {pad} + kw;",
                f"    if (w < 0 || w >= {W}) continue;",
                f"    const {ct.compute(out.dtype)} v = {x.at(f'(nc * {H} + h) * {W} + w')};",
                f"    acc = {combine};",
                "  }",
                "}",
                out.store(i, finish)]

    def el_max_pool2d(self, i):
        dt = self.outs[0].dtype
        comb = "gdsl_fmax(acc, v)" if dtypes.is_float(dt) else "(v > acc ? v : acc)"
        return self._pool(i, ct.lowest(dt), comb, "acc")

    def el_avg_pool2d(self, i):
        win = self.op.params["window"]
        return self._pool(i, "0.0f", "acc + v", f"acc / {win * win}.0f")

    def dynamic_update_slice(self):
        x, upd, out = self.ins[0], self.ins[1], self.outs[0]
        idx = self.ins[2:]
        shape, ushape = x.aval.shape, upd.aval.shape
        drop = self.op.params["mode"] == "drop"
        pre = []
        if drop:
            conds = [f"(long long)({a.at('0')}) < 0 || (long long)({a.at('0')}) > {n - u}"
                     for a, n, u in zip(idx, shape, ushape)]
            pre.append(f"const bool dropped = {' || '.join(conds) or 'false'};")
        pre += self._starts(shape, ushape, idx, "s")
        if self.op.params.get("in_place"):
            if drop:
                pre.append("if (dropped) return;")
            cs = coords(ushape, "i")
            dst = offset([f"(s{d} + {c})" for d, c in enumerate(cs)], strides(shape))
            return pre, [out.store(f"(int)({dst})", upd.at("i"))], upd.aval.size
        cs = coords(shape, "i")
        inside = " && ".join([f"{c} >= s{d} && {c} < s{d} + {u}" for d, (c, u) in enumerate(zip(cs, ushape))])
        inside = inside or "true"
        if drop:
            inside = f"!dropped && {inside}"
        src = offset([f"({c} - s{d})" for d, c in enumerate(cs)], strides(ushape))
        body = [f"if ({inside}) {out.store('i', upd.at(f'(int)({src})'))}",
                f"else {out.store('i', x.at('i'))}"]
        return pre, body, x.aval.size

    # ------------------------------------------------------------------------------------ reductions
    def reduce(self) -> str:
        op, x, out = self.op, self.ins[0], self.outs[0]
        kind = op.kind
        arg = kind in ("argmax", "argmin")
        axes = (op.params["axis"],) if arg else tuple(sorted(op.params["axes"]))
        n_out = out.aval.size
        length = max(1, x.aval.size) // max(n_out, 1) if x.aval.size else 0
        rows = op.params.get("rows", 1)
        xshape = x.aval.shape
        kept = [d for d in range(len(xshape)) if d not in axes]
        xst = strides(xshape)
        if axes == tuple(range(len(xshape) - len(axes), len(xshape))):
            base, inner = f"o * {length}" if length != 1 else "o", "r"
        else:
            base = offset(coords([xshape[d] for d in kept], "o"), [xst[d] for d in kept])
            inner = offset(coords([xshape[d] for d in axes], "r"), [xst[d] for d in axes])
        dt = x.dtype
        acc = ct.accumulator(dt) if kind != "reduce_sum" or dt != dtypes.bool_ else "int"
        load = f"({acc})({x.at(f'base + {inner}' if inner != '0' else 'base')})"
        if arg:
            return self.argreduce(kind, acc, dt, base, load, rows, length, n_out)
        floaty = dtypes.is_float(dt)
        ident, comb = {
            "reduce_sum": ("0", "a + b"),
            "reduce_max": (ct.lowest(dt) if dt != dtypes.bool_ else "0",
                           "gdsl_fmax(a, b)" if floaty else "(a > b ? a : b)"),
            "reduce_min": (ct.highest(dt) if dt != dtypes.bool_ else "1",
                           "gdsl_fmin(a, b)" if floaty else "(a < b ? a : b)"),
        }[kind]
        ident = f"({acc})({ident})"
        lines = [f"  auto comb = []({acc} a, {acc} b) -> {acc} {{ return {comb}; }};"]
        lines += self.reduction_loops(
            rows=rows, length=length, n_out=n_out, base=base, init=f"{acc} v = {ident};",
            step=f"v = comb(v, {load});", store=out.store("o", "v"),
            block_combine=f"v = gdsl_block_reduce<{self.nt}>(v, {ident}, comb, smem);",
            group_combine="v = gdsl_group_reduce<{g}>(v, comb);", smem=(self.nt // self.dialect.warp_size) * 8)
        return "\n".join(lines) + "\n"

    def argreduce(self, kind, acc, dt, base, load, rows, length, n_out) -> str:
        out = self.outs[0]
        cmp = ">" if kind == "argmax" else "<"
        if dtypes.is_float(dt):
            better = (f"bool vn = v != v, wn = w != w; if (vn || wn) return vn && (!wn || i < j); "
                      f"return v {cmp} w || (v == w && i < j);")
            ident = ct.lowest(dt) if kind == "argmax" else ct.highest(dt)
        else:
            better = f"return v {cmp} w || (v == w && i < j);"
            ident = (ct.lowest(dt) if kind == "argmax" else ct.highest(dt)) if dt != dtypes.bool_ else \
                ("0" if kind == "argmax" else "1")
        lines = [f"  auto better = []({acc} v, int i, {acc} w, int j) -> bool {{ {better} }};"]
        lines += self.reduction_loops(
            rows=rows, length=length, n_out=n_out, base=base, init=f"{acc} v = ({acc})({ident}); int k = 2147483647;",
            step=f"{acc} x = {load}; if (better(x, r, v, k)) {{ v = x; k = r; }}", store=out.store("o", "k"),
            block_combine=f"gdsl_block_argreduce<{self.nt}>(v, k, better, smem);",
            group_combine="gdsl_group_argreduce<{g}>(v, k, better);",
            smem=(self.nt // self.dialect.warp_size) * 16 + 16)
        return "\n".join(lines) + "\n"

    def reduction_loops(self, *, rows, length, n_out, base, init, step, store, block_combine, group_combine,
                        smem) -> list[str]:
        """The two layouts of a reduction uTask: one output row per uTask (the whole block reduces it, then
        `block_combine`), or `rows` rows per uTask (a group of up to a warp's lanes per row, then
        `group_combine`, formatted with the group size g). `init` starts an accumulator, `step` folds
        element r in, `store` writes output o."""
        thread = self.dialect.thread_index
        if rows == 1:
            self.smem = max(self.smem, smem)
            return ["  const int o = t;", f"  const int base = {base};", f"  {init}",
                    f"  for (int r = {thread}; r < {length}; r += {self.nt}) {{ {step} }}",
                    f"  {block_combine}", f"  if ({thread} == 0) {store}"]
        g = min(self.dialect.warp_size, 1 << max(0, (length - 1).bit_length()))
        return [f"  const int g = {thread} / {g}, lane = {thread} % {g};",
                f"  for (int b = 0; b < {rows}; b += {self.nt // g}) {{",
                f"    const int o = t * {rows} + b + g;",
                f"    const bool ok = b + g < {rows} && o < {n_out};",
                f"    {init}",
                "    if (ok) {",
                f"      const int base = {base};",
                f"      for (int r = lane; r < {length}; r += {g}) {{ {step} }}",
                "    }",
                f"    {group_combine.format(g=g)}",
                f"    if (ok && lane == 0) {store}",
                "  }"]

    # ------------------------------------------------------------------------------------ GEMM
    def gemm(self) -> str:
        op, out = self.op, self.outs[0]
        tm, tn = op.params["tile_m"], op.params["tile_n"]
        dt = out.dtype
        acc = ct.accumulator(dt)
        if op.kind == "matmul":
            a, b = self.ins
            M, K = a.aval.shape[-2], a.aval.shape[-1]
            N = b.aval.shape[-1]
            bshape = out.aval.shape[:-2]
            a_off = broadcast_index(bshape, a.aval.shape[:-2], "bt")
            b_off = broadcast_index(bshape, b.aval.shape[:-2], "bt")
            batch = math.prod(bshape)
            pre = [f"  const int a0 = ({a_off}) * {M * K}, b0 = ({b_off}) * {K * N}, c0 = bt * {M * N};"]
            la = f"return ({acc})({a.at(f'a0 + m * {K} + k')});"
            lb = f"return ({acc})({b.at(f'b0 + k * {N} + n')});"
            sc = out.store(f"c0 + m * {N} + n", "v")
            a_k, b_k = True, False
        else:
            x, w = self.ins
            _, C, H, W = x.aval.shape
            O, _, KH, KW = w.aval.shape
            _, _, HO, WO = out.aval.shape
            s, p = op.params["stride"], op.params["padding"]
            M, N, K, batch = out.aval.shape[0] * HO * WO, O, C * KH * KW, 1
            pre = []
            la = (f"const int n_ = m / {HO * WO}, r_ = m % {HO * WO}, c_ = k / {KH * KW}, q_ = k % {KH * KW}; "
                  f"const int h_ = (r_ / {WO}) * {s} - {p} + q_ / {KW}, w_ = (r_ % {WO}) * {s} - {p} + q_ % {KW}; "
                  f"return (h_ >= 0 && h_ < {H} && w_ >= 0 && w_ < {W}) ? "
                  f"({acc})({x.at(f'((n_ * {C} + c_) * {H} + h_) * {W} + w_')}) : ({acc})0;")
            lb = f"return ({acc})({w.at(f'n * {K} + k')});"
            sc = out.store(f"((m / {HO * WO}) * {O} + n) * {HO * WO} + m % {HO * WO}", "v")
            a_k, b_k = False, True
        tiles_m, tiles_n = -(-M // tm), -(-N // tn)
        # A tile covering a whole dimension of any size (a partitioned loop's) is computed as the next power
        # of two, its extra rows and columns masked: the tile routines split a power of two among threads.
        gemv = tm == M and M <= 8          # (any number of rows)
        tn = _pow2(tn) if tn >= N else tn
        tm = _pow2(tm) if tm >= M and not gemv else tm
        lines = [f"  const int bt = t / {tiles_m * tiles_n}, ti = (t / {tiles_n}) % {tiles_m}, "
                 f"tj = t % {tiles_n};" if batch > 1 else
                 f"  const int bt = 0, ti = t / {tiles_n}, tj = t % {tiles_n};"]
        lines += pre
        lines += [f"  auto la = [&](int m, int k) -> {acc} {{ {la} }};",
                  f"  auto lb = [&](int k, int n) -> {acc} {{ {lb} }};",
                  f"  auto sc = [&](int m, int n, {acc} v) {{ {sc} }};"]
        size = 8 if acc == "long long" else 4
        if gemv:
            ctn = min(tn, self.nt)
            lanes = self.dialect.warp_size // ctn if ctn < self.dialect.warp_size else 1
            slots = (self.nt // ctn) // lanes
            self.smem = max(self.smem, (M * GEMV_KC + (slots * M * tn if slots > 1 else 0)) * size)
            lines.append(f"  gdsl_gemv_tile<{M}, {tn}, {self.nt}, {GEMV_KC}, {acc}>({N}, {K}, tj * {tn}, "
                         f"la, lb, sc, smem);")
        else:
            rm, rn = micro_tile(tm, tn, self.nt)
            self.smem = max(self.smem, GEMM_BK * (tm + 1 + tn + 1) * size)
            lines.append(f"  gdsl_gemm_tile<{tm}, {tn}, {GEMM_BK}, {self.nt}, {rm}, {rn}, {str(a_k).lower()}, "
                         f"{str(b_k).lower()}, {acc}>({M}, {N}, {K}, ti * {tm}, tj * {tn}, la, lb, sc, smem);")
        return "\n".join(lines) + "\n"


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def micro_tile(tm: int, tn: int, nt: int) -> tuple[int, int]:
    """The register tile (RM, RN) of each computing thread: as many computing threads as fit in the block
    ((tm/RM) * (tn/RN) <= nt), then the squarest tile."""
    best = None
    for rm in (d for d in range(1, tm + 1) if tm % d == 0):
        for rn in (d for d in range(1, tn + 1) if tn % d == 0):
            threads = (tm // rm) * (tn // rn)
            if threads > nt:
                continue
            key = (threads, -abs(rm - rn), -rm)
            if best is None or key > best[0]:
                best = (key, (rm, rn))
    return best[1]

