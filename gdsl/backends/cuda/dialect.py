"""The CUDA dialect of the C-family renderer: NVRTC built-ins only (no headers needed), warp 32."""
from __future__ import annotations

from pathlib import Path

from gdsl.backends.cfamily.dialect import Dialect

# GDSL_SHARED_OP is static: in whole-program mode the machine code is the same, and compiled as relocatable device
# code (cuda/toolchain.py, SEPARATE_MIN_CALLED) a static function gets the register budget of the kernels calling
# it (an extern one may take 255 and fail the link) and is not emitted twice (an extern copy and an internal clone).
HEADER_TEMPLATE = r"""
#define GDSL_DEV __device__ __forceinline__
#define GDSL_SHARED_OP static __device__ __noinline__
#define GDSL_WARP $warp_size
#define GDSL_SHFL_XOR(v, m, w) __shfl_xor_sync(0xffffffffu, (v), (m), (w))
#define GDSL_SHFL(v, s, w) __shfl_sync(0xffffffffu, (v), (s), (w))
#define GDSL_U2F(u) __uint_as_float(u)
#define GDSL_F2U(f) __float_as_uint(f)
#define GDSL_SPIN_PAUSE() ((void)0)
GDSL_DEV float gdsl_h2f(unsigned short h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
GDSL_DEV unsigned short gdsl_f2h(float f) { unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
GDSL_DEV float gdsl_logistic(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.0f + expf(-x)));
  return r;
}
"""
# The grid barrier's ordering in its instructions (prelude.h, gdsl_grid_sync_atomic): thread 0 arrives with
# atom.add.release.gpu and spins with ld.acquire.gpu, no fence on either side. What makes the other threads' writes
# part of the release is the PTX memory model's causality order, transitive through the block barrier before the
# arrival (the pattern of CUTLASS's GenericBarrier: a block barrier, then thread 0's fence.acq_rel + relaxed red).
# On the H200 a barrier costs ~0.1 us less (benchmarks/group_barrier.py --schemes, session 27: 0.89 against 0.99-
# 1.04 us at 264 vEUs), and tests/test_barrier_litmus.py checks it on the GPU (every thread's plain store seen by
# another block's thread after the barrier, a hundred thousand rounds). False: the fences and a volatile spin.
RELEASE_BARRIER = True
BARRIER_CODE = r"""
GDSL_DEV unsigned gdsl_atom_add_release(unsigned* p, unsigned v) {
  unsigned old;
  asm volatile("atom.release.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}
GDSL_DEV unsigned gdsl_ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
#define GDSL_BARRIER_ARRIVE(bar, add) gdsl_atom_add_release((bar), (add))
#define GDSL_BARRIER_LOAD(bar) gdsl_ld_acquire(bar)
#define GDSL_BARRIER_ACQUIRED() ((void)0)
"""
# logistic(x) = 1 / (1 + e^-x) with the reciprocal from the SFU (`gdsl_logistic`: rcp.approx.ftz, at most 1 ulp; its
# argument is >= 1, so no denormal goes in, and a result under 2^-126 (x < -87.3) flushes to 0). The correctly
# rounded 1/d is a SASS sequence with a branch to a slow path that ptxas does not schedule across: a recurrent
# cell's independent gates then ran one after another on its thread (NASRNN bs1's cell 0.67 µs a step on the
# H200, session 22). False: the table's `1.0f / (1.0f + expf(-x))`.
APPROX_LOGISTIC = True


class CUDADialect(Dialect):
    name = "cuda"
    lowering_chain = ("cuda", "cfamily")
    warp_size = 32
    header_template = HEADER_TEMPLATE
    barriers = ("atomic", "coop")
    prefetch_template = 'asm volatile("prefetch.global.L2 [%0];" :: "l"({ptr}))'
    # The second bound keeps a thread's registers within what lets the plan's vEUs per SM be resident together
    # (else ptxas may take up to 255 and a grid of two vEUs per SM would not fit: see gemm.WIDE_MAX_REGISTERS).
    kernel_prefix = 'extern "C" __global__ void __launch_bounds__({block}, {veus_per_sm})'
    ldg_template = "__ldg({ptr})"
    ldg_types = frozenset({"float", "int", "long long", "gdsl_f16", "gdsl_bf16"})
    # An H100's or H200's 228 KB per SM, less each resident block's scratch (<= 17 KB) and reserve (1 KB) at
    # two vEUs per SM; lowering clamps it to the GPU's own shared memory when one is here.
    resident_smem_per_sm = 192 * 1024
    # Float32 GEMM tiles on the tensor cores, split in three TF32 products (float32 accuracy; sm_80 and later,
    # the FFMA tile before): the jit option tensor_cores=False turns it off.
    tensor_cores = True
    # Flag syncs by default (run on the H200: NASRNN bs1 3.85 -> 2.83 ms, session 11); HIP keeps them opt-in
    # until they have run on an AMD GPU (they compile there), the emulator follows CUDA.
    flag_syncs = True
    # A warp barrier orders the warp's memory accesses, so ptxas issues the loads before it there: a row chain's
    # leaves load in one round trip (reductions.FENCE_ROW_LEAVES).
    issue_fence = "__syncwarp();"
    device_library = (Path(__file__).with_name("tensor_core_ops.h").read_text() +
                      Path(__file__).with_name("tensor_cores.h").read_text())
    trace_clock = "gdsl_globaltimer()"      # ns, the same clock on every SM (instrumented builds only)
    trace_clock_code = ('GDSL_DEV unsigned long long gdsl_globaltimer() { unsigned long long t; '
                        'asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }')
    trace_clock_name, trace_ns_per_tick = "%globaltimer", 1.0

    @property
    def header(self) -> str:
        return super().header + (BARRIER_CODE if RELEASE_BARRIER else "")

    @property
    def elementwise_overrides(self) -> dict:
        return {"logistic": "gdsl_logistic({0})"} if APPROX_LOGISTIC else {}

    def grid_sync(self, barrier: str) -> str:
        if barrier == "coop":
            return "cooperative_groups::this_grid().sync();"
        return super().grid_sync(barrier)

    def includes(self, barrier: str) -> str:
        return "#include <cooperative_groups.h>\n" if barrier == "coop" else ""
