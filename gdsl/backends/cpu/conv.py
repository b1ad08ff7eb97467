"""The conv2d kind: implicit GEMM over NCHW input and OIHW weights.

uTask t computes output tile (ti, tj): output positions (n, ho, wo) ti*tile_m.. x output channels
tj*tile_n... A float32 tile of whole micro-kernel blocks inside one image multiplies the weights by an
im2col panel of the tile's input patches with the GEMM micro-kernel (gemm.micro_kernel); any other tile
gathers each position's patch and dots it with every channel's weights. Split over its depth (plan.K_SPLITS:
the partial products P, uTask t is tile t % tiles of slice s = t // tiles), a tile dots each patch over its
slice's range of k only (plan.k_range) and stores into P[s], position by position.
"""
from __future__ import annotations

from gdsl import dtypes
from gdsl.backends.cpu.epilogue import with_epilogue
from gdsl.backends.cpu.gemm import micro_kernel, micro_shape
from gdsl.backends.cpu.ir import affine, convert, load_element, strides, unravel
from gdsl.primitives.registry import register_lowering
from gdsl.schedule import utasks
from gdsl.schedule.plan import K_SPLITS, k_chunk

# The im2col panel of a conv2d tile built at once: CONV_K_CHUNK rows of its positions, fewer for a tile of more
# than 64 positions (utasks.GEMM_TALL_TILES), so that the panel (on the worker's stack) stays within 64 KiB.
CONV_K_CHUNK = 256
CONV_PANEL_FLOATS = CONV_K_CHUNK * 64


@register_lowering("conv2d", backend="cpu")
def conv2d_utask(fn, ops, op, t):
    """Implicit GEMM, tile (ti, tj): output positions (n, ho, wo) i0..i1-1 x output channels j0..j1-1.
    A float32 tile of whole micro-kernel blocks inside one image is computed transposed, channels x
    positions = w[O, K] . im2col[K, positions] (_conv_tile_gemm); other tiles gather each position's
    input patch once (zeros in the padding) and dot it with every channel's weights."""
    x, w = ops.aval(0), ops.aval(1)
    out = op.outputs[0].aval
    _, m, n, k = utasks.gemm_dims(op.kind, [x, w], out, op.params)
    tm, tn = op.params["tile_m"], op.params["tile_n"]
    if m * n == 0:
        return
    nn = -(-n // tn)
    split = None
    if op.params.get(K_SPLITS, 1) > 1:          # (slice s's range of k, its P[s] at s times the output's size)
        tiles = -(-m // tm) * nn
        s = fn.op(f"udiv i64 {t}, {tiles}")
        t = fn.op(f"urem i64 {t}, {tiles}")
        kc = k_chunk(k, op.params[K_SPLITS])
        k0 = affine(fn, 0, [(s, kc)])
        split = (k0, fn.imin(fn.op(f"add nsw i64 {k0}, {kc}"), k), affine(fn, 0, [(s, m * n)]))
    ti = fn.op(f"udiv i64 {t}, {nn}")
    tj = fn.op(f"urem i64 {t}, {nn}")
    i0 = fn.op(f"mul nsw i64 {ti}, {tm}")
    i1 = fn.imin(fn.op(f"add nsw i64 {i0}, {tm}"), m)
    j0 = fn.op(f"mul nsw i64 {tj}, {tn}")
    j1 = fn.imin(fn.op(f"add nsw i64 {j0}, {tn}"), n)
    positions = out.shape[-2] * out.shape[-1]

    def flat_of(r, c):            # output element (image, channel j0 + c, position) of GEMM row i0 + r
        row = fn.op(f"add nsw i64 {i0}, {r}")
        image, at = fn.op(f"udiv i64 {row}, {positions}"), fn.op(f"urem i64 {row}, {positions}")
        return affine(fn, at, [(image, n * positions), (j0, positions), (c, positions)])
    with_epilogue(fn, ops, op, fn.op(f"sub nsw i64 {i1}, {i0}"), fn.op(f"sub nsw i64 {j1}, {j0}"), tm, tn, flat_of,
                  lambda: _conv_positions(fn, ops, op, i0, i1, j0, j1, split) if split else
                  _conv_tile(fn, ops, op, i0, i1, j0, j1))


def _conv_tile(fn, ops, op, i0, i1, j0, j1):
    """The contraction of tile (i0..i1-1 positions, j0..j1-1 channels): see conv2d_utask."""
    x, w = ops.aval(0), ops.aval(1)
    out = op.outputs[0].aval
    tm = op.params["tile_m"]
    mr, mc, _ = micro_shape()
    positions = out.shape[2] * out.shape[3]
    if not (x.dtype == w.dtype == out.dtype == dtypes.float32 and tm % mc == 0
            and ops.is_pointer(0) and ops.is_pointer(1)):
        _conv_positions(fn, ops, op, i0, i1, j0, j1)
        return
    # tm positions inside one image (i0 % positions + tm <= positions), whole micro blocks of channels
    last = fn.op(f"add nsw i64 {fn.op(f'urem i64 {i0}, {positions}')}, {tm}")
    inside = fn.op(f"icmp sle i64 {last}, {positions}")
    channels = fn.op(f"sub nsw i64 {j1}, {j0}")
    blocks = fn.op(f"icmp eq i64 {fn.op(f'urem i64 {channels}, {mr}')}, 0")
    fn.if_(fn.op(f"and i1 {inside}, {blocks}"), lambda: _conv_tile_gemm(fn, ops, op, i0, j0, channels),
           lambda: _conv_positions(fn, ops, op, i0, i1, j0, j1))


def _conv_tile_gemm(fn, ops, op, i0, j0, channels):
    x, w = ops.aval(0), ops.aval(1)
    out = op.outputs[0].aval
    _, c, h, wd = x.shape
    _, _, kh, kw = w.shape
    _, o, ho, wo = out.shape
    stride, pad = op.params["stride"], op.params["padding"]
    tm = op.params["tile_m"]
    k = c * kh * kw
    mr, mc, _ = micro_shape()
    chunk = min(k, CONV_K_CHUNK, max(1, CONV_PANEL_FLOATS // tm))
    panel = fn.alloca(f"[{chunk * tm} x float]", "im2col")
    image = fn.op(f"udiv i64 {i0}, {ho * wo}")
    first = fn.op(f"urem i64 {i0}, {ho * wo}")          # the tile's first position in its image
    xs = strides(x.shape)
    x_ptr, w_ptr, out_ptr = ops.input_pointer(0), ops.input_pointer(1), ops.output_pointer(0)

    corner = fn.alloca(f"[{2 * tm} x i64]", "corner")   # per position: its window's top-left (y, x)

    def place(p):
        y, xx = unravel(fn, fn.op(f"add nsw i64 {first}, {p}"), (ho, wo))
        fn.store("i64", affine(fn, -pad, [(y, stride)]), fn.gep("i64", corner, p))
        fn.store("i64", affine(fn, -pad, [(xx, stride)]), fn.gep("i64", corner, fn.op(f"add nsw i64 {p}, {tm}")))
    fn.loop(0, tm, place)

    def fill(k0, count):
        """panel[kk - k0, p] = x at position first + p for patch element kk (0 in the padding)."""
        def element(kk):
            ci, r, q = unravel(fn, fn.op(f"add nsw i64 {k0}, {kk}") if k0 else kk, (c, kh, kw))
            base = affine(fn, 0, [(image, xs[0]), (ci, xs[1])])

            def position(p):
                yy = affine(fn, fn.load("i64", fn.gep("i64", corner, p)), [(r, 1)])
                xq = affine(fn, fn.load("i64", fn.gep("i64", corner, fn.op(f"add nsw i64 {p}, {tm}"))), [(q, 1)])
                ok = fn.op(f"and i1 {fn.op(f'icmp ult i64 {yy}, {h}')}, {fn.op(f'icmp ult i64 {xq}, {wd}')}")
                v = load_element(fn, x.dtype, x_ptr, affine(fn, base, [(fn.clamp(yy, 0, h - 1), xs[2]),
                                                                       (fn.clamp(xq, 0, wd - 1), 1)]))
                fn.store("float", fn.op(f"select i1 {ok}, float {v}, float 0.0"),
                         fn.gep("float", panel, affine(fn, 0, [(kk, tm), (p, 1)])))
            fn.loop(0, tm, position)
        fn.loop(0, count, element)

    for k0 in range(0, k, chunk):
        count = min(chunk, k - k0)
        fill(k0, count)

        def block(r, k0=k0, count=count):
            w_rows = [affine(fn, k0, [(j0, k), (r, k), (rr, k)]) for rr in range(mr)]
            for cc in range(0, tm, mc):
                out_rows = [affine(fn, cc, [(image, o * ho * wo), (j0, ho * wo), (r, ho * wo), (rr, ho * wo),
                                            (first, 1)]) for rr in range(mr)]
                micro_kernel(fn, w_ptr, w_rows, panel, cc, tm, out_ptr, out_rows, count, accumulate=k0 > 0)
        fn.loop(0, channels, block, step=mr)


def _conv_positions(fn, ops, op, i0, i1, j0, j1, split=None):
    """Positions i0..i1-1 x channels j0..j1-1, position by position: gather the patch, dot per channel; with
    `split` (first k, end k, output offset: a slice of split-K's partial products) over that range of k only,
    stored at that offset."""
    x, w = ops.aval(0), ops.aval(1)
    out = op.outputs[0].aval
    nb, c, h, wd = x.shape
    _, _, kh, kw = w.shape
    out_shape = out.shape[-4:]
    _, _, ho, wo = out_shape
    stride, pad = op.params["stride"], op.params["padding"]
    k = c * kh * kw
    patch = fn.alloca(f"[{max(k, 1)} x float]", "patch")
    xs, os_ = strides(x.shape), strides(out_shape)
    k_first, k_end, out_at = split or (0, k, 0)

    def position(i):
        bn, y, xx = unravel(fn, i, (nb, ho, wo))
        y0 = affine(fn, -pad, [(y, stride)])
        x0 = affine(fn, -pad, [(xx, stride)])

        def channel(ci):
            def row(r):
                yy = fn.op(f"add nsw i64 {y0}, {r}")
                y_ok = fn.op(f"icmp ult i64 {yy}, {h}")
                base = affine(fn, 0, [(bn, xs[0]), (ci, xs[1]), (fn.clamp(yy, 0, h - 1), xs[2])])

                def col(q):
                    xq = fn.op(f"add nsw i64 {x0}, {q}")
                    ok = fn.op(f"and i1 {y_ok}, {fn.op(f'icmp ult i64 {xq}, {wd}')}")
                    v = convert(fn, ops.load(0, affine(fn, base, [(fn.clamp(xq, 0, wd - 1), 1)])), x.dtype,
                                dtypes.float32)
                    slot = affine(fn, 0, [(ci, kh * kw), (r, kw), (q, 1)])
                    fn.store("float", fn.op(f"select i1 {ok}, float {v}, float 0.0"), fn.gep("float", patch, slot))
                fn.loop(0, kw, col)
            fn.loop(0, kh, row)
        fn.loop(0, c, channel)

        def out_channel(j):
            acc = fn.alloca("float", "acc")
            fn.store("float", "0.0", acc)
            w_row = affine(fn, 0, [(j, k)])

            def dot(kk):
                pv = fn.load("float", fn.gep("float", patch, kk))
                wv = convert(fn, ops.load(1, affine(fn, w_row, [(kk, 1)])), w.dtype, dtypes.float32)
                prod = fn.op(f"fmul contract float {pv}, {wv}")
                fn.store("float", fn.op(f"fadd reassoc contract float {fn.load('float', acc)}, {prod}"), acc)
            fn.loop(k_first, k_end, dot)
            dst = affine(fn, out_at, [(bn, os_[0]), (j, os_[1]), (y, os_[2]), (xx, os_[3])])
            ops.store(0, dst, convert(fn, fn.load("float", acc), dtypes.float32, out.dtype))
        fn.loop(j0, j1, out_channel)
    fn.loop(i0, i1, position)
