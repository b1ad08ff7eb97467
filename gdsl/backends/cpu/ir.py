"""Writing LLVM IR text: one `Function` at a time, SSA names, loops, and gdsl dtypes as LLVM types.

Every gdsl dtype has a memory type (how an element is stored) and a compute type (what an expression
holds in a register):

    float32   float / float          int32  i32 / i32         bool  i8 / i1
    float16   half  / float          int64  i64 / i64
    bfloat16  i16   / float          (bfloat16 bits are converted by hand: shift in, round-to-nearest-even out)

float16 and bfloat16 compute in float32 and are rounded back after every operation (what numpy and
ml_dtypes do per ufunc), so a fused chain gives the interpreter's result.
"""
from __future__ import annotations

import struct

import numpy as np

from gdsl import dtypes

MEM_TYPE = {dtypes.float32: "float", dtypes.float16: "half", dtypes.bfloat16: "i16", dtypes.int32: "i32",
            dtypes.int64: "i64", dtypes.bool_: "i8"}
COMPUTE_TYPE = {dtypes.float32: "float", dtypes.float16: "float", dtypes.bfloat16: "float",
                dtypes.int32: "i32", dtypes.int64: "i64", dtypes.bool_: "i1"}


def mem_type(dtype) -> str:
    return MEM_TYPE[np.dtype(dtype)]


def compute_type(dtype) -> str:
    return COMPUTE_TYPE[np.dtype(dtype)]


def is_low_float(dtype) -> bool:
    return np.dtype(dtype) in (dtypes.float16, dtypes.bfloat16)


def float_literal(value) -> str:
    """An f32 value in LLVM's exact hex form (a double holding the float's value)."""
    return f"0x{struct.unpack('<Q', struct.pack('<d', float(np.float32(value))))[0]:016X}"


def const(dtype, value) -> str:
    """`value` as a constant of `dtype`'s compute type (rounded to dtype first)."""
    dtype = np.dtype(dtype)
    if dtypes.is_float(dtype):
        return float_literal(np.asarray(value).astype(dtype).astype(np.float32))
    if dtype == dtypes.bool_:
        return "true" if bool(value) else "false"
    return str(int(np.asarray(value).astype(dtype)))


UNROLL_OFF = '!0 = !{!"llvm.loop.unroll.disable"}'


class Function:
    """An LLVM function being written. `op()` returns the SSA name of a new instruction's result;
    allocas go to the entry block; `block` is the label of the block being written (for phis).
    `metadata`, when given, collects the function's loop metadata nodes (numbered from !1; !0 is
    UNROLL_OFF), which the module renumbers into its own (render.ModuleWriter._number_loops)."""

    def __init__(self, header: str, attrs: str = "", metadata: list | None = None):
        self.header = header
        self.metadata = metadata
        self.attrs = attrs
        self.allocas: list[str] = []
        self.lines: list[str] = []
        self.count = 0
        self.block = "entry"

    def name(self, prefix="v") -> str:
        self.count += 1
        return f"%{prefix}{self.count}"

    def op(self, text: str, prefix="v") -> str:
        result = self.name(prefix)
        self.lines.append(f"  {result} = {text}")
        return result

    def do(self, text: str) -> None:
        self.lines.append(f"  {text}")

    def label(self, prefix="L") -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def start(self, label: str) -> None:
        self.lines.append(f"{label}:")
        self.block = label

    def goto(self, label: str) -> None:
        self.do(f"br label %{label}")

    def alloca(self, ty: str, prefix="slot") -> str:
        result = self.name(prefix)
        self.allocas.append(f"  {result} = alloca {ty}, align 16")
        return result

    def text(self) -> str:
        return "\n".join([f"{self.header} {self.attrs}{{", "entry:", *self.allocas, *self.lines, "}", ""])

    # -------------------------------------------------------------------------------------- helpers
    def loop(self, lo, hi, body, ty="i64", step=1, unroll=False) -> None:
        """for i in range(lo, hi, step): body(i)   (lo, hi: SSA names or ints; step > 0).
        Loops are not unrolled (the vectoriser still interleaves) unless `unroll`: full unrolling of
        every small constant loop costs much compile time and buys little."""
        head, loop, done = self.label("for"), self.label("body"), self.label("end")
        before = self.block
        self.goto(head)
        self.start(head)
        i = self.name("i")
        phi_at = len(self.lines)
        self.lines.append(None)  # the phi, written once the latch block is known
        cond = self.op(f"icmp slt {ty} {i}, {hi}")
        self.do(f"br i1 {cond}, label %{loop}, label %{done}")
        self.start(loop)
        body(i)
        nxt = self.op(f"add nsw {ty} {i}, {step}")
        latch = self.block
        if unroll or self.metadata is None:
            self.goto(head)
        else:
            n = len(self.metadata) + 1
            self.metadata.append(f"!{n} = distinct !{{!{n}, !0}}")
            self.do(f"br label %{head}, !llvm.loop !{n}")
        self.lines[phi_at] = f"  {i} = phi {ty} [{lo}, %{before}], [{nxt}, %{latch}]"
        self.start(done)

    def if_(self, cond, then, otherwise=None) -> None:
        """if cond: then() else: otherwise()   (cond: an i1 SSA name)."""
        yes, no, done = self.label("then"), self.label("else"), self.label("fi")
        self.do(f"br i1 {cond}, label %{yes}, label %{no if otherwise else done}")
        self.start(yes)
        then()
        self.goto(done)
        if otherwise:
            self.start(no)
            otherwise()
            self.goto(done)
        self.start(done)

    def imin(self, a, b, ty="i64") -> str:
        return self.op(f"call {ty} @llvm.smin.{ty}({ty} {a}, {ty} {b})")

    def imax(self, a, b, ty="i64") -> str:
        return self.op(f"call {ty} @llvm.smax.{ty}({ty} {a}, {ty} {b})")

    def clamp(self, x, lo, hi, ty="i64") -> str:
        return self.imin(self.imax(x, lo, ty), hi, ty)

    def gep(self, ty, ptr, index) -> str:
        return self.op(f"getelementptr inbounds {ty}, ptr {ptr}, i64 {index}")

    def load(self, ty, ptr) -> str:
        return self.op(f"load {ty}, ptr {ptr}")

    def store(self, ty, value, ptr) -> None:
        self.do(f"store {ty} {value}, ptr {ptr}")

    def ext_index(self, value, ty) -> str:
        """An integer scalar (compute type `ty`) as i64."""
        if ty == "i64":
            return value
        if ty == "i1":
            return self.op(f"zext i1 {value} to i64")
        return self.op(f"sext {ty} {value} to i64")


# ------------------------------------------------------------------------------------------- conversions

def from_memory(fn: Function, dtype, value: str) -> str:
    """A loaded element (memory type) in its compute type."""
    dtype = np.dtype(dtype)
    if dtype == dtypes.float16:
        return fn.op(f"fpext half {value} to float")
    if dtype == dtypes.bfloat16:
        wide = fn.op(f"zext i16 {value} to i32")
        return fn.op(f"bitcast i32 {fn.op(f'shl i32 {wide}, 16')} to float")
    if dtype == dtypes.bool_:
        return fn.op(f"trunc i8 {value} to i1")
    return value


def to_memory(fn: Function, dtype, value: str) -> str:
    """A compute-type value as its memory type (round to nearest even for float16/bfloat16)."""
    dtype = np.dtype(dtype)
    if dtype == dtypes.float16:
        return fn.op(f"fptrunc float {value} to half")
    if dtype == dtypes.bfloat16:
        bits = fn.op(f"bitcast float {value} to i32")
        lsb = fn.op(f"and i32 {fn.op(f'lshr i32 {bits}, 16')}, 1")
        bias = fn.op(f"add i32 {lsb}, 32767")
        rounded = fn.op(f"lshr i32 {fn.op(f'add i32 {bits}, {bias}')}, 16")
        quiet = fn.op(f"or i32 {fn.op(f'lshr i32 {bits}, 16')}, 64")
        nan = fn.op(f"fcmp uno float {value}, 0.0")
        return fn.op(f"trunc i32 {fn.op(f'select i1 {nan}, i32 {quiet}, i32 {rounded}')} to i16")
    if dtype == dtypes.bool_:
        return fn.op(f"zext i1 {value} to i8")
    return value


def round_to(fn: Function, dtype, value: str) -> str:
    """A float32 value rounded to float16/bfloat16 precision (identity for other dtypes)."""
    if not is_low_float(dtype):
        return value
    return from_memory(fn, dtype, to_memory(fn, dtype, value))


def load_element(fn: Function, dtype, ptr: str, offset) -> str:
    ty = mem_type(dtype)
    return from_memory(fn, dtype, fn.load(ty, fn.gep(ty, ptr, offset)))


def store_element(fn: Function, dtype, ptr: str, offset, value: str) -> None:
    ty = mem_type(dtype)
    fn.store(ty, to_memory(fn, dtype, value), fn.gep(ty, ptr, offset))


def convert(fn: Function, value: str, src, dst) -> str:
    """convert_element_type between compute types: float->int truncates, x->bool is `x != 0`."""
    src, dst = np.dtype(src), np.dtype(dst)
    s, d = compute_type(src), compute_type(dst)
    if dst == dtypes.bool_:
        if src == dtypes.bool_:
            return value
        if dtypes.is_float(src):
            return fn.op(f"fcmp une float {value}, 0.0")
        return fn.op(f"icmp ne {s} {value}, 0")
    if dtypes.is_float(dst):
        if dtypes.is_float(src):
            return round_to(fn, dst, value)
        op = "uitofp" if src == dtypes.bool_ else "sitofp"
        return round_to(fn, dst, fn.op(f"{op} {s} {value} to float"))
    # integer destination
    if dtypes.is_float(src):
        return fn.op(f"fptosi float {value} to {d}")
    if s == d:
        return value
    if src == dtypes.bool_:
        return fn.op(f"zext i1 {value} to {d}")
    bits = {"i32": 32, "i64": 64}
    return fn.op(f"{'sext' if bits[s] < bits[d] else 'trunc'} {s} {value} to {d}")


def strides(shape) -> tuple[int, ...]:
    """Row-major element strides."""
    out, acc = [], 1
    for d in reversed(tuple(shape)):
        out.append(acc)
        acc *= d
    return tuple(reversed(out))


def unravel(fn: Function, linear, shape) -> list:
    """Multi-index (i64 SSA names, or 0 for unit dimensions) of a row-major linear index < size."""
    idx, outer = [], True
    for d, s in zip(shape, strides(shape)):
        if d == 1:
            idx.append(0)
            continue
        q = linear if s == 1 else fn.op(f"udiv i64 {linear}, {s}")
        idx.append(q if outer else fn.op(f"urem i64 {q}, {d}"))
        outer = False
    return idx


def affine(fn: Function, base, terms) -> str | int:
    """base + sum(i * s for i, s in terms), folding Python ints (i: SSA names or ints; s: ints)."""
    acc = base
    for i, s in terms:
        if s == 0 or (isinstance(i, int) and i == 0):
            continue
        term = (i * s) if isinstance(i, int) else (i if s == 1 else fn.op(f"mul nsw i64 {i}, {s}"))
        if isinstance(acc, int) and isinstance(term, int):
            acc += term
        elif isinstance(acc, int) and acc == 0:
            acc = term
        else:
            acc = fn.op(f"add nsw i64 {acc}, {term}")
    return acc
