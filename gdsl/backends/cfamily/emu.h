// gdsl's CPU emulator dialect: the CUDA dialect's generated code compiled as C++ by g++, every CUDA thread a
// POSIX thread. Only for testing the renderer where there is no GPU: blocks and warps are real barriers, so
// a missing __syncthreads or grid barrier shows up as a wrong answer (or a hang), as it would on a GPU.
// (C headers only: the standard C++ thread headers would triple the compile time of every test kernel.)
//
// Two spellings: the emulator dialect's own (CUDA's names, GDSL_* defined below, 32-lane warps), and with
// GDSL_EMU_HIP defined first the HIP dialect's header as generated for AMD GPUs (its __shfl_xor, s_sleep,
// _Float16 half helpers), on top of the HIP names defined here; GDSL_WARP (32 or 64) may be defined first too.
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#ifndef GDSL_WARP
#define GDSL_WARP 32
#endif

struct gdsl_dim3 { unsigned x, y, z; };
struct gdsl_emu_block {
  pthread_barrier_t bar;
  pthread_barrier_t warps[1024 / GDSL_WARP];
  unsigned long long lanes[1024];   // one shuffle slot per thread
  float fragments[1024][6];         // a thread's mma operands (GDSL_EMU_TC)
  char* smem;
};
static __thread gdsl_dim3 threadIdx, blockIdx, blockDim, gridDim;
static __thread gdsl_emu_block* gdsl_emu_cur;

#define __launch_bounds__(n)

static inline void __syncthreads() { pthread_barrier_wait(&gdsl_emu_cur->bar); }
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
template <typename T> static inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
// v of lane `source` of this lane's group of `width` lanes (source taken modulo width, as CUDA and HIP do).
template <typename T> static inline T gdsl_emu_shfl(T v, int source, int width) {
  const int lane = threadIdx.x % GDSL_WARP, warp = threadIdx.x / GDSL_WARP;
  unsigned long long* slots = gdsl_emu_cur->lanes + warp * GDSL_WARP;
  memcpy(&slots[lane], &v, sizeof(T));
  pthread_barrier_wait(&gdsl_emu_cur->warps[warp]);
  T r;
  memcpy(&r, &slots[lane / width * width + ((source % width) + width) % width], sizeof(T));
  pthread_barrier_wait(&gdsl_emu_cur->warps[warp]);
  return r;
}
template <typename T> static inline T gdsl_emu_shfl_xor(T v, int mask, int width) {
  return gdsl_emu_shfl(v, (threadIdx.x % GDSL_WARP % width) ^ mask, width);
}
#ifdef GDSL_EMU_HIP
// The HIP names the HIP dialect's header uses (hiprtc built-ins on an AMD GPU).
#define __device__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __shfl_xor(v, m, w) gdsl_emu_shfl_xor((v), (m), (w))
#define __shfl(v, s, w) gdsl_emu_shfl((v), (s), (w))
#define __builtin_amdgcn_s_sleep(n) sched_yield()
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
#else
#define GDSL_DEV static inline
#define GDSL_SHARED_OP static
#define GDSL_SPIN_PAUSE() sched_yield()
#define GDSL_SHFL_XOR(v, m, w) gdsl_emu_shfl_xor((v), (m), (w))
#define GDSL_SHFL(v, s, w) gdsl_emu_shfl((v), (s), (w))
static inline float GDSL_U2F(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned GDSL_F2U(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline float gdsl_h2f(unsigned short h) { _Float16 x; memcpy(&x, &h, 2); return (float)x; }
static inline unsigned short gdsl_f2h(float f) { _Float16 x = (_Float16)f; unsigned short h; memcpy(&h, &x, 2); return h; }
#endif

#ifdef GDSL_EMU_TC
// The CUDA dialect's tensor-core instructions (cuda/tensor_core_ops.h) for its tiles' tests: cvt.rna.tf32 (to 10
// mantissa bits, ties away from zero), mma.sync.m16n8k8 computed by each lane from every lane's fragments (PTX's
// layouts), exchanged between two warp barriers; cp.async a copy that lands as late as PTX allows (below).
#define GDSL_TC 1
static inline unsigned gdsl_tf32(float x) {
  unsigned u;
  memcpy(&u, &x, 4);
  return (u & 0x7f800000u) == 0x7f800000u ? u : (u + 0x1000u) & 0xffffe000u;
}
static inline void gdsl_mma_tf32(float* c, const unsigned* a, const unsigned* b) {
  const int lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  float (*f)[6] = gdsl_emu_cur->fragments + threadIdx.x / 32 * 32;
  for (int e = 0; e < 4; ++e) memcpy(&f[lane][e], &a[e], 4);
  for (int e = 0; e < 2; ++e) memcpy(&f[lane][4 + e], &b[e], 4);
  pthread_barrier_wait(&gdsl_emu_cur->warps[threadIdx.x / GDSL_WARP]);
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + e / 2 * 8, col = 2 * t4 + e % 2;
    float s = c[e];
    for (int k = 0; k < 8; ++k)
      s += f[row % 8 * 4 + k % 4][(row >= 8) + 2 * (k >= 4)] * f[col * 4 + k % 4][4 + (k >= 4)];
    out[e] = s;
  }
  pthread_barrier_wait(&gdsl_emu_cur->warps[threadIdx.x / GDSL_WARP]);
  for (int e = 0; e < 4; ++e) c[e] = out[e];
}
// cp.async: a thread's copies wait in its own queue and land only when a cp.async.wait_group needs them (their
// group is older than the N newest), reading their source then. So a tile that reads a stage before its wait,
// or before the block barrier after every thread's wait (another thread's copies not landed yet), or that leaves
// copies in flight past its end, reads stale shared memory here: a wrong answer, as it may be on a GPU.
struct gdsl_emu_copy { float* dst; const float* src; int group; };   // group -1: not committed yet
enum { GDSL_EMU_MAX_COPIES = 512 };
static __thread gdsl_emu_copy gdsl_emu_copies[GDSL_EMU_MAX_COPIES];
static __thread int gdsl_emu_pending, gdsl_emu_groups;
static inline void gdsl_copy16(float* dst, const float* src) {
  if (gdsl_emu_pending == GDSL_EMU_MAX_COPIES) abort();        // (more copies in flight than a tile issues)
  if (((unsigned long long)dst | (unsigned long long)src) % 16) {  // (cp.async of 16 bytes wants both aligned:
    for (int i = 0; i < 4; ++i) dst[i] = NAN;                      //  a wrong answer here, not a crash)
    return;
  }
  gdsl_emu_copies[gdsl_emu_pending++] = {dst, src, -1};
}
static inline void gdsl_copy_commit() {
  for (int i = 0; i < gdsl_emu_pending; ++i)
    if (gdsl_emu_copies[i].group < 0) gdsl_emu_copies[i].group = gdsl_emu_groups;
  ++gdsl_emu_groups;
}
template <int N> static inline void gdsl_copy_wait() {
  int kept = 0;
  for (int i = 0; i < gdsl_emu_pending; ++i) {
    const gdsl_emu_copy c = gdsl_emu_copies[i];
    if (c.group >= 0 && c.group < gdsl_emu_groups - N) memcpy(c.dst, c.src, 16);
    else gdsl_emu_copies[kept++] = c;
  }
  gdsl_emu_pending = kept;
}
#endif

struct gdsl_emu_thread { gdsl_emu_block* block; int b, t, grid, nthreads; void (*body)(void**); void** args; };

static void* gdsl_emu_main(void* p) {
  gdsl_emu_thread* th = (gdsl_emu_thread*)p;
  threadIdx = {(unsigned)th->t, 0, 0};
  blockIdx = {(unsigned)th->b, 0, 0};
  blockDim = {(unsigned)th->nthreads, 1, 1};
  gridDim = {(unsigned)th->grid, 1, 1};
  gdsl_emu_cur = th->block;
  th->body(th->args);
  return 0;
}

// Run body(args) as grid x block threads; each block gets `smem` bytes of shared memory.
static void gdsl_emu_launch(int grid, int block, int smem, void (*body)(void**), void** args) {
  gdsl_emu_block* blocks = (gdsl_emu_block*)calloc(grid, sizeof(gdsl_emu_block));
  gdsl_emu_thread* threads = (gdsl_emu_thread*)calloc((size_t)grid * block, sizeof(gdsl_emu_thread));
  pthread_t* ids = (pthread_t*)calloc((size_t)grid * block, sizeof(pthread_t));
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 1 << 20);
  for (int b = 0; b < grid; ++b) {
    pthread_barrier_init(&blocks[b].bar, 0, block);
    for (int w = 0; w < block / GDSL_WARP; ++w) pthread_barrier_init(&blocks[b].warps[w], 0, GDSL_WARP);
    blocks[b].smem = (char*)aligned_alloc(64, ((smem + 64 + 63) / 64) * 64);
  }
  for (int b = 0; b < grid; ++b)
    for (int t = 0; t < block; ++t) {
      gdsl_emu_thread* th = &threads[(size_t)b * block + t];
      *th = {&blocks[b], b, t, grid, block, body, args};
      pthread_create(&ids[(size_t)b * block + t], &attr, gdsl_emu_main, th);
    }
  for (size_t i = 0; i < (size_t)grid * block; ++i) pthread_join(ids[i], 0);
  for (int b = 0; b < grid; ++b) {
    pthread_barrier_destroy(&blocks[b].bar);
    for (int w = 0; w < block / GDSL_WARP; ++w) pthread_barrier_destroy(&blocks[b].warps[w]);
    free(blocks[b].smem);
  }
  pthread_attr_destroy(&attr);
  free(ids);
  free(threads);
  free(blocks);
}
