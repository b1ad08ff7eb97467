// ---------------------------------------------------------------------------------------- tensor-core GEMM tile
// One TM x TN output tile of C = A B (float32) on the tensor cores, at float32 accuracy ("3xTF32"): each
// operand x is split into hi = tf32(x) and lo = tf32(x - hi), and A B is accumulated in float32 as
// lo_a hi_b + hi_a lo_b + hi_a hi_b (the lo_a lo_b term lies below float32's rounding). The staging is
// gdsl_gemm_stages' (the loaders into shared memory BK deep); rows are padded by 8 elements so that the
// fragment loads of a warp (4 k rows x 8 columns) hit 32 different banks.
// Warps tile the output WR x WC, each MF x NF fragments of mma.sync.m16n8k8; with more warps than that
// (a small tile) the KS = warps / (WR * WC) groups of warps split each stage's k and add their partial
// sums in shared memory at the end. Before sm_80 (no TF32 mma) the FFMA tile computes it (RM x RN).
GDSL_DEV unsigned gdsl_tf32(float x) {
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

GDSL_DEV void gdsl_mma_tf32(float* c, const unsigned* a, const unsigned* b) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <int TM, int TN, int BK, int NT, int WR, int WC, int RM, int RN, bool AK, bool BKC, class LA, class LB,
          class SC>
GDSL_DEV void gdsl_gemm_tile_tc(int M, int N, int K, int row0, int col0, LA la, LB lb, SC sc, char* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int NW = NT / 32, WF = WR * WC, KS = NW / WF, MF = TM / 16 / WR, NF = TN / 8 / WC;
  constexpr int PA = TM + 8, PB = TN + 8;
  static_assert(MF * WR * 16 == TM && NF * WC * 8 == TN && KS * WF == NW && BK % (8 * KS) == 0, "tile shape");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t4 = lane % 4;
  const int kg = warp / WF, r0 = (warp % WF) / WC * MF * 16, c0 = (warp % WF) % WC * NF * 8;
  float acc[MF][NF][4];
#pragma unroll
  for (int i = 0; i < MF; ++i)
#pragma unroll
    for (int j = 0; j < NF; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  gdsl_gemm_stages<TM, TN, BK, NT, PA, PB, AK, BKC, float>(M, N, K, row0, col0, la, lb, smem,
                                                            [&](const float* As, const float* Bs) {
#pragma unroll
    for (int k8 = kg * 8; k8 < BK; k8 += 8 * KS) {
      unsigned ahi[MF][4], alo[MF][4], bhi[NF][2], blo[NF][2];
#pragma unroll
      for (int i = 0; i < MF; ++i) {
        const float* a = As + (k8 + t4) * PA + r0 + i * 16 + g;
        const float x[4] = {a[0], a[8], a[4 * PA], a[4 * PA + 8]};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          ahi[i][e] = gdsl_tf32(x[e]);
          alo[i][e] = gdsl_tf32(x[e] - __uint_as_float(ahi[i][e]));
        }
      }
#pragma unroll
      for (int j = 0; j < NF; ++j) {
        const float* b = Bs + (k8 + t4) * PB + c0 + j * 8 + g;
        const float y[2] = {b[0], b[4 * PB]};
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          bhi[j][e] = gdsl_tf32(y[e]);
          blo[j][e] = gdsl_tf32(y[e] - __uint_as_float(bhi[j][e]));
        }
      }
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
  if (kg == 0) {
#pragma unroll
    for (int i = 0; i < MF; ++i)
#pragma unroll
      for (int j = 0; j < NF; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int gm = row0 + r0 + i * 16 + g + (e / 2) * 8, gn = col0 + c0 + j * 8 + 2 * t4 + e % 2;
          if (gm < M && gn < N) sc(gm, gn, acc[i][j][e]);
        }
  }
#else
  gdsl_gemm_tile<TM, TN, BK, NT, RM, RN, AK, BKC, float>(M, N, K, row0, col0, la, lb, sc, smem);
#endif
}

