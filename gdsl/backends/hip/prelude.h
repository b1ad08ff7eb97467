// gdsl's HIP device prelude for plain clang (`clang -x hip -nogpulib -nogpuinc -include prelude.h`).
//
// With -nogpuinc clang brings none of ROCm's headers, so the CUDA-style names that generated kernels
// use (threadIdx, __syncthreads, atomicAdd, __half, ...) are defined here on top of clang's amdgcn
// builtins. hiprtc has all of these built in and never sees this file; keep the two in step.
#pragma once

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
