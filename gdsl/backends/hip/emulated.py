"""The HIP dialect's generated code run where no AMD GPU is, two ways (tests/test_hip_emulated.py):

- on the CPU emulator (gdsl/backends/cfamily/emulator.py): EmulatedHIPDialect renders the HIP dialect's
  header as it is for hiprtc (its `__shfl_xor` reductions and GEMV lane split over 64- or 32-lane
  wavefronts, `__builtin_amdgcn_s_sleep` in the grid barrier's spin, the `_Float16` half helpers), and
  emu.h (with GDSL_EMU_HIP) defines those HIP names for g++; kernels, shared memory and launchers are
  the emulator's.
- on an NVIDIA GPU: `cuda_compat_source(source)` puts CUDA_COMPAT in front of a HIP-dialect source
  rendered with 32-lane wavefronts (HIPDialect(wave=32)), mapping the HIP names onto CUDA's, so NVRTC
  compiles it and CuPy runs it (tests/test_hip_emulated.py's device, through the CUDA backend's
  toolchain; the hip backend itself imports nothing of CUDA's): the HIP barrier, stack machine and control
  flow on a real GPU.
"""
from __future__ import annotations

from gdsl.backends.cfamily import emulator
from gdsl.backends.hip.dialect import HIPDialect


class EmulatedHIPDialect(HIPDialect):
    """The HIP dialect's header and lowering rules on the CPU emulator, with `wave`-lane wavefronts."""
    name = "hip-emulated"
    kernel_prefix = emulator.EmulatorDialect.kernel_prefix
    shared_decl = emulator.EmulatorDialect.shared_decl
    trace_clock = emulator.EmulatorDialect.trace_clock
    trace_clock_name = emulator.EmulatorDialect.trace_clock_name
    trace_ns_per_tick = emulator.EmulatorDialect.trace_ns_per_tick
    host_code = emulator.EmulatorDialect.host_code

    def __init__(self, wave: int = 64):
        super().__init__(wave=wave)

    @property
    def header(self) -> str:
        return (f"#define GDSL_EMU_HIP\n#define GDSL_WARP {self.warp_size}\n{emulator.EMU_HEADER}"
                f"{super().header}")


# HIP names -> CUDA, for a HIP-dialect source rendered with 32-lane wavefronts (an NVIDIA warp).
CUDA_COMPAT = r"""// gdsl: HIP dialect on NVIDIA through NVRTC (test mode): HIP's names spelled in CUDA.
#include <cuda_fp16.h>
#define __shfl_xor(v, m, w) __shfl_xor_sync(0xffffffffu, (v), (m), (w))
#define __shfl(v, s, w) __shfl_sync(0xffffffffu, (v), (s), (w))
#define __builtin_amdgcn_s_sleep(n) __nanosleep(64u * (n))
#define __builtin_amdgcn_s_memrealtime() gdsl_compat_globaltimer()
#define _Float16 __half
#define __builtin_memcpy memcpy
static __device__ __forceinline__ unsigned long long gdsl_compat_globaltimer() {
  unsigned long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }
"""


def cuda_compat_source(source: str) -> str:
    """A HIP-dialect source (rendered with wave=32) as CUDA that NVRTC compiles."""
    return CUDA_COMPAT + source
