// ---------------------------------------------------------------------------------------- tensor-core GEMM tiles
// Output tiles of C = A B (float32) on the tensor cores, at float32 accuracy ("3xTF32"): each operand x is split
// into hi = tf32(x) and lo = tf32(x - hi), and A B is accumulated in float32 as lo_a hi_b + hi_a lo_b + hi_a hi_b
// (the lo_a lo_b term lies below float32's rounding), with mma.sync.m16n8k8 (TF32 in, float32 out). Fragment
// layouts (PTX ISA, g = lane / 4, t4 = lane % 4): A's registers (row g, k t4), (g + 8, t4), (g, t4 + 4),
// (g + 8, t4 + 4); B's (k t4, column g), (t4 + 4, g); C's (g, 2 t4), (g, 2 t4 + 1), (g + 8, 2 t4), (g + 8, 2 t4 + 1).
//
// The instructions (gdsl_tf32, gdsl_mma_tf32, gdsl_copy16 and its groups) are cuda/tensor_core_ops.h's, which the
// CUDA dialect puts before this file; the CPU emulator defines the same functions itself (cfamily/emu.h with
// GDSL_EMU_TC), so that the tiles' indexing runs in the tests.

// A thread's elements of an A fragment, `a` at its (row g, k t4) and the rows 8 further and the k 4 further at
// `row8` and `k4` elements from it, each split into its TF32 halves (hi, lo); likewise its two elements of a B
// fragment, `b` at (k t4, column g) and k 4 further at `k4`.
GDSL_DEV void gdsl_split_a(const float* a, int row8, int k4, unsigned* hi, unsigned* lo) {
  const float x[4] = {a[0], a[row8], a[k4], a[row8 + k4]};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    hi[e] = gdsl_tf32(x[e]);
    lo[e] = gdsl_tf32(x[e] - GDSL_U2F(hi[e]));
  }
}
// (`rows`: how many rows from b's on exist, where the tile's depth ends inside a stage read in place; 0 past them.)
GDSL_DEV void gdsl_split_b(const float* b, int k4, unsigned* hi, unsigned* lo, int rows = 8) {
  const float y[2] = {rows > 0 ? b[0] : 0.f, rows > 4 ? b[k4] : 0.f};
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    hi[e] = gdsl_tf32(y[e]);
    lo[e] = gdsl_tf32(y[e] - GDSL_U2F(hi[e]));
  }
}

// A warp's MF x NF accumulator fragments (C's layout) stored through sc, the warp's tile at (row, col) of the
// output, elements past M or N dropped.
template <int MF, int NF, class SC>
GDSL_DEV void gdsl_store_fragments(const float (&acc)[MF][NF][4], int row, int col, int M, int N, SC sc) {
  const int g = threadIdx.x % 32 / 4, t4 = threadIdx.x % 4;
#pragma unroll
  for (int i = 0; i < MF; ++i)
#pragma unroll
    for (int j = 0; j < NF; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int gm = row + i * 16 + g + e / 2 * 8, gn = col + j * 8 + 2 * t4 + e % 2;
        if (gm < M && gn < N) sc(gm, gn, acc[i][j][e]);
      }
}

// One TM x TN tile, staged like the FFMA tile (gdsl_gemm_stages: the loaders into shared memory BK deep); rows are
// padded by 8 elements so that the fragment loads of a warp (4 k rows x 8 columns) hit 32 different banks.
// Warps tile the output WR x WC, each MF x NF fragments; with more warps than that (a small tile) the
// KS = warps / (WR * WC) groups of warps split each stage's k and add their partial sums in shared memory at the
// end. Without tensor cores (before sm_80) the FFMA tile computes it (RM x RN).
template <int TM, int TN, int BK, int NT, int WR, int WC, int RM, int RN, bool AK, bool BKC, class LA, class LB,
          class SC>
GDSL_DEV void gdsl_gemm_tile_tc(int M, int N, int K, int row0, int col0, LA la, LB lb, SC sc, char* smem) {
#ifdef GDSL_TC
  constexpr int NW = NT / 32, WF = WR * WC, KS = NW / WF, MF = TM / 16 / WR, NF = TN / 8 / WC;
  constexpr int PA = TM + 8, PB = TN + 8;
  static_assert(MF * WR * 16 == TM && NF * WC * 8 == TN && KS * WF == NW && BK % (8 * KS) == 0, "tile shape");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t4 = lane % 4;
  const int kg = warp / WF, r0 = (warp % WF) / WC * MF * 16, c0 = (warp % WF) % WC * NF * 8;
  float acc[MF][NF][4] = {};
  gdsl_gemm_stages<TM, TN, BK, NT, PA, PB, AK, BKC, float>(M, N, K, row0, col0, la, lb, smem,
                                                            [&](const float* As, const float* Bs) {
#pragma unroll
    for (int k8 = kg * 8; k8 < BK; k8 += 8 * KS) {
      unsigned ahi[MF][4], alo[MF][4], bhi[NF][2], blo[NF][2];
#pragma unroll
      for (int i = 0; i < MF; ++i)
        gdsl_split_a(As + (k8 + t4) * PA + r0 + i * 16 + g, 8, 4 * PA, ahi[i], alo[i]);   // (A k-major)
#pragma unroll
      for (int j = 0; j < NF; ++j)
        gdsl_split_b(Bs + (k8 + t4) * PB + c0 + j * 8 + g, 4 * PB, bhi[j], blo[j]);
#pragma unroll
      for (int i = 0; i < MF; ++i)
#pragma unroll
        for (int j = 0; j < NF; ++j) {
          gdsl_mma_tf32(acc[i][j], alo[i], bhi[j]);
          gdsl_mma_tf32(acc[i][j], ahi[i], blo[j]);
          gdsl_mma_tf32(acc[i][j], ahi[i], bhi[j]);
        }
    }
  });
  if (KS > 1) {       // the k groups' partial sums meet in shared memory (the stages are done with it)
    float* red = (float*)smem;
    const int slot = ((warp % WF) * 32 + lane) * MF * NF * 4;
    if (kg > 0) {
#pragma unroll
      for (int i = 0; i < MF; ++i)
#pragma unroll
        for (int j = 0; j < NF; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) red[(kg - 1) * TM * TN + slot + (i * NF + j) * 4 + e] = acc[i][j][e];
    }
    __syncthreads();
    if (kg == 0) {
#pragma unroll
      for (int s = 0; s < KS - 1; ++s)
#pragma unroll
        for (int i = 0; i < MF; ++i)
#pragma unroll
          for (int j = 0; j < NF; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] += red[s * TM * TN + slot + (i * NF + j) * 4 + e];
    }
    __syncthreads();
  }
  if (kg == 0) gdsl_store_fragments<MF, NF>(acc, row0 + r0, col0 + c0, M, N, sc);
#else
  gdsl_gemm_tile<TM, TN, BK, NT, RM, RN, AK, BKC, float>(M, N, K, row0, col0, la, lb, sc, smem);
#endif
}


// One TM x TN tile fed by a pipeline of S shared-memory stages of BK k (TC_PIPELINE in gemm.py): the stages are
// filled S - 1 ahead with 16-byte cp.async copies (A from pa, rows along k; B from pb, rows along n), so a stage's
// copies are in flight while the warps compute on earlier ones, and a stage costs one block barrier. Where the
// tile is not whole (rows past M, columns past N, K not whole stages) or an operand's rows are not 16-byte aligned,
// the loaders la / lb fill the stages instead (plain loads, zeros outside). BRES: B is the tile's resident rows at
// `rbs` (K x TN, RP apart), read in place, no row past K (of a depth of no whole stages, the last stage's rows
// past K read as zeros). A's stage rows are padded to BK + 4 and B's to TN + 8, so a warp's fragment loads hit 32
// banks (resident rows are too where RP = TN + 8: gemm.TC_RESIDENT_PAD). Each of the WR x WC warps computes
// MF x NF fragments, splitting each element into its TF32 halves as it loads it, and issues the three products
// term by term over all of its fragments (no three dependent mma in a row). (Before sm_80, a plain loop.)
template <int TM, int TN, int BK, int S, int NT, int WR, int WC, bool BRES, int RP, class LA, class LB, class PA_,
          class PB_, class SC>
GDSL_DEV void gdsl_gemm_tile_tcp(int M, int N, int K, int row0, int col0, LA la, LB lb, PA_ pa, PB_ pb, SC sc,
                                 const float* rbs, char* smem) {
#ifdef GDSL_TC
  constexpr int PA = BK + 4, PB = BRES ? RP : TN + 8, MF = TM / (16 * WR), NF = TN / (8 * WC);
  static_assert(MF * 16 * WR == TM && NF * 8 * WC == TN && WR * WC * 32 == NT && BK % 8 == 0 && S >= 2,
                "pipelined tensor-core tile shape");
  float* As = (float*)smem;                       // [S][TM][PA]
  float* Bs = As + S * TM * PA;                   // [S][BK][PB] (none with BRES)
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t4 = lane % 4;
  const int wm = warp / WC * MF * 16, wn = warp % WC * NF * 8, KT = (K + BK - 1) / BK;
  const bool vec = row0 + TM <= M && (BRES || col0 + TN <= N) && K % BK == 0 &&
                   ((unsigned long long)pa(row0, 0) | (unsigned long long)pa(row0 + 1, 0) |
                    (BRES ? 0ULL : (unsigned long long)pb(0, col0) | (unsigned long long)pb(1, col0))) % 16 == 0;
  auto fill = [&](int slot, int k0) {
    float* as = As + slot * TM * PA;
    float* bs = Bs + slot * BK * PB;
    if (vec) {
      for (int q = tid; q < TM * BK / 4; q += NT) {
        const int m = q / (BK / 4), kq = q % (BK / 4) * 4;
        gdsl_copy16(as + m * PA + kq, pa(row0 + m, k0 + kq));
      }
      if constexpr (!BRES) {
        for (int q = tid; q < BK * TN / 4; q += NT) {
          const int kk = q / (TN / 4), nq = q % (TN / 4) * 4;
          gdsl_copy16(bs + kk * PB + nq, pb(k0 + kk, col0 + nq));
        }
      }
      return;
    }
    for (int e = tid; e < TM * BK; e += NT) {
      const int m = e / BK, kk = e % BK;
      as[m * PA + kk] = row0 + m < M && k0 + kk < K ? la(row0 + m, k0 + kk) : 0.f;
    }
    if constexpr (!BRES) {
      for (int e = tid; e < BK * TN; e += NT) {
        const int kk = e / TN, n = e % TN;
        bs[kk * PB + n] = col0 + n < N && k0 + kk < K ? lb(k0 + kk, col0 + n) : 0.f;
      }
    }
  };
  float acc[MF][NF][4] = {};
  __syncthreads();                     // (the vEU's previous uTask may still read this shared memory)
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < KT) fill(s, s * BK);
    gdsl_copy_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    gdsl_copy_wait<S - 2>();           // stage kt's copies by this thread have landed ...
    __syncthreads();                   // ... and every thread's; every warp is done with the slot filled next
    if (kt + S - 1 < KT) fill((kt + S - 1) % S, (kt + S - 1) * BK);
    gdsl_copy_commit();
    const float* as = As + kt % S * TM * PA + wm * PA;
    const float* bs = (BRES ? rbs + kt * BK * RP : Bs + kt % S * BK * PB) + wn;
#pragma unroll
    for (int k8 = 0; k8 < BK; k8 += 8) {
      unsigned ahi[MF][4], alo[MF][4], bhi[NF][2], blo[NF][2];
#pragma unroll
      for (int i = 0; i < MF; ++i)
        gdsl_split_a(as + (i * 16 + g) * PA + k8 + t4, 8 * PA, 4, ahi[i], alo[i]);        // (A row-major)
#pragma unroll
      for (int j = 0; j < NF; ++j)      // (B read in place has K rows only: none past them is read)
        gdsl_split_b(bs + (k8 + t4) * PB + j * 8 + g, 4 * PB, bhi[j], blo[j], BRES ? K - kt * BK - k8 - t4 : 8);
#pragma unroll
      for (int i = 0; i < MF; ++i)
#pragma unroll
        for (int j = 0; j < NF; ++j) gdsl_mma_tf32(acc[i][j], alo[i], bhi[j]);
#pragma unroll
      for (int i = 0; i < MF; ++i)
#pragma unroll
        for (int j = 0; j < NF; ++j) gdsl_mma_tf32(acc[i][j], ahi[i], blo[j]);
#pragma unroll
      for (int i = 0; i < MF; ++i)
#pragma unroll
        for (int j = 0; j < NF; ++j) gdsl_mma_tf32(acc[i][j], ahi[i], bhi[j]);
    }
  }
  gdsl_copy_wait<0>();                 // (only empty groups are left; no copy lands after the tile)
  __syncthreads();                     // every warp is done with the stages before the next uTask's writes
  gdsl_store_fragments<MF, NF>(acc, row0 + wm, col0 + wn, M, N, sc);
#else     // (no tensor cores: each thread sums its outputs over all of k, plainly)
  for (int e = threadIdx.x; e < TM * TN; e += NT) {
    const int gm = row0 + e / TN, gn = col0 + e % TN;
    if (gm >= M || gn >= N) continue;
    float v = 0.f;
    for (int k = 0; k < K; ++k) v += la(gm, k) * (BRES ? rbs[k * RP + gn - col0] : lb(k, gn));
    sc(gm, gn, v);
  }
#endif
}
