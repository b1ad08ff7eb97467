"""The stacked LSTM at batch 1 laid out one layer per thread-block cluster: what that schedule costs on this card,
before the compiler learns to build it (issue 11's LSTM bs1 row).

    python benchmarks/cluster_lstm.py [--clusters 8,16] [--launches 30] [--no-gdsl] [--json F]
    python benchmarks/cluster_lstm.py --emulate        # the same kernel on the CPU (g++, a thread per CUDA thread)

Why: the batch-1 rows wait on grid barriers and flag syncs, each a few L2 round trips (~1 µs on the H200), several a
step; Hopper's cluster barrier costs a fifth of that (0.19-0.22 µs, benchmarks/group_barrier.py, session 27) and a
cluster's blocks can write into each other's shared memory. The layout, written by hand here (the model's
weights, its numbers checked against a float64 reference):

- layer l runs on cluster l (C blocks); block r of it owns the hidden units [r*U, (r+1)*U) (U = H / C) of all four
  gates: its columns of W_hh (H x 4U floats) stay in its shared memory for the whole kernel, and it keeps the
  cell state c of its units in registers;
- a step t of layer l: the GEMV `h[l, t-1] @ W_hh` from shared memory, plus the input part (below), the cell of
  its U units, the new h written into every block of the cluster (`mapa` + `st.shared::cluster`, double-buffered)
  and once into global memory (`hseq[l][t]`, single assignment: no buffer is ever reused, so no write waits for a
  reader); then a cluster barrier (`barrier.cluster.arrive.release` ... `wait.acquire`) instead of a grid barrier;
- the input part of step t+1, `h[l-1, t+1] @ W_ih + b` (layer 0: `x[t+1] @ W_ih`), runs between the arrive and
  the wait: it waits on a counter of layer l-1's step t+1 (each of that cluster's blocks adds 1 after its
  stores), then reads W_ih's columns from L2 (10 layers' W_ih and W_hh are 21 MB: W_hh resident, W_ih not).

So the layers run as a wavefront paced by the counters, with no grid barrier at all: the clusters that are
ahead wait only on the layer below. `--no-input-part` times the same kernel with the input part left out (wrong
numbers, not checked): how much of a step the recurrent chain alone takes. The gdsl call of the same model
(models/lstm.py, default options) is timed in the same process with the same method (CUDA events around the
call, median of `--launches`), as is the prototype.

Needs a GPU, CuPy and sm_90 (clusters); `--emulate` needs g++ only. The occupancy of the clusters is checked
with cuOccupancyMaxActiveClusters (every layer's cluster must be resident at once: they wait on each other), and
every spin gives up after SPIN_LIMIT polls, counting the timeout, rather than hang.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from models import common, lstm  # noqa: E402  (after the path)

SPIN_LIMIT = 1 << 22          # polls of a counter before a wait gives up (a few seconds on the GPU)
NON_PORTABLE_CLUSTER_SIZE_ALLOWED = 14     # CUfunction_attribute: clusters of more than 8 blocks

KERNEL = r'''
#define U (H / C)                 // hidden units a block owns
#define G (4 * U)                 // its gate columns (gate-major: column g * U + i is unit r * U + i of gate g)
#define NKS (NT / G)              // k slices of a GEMV (thread tid: column tid % G, slice tid / G)
#define KS (H / NKS)              // k of a slice

GDSL_DEV float sigm(float v) { return 1.f / (1.f + expf(-v)); }

GDSL_DEV void wait_count(unsigned* p, unsigned target, unsigned* err) {
  long long polls = 0;
  while ((int)(load_acquire(p) - target) < 0) {
    if (++polls > SPIN_LIMIT || load_acquire(err) != 0u) { atomicAdd(err, 1u); return; }
  }
}

// The input vector of step t of layer l: layer l-1's h of step t (after its counter says every block of that
// cluster stored its part), layer 0's x[t].
GDSL_DEV const float* input_row(int l, int t, const float* x, const float* hseq) {
  return l > 0 ? hseq + ((l - 1) * T + t) * H : x + t * H;
}

GDSL_DEV void wait_input(int l, int t, unsigned seen, unsigned* hcount, unsigned epoch, unsigned* err) {
  if (l > 0 && (int)(seen - C * epoch) < 0) wait_count(hcount + (l - 1) * T + t, C * epoch, err);
}

// The sync of a layer's C blocks at each step, in two halves (the input part runs between them): with CLUSTER_SYNC
// the cluster barrier, else gdsl's atomic scheme on a counter of the layer (phase p of launch `epoch` complete at
// C * ((epoch - 1) * (T + 1) + p)).
GDSL_DEV void step_arrive(unsigned* gbar, int l) {
#if CLUSTER_SYNC
  cluster_arrive();
#else
  __syncthreads();
  if (threadIdx.x == 0) { __threadfence(); atomicAdd(gbar + l, 1u); }
#endif
}
GDSL_DEV void step_wait(unsigned* gbar, int l, unsigned epoch, int phase, unsigned* err) {
#if CLUSTER_SYNC
  cluster_wait();
#else
  if (threadIdx.x == 0) wait_count(gbar + l, C * ((epoch - 1) * (T + 1) + phase), err);
  __syncthreads();
#endif
}

// xp[] = hin[] @ W_ih[l][:, this block's columns] + b. W_ih's columns are in shared memory (Wi, [H][G]) where
// W_hh's are in registers (W_IN_REGS), else read from L2.
GDSL_DEV void input_gemv(int l, const float* W_ih, const float* bias, const float* Wi, const float* hin,
                         float* xpart, float* xp) {
  const int tid = threadIdx.x, col = tid % G, ks = tid / G, r = blockIdx.x % C;
  const int g = col / U, unit = r * U + col % U;
  float s = 0.f;
  if (INPUT_PART) {
#if W_IN_REGS
    for (int k = ks * KS; k < (ks + 1) * KS; ++k) s += hin[k] * Wi[k * G + col];
#else
    const float* w = W_ih + (size_t)(l * 4 + g) * H * H + unit;      // W_ih[l][g][k][unit] at w[k * H]
    for (int k = ks * KS; k < (ks + 1) * KS; ++k) s += hin[k] * load_ro(w + (size_t)k * H);
#endif
  }
  xpart[ks * G + col] = s;
  __syncthreads();
  if (ks == 0) {
    float v = bias[(l * 4 + g) * H + unit];
    for (int q = 0; q < NKS; ++q) v += xpart[q * G + col];
    xp[col] = v;
  }
  __syncthreads();
}

// The input part of step t, all at once: wait for the input, load it, the GEMV (INPUT_PART 0: the bias only).
GDSL_DEV void input_part(int l, int t, const float* W_ih, const float* bias, const float* x, float* hseq,
                         unsigned* hcount, unsigned epoch, unsigned* err, const float* Wi, float* hin, float* xpart,
                         float* xp) {
  if (INPUT_PART) {
    if (threadIdx.x == 0) wait_input(l, t, 0u, hcount, epoch, err);
    __syncthreads();
    const float* row = input_row(l, t, x, hseq);
    for (int k = threadIdx.x; k < H; k += NT) hin[k] = load_cg(row + k);
    __syncthreads();
  }
  input_gemv(l, W_ih, bias, Wi, hin, xpart, xp);
}

KERNEL_HEAD(lstm_clusters)(const float* W_ih, const float* W_hh, const float* bias, const float* x, float* hseq,
                           unsigned* hcount, unsigned epoch, unsigned* err, float* hglob, unsigned* gbar) {
  float* Ws = SMEM;                    // [H][G]: this block's columns of W_hh[l] (of W_ih[l] with W_IN_REGS)
  float* hbuf = Ws + H * G;            // [2][H]: h of the last two steps, written by every block of the cluster
  float* hin = hbuf + 2 * H;           // [H]: the input part's vector
  float* part = hin + H;               // [NKS][G]: the GEMV's partial sums
  float* xpart = part + NKS * G;       // [NKS][G]: the input part's
  float* xp = xpart + NKS * G;         // [G]: the input part of the next step, bias included
  const int l = blockIdx.x / C, r = blockIdx.x % C, tid = threadIdx.x, col = tid % G, ks = tid / G;
  const float* staged = W_IN_REGS ? W_ih : W_hh;
  for (int idx = tid; idx < H * G; idx += NT) {
    const int k = idx / G, cc = idx % G;
    Ws[idx] = staged[((size_t)(l * 4 + cc / U) * H + k) * H + r * U + cc % U];
  }
#if W_IN_REGS
  float wr[KS];                        // W_hh[l][g][ks * KS + k][unit] for this thread's column and k slice
  for (int k = 0; k < KS; ++k) wr[k] = W_hh[((size_t)(l * 4 + col / U) * H + ks * KS + k) * H + r * U + col % U];
#endif
  for (int k = tid; k < H; k += NT) hbuf[H + k] = 0.f;     // h[-1] = 0, read by step 0 (buffer 1)
  float c = 0.f;                                          // (threads < U: unit r * U + tid's cell state)
  input_part(l, 0, W_ih, bias, x, hseq, hcount, epoch, err, Ws, hin, xpart, xp);
  // LOOKAHEAD: the input of step s is waited for and loaded over the two steps before the one that uses it, so that
  // neither round trip through L2 waits in line: thread 0 loads the counter of step s at step s - 3 (`seen`) and
  // checks it at step s - 2, when every thread loads its part of the input into registers (`ahead`), which go to
  // shared memory at step s - 1, for the GEMV of the input part of step s.
  float ahead[(H + NT - 1) / NT];
  unsigned seen = 0u;
  if (LOOKAHEAD && INPUT_PART && T > 1) {
    if (tid == 0) wait_input(l, 1, 0u, hcount, epoch, err);
    __syncthreads();
    for (int i = 0, k = tid; k < H; ++i, k += NT) ahead[i] = load_cg(input_row(l, 1, x, hseq) + k);
    if (tid == 0 && l > 0 && T > 2) seen = load_acquire(hcount + (l - 1) * T + 2);
  }
  step_arrive(gbar, l);                                   // every block of the cluster started (its smem exists)
  step_wait(gbar, l, epoch, 1, err);
  for (int t = 0; t < T; ++t) {
    STEP_STALL();
    if (!DSMEM && t > 0) {                                // h[t - 1] from the layer's buffer in global memory
      for (int k = tid; k < H; k += NT) hbuf[((t + 1) & 1) * H + k] = load_cg(hglob + (l * 2 + ((t + 1) & 1)) * H + k);
      __syncthreads();
    }
    const float* hprev = hbuf + ((t + 1) & 1) * H + ks * KS;
    float s = ks == 0 ? xp[col] : 0.f;
#if W_IN_REGS
#pragma unroll
    for (int k = 0; k < KS; ++k) s += hprev[k] * wr[k];
#else
    for (int k = 0; k < KS; ++k) s += hprev[k] * Ws[(ks * KS + k) * G + col];
#endif
    part[ks * G + col] = s;
    __syncthreads();
    if (tid < U) {
      float pre[4];
      for (int g = 0; g < 4; ++g) {
        float v = 0.f;
        for (int q = 0; q < NKS; ++q) v += part[q * G + g * U + tid];
        pre[g] = v;
      }
      c = sigm(pre[1]) * c + sigm(pre[0]) * tanhf(pre[2]);
      const float h = sigm(pre[3]) * tanhf(c);
      hseq[(l * T + t) * H + r * U + tid] = h;
#if DSMEM
      for (int q = 0; q < C; ++q) store_peer(hbuf + (t & 1) * H + r * U + tid, q, h);
#else
      hglob[(l * 2 + (t & 1)) * H + r * U + tid] = h;
#endif
    }
    step_arrive(gbar, l);              // (the step's h released; the next GEMV waits for every block's)
    __syncthreads();                   // this block's hseq stores, published by its thread 0 for the layer above
    if (tid == 0) { __threadfence(); atomicAdd(hcount + l * T + t, 1u); }
    if (t + 1 < T) {
      if (LOOKAHEAD && INPUT_PART) {
        for (int i = 0, k = tid; k < H; ++i, k += NT) hin[k] = ahead[i];
        __syncthreads();
        input_gemv(l, W_ih, bias, Ws, hin, xpart, xp);
        if (t + 2 < T) {
          if (tid == 0) wait_input(l, t + 2, seen, hcount, epoch, err);
          __syncthreads();
          for (int i = 0, k = tid; k < H; ++i, k += NT) ahead[i] = load_cg(input_row(l, t + 2, x, hseq) + k);
          if (tid == 0 && l > 0 && t + 3 < T) seen = load_acquire(hcount + (l - 1) * T + t + 3);
        }
      } else {
        input_part(l, t + 1, W_ih, bias, x, hseq, hcount, epoch, err, Ws, hin, xpart, xp);
      }
    }
    step_wait(gbar, l, epoch, t + 2, err);
  }
}
'''

# The cluster operations on the GPU (sm_90).
CUDA_HEAD = r'''
#define GDSL_DEV __device__ __forceinline__
#define SMEM smem_
#if CLUSTER_SYNC || DSMEM
#define CLUSTER_ATTR __cluster_dims__(C, 1, 1)
#else
#define CLUSTER_ATTR
#endif
#define KERNEL_HEAD(name) extern __shared__ float smem_[]; \
  extern "C" __global__ void CLUSTER_ATTR __launch_bounds__(NT, 1) name
GDSL_DEV unsigned load_acquire(unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
GDSL_DEV float load_cg(const float* p) { return __ldcg(p); }
GDSL_DEV float load_ro(const float* p) { return __ldg(p); }
GDSL_DEV void store_peer(float* local, int rank, float v) {
  unsigned remote, addr = (unsigned)__cvta_generic_to_shared(local);
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(addr), "r"(rank));
  asm volatile("st.shared::cluster.f32 [%0], %1;" :: "r"(remote), "f"(v) : "memory");
}
GDSL_DEV void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory"); }
#define STEP_STALL()
GDSL_DEV void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }
'''

# The same operations on the CPU: every CUDA thread a POSIX thread, a block's shared memory a heap block, the
# cluster barrier an arrival count per cluster that `wait` spins on.
EMU_HEAD = r'''
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
// Layer 0 slowed down, so that the layers above run ahead of it and a missing wait reads a step not written yet,
// and the first block of every other layer a little, so that a missing barrier among a layer's blocks shows too.
#define STEP_STALL() usleep(blockIdx.x < C ? 20000 : blockIdx.x % C == 0 ? 3000 : 0)
struct emu_dim3 { unsigned x, y, z; };
static __thread emu_dim3 threadIdx, blockIdx;
static __thread unsigned emu_phase;
static pthread_barrier_t* emu_bars;
static float** emu_smem;
static unsigned* emu_cluster_count;
#define GDSL_DEV static inline
#define SMEM emu_smem[blockIdx.x]
#define KERNEL_HEAD(name) static void name
static inline void __syncthreads() { pthread_barrier_wait(&emu_bars[blockIdx.x]); }
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline unsigned load_acquire(unsigned* p) { sched_yield(); return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline float load_cg(const float* p) { return *(const volatile float*)p; }
static inline float load_ro(const float* p) { return *p; }
static inline void store_peer(float* local, int rank, float v) {
  float* own = emu_smem[blockIdx.x];
  emu_smem[blockIdx.x / C * C + rank][local - own] = v;
}
static inline void cluster_arrive() {
  ++emu_phase;
  __atomic_fetch_add(&emu_cluster_count[blockIdx.x / C], 1u, __ATOMIC_SEQ_CST);
}
static inline void cluster_wait() {
  while (__atomic_load_n(&emu_cluster_count[blockIdx.x / C], __ATOMIC_SEQ_CST) < emu_phase * C * NT) sched_yield();
}
'''

EMU_MAIN = r'''
struct emu_args {
  int b, t;
  const float *W_ih, *W_hh, *bias, *x;
  float* hseq;
  unsigned *hcount, *err;
  float* hglob;
  unsigned* gbar;
};
static void* emu_thread(void* p) {
  emu_args* a = (emu_args*)p;
  threadIdx = {(unsigned)a->t, 0, 0};
  blockIdx = {(unsigned)a->b, 0, 0};
  emu_phase = 0;
  lstm_clusters(a->W_ih, a->W_hh, a->bias, a->x, a->hseq, a->hcount, 1u, a->err, a->hglob, a->gbar);
  return 0;
}
extern "C" void run(const float* W_ih, const float* W_hh, const float* bias, const float* x, float* hseq,
                    unsigned* hcount, unsigned* err, float* hglob, unsigned* gbar, int smem_bytes) {
  const int blocks = L * C;
  emu_bars = (pthread_barrier_t*)calloc(blocks, sizeof(pthread_barrier_t));
  emu_smem = (float**)calloc(blocks, sizeof(float*));
  emu_cluster_count = (unsigned*)calloc(L, sizeof(unsigned));
  emu_args* args = (emu_args*)calloc(blocks * NT, sizeof(emu_args));
  pthread_t* ids = (pthread_t*)calloc(blocks * NT, sizeof(pthread_t));
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 1 << 18);
  for (int b = 0; b < blocks; ++b) {
    pthread_barrier_init(&emu_bars[b], 0, NT);
    emu_smem[b] = (float*)calloc(smem_bytes / 4, 4);
  }
  for (int i = 0; i < blocks * NT; ++i) {
    args[i] = {i / NT, i % NT, W_ih, W_hh, bias, x, hseq, hcount, err, hglob, gbar};
    pthread_create(&ids[i], &attr, emu_thread, &args[i]);
  }
  for (int i = 0; i < blocks * NT; ++i) pthread_join(ids[i], 0);
  for (int b = 0; b < blocks; ++b) { pthread_barrier_destroy(&emu_bars[b]); free(emu_smem[b]); }
  free(emu_bars); free(emu_smem); free(emu_cluster_count); free(args); free(ids);
}
'''


@dataclass(frozen=True)
class Layout:
    """How the kernel keeps its weights, loads its input and syncs a layer's blocks."""
    in_regs: bool = False       # W_hh in registers and W_ih in shared memory, else W_hh in shared memory, W_ih from L2
    lookahead: bool = False     # the input part's vector waited for and loaded two steps ahead
    cluster_sync: bool = True   # the cluster barrier, else gdsl's atomic barrier of the layer's blocks (no clusters)
    dsmem: bool = True          # h stored into every block's shared memory, else through a buffer in global memory

    @property
    def name(self) -> str:
        return ", ".join(
            ["W_hh in registers, W_ih in shared memory" if self.in_regs else "W_hh in shared memory, W_ih from L2"] +
            ["input loaded two steps ahead"] * self.lookahead +
            [f"{'cluster' if self.cluster_sync else 'atomic'} barrier, h through "
             f"{'the cluster' + chr(39) + 's shared memory' if self.dsmem else 'global memory'}"])


# The layouts timed: the weights and the lookahead, then for the last one the h broadcast through global memory
# and the barrier without clusters (what the layout gives on a GPU without them).
LAYOUTS = (Layout(), Layout(in_regs=True), Layout(lookahead=True), Layout(in_regs=True, lookahead=True),
           Layout(in_regs=True, lookahead=True, dsmem=False),
           Layout(in_regs=True, lookahead=True, cluster_sync=False, dsmem=False))


def source(cfg: lstm.Config, cluster: int, threads: int, layout: Layout, input_part: bool = True,
           emulated: bool = False) -> str:
    L, H, T = cfg.layers, cfg.hidden, cfg.seq_len
    u = H // cluster
    if H % cluster or threads % (4 * u) or H % (threads // (4 * u)) or threads < u:
        raise ValueError(f"hidden {H}, cluster {cluster}, {threads} threads: need U = H / C whole, the threads a "
                         f"multiple of 4U and H a multiple of the k slices")
    if layout.dsmem and not layout.cluster_sync:
        raise ValueError("stores into the cluster's shared memory need the cluster barrier")
    switches = {"SPIN_LIMIT": SPIN_LIMIT, "INPUT_PART": input_part, "W_IN_REGS": layout.in_regs,
                "LOOKAHEAD": layout.lookahead, "CLUSTER_SYNC": layout.cluster_sync, "DSMEM": layout.dsmem}
    defines = f"#define L {L}\n#define H {H}\n#define T {T}\n#define C {cluster}\n#define NT {threads}\n" + "".join(
        f"#define {k} {int(v)}\n" for k, v in switches.items())
    return defines + (EMU_HEAD if emulated else CUDA_HEAD) + KERNEL + (EMU_MAIN if emulated else "")


def smem_bytes(cfg: lstm.Config, cluster: int, threads: int) -> int:
    H = cfg.hidden
    G = 4 * H // cluster
    return 4 * (H * G + 3 * H + 2 * (threads // G) * G + G)


def operands(cfg: lstm.Config, seed: int = 0):
    """The model's weights and input (models/lstm.py) as the kernel reads them: W_ih, W_hh [L][4][H][H], the two
    biases summed [L][4][H], x [T][H]."""
    w, inputs = lstm.init_weights(cfg, seed), lstm.make_inputs(cfg, 1, seed)
    return (np.ascontiguousarray(w["W_ih"]), np.ascontiguousarray(w["W_hh"]),
            np.ascontiguousarray(w["b_ih"] + w["b_hh"]), np.ascontiguousarray(inputs["x"][:, 0])), w, inputs


def reference_hseq(W_ih, W_hh, bias, x) -> np.ndarray:
    """h of every layer and step [L][T][H], in float64."""
    L, _, H, _ = W_ih.shape
    T = x.shape[0]
    out = np.zeros((L, T, H))
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    for l in range(L):
        h, c = np.zeros(H), np.zeros(H)
        for t in range(T):
            inp = x[t].astype(np.float64) if l == 0 else out[l - 1, t]
            pre = [inp @ W_ih[l, g] + h @ W_hh[l, g] + bias[l, g] for g in range(4)]
            c = sig(pre[1]) * c + sig(pre[0]) * np.tanh(pre[2])
            h = sig(pre[3]) * np.tanh(c)
            out[l, t] = h
    return out


def emulate(cfg: lstm.Config, cluster: int, threads: int, layout: Layout) -> tuple[np.ndarray, int]:
    """(hseq, timeouts) of the kernel run on the CPU emulator."""
    from gdsl.backends.cfamily import emulator
    ops, _, _ = operands(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = os.path.join(tmp, "k.cpp"), os.path.join(tmp, "k.so")
        with open(src, "w") as f:
            f.write(source(cfg, cluster, threads, layout, emulated=True))
        subprocess.run([emulator.cxx(), "-O1", "-std=c++20", "-shared", "-fPIC", "-pthread", src, "-o", lib],
                       check=True)
        run = ctypes.CDLL(lib).run
        hseq = np.zeros((cfg.layers, cfg.seq_len, cfg.hidden), np.float32)
        hcount = np.zeros(cfg.layers * cfg.seq_len, np.uint32)
        err = np.zeros(1, np.uint32)
        hglob, gbar = np.zeros((cfg.layers, 2, cfg.hidden), np.float32), np.zeros(cfg.layers, np.uint32)
        ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
        run(*[ptr(a) for a in (*ops, hseq, hcount, err, hglob, gbar)], ctypes.c_int(smem_bytes(cfg, cluster, threads)))
    return hseq, int(err[0])


def max_active_clusters(fn, grid: int, threads: int, smem: int) -> int | None:
    """cuOccupancyMaxActiveClusters for `fn` (its cluster size compiled in), None where the driver call fails."""
    class LaunchConfig(ctypes.Structure):
        _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                    ("stream", ctypes.c_void_p), ("attrs", ctypes.c_void_p), ("n_attrs", ctypes.c_uint)]
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        config = LaunchConfig((grid, 1, 1), (threads, 1, 1), smem, None, None, 0)
        count = ctypes.c_int(0)
        function = ctypes.c_void_p(fn.kernel.ptr)          # (the RawKernel's CUfunction)
        status = driver.cuOccupancyMaxActiveClusters(ctypes.byref(count), function, ctypes.byref(config))
        return count.value if status == 0 else None
    except (OSError, AttributeError):
        return None


def events_ms(call, launches: int) -> float:
    """Median over `launches` of CUDA events around one call, in ms (after three warm-up calls)."""
    import cupy as cp
    for _ in range(3):
        call()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(launches):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        call()
        e1.record()
        e1.synchronize()
        times.append(cp.cuda.get_elapsed_time(e0, e1))
    return statistics.median(times)


def run_gpu(cfg: lstm.Config, cluster: int, threads: int, launches: int, layout: Layout, input_part: bool) -> dict:
    import cupy as cp
    ops, _, _ = operands(cfg)
    L, T, H = cfg.layers, cfg.seq_len, cfg.hidden
    module = cp.RawModule(code=source(cfg, cluster, threads, layout, input_part), options=("-std=c++17",))
    fn = module.get_function("lstm_clusters")
    smem = smem_bytes(cfg, cluster, threads)
    fn.max_dynamic_shared_size_bytes = smem
    clustered = layout.cluster_sync or layout.dsmem
    if clustered and cluster > 8:
        driver = ctypes.CDLL("libcuda.so.1")
        driver.cuFuncSetAttribute(ctypes.c_void_p(fn.kernel.ptr), NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1)
    grid = L * cluster
    row = {"cluster": cluster, "threads": threads, "grid": grid, "smem_bytes": smem, "input_part": input_part,
           "layout": layout.name, "registers": fn.num_regs,
           "max_active_clusters": max_active_clusters(fn, grid, threads, smem) if clustered else None}
    if row["max_active_clusters"] is not None and row["max_active_clusters"] < L:
        row["skipped"] = f"only {row['max_active_clusters']} clusters fit at once, {L} needed"
        return row
    d_ops = [cp.asarray(a) for a in ops]
    hseq = cp.zeros((L, T, H), cp.float32)
    hcount = cp.zeros(L * T, cp.uint32)
    err = cp.zeros(1, cp.uint32)
    hglob, gbar = cp.zeros((L, 2, H), cp.float32), cp.zeros(L, cp.uint32)
    epoch = [0]

    def call():
        epoch[0] += 1
        fn((grid,), (threads,), (*d_ops, hseq, hcount, np.uint32(epoch[0]), err, hglob, gbar), shared_mem=smem)

    call()
    cp.cuda.Device().synchronize()
    row["timeouts"] = int(err[0])
    if row["timeouts"]:
        row["skipped"] = "a wait timed out (blocks not co-resident?)"
        return row
    if input_part:
        expected = reference_hseq(*ops)
        row["max_abs_err"] = float(np.max(np.abs(cp.asnumpy(hseq) - expected)))
    row["ms"] = events_ms(call, launches)
    row["timeouts"] = int(err[0])
    return row


def run_gdsl(cfg: lstm.Config, launches: int) -> dict:
    import cupy as cp
    _, weights, inputs = operands(cfg)
    f = lstm.make_forward(cfg, backend="cuda")
    d_w = {k: cp.asarray(v) for k, v in weights.items()}
    d_in = {k: cp.asarray(v) for k, v in inputs.items()}
    got = common.to_numpy(f(d_w, d_in))
    err = float(np.max(np.abs(got - lstm.reference(weights, inputs, cfg))))
    return {"system": "gdsl (models/lstm.py, default options)", "max_abs_err": err,
            "ms": events_ms(lambda: f(d_w, d_in), launches)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clusters", default="8,16", help="blocks per layer's cluster (H / C units a block)")
    ap.add_argument("--threads", type=int, default=256)
    ap.add_argument("--launches", type=int, default=30)
    ap.add_argument("--no-gdsl", action="store_true", help="do not time gdsl's own kernel of the model")
    ap.add_argument("--emulate", action="store_true", help="run a small configuration on the CPU emulator")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.emulate:
        failures = 0
        for cfg, cluster, threads in ((lstm.Config(seq_len=5, layers=3, hidden=32), 2, 128),
                                      (lstm.Config(seq_len=4, layers=2, hidden=32), 4, 64)):
            for layout in LAYOUTS:
                hseq, timeouts = emulate(cfg, cluster, threads, layout)
                err = float(np.max(np.abs(hseq - reference_hseq(*operands(cfg)[0]))))
                print(f"emulated {cfg.layers} layers x {cfg.seq_len} steps, hidden {cfg.hidden}, "
                      f"clusters of {cluster}, {threads} threads, {layout.name}: "
                      f"max abs error {err:.2e}, {timeouts} timeouts")
                failures += err > 1e-4 or timeouts > 0
        return int(failures > 0)
    import cupy as cp
    cfg = lstm.Config()
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    card = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    rows = []
    for cluster in map(int, args.clusters.split(",")):
        runs = [(layout, True) for layout in LAYOUTS] + [(Layout(in_regs=r), False) for r in (False, True)]
        for layout, input_part in runs:
            row = run_gpu(cfg, cluster, args.threads, args.launches, layout, input_part)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if not args.no_gdsl:
        rows.append(run_gdsl(cfg, args.launches))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "config": vars(cfg), "launches": args.launches, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
