"""The HIP dialect of the C-family renderer: hiprtc built-ins, the wavefront size of the target arch (64 lanes
on CDNA, 32 on RDNA), gdsl's atomic grid barrier (HIP has no cooperative-groups grid.sync through hiprtc; a
persistent grid must still fit, which load() checks).

    HIPDialect()                 gfx90a: 64-lane wavefronts
    HIPDialect(arch="gfx1100")   RDNA: 32-lane wavefronts
    HIPDialect(wave=32)          a wavefront size without an arch (gfx1030; the NVIDIA compatibility test mode)
"""
from __future__ import annotations

from gdsl.backends.cfamily.dialect import Dialect

DEFAULT_ARCH = "gfx90a"     # an MI250X (CDNA2)
DEFAULT_WAVE32_ARCH = "gfx1030"     # RDNA2: the arch of a wave=32 lowering without one (hiprtc 5.2 builds it)

HEADER_TEMPLATE = r"""
#define GDSL_DEV __device__ __forceinline__
#define GDSL_SHARED_OP __device__ __noinline__
#define GDSL_WARP $warp_size
#define GDSL_SHFL_XOR(v, m, w) __shfl_xor((v), (m), (w))
#define GDSL_SHFL(v, s, w) __shfl((v), (s), (w))
#define GDSL_U2F(u) __uint_as_float(u)
#define GDSL_F2U(f) __float_as_uint(f)
#define GDSL_SPIN_PAUSE() __builtin_amdgcn_s_sleep(1)
GDSL_DEV float gdsl_h2f(unsigned short h) { _Float16 x; __builtin_memcpy(&x, &h, 2); return (float)x; }
GDSL_DEV unsigned short gdsl_f2h(float f) { _Float16 x = (_Float16)f; unsigned short h; __builtin_memcpy(&h, &x, 2); return h; }
"""


def wave_size(arch: str) -> int:
    """Lanes of a wavefront on `arch` ("gfx942", "gfx90a:sramecc+:xnack-", ...): 32 on RDNA (gfx10xx, gfx11xx,
    gfx12xx, which run wave32 by default), 64 on GCN and CDNA (gfx8xx, gfx9xx). ValueError for anything else."""
    name = arch.split(":")[0]
    if not name.startswith("gfx") or not name[3:].isalnum() or len(name) < 6:
        raise ValueError(f"not an AMD GPU architecture: {arch!r} (expected e.g. 'gfx90a', 'gfx942', 'gfx1100')")
    generation = _generation(name)
    if generation in ("8", "9"):
        return 64
    if generation in ("10", "11", "12"):
        return 32
    raise ValueError(f"gdsl does not know the wavefront size of {arch!r} (GCN/CDNA gfx8xx/gfx9xx: 64, "
                     f"RDNA gfx10xx-gfx12xx: 32)")


def _generation(arch: str) -> str:
    """gfx90a -> "9", gfx942 -> "9", gfx1030 -> "10", gfx1201 -> "12"."""
    return arch.split(":")[0][3:-2]


class HIPDialect(Dialect):
    name = "hip"
    lowering_chain = ("hip", "cfamily")
    warp_size = 64
    header_template = HEADER_TEMPLATE
    barriers = ("atomic",)
    shared_decl = "__shared__ __attribute__((aligned(16))) char gdsl_smem[{nbytes}];"
    static_smem_limit = 64 * 1024        # (an AMD GPU's LDS per workgroup)
    # the constant 100 MHz clock of gfx90a (wall_clock64() in HIP's headers): one clock for every CU
    trace_clock = "(unsigned long long)__builtin_amdgcn_s_memrealtime()"
    trace_clock_name, trace_ns_per_tick = "s_memrealtime (100 MHz)", 10.0

    def __init__(self, arch: str | None = None, wave: int | None = None):
        """`arch` gives the wavefront size (wave_size); `wave` (32 or 64) alone picks a default arch of that
        wavefront size (gfx90a, gfx1030); both given must agree."""
        if wave is not None and wave not in (32, 64):
            raise ValueError(f"wave must be 32 or 64, got {wave!r}")
        self.arch = arch or (DEFAULT_WAVE32_ARCH if wave == 32 else DEFAULT_ARCH)
        self.warp_size = wave_size(self.arch)
        if wave is not None and wave != self.warp_size:
            raise ValueError(f"wave={wave} does not match {arch} ({self.warp_size}-lane wavefronts)")
        if _generation(self.arch) in ("11", "12"):
            # RDNA3/4 have no s_memrealtime: the same constant clock comes back from a message (MSG_RTN_GET_REALTIME)
            self.trace_clock = "(unsigned long long)__builtin_amdgcn_s_sendmsg_rtnl(0x83)"
