"""The "utask" rule of a GEMV, a row chain and a GEMV computed as one (plan.GEMV_ROWS_GEMV, gdsl/schedule/gemv_rows.py).

uTask t is batch element t: op1's output row S = A1 · B1 (its epilogue applied), the chain's steps on S, and
op3's row P · B2, P the chain's output:

    B2's values         each thread's share of the second GEMV's B, loaded first: their latency passes while
                        the first GEMV runs (on the H200 the order of the two GEMVs' loads made no difference:
                        70.14 us with these first, 70.00 with them after the first GEMV's, session 30)
    the first GEMV      op1's own GEMV tile (gemm.py), its store into S in shared memory, its A read where it
                        is (A_IN_PLACE: no staging behind a barrier); a block barrier
    the row chain       every warp runs the whole chain on S itself (reductions.py's row steps, lane l holding
                        elements l + j * warp), so no block barrier follows: the warps agree without one
    the second GEMV     thread (c, s) of the block: column c of P · B2 over its slice s of the row, P's
                        elements taken from the lanes that hold them (GDSL_SHFL); the slices' partial sums
                        meet in shared memory behind a block barrier; op3's store (its epilogue, its window)

Each part's operands are the op's parameters (the same Args), its intermediate results only on chip.
"""
from __future__ import annotations

from gdsl.backends.cfamily import types as c_types
from gdsl.backends.cfamily.gemm import gemm_tiles, matmul_gemm
from gdsl.backends.cfamily.ops import Arg, OpRenderer
from gdsl.backends.cfamily.reductions import row_steps
from gdsl.primitives.registry import register_lowering
from gdsl.schedule.plan import CHAIN_INPUTS, CHAIN_PARTS, GEMV_ROWS_GEMV, ROW_SHAPE, STEP_OUTPUTS, STEPS

# The first GEMV reads its A (one row) where it is, each thread its own elements, instead of the block staging it
# in shared memory behind a barrier (gdsl_gemv_tile's a_in_place). On the H200 (session 30, benchmarks/kernel_ab.py,
# ncu kernel time): Attention bs1 72.26 -> 70.00 us, bs64 371.66 -> 365.34.
A_IN_PLACE = True


class SharedRow(Arg):
    """An intermediate result of the op, in shared memory: the uTask's row (one batch element's) at `buffer`."""

    def __init__(self, value, buffer: str, dialect):
        super().__init__(value, buffer, dialect, output=True)
        self.length = value.aval.shape[-1]

    def _row(self, idx: str) -> str:
        return f"{self.name}[({idx}) - t * {self.length}]"

    def at(self, idx: str, first=None) -> str:
        return self._row(idx)

    def store(self, idx: str, expr: str) -> str:
        return f"{self._row(idx)} = {expr};"


def _part(ops: OpRenderer, number: int, intermediates: dict) -> OpRenderer:
    """A renderer of part `number` whose inputs are the op's own Args (an intermediate's: its SharedRow, from
    `intermediates`, storage -> SharedRow)."""
    part = ops.op.params[CHAIN_PARTS][number]
    sub = OpRenderer(part, ops.dialect, ops.block)
    for k, (owner, j) in enumerate(ops.op.params[CHAIN_INPUTS]):
        if owner == number:
            sub.ins[j] = ops.ins[k]
    for j, value in enumerate(part.inputs):
        if value.storage in intermediates:
            sub.ins[j] = intermediates[value.storage]
    sub.outs = [intermediates[v.storage] for v in part.outputs] if part.outputs[0].storage in intermediates \
        else ops.outs
    return sub


@register_lowering(GEMV_ROWS_GEMV, backend="cfamily")
def gemv_rows_gemv(ops: OpRenderer) -> str:
    op1, op2, op3 = ops.op.params[CHAIN_PARTS]
    dialect, block, warp = ops.dialect, ops.block, ops.dialect.warp_size
    length, width = op1.outputs[0].aval.shape[-1], op3.outputs[0].aval.shape[-1]
    columns = 1 << max(0, (width - 1).bit_length())        # column threads: the next power of two >= width
    slices = block // columns
    per = -(-length // slices)                             # the row's elements a slice takes
    slots = -(-length // warp)                             # the chain's elements a lane holds
    row = SharedRow(op1.outputs[0], "S_", dialect)
    scratch = 16 * -(-(length + slices * columns) * 4 // 16)  # (the first GEMV's own shared memory, after S_ and red_)
    first, chain, second = (_part(ops, n, {op1.outputs[0].storage: row}) for n in range(3))
    gemm1, gemm2 = matmul_gemm(first), matmul_gemm(second)
    acc = c_types.accumulator(op3.outputs[0].aval.dtype)
    # (not a published A: a flag wait per element and thread)
    tile = gemm_tiles(first, gemm1, scratch=f"smem + {scratch}", a_in_place=A_IN_PLACE and gemm1.a_plain)
    ops.smem = max(ops.smem, scratch + first.smem)
    steps, shape = op2.params[STEPS], tuple(op2.params[ROW_SHAPE])
    last = op2.params[STEP_OUTPUTS][0]
    # P's element k of this thread's slice: on lane k % warp, in its register slot k / warp (uniform across a
    # warp when a warp's threads share a slice: then one shuffle of the picked slot; else one per slot)
    k = f"(s_ * {per} + r_)"
    if columns >= warp:
        pick = " ".join(f"if ({k} / {warp} == {j}) p_ = s{last}[{j}];" for j in range(1, slots))
        element = f"float p_ = s{last}[0]; {pick} p_ = GDSL_SHFL(p_, {k} % {warp}, {warp});"
    else:
        shuffled = " ".join(f"{{ const float q_ = GDSL_SHFL(s{last}[{j}], {k} % {warp}, {warp}); "
                            f"if ({k} / {warp} == {j}) p_ = q_; }}" for j in range(slots))
        element = f"float p_ = 0.f; {shuffled}"
    lines = [
        "  const int bt = t, ti = 0, tj = 0; (void)ti; (void)tj;",
        f"  float* S_ = (float*)smem; float* red_ = S_ + {length};",
        f"  const int c_ = (int){dialect.thread_index} % {columns}, s_ = (int){dialect.thread_index} / {columns};",
        *gemm2.setup,
        f"  auto lb2_ = [&](int k, int n) -> {acc} {{ {gemm2.load_b} }};",
        f"  auto sc2_ = [&](int m, int n, {acc} v) {{ {gemm2.store} }};",
        f"  {acc} b2_[{per}];",
        f"  for (int r_ = 0; r_ < {per}; ++r_) b2_[r_] = {k} < {length} && c_ < {width} ? lb2_({k}, c_) : ({acc})0;",
        "  {     // the first GEMV, its row into S_",
        *("  " + line for line in tile.rstrip("\n").split("\n")),
        "  }",
    ]
    if not first.ends_with_block_barrier:
        lines.append(f"  {dialect.block_barrier}")
    lines += [f"  const int lane = (int){dialect.thread_index} % {warp}, o = t; const bool ok = true;",
              *("  " + line for line in row_steps(chain, steps, shape, slots, warp, True)),
              f"  {acc} a_ = ({acc})0;",
              f"  for (int r_ = 0; r_ < {per}; ++r_) {{ {element} if ({k} < {length}) a_ += ({acc})p_ * b2_[r_]; }}",
              f"  red_[s_ * {columns} + c_] = a_;",
              f"  {dialect.block_barrier}",
              f"  if (s_ == 0 && c_ < {width}) {{",
              f"    {acc} v_ = red_[c_];",
              f"    for (int s = 1; s < {slices}; ++s) v_ += red_[s * {columns} + c_];",
              "    sc2_(0, c_, v_);",
              "  }",
              f"  {dialect.block_barrier}   // (the next uTask on this vEU reuses the shared memory)"]
    ops.ends_with_block_barrier = True
    return "\n".join(lines) + "\n"
