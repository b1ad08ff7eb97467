"""The HIP dialect of the C-family renderer: hiprtc built-ins, 64-lane wavefronts, gdsl's atomic grid
barrier (HIP has no cooperative-groups grid.sync through hiprtc; a persistent grid must still fit)."""
from __future__ import annotations

from gdsl.backends.cfamily.dialect import Dialect

HEADER_TEMPLATE = r"""
#define GDSL_DEV __device__ __forceinline__
#define GDSL_SHARED_OP __device__ __noinline__
#define GDSL_WARP $warp_size
#define GDSL_SHFL_XOR(v, m, w) __shfl_xor((v), (m), (w))
#define GDSL_U2F(u) __uint_as_float(u)
#define GDSL_F2U(f) __float_as_uint(f)
#define GDSL_SPIN_PAUSE() __builtin_amdgcn_s_sleep(1)
GDSL_DEV float gdsl_h2f(unsigned short h) { _Float16 x; __builtin_memcpy(&x, &h, 2); return (float)x; }
GDSL_DEV unsigned short gdsl_f2h(float f) { _Float16 x = (_Float16)f; unsigned short h; __builtin_memcpy(&h, &x, 2); return h; }
"""


class HIPDialect(Dialect):
    name = "hip"
    lowering_chain = ("hip", "cfamily")
    warp_size = 64
    header_template = HEADER_TEMPLATE
    barriers = ("atomic",)
    shared_decl = "__shared__ __attribute__((aligned(16))) char gdsl_smem[{nbytes}];"
    # the constant 100 MHz clock of gfx90a (wall_clock64() in HIP's headers): one clock for every CU
    trace_clock = "(unsigned long long)__builtin_amdgcn_s_memrealtime()"
    trace_clock_name, trace_ns_per_tick = "s_memrealtime (100 MHz)", 10.0
