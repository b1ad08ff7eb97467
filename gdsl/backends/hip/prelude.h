// gdsl's HIP device prelude for plain clang (`clang -x hip -nogpulib -nogpuinc -include prelude.h`).
//
// With -nogpuinc clang brings none of ROCm's headers, so the CUDA-style names that generated kernels
// use (threadIdx, __syncthreads, atomicAdd, __half, ...) are defined here on top of clang's amdgcn
// builtins. hiprtc has all of these built in and never sees this file; keep the two in step.
#pragma once

typedef __SIZE_TYPE__ size_t;     // no C headers either

#define __global__ __attribute__((global))
#define __device__ __attribute__((device))
#define __host__ __attribute__((host))
#define __shared__ __attribute__((shared))
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(max_threads) __attribute__((amdgpu_flat_work_group_size(1, max_threads)))

// threadIdx.x etc. read like fields but are calls: each index is a `property` whose getter is a builtin.
#define GDSL_INDEX_STRUCT(type, x_expr, y_expr, z_expr)                                  \
  struct type {                                                                           \
    __declspec(property(get = get_x)) unsigned x;                                         \
    __declspec(property(get = get_y)) unsigned y;                                         \
    __declspec(property(get = get_z)) unsigned z;                                         \
    static __device__ __forceinline__ unsigned get_x() { return x_expr; }                 \
    static __device__ __forceinline__ unsigned get_y() { return y_expr; }                 \
    static __device__ __forceinline__ unsigned get_z() { return z_expr; }                 \
  };                                                                                      \
  extern const __device__ __attribute__((weak)) type

GDSL_INDEX_STRUCT(gdsl_thread_idx, __builtin_amdgcn_workitem_id_x(), __builtin_amdgcn_workitem_id_y(),
                  __builtin_amdgcn_workitem_id_z()) threadIdx;
GDSL_INDEX_STRUCT(gdsl_block_idx, __builtin_amdgcn_workgroup_id_x(), __builtin_amdgcn_workgroup_id_y(),
                  __builtin_amdgcn_workgroup_id_z()) blockIdx;
GDSL_INDEX_STRUCT(gdsl_block_dim, __builtin_amdgcn_workgroup_size_x(), __builtin_amdgcn_workgroup_size_y(),
                  __builtin_amdgcn_workgroup_size_z()) blockDim;
// The dispatch packet holds the grid in work-items; HIP launches whole blocks, so this division is exact.
GDSL_INDEX_STRUCT(gdsl_grid_dim, __builtin_amdgcn_grid_size_x() / __builtin_amdgcn_workgroup_size_x(),
                  __builtin_amdgcn_grid_size_y() / __builtin_amdgcn_workgroup_size_y(),
                  __builtin_amdgcn_grid_size_z() / __builtin_amdgcn_workgroup_size_z()) gridDim;
#undef GDSL_INDEX_STRUCT

// A block barrier must also order shared-memory writes around it, hence the fences on both sides.
static __device__ __forceinline__ void __syncthreads() {
  __builtin_amdgcn_fence(__ATOMIC_RELEASE, "workgroup");
  __builtin_amdgcn_s_barrier();
  __builtin_amdgcn_fence(__ATOMIC_ACQUIRE, "workgroup");
}
// "agent" scope is the whole GPU: what a grid barrier needs between blocks.
static __device__ __forceinline__ void __threadfence() { __builtin_amdgcn_fence(__ATOMIC_SEQ_CST, "agent"); }
static __device__ __forceinline__ void __threadfence_block() { __builtin_amdgcn_fence(__ATOMIC_SEQ_CST, "workgroup"); }

// CUDA's atomics return the old value and are relaxed, device-wide.
#define GDSL_ATOMIC_ADD(T)                                                                \
  static __device__ __forceinline__ T atomicAdd(T* address, T value) {                   \
    return __hip_atomic_fetch_add(address, value, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_AGENT); \
  }
GDSL_ATOMIC_ADD(int)
GDSL_ATOMIC_ADD(unsigned)
GDSL_ATOMIC_ADD(unsigned long long)
GDSL_ATOMIC_ADD(float)
#undef GDSL_ATOMIC_ADD

// Half precision is the target's native _Float16; only the conversions generated code uses.
typedef _Float16 __half;
static __device__ __forceinline__ float __half2float(__half h) { return (float)h; }
static __device__ __forceinline__ __half __float2half(float f) { return (__half)f; }

// Bit casts (hiprtc built-ins).
static __device__ __forceinline__ float __uint_as_float(unsigned u) { return __builtin_bit_cast(float, u); }
static __device__ __forceinline__ unsigned __float_as_uint(float f) { return __builtin_bit_cast(unsigned, f); }

// HIP's __shfl_xor and __shfl through ds_bpermute, one 32-bit word at a time: lane ^ mask within groups of
// `width` lanes (a lane whose partner is outside its group keeps its own value); lane `source` (modulo width)
// of the lane's own group.
static __device__ __forceinline__ int gdsl_lane_id() {
  return __builtin_amdgcn_mbcnt_hi(~0u, __builtin_amdgcn_mbcnt_lo(~0u, 0u));
}
template <typename T> static __device__ __forceinline__ T gdsl_bpermute(T var, int index) {
  int words[(sizeof(T) + 3) / 4];
  __builtin_memcpy(words, &var, sizeof(T));
  for (unsigned i = 0; i < sizeof(words) / 4; ++i) words[i] = __builtin_amdgcn_ds_bpermute(index << 2, words[i]);
  T out;
  __builtin_memcpy(&out, words, sizeof(T));
  return out;
}
template <typename T> static __device__ __forceinline__ T __shfl_xor(T var, int lane_mask, int width) {
  const int self = gdsl_lane_id();
  int index = self ^ lane_mask;
  index = index >= ((self + width) & ~(width - 1)) ? self : index;
  return gdsl_bpermute(var, index);
}
template <typename T> static __device__ __forceinline__ T __shfl(T var, int source, int width) {
  return gdsl_bpermute(var, (gdsl_lane_id() & ~(width - 1)) + (source & (width - 1)));
}

// The float math the elementwise table and the prelude use. Without -nogpulib's ocml most lower to AMDGPU
// instructions; tanhf and erff have no instruction and no libcall, so they are built here from expf.
static __device__ __forceinline__ float expf(float x) { return __builtin_expf(x); }
static __device__ __forceinline__ float logf(float x) { return __builtin_logf(x); }
static __device__ __forceinline__ float sqrtf(float x) { return __builtin_sqrtf(x); }
static __device__ __forceinline__ float fabsf(float x) { return __builtin_fabsf(x); }
static __device__ __forceinline__ float floorf(float x) { return __builtin_floorf(x); }
static __device__ __forceinline__ float copysignf(float x, float y) { return __builtin_copysignf(x, y); }
static __device__ __forceinline__ float fmodf(float x, float y) { return __builtin_fmodf(x, y); }
static __device__ __forceinline__ float powf(float x, float y) { return __builtin_powf(x, y); }
// tanh: its Taylor series near 0 (where 1 - 2/(e^2x + 1) cancels), that formula elsewhere (saturates to +-1).
static __device__ __forceinline__ float tanhf(float x) {
  const float a = __builtin_fabsf(x);
  if (a < 0.125f) {
    const float x2 = x * x;
    return x * (1.0f + x2 * (-1.0f / 3 + x2 * (2.0f / 15 + x2 * (-17.0f / 315 + x2 * (62.0f / 2835)))));
  }
  return __builtin_copysignf(1.0f - 2.0f / (__builtin_expf(2.0f * a) + 1.0f), x);
}
// erf: its Taylor series below 0.5, Abramowitz & Stegun 7.1.26 above (absolute error <= 1.5e-7).
static __device__ __forceinline__ float erff(float x) {
  const float a = __builtin_fabsf(x);
  if (a < 0.5f) {
    const float x2 = x * x;
    return 1.1283791671f * x *
           (1.0f + x2 * (-1.0f / 3 + x2 * (1.0f / 10 + x2 * (-1.0f / 42 + x2 * (1.0f / 216 - x2 / 1320)))));
  }
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f +
                     t * 1.061405429f))));
  return __builtin_copysignf(1.0f - poly * __builtin_expf(-a * a), x);
}
