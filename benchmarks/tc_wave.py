"""One wave of the batch-64 recurrent GEMMs on the tensor cores at float32 accuracy, with the staging pipelined: what
such a tile would give before the compiler gets one (issue 11's batch-64 rows).

    python benchmarks/tc_wave.py [--batch 76] [--m 64] [--k 256] [--n 256] [--runs 30] [--json F]
    python benchmarks/tc_wave.py --emulate     # the kernels on the CPU (g++, a thread per CUDA thread)

Why: LSTM, NASRNN and Seq2seq at batch 64 spend most of a step in [64, 256] @ [256, n] GEMM tiles that run at a third
to a half of the SM's FFMA rate; session 8 found that a 3xTF32 tensor-core tile staged like the FFMA tile (one
shared buffer, two block barriers a k stage) was no faster, both tiles waiting on their staging, and named the
next thing to try: a tile whose arithmetic is short (the tensor cores) fed by a staging that keeps several stages
in flight, together (docs/performance.md, "Tensor cores at batch 64, tried again"). This is that tile, by hand:

- one CTA per TM x TN output tile of one GEMM of the batch; S stages of BK k in shared memory, filled with 16-byte
  `cp.async` copies S - 1 stages ahead (`commit_group` / `wait_group`), one block barrier a stage;
- warps on a WR x WC grid, each MF x NF fragments of `mma.sync.m16n8k8` (TF32 in, float32 accumulate); rows padded
  so that a warp's fragment loads hit 32 banks (A row-major with pitch BK + 4, B with pitch TN + 8);
- each fragment element split as it is loaded into hi = tf32(x) and lo = tf32(x - hi); the product accumulated as
  lo_a hi_b + hi_a lo_b + hi_a hi_b (TERMS 3, "3xTF32": float32's accuracy) issued term by term over all of a
  warp's fragments (no three dependent mma in a row); TERMS 1 (hi_a hi_b: TF32's accuracy) for comparison only.

Timed in the same process (CUDA events, median of --runs, after warm-up): every tile variant, gdsl's own matmul of
the same batch (grids 264 and 132, as benchmarks/gemm_wave.py) on its FFMA wide tile and with gemm.TC_PIPELINE (the
compiler's copy of this tile) and, where PyTorch is there, torch.bmm with TF32 off and on. Every result is checked
against float64 (max abs error printed). Needs a GPU (sm_80 or later) and CuPy; `--emulate` needs g++ only.
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
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import gdsl.backends.cuda  # noqa: E402  (after the path)
from gdsl.backends.cfamily import emulator  # noqa: E402

# (TM, TN, BK, S, WR, WC, TERMS) of the variants timed on the GPU.
VARIANTS = (
    (64, 64, 32, 2, 2, 2, 3), (64, 64, 32, 3, 2, 2, 3), (64, 64, 32, 4, 2, 2, 3), (64, 64, 16, 4, 2, 2, 3),
    (64, 64, 32, 3, 2, 4, 3), (64, 128, 32, 3, 2, 4, 3), (64, 128, 32, 3, 2, 2, 3), (32, 64, 32, 3, 1, 4, 3),
    (64, 64, 32, 3, 2, 2, 1), (64, 128, 32, 3, 2, 4, 1),
)

KERNEL = r'''
template <int TM, int TN, int BK, int S, int WR, int WC, int TERMS>
KERNEL_HEAD(TM, TN, BK, S, WR, WC, TERMS)(const float* A, const float* B, float* C, int M, int N, int K) {
  constexpr int NT = WR * WC * 32, PA = BK + 4, PB = TN + 8;       // threads; A's and B's row pitch in shared memory
  constexpr int MF = TM / (16 * WR), NF = TN / (8 * WC);           // a warp's fragments
  static_assert(MF * 16 * WR == TM && NF * 8 * WC == TN && BK % 8 == 0, "tile shape");
  float* As = SMEM;                                                // [S][TM][PA]
  float* Bs = As + S * TM * PA;                                    // [S][BK][PB]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t4 = lane % 4;
  const int wm = warp / WC * MF * 16, wn = warp % WC * NF * 8;
  const int tiles_m = M / TM, tiles_n = N / TN, tile = blockIdx.x % (tiles_m * tiles_n);
  const int bt = blockIdx.x / (tiles_m * tiles_n), row0 = tile / tiles_n * TM, col0 = tile % tiles_n * TN;
  const float* Ab = A + (size_t)bt * M * K + (size_t)row0 * K;
  const float* Bb = B + (size_t)bt * K * N + col0;
  auto load_stage = [&](int slot, int k0) {
    for (int q = tid; q < TM * BK / 4; q += NT) {
      const int m = q / (BK / 4), kq = q % (BK / 4) * 4;
      gdsl_copy16(As + slot * TM * PA + m * PA + kq, Ab + (size_t)m * K + k0 + kq);
    }
    for (int q = tid; q < BK * TN / 4; q += NT) {
      const int kk = q / (TN / 4), nq = q % (TN / 4) * 4;
      gdsl_copy16(Bs + slot * BK * PB + kk * PB + nq, Bb + (size_t)(k0 + kk) * N + nq);
    }
  };
  float acc[MF][NF][4];
#pragma unroll
  for (int i = 0; i < MF; ++i)
#pragma unroll
    for (int j = 0; j < NF; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  const int KT = K / BK;
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < KT) load_stage(s, s * BK);
    gdsl_copy_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    gdsl_copy_wait<S - 2>();                  // stage kt is in shared memory (this thread's copies) ...
    __syncthreads();                     // ... every thread's; and every warp is done with the slot refilled next
    if (kt + S - 1 < KT) load_stage((kt + S - 1) % S, (kt + S - 1) * BK);
    gdsl_copy_commit();
    const float* as = As + (kt % S) * TM * PA + wm * PA;
    const float* bs = Bs + (kt % S) * BK * PB + wn;
#pragma unroll
    for (int k8 = 0; k8 < BK; k8 += 8) {
      unsigned ahi[MF][4], alo[MF][4], bhi[NF][2], blo[NF][2];
#pragma unroll
      for (int i = 0; i < MF; ++i) {
        const float* a = as + (i * 16 + g) * PA + k8 + t4;
        const float x[4] = {a[0], a[8 * PA], a[4], a[8 * PA + 4]};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          ahi[i][e] = gdsl_tf32(x[e]);
          alo[i][e] = gdsl_tf32(x[e] - GDSL_U2F(ahi[i][e]));
        }
      }
#pragma unroll
      for (int j = 0; j < NF; ++j) {
        const float* b = bs + (k8 + t4) * PB + j * 8 + g;
        const float y[2] = {b[0], b[4 * PB]};
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          bhi[j][e] = gdsl_tf32(y[e]);
          blo[j][e] = gdsl_tf32(y[e] - GDSL_U2F(bhi[j][e]));
        }
      }
      if (TERMS == 3) {
#pragma unroll
        for (int i = 0; i < MF; ++i)
#pragma unroll
          for (int j = 0; j < NF; ++j) gdsl_mma_tf32(acc[i][j], alo[i], bhi[j]);
#pragma unroll
        for (int i = 0; i < MF; ++i)
#pragma unroll
          for (int j = 0; j < NF; ++j) gdsl_mma_tf32(acc[i][j], ahi[i], blo[j]);
      }
#pragma unroll
      for (int i = 0; i < MF; ++i)
#pragma unroll
        for (int j = 0; j < NF; ++j) gdsl_mma_tf32(acc[i][j], ahi[i], bhi[j]);
    }
  }
  float* Cb = C + (size_t)bt * M * N;
#pragma unroll
  for (int i = 0; i < MF; ++i)
#pragma unroll
    for (int j = 0; j < NF; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        Cb[(size_t)(row0 + wm + i * 16 + g + e / 2 * 8) * N + col0 + wn + j * 8 + 2 * t4 + e % 2] = acc[i][j][e];
}
'''

LIBRARY = Path(gdsl.backends.cuda.__file__).with_name("tensor_core_ops.h").read_text()
CUDA_HEAD = r'''
#define GDSL_DEV __device__ __forceinline__
#define GDSL_U2F(u) __uint_as_float(u)
#define KERNEL_HEAD(TM, TN, BK, S, WR, WC, TERMS) __global__ void __launch_bounds__(WR * WC * 32) tc_gemm
#define SMEM smem_
extern __shared__ float smem_[];
''' + LIBRARY

# On the CPU: the emulator's header (gdsl/backends/cfamily/emu.h) with its tensor-core instructions (GDSL_EMU_TC:
# mma.sync from every lane's fragments, cp.async a plain copy), the kernel a function its launcher runs.
EMU_HEAD = "#define GDSL_EMU_TC\n" + (Path(emulator.__file__).with_name("emu.h")).read_text() + r'''
#define KERNEL_HEAD(TM, TN, BK, S, WR, WC, TERMS) static void tc_gemm
#define SMEM ((float*)gdsl_emu_cur->smem)
'''

EMU_MAIN = r'''
static void emu_body(void** a) {
  tc_gemm<TM_, TN_, BK_, S_, WR_, WC_, TERMS_>((const float*)a[0], (const float*)a[1], (float*)a[2], *(int*)a[3],
                                               *(int*)a[4], *(int*)a[5]);
}
extern "C" void run(const float* A, const float* B, float* C, int batch, int M, int N, int K, int smem_bytes) {
  void* args[6] = {(void*)A, (void*)B, (void*)C, &M, &N, &K};
  gdsl_emu_launch(batch * (M / TM_) * (N / TN_), WR_ * WC_ * 32, smem_bytes, emu_body, args);
}
'''


def name(v) -> str:
    TM, TN, BK, S, WR, WC, TERMS = v
    return f"tc{TERMS} {TM}x{TN} k{BK} s{S} warps {WR}x{WC}"


def instantiated_source() -> str:
    """The CUDA source with every variant instantiated (what NVRTC compiles in the tests; the GPU run names them
    through CuPy's name expressions instead)."""
    return CUDA_HEAD + KERNEL + "".join(f"template __global__ void tc_gemm<{', '.join(map(str, v))}>"
                                        "(const float*, const float*, float*, int, int, int);\n" for v in VARIANTS)


def smem_bytes(v) -> int:
    TM, TN, BK, S, *_ = v
    return 4 * S * (TM * (BK + 4) + BK * (TN + 8))


def emulate(v, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A @ B for the batch (a [batch, M, K], b [batch, K, N]) by variant `v` on the CPU emulator."""
    TM, TN, BK, S, WR, WC, TERMS = v
    batch, M, K = a.shape
    N = b.shape[2]
    defines = "".join(f"#define {k}_ {val}\n" for k, val in zip(("TM", "TN", "BK", "S", "WR", "WC", "TERMS"), v))
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = os.path.join(tmp, "k.cpp"), os.path.join(tmp, "k.so")
        with open(src, "w") as f:
            f.write(defines + EMU_HEAD + KERNEL + EMU_MAIN)
        subprocess.run([emulator.cxx(), "-O1", "-std=c++20", "-shared", "-fPIC", "-pthread", src, "-o", lib],
                       check=True)
        c = np.zeros((batch, M, N), np.float32)
        ptr = lambda x: x.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
        ctypes.CDLL(lib).run(ptr(a), ptr(b), ptr(c), batch, M, N, K, ctypes.c_int(smem_bytes(v)))
    return c


def operands(batch: int, m: int, k: int, n: int, seed: int = 0):
    """Random A [batch, m, k] ~ N(0, 1) (a batch of hidden states) and B [batch, k, n] ~ N(0, 1/k) (weights)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((batch, m, k)).astype(np.float32)
    b = (rng.standard_normal((batch, k, n)) / np.sqrt(k)).astype(np.float32)
    return a, b


def timed_ms(call, runs: int) -> float:
    """Median over `runs` of CUDA events around 20 calls back to back, per call (after 10 warm-up calls)."""
    import cupy as cp
    for _ in range(10):
        call()
    times = []
    for _ in range(runs):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        for _ in range(20):
            call()
        e1.record()
        e1.synchronize()
        times.append(cp.cuda.get_elapsed_time(e0, e1) / 20)
    return statistics.median(times)


def gpu_rows(a, b, runs: int) -> list[dict]:
    import cupy as cp
    batch, M, K = a.shape
    N = b.shape[2]
    ref = a.astype(np.float64) @ b.astype(np.float64)
    flops = 2.0 * batch * M * N * K
    da, db = cp.asarray(a), cp.asarray(b)
    rows = []

    def row(system, ms, out):
        r = {"system": system, "ms": ms, "tflops": flops / ms / 1e9,
             "max_abs_err": float(np.max(np.abs(cp.asnumpy(out).astype(np.float64) - ref)))}
        rows.append(r)
        print(json.dumps(r), flush=True)

    names = [f"tc_gemm<{', '.join(map(str, v))}>" for v in VARIANTS]
    module = cp.RawModule(code=CUDA_HEAD + KERNEL, options=("-std=c++17",), name_expressions=names)
    for v, expr in zip(VARIANTS, names):
        TM, TN, _, _, WR, WC, _ = v
        if M % TM or N % TN:
            continue
        fn = module.get_function(expr)
        smem = smem_bytes(v)
        fn.max_dynamic_shared_size_bytes = smem
        dc = cp.zeros((batch, M, N), cp.float32)
        grid = batch * (M // TM) * (N // TN)
        call = lambda fn=fn, grid=grid, WR=WR, WC=WC, smem=smem, dc=dc: fn(  # noqa: E731
            (grid,), (WR * WC * 32,), (da, db, dc, np.int32(M), np.int32(N), np.int32(K)), shared_mem=smem)
        row(name(v), timed_ms(call, runs), (call(), dc)[1])
    import gdsl
    import gdsl.numpy as gnp
    from gdsl.backends.cfamily import gemm
    for pipelined in (False, True):       # (gemm.TC_PIPELINE: the compiler's own copy of this tile)
        gemm.TC_PIPELINE = pipelined
        tile = "tensor-core tile, TC_PIPELINE" if pipelined else "FFMA wide tile"
        for grid in (264, 132):
            fn = gdsl.jit(lambda x, y: gnp.matmul(x, y), backend="cuda", grid=grid)
            row(f"gdsl matmul, grid {grid} ({tile})", timed_ms(lambda fn=fn: fn(da, db), runs), fn(da, db))
    gemm.TC_PIPELINE = False
    try:
        import torch
    except ImportError:
        return rows
    ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        ms = timed_ms(lambda: torch.bmm(ta, tb), runs)
        row(f"torch.bmm (cuBLAS), TF32 {'on' if tf32 else 'off'}", ms, cp.asarray(torch.bmm(ta, tb)))
    torch.backends.cuda.matmul.allow_tf32 = False
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=76)
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--emulate", action="store_true", help="check every variant's kernel on the CPU emulator")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.emulate:
        a, b = operands(2, 64, 64, 128)
        ref = a.astype(np.float64) @ b.astype(np.float64)
        failures = 0
        for v in VARIANTS:
            err = float(np.max(np.abs(emulate(v, a, b) - ref)))
            bound = 1e-4 if v[-1] == 3 else 5e-2          # float32's accuracy; TF32's (10 mantissa bits)
            print(f"emulated {name(v)}: max abs error {err:.2e} (bound {bound:.0e})")
            failures += not err <= bound
        return int(failures > 0)
    import cupy as cp
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    card = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    a, b = operands(args.batch, args.m, args.k, args.n)
    rows = gpu_rows(a, b, args.runs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "shape": [args.batch, args.m, args.k, args.n], "runs": args.runs,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
