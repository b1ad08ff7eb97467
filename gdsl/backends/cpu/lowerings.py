"""The CPU lowering of every elementwise primitive: one table, name -> LLVM emission function.

    LOWERINGS[name](fn, dtype, args, params) -> SSA name of the result (its compute type)

`dtype` is the operands' dtype (for `select`, the branches'; for `convert_element_type`, the source's) and
`args` are compute-type SSA names (ir.py). Results of comparisons are i1 (bool). Rounding back to float16/
bfloat16 after each operation is the caller's job (ir.round_to). Operations that need several blocks or
many instructions (integer power, numpy's float floor division, exp, tanh, erf) call small internal
helper functions defined once per module from HELPERS; intrinsics and libm functions are declared from
DECLARATIONS. exp, tanh and logistic are branch-free polynomials (no libm call), so that loops over them
vectorise; log and pow go through LLVM's intrinsics to libm.

Semantics are numpy's (the primitives' numpy rules in gdsl/primitives/elementwise.py): integer floor
division and remainder follow numpy's signs and give 0 for a zero divisor; float floor division and
remainder follow numpy's npy_divmod; float max/min propagate NaN; bool add/mul/max/min are or/and;
float->int truncates.
"""
from __future__ import annotations

import math
import re

import numpy as np

from gdsl import dtypes
from gdsl.backends.cpu.ir import compute_type, convert, float_literal


def _float(dtype) -> bool:
    return dtypes.is_float(dtype)


def _bool(dtype) -> bool:
    return np.dtype(dtype) == dtypes.bool_


def _arith(float_op, int_op, bool_op=None):
    def lower(fn, dtype, args, params):
        a, b = args
        ty = compute_type(dtype)
        if _float(dtype):
            return fn.op(f"{float_op} float {a}, {b}")
        return fn.op(f"{(bool_op if _bool(dtype) and bool_op else int_op)} {ty} {a}, {b}")
    return lower


def _compare(float_pred, int_pred, bool_pred):
    def lower(fn, dtype, args, params):
        a, b = args
        if _float(dtype):
            return fn.op(f"fcmp {float_pred} float {a}, {b}")
        pred = bool_pred if _bool(dtype) else int_pred
        return fn.op(f"icmp {pred} {compute_type(dtype)} {a}, {b}")
    return lower


def _intrinsic(name):
    def lower(fn, dtype, args, params):
        return fn.op(f"call float @{name}(float {args[0]})")
    return lower


def _helper(base):
    """A call of helper `base_<type>` (HELPERS) on the operands."""
    def lower(fn, dtype, args, params):
        ty = compute_type(dtype)
        suffix = "f32" if _float(dtype) else ty
        return fn.op(f"call {ty} @gdsl_{base}_{suffix}(" + ", ".join(f"{ty} {a}" for a in args) + ")")
    return lower


def _neg(fn, dtype, args, params):
    if _float(dtype):
        return fn.op(f"fneg float {args[0]}")
    if _bool(dtype):
        return args[0]
    return fn.op(f"sub {compute_type(dtype)} 0, {args[0]}")


def _abs(fn, dtype, args, params):
    if _float(dtype):
        return fn.op(f"call float @llvm.fabs.f32(float {args[0]})")
    if _bool(dtype):
        return args[0]
    ty = compute_type(dtype)
    return fn.op(f"call {ty} @llvm.abs.{ty}({ty} {args[0]}, i1 false)")


def _sign(fn, dtype, args, params):
    x, ty = args[0], compute_type(dtype)
    if _bool(dtype):
        return x
    if _float(dtype):
        pos = fn.op(f"fcmp ogt float {x}, 0.0")
        neg = fn.op(f"fcmp olt float {x}, 0.0")
        zero_or_nan = fn.op(f"fmul float {x}, 0.0")   # sign(0) = 0, sign(nan) = nan
        inner = fn.op(f"select i1 {neg}, float -1.0, float {zero_or_nan}")
        return fn.op(f"select i1 {pos}, float 1.0, float {inner}")
    pos = fn.op(f"zext i1 {fn.op(f'icmp sgt {ty} {x}, 0')} to {ty}")
    neg = fn.op(f"zext i1 {fn.op(f'icmp slt {ty} {x}, 0')} to {ty}")
    return fn.op(f"sub {ty} {pos}, {neg}")


def _not(fn, dtype, args, params):
    ty = compute_type(dtype)
    return fn.op(f"xor {ty} {args[0]}, {'true' if ty == 'i1' else -1}")


def _logistic(fn, dtype, args, params):
    e = fn.op(f"call float @gdsl_exp_f32(float {fn.op(f'fneg float {args[0]}')})")
    return fn.op(f"fdiv float 1.0, {fn.op(f'fadd float 1.0, {e}')}")


def _rsqrt(fn, dtype, args, params):
    return fn.op(f"fdiv float 1.0, {fn.op(f'call float @llvm.sqrt.f32(float {args[0]})')}")


def _extreme(float_pred, int_name, bool_op):
    """numpy maximum/minimum: (a > b or isnan(a)) ? a : b (NaN propagates from either side)."""
    def lower(fn, dtype, args, params):
        a, b = args
        ty = compute_type(dtype)
        if _float(dtype):
            better = fn.op(f"fcmp {float_pred} float {a}, {b}")
            take_a = fn.op(f"or i1 {better}, {fn.op(f'fcmp uno float {a}, 0.0')}")
            return fn.op(f"select i1 {take_a}, float {a}, float {b}")
        if _bool(dtype):
            return fn.op(f"{bool_op} i1 {a}, {b}")
        return fn.op(f"call {ty} @llvm.{int_name}.{ty}({ty} {a}, {ty} {b})")
    return lower


def _pow(fn, dtype, args, params):
    a, b = args
    if _float(dtype):
        return fn.op(f"call float @llvm.pow.f32(float {a}, float {b})")
    if _bool(dtype):   # a ** b = a or not b
        return fn.op(f"or i1 {a}, {fn.op(f'xor i1 {b}, true')}")
    return _helper("ipow")(fn, dtype, args, params)


def _select(fn, dtype, args, params):
    pred, a, b = args
    return fn.op(f"select i1 {pred}, {compute_type(dtype)} {a}, {compute_type(dtype)} {b}")


def _convert(fn, dtype, args, params):
    return convert(fn, args[0], dtype, params["new_dtype"])


def _identity(fn, dtype, args, params):
    return args[0]


# Named for the reductions and pools that fold with them (reductions.py, window.py).
maximum = _extreme("ogt", "smax", "or")
minimum = _extreme("olt", "smin", "and")

LOWERINGS = {
    "neg": _neg,
    "exp": _intrinsic("gdsl_exp_f32"),
    "log": _intrinsic("llvm.log.f32"),
    "tanh": _intrinsic("gdsl_tanh_f32"),
    "logistic": _logistic,
    "sqrt": _intrinsic("llvm.sqrt.f32"),
    "rsqrt": _rsqrt,
    "erf": _intrinsic("gdsl_erf_f32"),
    "abs": _abs,
    "sign": _sign,
    "not": _not,
    "add": _arith("fadd", "add", "or"),
    "sub": _arith("fsub", "sub", "xor"),
    "mul": _arith("fmul", "mul", "and"),
    "div": _arith("fdiv", "sdiv"),
    "floor_divide": _helper("floordiv"),
    "rem": _helper("rem"),
    "pow": _pow,
    "max": maximum,
    "min": minimum,
    "and": _arith("and", "and"),
    "or": _arith("or", "or"),
    "eq": _compare("oeq", "eq", "eq"),
    "ne": _compare("une", "ne", "ne"),
    "lt": _compare("olt", "slt", "ult"),
    "le": _compare("ole", "sle", "ule"),
    "gt": _compare("ogt", "sgt", "ugt"),
    "ge": _compare("oge", "sge", "uge"),
    "select": _select,
    "convert_element_type": _convert,
    "broadcast_to": _identity,   # inside a fused expression broadcasting is done by indexing
}

# -------------------------------------------------------------------------------------------- helpers

_INT_HELPERS = r"""
define internal {T} @gdsl_floordiv_{T}({T} %a, {T} %b) alwaysinline {{
entry:
  %zero = icmp eq {T} %b, 0
  %m1 = icmp eq {T} %b, -1
  %bad = or i1 %zero, %m1
  %safe = select i1 %bad, {T} 1, {T} %b
  %q = sdiv {T} %a, %safe
  %r = srem {T} %a, %safe
  %rnz = icmp ne {T} %r, 0
  %x = xor {T} %r, %safe
  %diff = icmp slt {T} %x, 0
  %adj = and i1 %rnz, %diff
  %q1 = sub {T} %q, 1
  %q2 = select i1 %adj, {T} %q1, {T} %q
  %neg = sub {T} 0, %a
  %q3 = select i1 %m1, {T} %neg, {T} %q2
  %q4 = select i1 %zero, {T} 0, {T} %q3
  ret {T} %q4
}}
define internal {T} @gdsl_rem_{T}({T} %a, {T} %b) alwaysinline {{
entry:
  %zero = icmp eq {T} %b, 0
  %m1 = icmp eq {T} %b, -1
  %bad = or i1 %zero, %m1
  %safe = select i1 %bad, {T} 1, {T} %b
  %r = srem {T} %a, %safe
  %rnz = icmp ne {T} %r, 0
  %x = xor {T} %r, %safe
  %diff = icmp slt {T} %x, 0
  %adj = and i1 %rnz, %diff
  %r1 = add {T} %r, %safe
  %r2 = select i1 %adj, {T} %r1, {T} %r
  %r3 = select i1 %bad, {T} 0, {T} %r2
  ret {T} %r3
}}
define internal {T} @gdsl_ipow_{T}({T} %a, {T} %b) {{
entry:
  br label %loop
loop:
  %r = phi {T} [1, %entry], [%r2, %loop]
  %x = phi {T} [%a, %entry], [%x2, %loop]
  %e = phi {T} [%b, %entry], [%e2, %loop]
  %go = icmp sgt {T} %e, 0
  %bit = and {T} %e, 1
  %odd = icmp ne {T} %bit, 0
  %rx = mul {T} %r, %x
  %r1 = select i1 %odd, {T} %rx, {T} %r
  %r2 = select i1 %go, {T} %r1, {T} %r
  %x2 = mul {T} %x, %x
  %e2 = ashr {T} %e, 1
  br i1 %go, label %loop, label %done
done:
  ret {T} %r
}}
"""

# numpy's npy_divmodf (floor division snapped to an integer, Python-style remainder sign).
_FLOAT_HELPERS = r"""
define internal float @gdsl_fdivmod(float %a, float %b, ptr %mod_out) alwaysinline {
entry:
  %mod = frem float %a, %b
  %bzero = fcmp oeq float %b, 0.0
  br i1 %bzero, label %zero, label %nonzero
zero:
  %q0 = fdiv float %a, %b
  store float %mod, ptr %mod_out
  ret float %q0
nonzero:
  %am = fsub float %a, %mod
  %div = fdiv float %am, %b
  %modnz = fcmp une float %mod, 0.0
  %bneg = fcmp olt float %b, 0.0
  %mneg = fcmp olt float %mod, 0.0
  %signs = xor i1 %bneg, %mneg
  %fix = and i1 %modnz, %signs
  %mod1 = fadd float %mod, %b
  %div1 = fsub float %div, 1.0
  %modf = select i1 %fix, float %mod1, float %mod
  %divf = select i1 %fix, float %div1, float %div
  %zmod = call float @llvm.copysign.f32(float 0.0, float %b)
  %modr = select i1 %modnz, float %modf, float %zmod
  store float %modr, ptr %mod_out
  %divnz = fcmp une float %divf, 0.0
  %fl = call float @llvm.floor.f32(float %divf)
  %frac = fsub float %divf, %fl
  %up = fcmp ogt float %frac, 0.5
  %fl1 = fadd float %fl, 1.0
  %snap = select i1 %up, float %fl1, float %fl
  %ab = fdiv float %a, %b
  %zdiv = call float @llvm.copysign.f32(float 0.0, float %ab)
  %res = select i1 %divnz, float %snap, float %zdiv
  ret float %res
}
define internal float @gdsl_floordiv_f32(float %a, float %b) alwaysinline {
entry:
  %m = alloca float
  %q = call float @gdsl_fdivmod(float %a, float %b, ptr %m)
  ret float %q
}
define internal float @gdsl_rem_f32(float %a, float %b) alwaysinline {
entry:
  %m = alloca float
  %q = call float @gdsl_fdivmod(float %a, float %b, ptr %m)
  %r = load float, ptr %m
  ret float %r
}
"""

# erf in float32, max error about 1 ulp (two minimax polynomials, |x| <= 0.9277 and above).
_ERF_COEFFS = {
    "hi": [-1.72853470e-5, 3.83197126e-4, -3.88396438e-3, 2.42546219e-2, -1.06777877e-1, -6.34846687e-1,
           -1.28717512e-1],
    "lo": [-5.96761703e-4, 4.99119423e-3, -2.67681349e-2, 1.12819925e-1, -3.76125336e-1, 1.28379166e-1],
}


def _erf_helper() -> str:
    h = [float_literal(c) for c in _ERF_COEFFS["hi"]]
    lo = [float_literal(c) for c in _ERF_COEFFS["lo"]]
    fma = "call float @llvm.fma.f32"
    return f"""
define internal float @gdsl_erf_f32(float %a) {{
entry:
  %t = call float @llvm.fabs.f32(float %a)
  %s = fmul float %a, %a
  %big = fcmp ogt float %t, {float_literal(0.927734375)}
  br i1 %big, label %hi, label %lo
hi:
  %r0 = {fma}(float {h[0]}, float %t, float {h[1]})
  %u0 = {fma}(float {h[2]}, float %t, float {h[3]})
  %r1 = {fma}(float %r0, float %s, float %u0)
  %r2 = {fma}(float %r1, float %t, float {h[4]})
  %r3 = {fma}(float %r2, float %t, float {h[5]})
  %r4 = {fma}(float %r3, float %t, float {h[6]})
  %nt = fneg float %t
  %r5 = {fma}(float %r4, float %t, float %nt)
  %e = call float @gdsl_exp_f32(float %r5)
  %r6 = fsub float 1.0, %e
  %r7 = call float @llvm.copysign.f32(float %r6, float %a)
  ret float %r7
lo:
  %p1 = {fma}(float {lo[0]}, float %s, float {lo[1]})
  %p2 = {fma}(float %p1, float %s, float {lo[2]})
  %p3 = {fma}(float %p2, float %s, float {lo[3]})
  %p4 = {fma}(float %p3, float %s, float {lo[4]})
  %p5 = {fma}(float %p4, float %s, float {lo[5]})
  %p6 = {fma}(float %p5, float %a, float %a)
  ret float %p6
}}
"""


def _definitions(text: str) -> dict:
    """name -> text of each `define` in `text`."""
    out = {}
    for chunk in re.split(r"\n(?=define )", text.strip()):
        out[re.search(r"@([\w.]+)\(", chunk).group(1)] = chunk + "\n"
    return out


def _exp_tanh_helpers() -> str:
    """exp and tanh in float32 without branches or libm calls, so that loops over them vectorise.
    exp: Cody-Waite reduction x = k ln2 + r, degree-7 polynomial, 2^k applied in two halves (gradual
    underflow kept); max error 1.2 ulp. tanh: odd Taylor polynomial below |x| = 0.4, else
    1 - 2 / (exp(2|x|) + 1) with x's sign; max error 2.6 ulp."""
    f = float_literal
    fma = "call float @llvm.fma.f32"
    exp_poly = "\n".join(f"  %p{k} = {fma}(float %p{k + 1}, float %r, float {f(1 / math.factorial(k))})"
                          for k in range(6, -1, -1))
    tanh_c = [-1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925, 21844 / 6081075, -929569 / 638512875]
    tanh_poly = "\n".join(f"  %q{k} = {fma}(float %q{k + 1}, float %s, float {f(c)})"
                           for k, c in reversed(list(enumerate(tanh_c[:-1]))))
    return f"""
define internal float @gdsl_exp_f32(float %x) alwaysinline {{
entry:
  %lo = call float @llvm.maxnum.f32(float %x, float {f(-103.972084)})
  %xc = call float @llvm.minnum.f32(float %lo, float {f(88.7228394)})
  %kx = fmul float %xc, {f(1.44269504)}
  %k = call float @llvm.rint.f32(float %kx)
  %r1 = {fma}(float %k, float {f(-0.693145751953125)}, float %xc)
  %r = {fma}(float %k, float {f(-1.428606765330187e-06)}, float %r1)
  %p7 = bitcast i32 {np.float32(1 / 5040).view(np.int32)} to float
{exp_poly}
  %ki = fptosi float %k to i32
  %k1 = ashr i32 %ki, 1
  %k2 = sub i32 %ki, %k1
  %e1 = add i32 %k1, 127
  %e2 = add i32 %k2, 127
  %b1 = shl i32 %e1, 23
  %b2 = shl i32 %e2, 23
  %s1 = bitcast i32 %b1 to float
  %s2 = bitcast i32 %b2 to float
  %y1 = fmul float %p0, %s1
  %y = fmul float %y1, %s2
  %over = fcmp ogt float %x, {f(88.7228394)}
  %yo = select i1 %over, float 0x7FF0000000000000, float %y
  %nan = fcmp uno float %x, 0.0
  %res = select i1 %nan, float %x, float %yo
  ret float %res
}}
define internal float @gdsl_tanh_f32(float %x) alwaysinline {{
entry:
  %ax = call float @llvm.fabs.f32(float %x)
  %s = fmul float %x, %x
  %q6 = bitcast i32 {np.float32(tanh_c[-1]).view(np.int32)} to float
{tanh_poly}
  %xs = fmul float %x, %s
  %small = {fma}(float %xs, float %q0, float %x)
  %ax2 = fmul float %ax, 2.0
  %e = call float @gdsl_exp_f32(float %ax2)
  %e1 = fadd float %e, 1.0
  %frac = fdiv float 2.0, %e1
  %t = fsub float 1.0, %frac
  %big = call float @llvm.copysign.f32(float %t, float %x)
  %use_small = fcmp olt float %ax, {f(0.4)}
  %res = select i1 %use_small, float %small, float %big
  ret float %res
}}
"""


# A sense-reversing barrier of `n` threads: count arrivals; the last one resets the count and flips the
# shared sense; the others spin on it a little, then sleep on it with futex (so a machine with more
# threads than free cores still makes progress). Layout: i32 count, sense, sleepers, interrupt: a waiting
# thread leaves when the interrupt word is set (interrupts._INTERRUPT_IR, which also wakes the sleepers). seq_cst on the
# sleeper count and the sense flip means no wake-up is lost; acquire/release order every buffer write
# before the barrier with every read after it. (Linux: syscall 202 = futex, 128 = FUTEX_PRIVATE_FLAG.)
_BARRIER = r"""
define internal void @gdsl_barrier(ptr %bar, ptr %local, i64 %threads) nounwind noinline {
entry:
  %n = trunc i64 %threads to i32
  %ls = load i32, ptr %local
  %sense = xor i32 %ls, 1
  store i32 %sense, ptr %local
  %flag = getelementptr inbounds i32, ptr %bar, i64 1
  %sleepers = getelementptr inbounds i32, ptr %bar, i64 2
  %old = atomicrmw add ptr %bar, i32 1 acq_rel, align 4
  %last1 = add i32 %n, -1
  %last = icmp eq i32 %old, %last1
  br i1 %last, label %release, label %spin
release:
  store atomic i32 0, ptr %bar monotonic, align 4
  store atomic i32 %sense, ptr %flag seq_cst, align 4
  %waiting = load atomic i32, ptr %sleepers seq_cst, align 4
  %wake = icmp ne i32 %waiting, 0
  br i1 %wake, label %wakeup, label %done
wakeup:
  %w = call i64 (i64, ...) @syscall(i64 202, ptr %flag, i32 129, i32 2147483647, ptr null, ptr null, i32 0)
  br label %done
done:
  ret void
spin:
  %k = phi i32 [0, %entry], [%k1, %patience], [%k1, %slept]
  %f = load atomic i32, ptr %flag acquire, align 4
  %ok = icmp eq i32 %f, %sense
  br i1 %ok, label %out, label %wait
wait:
  %k1 = add i32 %k, 1
  %stop_at = getelementptr inbounds i32, ptr %bar, i64 3
  %stop = load atomic volatile i32, ptr %stop_at monotonic, align 4
  %stopped = icmp ne i32 %stop, 0
  br i1 %stopped, label %out, label %patience
patience:
  %patient = icmp ult i32 %k, 20000
  br i1 %patient, label %spin, label %sleep
sleep:
  %s0 = atomicrmw add ptr %sleepers, i32 1 seq_cst, align 4
  %f2 = load atomic i32, ptr %flag seq_cst, align 4
  %flipped = icmp eq i32 %f2, %sense
  br i1 %flipped, label %slept, label %futex
futex:
  %r = call i64 (i64, ...) @syscall(i64 202, ptr %flag, i32 128, i32 %ls, ptr null, ptr null, i32 0)
  br label %slept
slept:
  %s1 = atomicrmw sub ptr %sleepers, i32 1 seq_cst, align 4
  br label %spin
out:
  ret void
}
"""

HELPERS = {**_definitions(_BARRIER), **_definitions(_exp_tanh_helpers()),
           **_definitions(_INT_HELPERS.format(T="i32")), **_definitions(_INT_HELPERS.format(T="i64")),
           **_definitions(_FLOAT_HELPERS), **_definitions(_erf_helper())}

# Intrinsics and libm functions, declared in a module when its text calls them.
DECLARATIONS = {
    "syscall": "declare i64 @syscall(i64, ...)",
}
for _f in ("exp", "log", "sqrt", "fabs", "floor", "rint"):
    DECLARATIONS[f"llvm.{_f}.f32"] = f"declare float @llvm.{_f}.f32(float)"
for _f in ("pow", "copysign", "maxnum", "minnum"):
    DECLARATIONS[f"llvm.{_f}.f32"] = f"declare float @llvm.{_f}.f32(float, float)"
DECLARATIONS["llvm.prefetch.p0"] = "declare void @llvm.prefetch.p0(ptr, i32, i32, i32)"
DECLARATIONS["llvm.fma.f32"] = "declare float @llvm.fma.f32(float, float, float)"
for _n in (8, 16):
    DECLARATIONS[f"llvm.fma.v{_n}f32"] = f"declare <{_n} x float> @llvm.fma.v{_n}f32(" + \
        ", ".join([f"<{_n} x float>"] * 3) + ")"
for _t in ("i8", "i16", "i32", "i64"):
    for _f in ("smin", "smax", "umin", "umax"):
        DECLARATIONS[f"llvm.{_f}.{_t}"] = f"declare {_t} @llvm.{_f}.{_t}({_t}, {_t})"
    DECLARATIONS[f"llvm.abs.{_t}"] = f"declare {_t} @llvm.abs.{_t}({_t}, i1)"


def support_code(text: str) -> str:
    """Definitions of the helpers `text` calls (and those they call), then declarations of every intrinsic
    and libm function used."""
    wanted: list = []
    pending = re.findall(r"@(gdsl_[a-z0-9_]+)\(", text)
    while pending:
        name = pending.pop()
        if name in HELPERS and name not in wanted:
            wanted.append(name)
            pending.extend(re.findall(r"@(gdsl_[a-z0-9_]+)\(", HELPERS[name]))
    defs = "".join(HELPERS[n] for n in wanted)
    used = dict.fromkeys(re.findall(r"@([\w.]+)\(", text + defs))
    return defs + "".join(DECLARATIONS[n] + "\n" for n in used if n in DECLARATIONS)
