// gdsl's device library, shared by every C-family dialect (CUDA, HIP, the CPU emulator).
//
// The dialect header in front of this file defines: GDSL_DEV (device function qualifier, inlined),
// GDSL_SHARED_OP (the qualifier of a uTask function several ops share: not inlined), GDSL_WARP (lanes
// of a warp/wavefront), GDSL_SHFL_XOR(v, mask, width), GDSL_SHFL(v, source lane, width), GDSL_LDG(p) (a read-only load), GDSL_U2F/GDSL_F2U
// (bit casts), gdsl_h2f/gdsl_f2h (float16 <-> float), GDSL_SPIN_PAUSE(), and __syncthreads, __threadfence,
// atomicAdd with CUDA's meaning. float16 and bfloat16 are stored as 16-bit words and computed in float.

#define GDSL_INF GDSL_U2F(0x7f800000u)
#define GDSL_NAN GDSL_U2F(0x7fc00000u)
typedef unsigned short gdsl_f16;
typedef unsigned short gdsl_bf16;

GDSL_DEV float gdsl_bf2f(gdsl_bf16 b) { return GDSL_U2F(((unsigned)b) << 16); }
GDSL_DEV gdsl_bf16 gdsl_f2bf(float f) {            // round to nearest even, as ml_dtypes
  unsigned u = GDSL_F2U(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (gdsl_bf16)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (gdsl_bf16)(u >> 16);
}
GDSL_DEV float gdsl_round_f16(float x) { return gdsl_h2f(gdsl_f2h(x)); }
GDSL_DEV float gdsl_round_bf16(float x) { return gdsl_bf2f(gdsl_f2bf(x)); }

// numpy's maximum/minimum propagate NaN (fmaxf would drop it).
GDSL_DEV float gdsl_fmax(float a, float b) { return (a > b || a != a) ? a : b; }
GDSL_DEV float gdsl_fmin(float a, float b) { return (a < b || a != a) ? a : b; }
template <typename T> GDSL_DEV T gdsl_imax(T a, T b) { return a > b ? a : b; }
template <typename T> GDSL_DEV T gdsl_imin(T a, T b) { return a < b ? a : b; }
GDSL_DEV float gdsl_fsign(float x) { return x > 0.f ? 1.f : (x < 0.f ? -1.f : x); }

// numpy's floor_divide / remainder: integers by zero give 0; floats follow npy_divmod.
template <typename T> GDSL_DEV T gdsl_ifloordiv(T a, T b) {
  if (b == 0) return 0;
  if (b == -1) return (T)(0 - (unsigned long long)a);   // no INT_MIN / -1 trap
  T q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) q -= 1;
  return q;
}
template <typename T> GDSL_DEV T gdsl_imod(T a, T b) {
  if (b == 0 || b == -1) return 0;
  T r = a % b;
  if (r != 0 && ((r < 0) != (b < 0))) r += b;
  return r;
}
GDSL_DEV float gdsl_fmod_py(float a, float b) {
  float mod = fmodf(a, b);
  if (b == 0.f) return mod;
  if (mod != 0.f) { if ((b < 0.f) != (mod < 0.f)) mod += b; } else mod = copysignf(0.f, b);
  return mod;
}
GDSL_DEV float gdsl_floordiv_py(float a, float b) {
  if (b == 0.f) return a / b;
  float mod = fmodf(a, b);
  float div = (a - mod) / b;
  if (mod != 0.f && ((b < 0.f) != (mod < 0.f))) div -= 1.f;
  if (div == 0.f) return copysignf(0.f, a / b);
  float fl = floorf(div);
  if (div - fl > 0.5f) fl += 1.f;
  return fl;
}
template <typename T> GDSL_DEV T gdsl_ipow(T a, T b) {   // numpy clamps negative integer powers to 0
  unsigned long long r = 1, x = (unsigned long long)a;
  for (T e = b; e > 0; e >>= 1) { if (e & 1) r *= x; x *= x; }
  return (T)r;
}

// ---------------------------------------------------------------------------------------- reductions
// A reduction over groups of W lanes (W a power of two <= GDSL_WARP): every lane ends with the result.
template <int W, typename T, class F> GDSL_DEV T gdsl_group_reduce(T v, F f) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) v = f(v, (T)GDSL_SHFL_XOR(v, o, W));
  return v;
}
// argmax/argmin pairs: `better(v, i, w, j)` says whether (v, i) wins over (w, j).
template <int W, typename T, class B> GDSL_DEV void gdsl_group_argreduce(T& v, int& i, B better) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) {
    T w = (T)GDSL_SHFL_XOR(v, o, W);
    int j = GDSL_SHFL_XOR(i, o, W);
    if (better(w, j, v, i)) { v = w; i = j; }
  }
}
// A whole-block reduction (NT threads, a multiple of GDSL_WARP); the result is valid in every thread.
template <int NT, typename T, class F> GDSL_DEV T gdsl_block_reduce(T v, T ident, F f, char* smem) {
  constexpr int NW = NT / GDSL_WARP;
  T* red = (T*)smem;
  v = gdsl_group_reduce<GDSL_WARP>(v, f);
  if (NW == 1) return v;
  const int lane = threadIdx.x % GDSL_WARP, w = threadIdx.x / GDSL_WARP;
  if (lane == 0) red[w] = v;
  __syncthreads();
  v = lane < NW ? red[lane] : ident;
  v = gdsl_group_reduce<GDSL_WARP>(v, f);
  __syncthreads();
  return v;
}
template <int NT, typename T, class B> GDSL_DEV void gdsl_block_argreduce(T& v, int& i, B better, char* smem) {
  constexpr int NW = NT / GDSL_WARP;
  gdsl_group_argreduce<GDSL_WARP>(v, i, better);
  if (NW == 1) return;
  T* rv = (T*)smem;
  int* ri = (int*)(smem + NW * sizeof(T) + 8);
  const int lane = threadIdx.x % GDSL_WARP, w = threadIdx.x / GDSL_WARP;
  if (lane == 0) { rv[w] = v; ri[w] = i; }
  __syncthreads();
  v = rv[lane < NW ? lane : 0];
  i = ri[lane < NW ? lane : 0];
  gdsl_group_argreduce<GDSL_WARP>(v, i, better);
  __syncthreads();
}

// ---------------------------------------------------------------------------------------- GEMM tiles
// Four consecutive elements in one 16-byte load (LDS.128 / LDG.128), the address a multiple of 16 bytes.
template <typename T> struct alignas(4 * sizeof(T)) gdsl_vec4 { T v[4]; };
template <typename T> struct alignas(2 * sizeof(T)) gdsl_vec2 { T v[2]; };

// The staging of one TM x TN output tile of C[M,N] = A[M,K] B[K,N]: A and B are read through the loaders
// la(m, k) / lb(k, n) (so conv2d's implicit GEMM and batched/broadcast matmuls share this code) into shared
// memory BK deep, As[k][m] and Bs[k][n] with rows of PA and PB elements (padding against bank conflicts);
// `stage(As, Bs)` then computes on them. The next stage's global loads are issued into registers before the
// current stage is computed, so their latency overlaps the computation.
// AK / BKC: the operand is contiguous along k in memory (then consecutive threads load consecutive k).
// VEC (float32 operands in memory, A contiguous along k; K, and N where B runs along n, multiples of 4):
// pa(m, k) / pb(k, n) give the operands' addresses, and when `vec` (the caller found the tile's first
// addresses 16-byte aligned, so every group of four starting at a multiple of 4 is aligned and wholly inside
// or wholly outside the matrix) each thread loads four consecutive elements at once, a quarter of the load
// instructions of la / lb, which it uses otherwise.
// BRES: B already waits in shared memory for the whole tile (a resident tile, gdsl/schedule/resident.py: K rows
// of TN, rows TN apart, at `rb`; K a multiple of BK): only A is staged, and `stage` gets the resident rows of
// each stage's k.
template <int TM, int TN, int BK, int NT, int PA, int PB, bool AK, bool BKC, typename Acc, bool VEC, bool BRES,
          class LA, class LB, class PA_, class PB_, class STAGE>
GDSL_DEV void gdsl_gemm_stages_vec(int M, int N, int K, int row0, int col0, LA la, LB lb, PA_ pa, PB_ pb, bool vec,
                                   const Acc* rb, char* smem, STAGE stage) {
  constexpr int NA = (TM * BK + NT - 1) / NT, NB = BRES ? 0 : (TN * BK + NT - 1) / NT;  // staged loads a thread
  constexpr int QA = (TM * BK / 4 + NT - 1) / NT, QB = BRES ? 0 : (TN * BK / 4 + NT - 1) / NT;  // of four
  constexpr int RA = VEC && 4 * QA > NA ? 4 * QA : NA, RB = VEC && 4 * QB > NB ? 4 * QB : NB;
  static_assert(!VEC || (AK && BK % 4 == 0 && (BKC || TN % 4 == 0)), "four-element groups");
  Acc* As = (Acc*)smem;
  Acc* Bs = As + BK * PA;
  const int tid = threadIdx.x;
  Acc ra[RA], rg[RB > 0 ? RB : 1];
  auto fetch = [&](int k0) {
    if constexpr (VEC) {
      if (vec) {
        auto load4 = [&](Acc* r, const Acc* p, bool valid) {
          const gdsl_vec4<Acc> v = valid ? *(const gdsl_vec4<Acc>*)p : gdsl_vec4<Acc>{{0, 0, 0, 0}};
#pragma unroll
          for (int e = 0; e < 4; ++e) r[e] = v.v[e];
        };
#pragma unroll
        for (int r = 0; r < QA; ++r) {     // A along k: row m, k from kq
          const int q = tid + r * NT, m = q / (BK / 4), kq = q % (BK / 4) * 4;
          const int gm = row0 + m, gk = k0 + kq;
          const bool valid = q < TM * BK / 4 && gm < M && gk < K;
          load4(ra + 4 * r, pa(valid ? gm : row0, valid ? gk : 0), valid);
        }
#pragma unroll
        for (int r = 0; r < QB; ++r) {     // B along k (BKC: column n, k from kq) or along n (row kk, n from n4)
          const int q = tid + r * NT;
          const int n = BKC ? q / (BK / 4) : q % (TN / 4) * 4, kk = BKC ? q % (BK / 4) * 4 : q / (TN / 4);
          const int gn = col0 + n, gk = k0 + kk;
          const bool valid = q < TN * BK / 4 && gn < N && gk < K;
          load4(rg + 4 * r, pb(valid ? gk : 0, valid ? gn : col0), valid);
        }
        return;
      }
    }
#pragma unroll
    for (int r = 0; r < NA; ++r) {
      const int e = tid + r * NT;
      const int m = AK ? e / BK : e % TM, kk = AK ? e % BK : e / TM;
      const int gm = row0 + m, gk = k0 + kk;
      ra[r] = (e < TM * BK && gm < M && gk < K) ? la(gm, gk) : Acc(0);
    }
#pragma unroll
    for (int r = 0; r < NB; ++r) {
      const int e = tid + r * NT;
      const int n = BKC ? e / BK : e % TN, kk = BKC ? e % BK : e / TN;
      const int gn = col0 + n, gk = k0 + kk;
      rg[r] = (e < TN * BK && gn < N && gk < K) ? lb(gk, gn) : Acc(0);
    }
  };
  auto store = [&]() {
    if constexpr (VEC) {
      if (vec) {
#pragma unroll
        for (int r = 0; r < QA; ++r) {
          const int q = tid + r * NT, m = q / (BK / 4), kq = q % (BK / 4) * 4;
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (q < TM * BK / 4) As[(kq + e) * PA + m] = ra[4 * r + e];
        }
#pragma unroll
        for (int r = 0; r < QB; ++r) {
          const int q = tid + r * NT;
          const int n = BKC ? q / (BK / 4) : q % (TN / 4) * 4, kk = BKC ? q % (BK / 4) * 4 : q / (TN / 4);
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (q < TN * BK / 4) Bs[BKC ? (kk + e) * PB + n : kk * PB + n + e] = rg[4 * r + e];
        }
        return;
      }
    }
#pragma unroll
    for (int r = 0; r < NA; ++r) {
      const int e = tid + r * NT;
      if (e < TM * BK) As[(AK ? e % BK : e / TM) * PA + (AK ? e / BK : e % TM)] = ra[r];
    }
#pragma unroll
    for (int r = 0; r < NB; ++r) {
      const int e = tid + r * NT;
      if (e < TN * BK) Bs[(BKC ? e % BK : e / TN) * PB + (BKC ? e / BK : e % TN)] = rg[r];
    }
  };
  fetch(0);
  for (int k0 = 0; k0 < K; k0 += BK) {
    store();
    __syncthreads();
    if (k0 + BK < K) fetch(k0 + BK);
    stage((const Acc*)As, BRES ? rb + k0 * PB : (const Acc*)Bs);      // (a resident B's rows are PB apart)
    __syncthreads();
  }
}

// gdsl_gemm_stages_vec through la / lb only.
template <int TM, int TN, int BK, int NT, int PA, int PB, bool AK, bool BKC, typename Acc, class LA, class LB,
          class STAGE>
GDSL_DEV void gdsl_gemm_stages(int M, int N, int K, int row0, int col0, LA la, LB lb, char* smem, STAGE stage) {
  gdsl_gemm_stages_vec<TM, TN, BK, NT, PA, PB, AK, BKC, Acc, false, false>(M, N, K, row0, col0, la, lb, la, lb,
                                                                           false, nullptr, smem, stage);
}

// One output tile on the FFMA units: each of the TX*TY computing threads owns an RM x RN register tile
// strided by (TY, TX), so shared-memory reads are conflict-free and the stores coalesce.
template <int TM, int TN, int BK, int NT, int RM, int RN, bool AK, bool BKC, typename Acc, class LA, class LB,
          class SC>
GDSL_DEV void gdsl_gemm_tile(int M, int N, int K, int row0, int col0, LA la, LB lb, SC sc, char* smem) {
  constexpr int TX = TN / RN, TY = TM / RM, PA = TM + 1, PB = TN + 1;
  const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
  const bool computes = tid < TX * TY;
  Acc acc[RM][RN];
#pragma unroll
  for (int i = 0; i < RM; ++i)
#pragma unroll
    for (int j = 0; j < RN; ++j) acc[i][j] = Acc(0);
  gdsl_gemm_stages<TM, TN, BK, NT, PA, PB, AK, BKC, Acc>(M, N, K, row0, col0, la, lb, smem,
                                                          [&](const Acc* As, const Acc* Bs) {
    if (!computes) return;
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      Acc a[RM], b[RN];
#pragma unroll
      for (int i = 0; i < RM; ++i) a[i] = As[kk * PA + ty + i * TY];
#pragma unroll
      for (int j = 0; j < RN; ++j) b[j] = Bs[kk * PB + tx + j * TX];
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < RN; ++j) acc[i][j] += a[i] * b[j];
    }
  });
  if (computes) {
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < RN; ++j) {
        const int gm = row0 + ty + i * TY, gn = col0 + tx + j * TX;
        if (gm < M && gn < N) sc(gm, gn, acc[i][j]);
      }
  }
}

// One output tile on the FFMA units with wide register tiles: threads form KS groups of (TM/RM) x (TN/RN);
// group g computes every output of the tile over its share of each stage's k (BK/KS rows), and the groups'
// partial sums meet in shared memory at the end. A thread's RM x RN registers are RM/4 x RN/4 blocks of
// 4 x 4 at row (i * TY + ty) * 4 and column (j * TX + tx) * 4, so each k step reads them with 16-byte loads
// (a warp's loads of one block are consecutive: no bank conflicts) and does RM * RN FFMAs per RM/4 + RN/4
// loads, where gdsl_gemm_tile's 4 x 4 strided tile does 16 per 8 (shared-memory bound on the H200).
// RN need not be a multiple of 4 (tiles 80 or 96 wide: 4 x 5, 4 x 6): its last RN % 4 columns follow the
// 4-column blocks, a pair at column 4 * (RN/4) * TX + 2 * tx (8-byte loads) and a single one after the pairs
// at + tx; a warp's loads of each are consecutive too (wide_col gives a register's column).
// Staging (gdsl_gemm_stages_vec): la / lb load the operands; with VEC, pa / pb give the float32 operands'
// addresses, loaded four at a time when the tile's first addresses are 16-byte aligned. (Without VEC, pa / pb
// are la / lb.) BRES: B is the tile's resident rows at `rbs` (K x TN, RBP apart, 16-byte aligned, K a multiple of
// BK), never staged.
template <int TM, int TN, int BK, int NT, int RM, int RN, int KS, bool VEC, bool BRES, bool AK, bool BKC,
          typename Acc, int RBP = TN, class LA, class LB, class PA_, class PB_, class SC>
GDSL_DEV void gdsl_gemm_tile_wide(int M, int N, int K, int row0, int col0, LA la, LB lb, PA_ pa, PB_ pb, SC sc,
                                  const Acc* rbs, char* smem) {
  constexpr int TX = TN / RN, TY = TM / RM, GT = TX * TY, PA = TM + 4, PB = BRES ? RBP : TN + 4, KG = BK / KS;
  constexpr int RQ = RN / 4, RP = RN % 4 / 2, RS = RN % 2;   // a thread's blocks of 4, 2 and 1 columns
  static_assert(RM % 4 == 0 && TX * RN == TN && TY * RM == TM && GT * KS == NT &&
                KG * KS == BK && (KS & (KS - 1)) == 0, "wide tile shape");
  const int tid = threadIdx.x, g = tid / GT, tx = tid % GT % TX, ty = tid % GT / TX;
  // the tile column of register j of a thread's RN
  auto wide_col = [&](int j) {
    return j < 4 * RQ ? ((j / 4) * TX + tx) * 4 + j % 4
                      : (j < 4 * RQ + 2 * RP ? 4 * RQ * TX + 2 * tx + (j - 4 * RQ) : (4 * RQ + 2 * RP) * TX + tx);
  };
  Acc acc[RM][RN];
#pragma unroll
  for (int i = 0; i < RM; ++i)
#pragma unroll
    for (int j = 0; j < RN; ++j) acc[i][j] = Acc(0);
  // Each k step's registers are read from shared memory one step ahead (two register sets), so the FFMAs
  // of step q do not wait on the loads of step q (with few warps per scheduler they did: "short scoreboard").
  auto stage = [&](const Acc* As, const Acc* Bs) {
    Acc a[2][RM], b[2][RN];
    auto load = [&](int q, Acc* ra, Acc* rb) {
      const int kk = g * KG + q;
#pragma unroll
      for (int i = 0; i < RM / 4; ++i) {
        const gdsl_vec4<Acc> v = *(const gdsl_vec4<Acc>*)(As + kk * PA + (i * TY + ty) * 4);
#pragma unroll
        for (int e = 0; e < 4; ++e) ra[i * 4 + e] = v.v[e];
      }
#pragma unroll
      for (int j = 0; j < RQ; ++j) {
        const gdsl_vec4<Acc> v = *(const gdsl_vec4<Acc>*)(Bs + kk * PB + (j * TX + tx) * 4);
#pragma unroll
        for (int e = 0; e < 4; ++e) rb[j * 4 + e] = v.v[e];
      }
      if constexpr (RP > 0) {
        const gdsl_vec2<Acc> v = *(const gdsl_vec2<Acc>*)(Bs + kk * PB + 4 * RQ * TX + 2 * tx);
        rb[4 * RQ] = v.v[0];
        rb[4 * RQ + 1] = v.v[1];
      }
      if constexpr (RS > 0) rb[4 * RQ + 2 * RP] = Bs[kk * PB + (4 * RQ + 2 * RP) * TX + tx];
    };
    load(0, a[0], b[0]);
#pragma unroll
    for (int q = 0; q < KG; ++q) {
      if (q + 1 < KG) load(q + 1, a[(q + 1) % 2], b[(q + 1) % 2]);
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < RN; ++j) acc[i][j] += a[q % 2][i] * b[q % 2][j];
    }
  };
  bool vec = false;
  if constexpr (VEC)    // (a resident B is aligned by its placement: resident.ALIGN)
    vec = ((unsigned long long)pa(row0, 0) | (BRES ? 0ULL : (unsigned long long)pb(0, col0))) % 16 == 0;
  gdsl_gemm_stages_vec<TM, TN, BK, NT, PA, PB, AK, BKC, Acc, VEC, BRES>(M, N, K, row0, col0, la, lb, pa, pb, vec, rbs,
                                                                        smem, stage);
  // The groups' partial sums meet in shared memory (the stages are done with it), halving the groups each
  // round: KS/2 tiles of space. Register e of a group's threads lies side by side: no bank conflicts.
  Acc* red = (Acc*)smem + tid % GT;
#pragma unroll
  for (int half = KS / 2; half >= 1; half /= 2) {
    if (g >= half && g < 2 * half) {
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < RN; ++j) red[((g - half) * RM * RN + i * RN + j) * GT] = acc[i][j];
    }
    __syncthreads();
    if (g < half) {
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < RN; ++j) acc[i][j] += red[(g * RM * RN + i * RN + j) * GT];
    }
    __syncthreads();
  }
  if (g == 0) {
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < RN; ++j) {
        const int gm = row0 + ((i / 4) * TY + ty) * 4 + i % 4, gn = col0 + wide_col(j);
        if (gm < M && gn < N) sc(gm, gn, acc[i][j]);
      }
  }
}

// A GEMV-shaped tile for few rows (MR <= 8, the batch-1 case): C[0:MR, col0:col0+TN]. Threads split the
// columns (CT column threads, CPT columns each) and K (KS slices); A's rows are staged in shared memory KC
// at a time; the KS partial sums are reduced with warp shuffles, then across warps in shared memory.
// TN need not be a power of two (a wave's balanced split, gdsl/schedule/balance.py, may take 96 columns):
// CT is the largest power of two dividing it (at most NT), so CT divides both TN and NT.
// KMAJOR (B contiguous along k, e.g. read through a transposed view): the lanes of a warp take consecutive
// k slices of one column group instead of consecutive columns, so their loads of B coalesce; CT is then at
// most NT / GDSL_WARP, leaving a whole warp (or more) of k slices per column.
// PF: the most B values a thread prefetches (below); a tile that stages its whole k at once may take more
// (utasks.THIN_GEMV_REGISTERS: the scheduler checked that they fit).
// `a_in_place`: each thread reads its elements of A through la where they are, instead of the block staging
// them in shared memory behind a barrier (a row of A that every thread reads a few elements of: cheap to read
// twice, dear to wait for).
template <int MR, int TN, int NT, int KC, typename Acc, bool KMAJOR, int PF = 32, class LA, class LB, class SC>
GDSL_DEV void gdsl_gemv_tile(int N, int K, int col0, LA la, LB lb, SC sc, char* smem, bool a_in_place = false) {
  constexpr int MAX_CT = KMAJOR ? (NT / GDSL_WARP > 0 ? NT / GDSL_WARP : 1) : NT;
  constexpr int CT = (TN & -TN) < MAX_CT ? (TN & -TN) : MAX_CT, CPT = TN / CT, KS = NT / CT;
  // k slices of one column within a warp, and the lane distance between two of them
  constexpr int LANES = KMAJOR ? (KS < GDSL_WARP ? KS : GDSL_WARP) : (CT < GDSL_WARP ? GDSL_WARP / CT : 1);
  constexpr int LANE_STEP = KMAJOR ? 1 : CT;
  constexpr int SLOTS = KS / LANES;
  Acc* As = (Acc*)smem;                 // [MR][KC]
  Acc* red = As + MR * KC;              // [SLOTS][MR][TN]
  const int tid = threadIdx.x, c = KMAJOR ? tid / KS : tid % CT, ks = KMAJOR ? tid % KS : tid / CT;
  Acc acc[MR][CPT];
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int j = 0; j < CPT; ++j) acc[m][j] = Acc(0);
  // A thread's B values of one k chunk: when they fit in registers, all of them are loaded before A is
  // staged, so their latency overlaps A's and the barrier's instead of following them (a uTask of a
  // batch-1 matmul is a few dependent memory round trips long; this removes one or two of them).
  constexpr int PER = (KC + KS - 1) / KS;
  constexpr bool PREFETCH = PER * CPT <= PF && KC % KS == 0;
  for (int k0 = 0; k0 < K; k0 += KC) {
    const int kc = K - k0 < KC ? K - k0 : KC;
    Acc bv[PREFETCH ? PER : 1][PREFETCH ? CPT : 1];
    if constexpr (PREFETCH) {
#pragma unroll
      for (int r = 0; r < PER; ++r)
#pragma unroll
        for (int j = 0; j < CPT; ++j) {
          const int kk = ks + r * KS, n = col0 + c + j * CT;
          bv[r][j] = kk < kc && n < N ? lb(k0 + kk, n) : Acc(0);
        }
    }
    if (!a_in_place) {
      for (int e = tid; e < MR * KC; e += NT) {
        const int m = e / KC, kk = e % KC;
        As[e] = kk < kc ? la(m, k0 + kk) : Acc(0);
      }
      __syncthreads();
    }
    if constexpr (PREFETCH) {
#pragma unroll
      for (int r = 0; r < PER; ++r)
#pragma unroll
        for (int j = 0; j < CPT; ++j)
#pragma unroll
          for (int m = 0; m < MR; ++m) {
            const int kk = ks + r * KS;
            acc[m][j] += (a_in_place ? (kk < kc ? la(m, k0 + kk) : Acc(0)) : As[m * KC + kk]) * bv[r][j];
          }
    } else {
      constexpr int UNROLL = GDSL_GEMV_LOOP_UNROLL;
#pragma unroll UNROLL
      for (int kk = ks; kk < kc; kk += KS) {
#pragma unroll
        for (int j = 0; j < CPT; ++j) {
          const int n = col0 + c + j * CT;
          const Acc b = n < N ? lb(k0 + kk, n) : Acc(0);
#pragma unroll
          for (int m = 0; m < MR; ++m) acc[m][j] += (a_in_place ? la(m, k0 + kk) : As[m * KC + kk]) * b;
        }
      }
    }
    // (before the next chunk's staging overwrites As; after the last chunk only where no block barrier of the
    // k slices' reduction follows before the tile returns: its partial sums go to `red`, not As)
    if (!a_in_place && (SLOTS == 1 || k0 + KC < K || GDSL_GEMV_LAST_CHUNK_SYNC)) __syncthreads();
  }
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      Acc v = acc[m][j];
#pragma unroll
      for (int o = LANE_STEP; o < LANE_STEP * LANES; o <<= 1) v += (Acc)GDSL_SHFL_XOR(v, o, GDSL_WARP);
      acc[m][j] = v;
    }
  if (SLOTS == 1) {
    if (ks == 0) {
#pragma unroll
      for (int m = 0; m < MR; ++m)
#pragma unroll
        for (int j = 0; j < CPT; ++j) if (col0 + c + j * CT < N) sc(m, col0 + c + j * CT, acc[m][j]);
    }
    return;
  }
  const int slot = ks / LANES;
  if (ks % LANES == 0) {
#pragma unroll
    for (int m = 0; m < MR; ++m)
#pragma unroll
      for (int j = 0; j < CPT; ++j) red[(slot * MR + m) * TN + c + j * CT] = acc[m][j];
  }
  __syncthreads();
  for (int e = tid; e < MR * TN; e += NT) {
    Acc v = Acc(0);
    for (int s = 0; s < SLOTS; ++s) v += red[s * MR * TN + e];
    const int m = e / TN, n = col0 + e % TN;
    if (n < N) sc(m, n, v);
  }
  __syncthreads();
}

// Rows [0, K) x columns [col0, col0 + TN) of a row-major K x N matrix into dst[K][TN] (zeros past column N),
// by all threads of the block: a resident tile of a loop-invariant matmul operand (gdsl/schedule/resident.py).
// A thread loads GDSL_COPY_BATCH elements before it stores any: the copy's loads are then in flight together
// instead of one memory round trip each (the stores may alias the loads for all the compiler knows).
#define GDSL_COPY_BATCH 8
template <typename T, bool PITCHED = false>
GDSL_DEV void gdsl_stage_columns(const T* src, int K, int N, int col0, int TN, T* dst, int pitch = 0) {
  for (int e0 = threadIdx.x; e0 < K * TN; e0 += GDSL_COPY_BATCH * blockDim.x) {
    T v[GDSL_COPY_BATCH];
#pragma unroll
    for (int b = 0; b < GDSL_COPY_BATCH; ++b) {
      const int e = e0 + b * blockDim.x, k = e / TN, n = col0 + e % TN;
      v[b] = e < K * TN && n < N ? src[(long long)k * N + n] : T(0);
    }
#pragma unroll
    for (int b = 0; b < GDSL_COPY_BATCH; ++b)
      if (e0 + b * blockDim.x < K * TN) {
        if constexpr (PITCHED) {          // (rows `pitch` apart: gemm.TC_RESIDENT_PAD)
          const int e = e0 + b * blockDim.x;
          dst[e / TN * pitch + e % TN] = v[b];
        } else {
          dst[e0 + b * blockDim.x] = v[b];
        }
      }
  }
}

// dst[0, n) = src[0, n) by all threads of the block (a loop's staged slice in or out: gdsl/schedule/local.py).
template <typename T>
GDSL_DEV void gdsl_copy_block(T* dst, const T* src, int n) {
  for (int e0 = threadIdx.x; e0 < n; e0 += GDSL_COPY_BATCH * blockDim.x) {
    T v[GDSL_COPY_BATCH];
#pragma unroll
    for (int b = 0; b < GDSL_COPY_BATCH; ++b) if (e0 + b * blockDim.x < n) v[b] = src[e0 + b * blockDim.x];
#pragma unroll
    for (int b = 0; b < GDSL_COPY_BATCH; ++b) if (e0 + b * blockDim.x < n) dst[e0 + b * blockDim.x] = v[b];
  }
}

// ---------------------------------------------------------------------------------------- grid barrier
// Every block's thread 0 adds to one counter: 1, and block 0 adds 2^31 - (blocks - 1), so each round adds
// exactly 2^31 and flips the top bit, which the waiting blocks watch (the scheme of cooperative groups'
// grid.sync, on our own counter: no reset, no generation variable, one atomic per block).
// The ordering: the block barrier before the arrival orders the block's writes before thread 0's, whose arrival
// releases them at GPU scope; the load that sees the round complete acquires the other blocks' writes, and the
// block barrier after it hands them to the block's threads. A dialect may define the three steps with that
// ordering in the instructions (CUDA: atom.add.release.gpu, ld.acquire.gpu, no fences); by default a fence on
// either side of a relaxed atomic and a volatile spin.
#ifndef GDSL_BARRIER_ARRIVE
#define GDSL_BARRIER_ARRIVE(bar, add) (__threadfence(), atomicAdd((bar), (add)))
#define GDSL_BARRIER_LOAD(bar) (*(volatile unsigned*)(bar))
#define GDSL_BARRIER_ACQUIRED() __threadfence()
#endif

GDSL_DEV void gdsl_grid_sync_atomic(unsigned* bar) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1u) : 1u;
    const unsigned old = GDSL_BARRIER_ARRIVE(bar, add);
    while (((old ^ GDSL_BARRIER_LOAD(bar)) & 0x80000000u) == 0u) GDSL_SPIN_PAUSE();
    GDSL_BARRIER_ACQUIRED();
  }
  __syncthreads();
}

// Flag syncs (gdsl/schedule/flags.py): a published element also as one 64-bit word, its value's bits | tag << 32,
// written with one 8-byte store (single-copy atomic: the value comes with its tag, no fence); a reader spins on
// the word until the tag is the one it waits for, then takes the value from the same load.
GDSL_DEV void gdsl_flag_put(unsigned long long* word, unsigned bits, unsigned tag) {
  *(volatile unsigned long long*)word = (unsigned long long)bits | ((unsigned long long)tag << 32);
}

GDSL_DEV unsigned long long gdsl_flag_load(const unsigned long long* word) {
  return *(const volatile unsigned long long*)word;
}

// The value of a word first loaded as `v` (gdsl_flag_load), loading it again until it has the tag. A thread
// that loads its words first and finishes them after has its first loads in flight together (one round trip
// for all where they are ready); gdsl_flag_get's spin before the next load would make it one each.
GDSL_DEV unsigned gdsl_flag_finish(const unsigned long long* word, unsigned long long v, unsigned tag) {
  while ((unsigned)(v >> 32) != tag) {
    GDSL_SPIN_PAUSE();
    v = gdsl_flag_load(word);
  }
  return (unsigned)v;
}

GDSL_DEV unsigned gdsl_flag_get(const unsigned long long* word, unsigned tag) {
  return gdsl_flag_finish(word, gdsl_flag_load(word), tag);
}

// Wait until the words [start, stop) have the tag, the block's threads striding through them, GDSL_COPY_BATCH
// loads of a thread in flight before it checks any (a flag sync's FlagWait).
GDSL_DEV void gdsl_flag_wait(const unsigned long long* words, int start, int stop, unsigned tag) {
  for (int i0 = start + (int)threadIdx.x; i0 < stop; i0 += GDSL_COPY_BATCH * (int)blockDim.x) {
    unsigned long long v[GDSL_COPY_BATCH];
#pragma unroll
    for (int b = 0; b < GDSL_COPY_BATCH; ++b) {
      const int i = i0 + b * (int)blockDim.x;
      v[b] = i < stop ? gdsl_flag_load(words + i) : 0ull;
    }
#pragma unroll
    for (int b = 0; b < GDSL_COPY_BATCH; ++b) {
      const int i = i0 + b * (int)blockDim.x;
      if (i < stop) (void)gdsl_flag_finish(words + i, v[b], tag);
    }
  }
}

// A barrier of the vEUs [lo, lo + size) only (a group running one of a Fork's calls, gdsl/schedule/plan.py): the
// grid barrier's scheme on the group's own counter, block `lo` adding 2^31 - (size - 1). A group's vEUs are the
// same every time its counter is used (groups are heap-numbered), so the rounds add up as the grid's do.
// Returns true when a call overflowed its max_depth somewhere (*err set): the vEUs that did have left the
// kernel and will never arrive, so the waiting ones stop waiting and leave too. The decision is thread 0's,
// passed to the block through *quit (shared memory) so that the whole block leaves or none of it.
GDSL_DEV bool gdsl_group_sync_atomic(unsigned* bar, int lo, int size, volatile int* err, volatile int* quit) {
  __syncthreads();
  if (threadIdx.x == 0) {
    if (size > 1) {
      const unsigned add = (int)blockIdx.x == lo ? 0x80000000u - (unsigned)(size - 1) : 1u;
      const unsigned old = GDSL_BARRIER_ARRIVE(bar, add);
      while (((old ^ GDSL_BARRIER_LOAD(bar)) & 0x80000000u) == 0u && *err == 0) GDSL_SPIN_PAUSE();
      GDSL_BARRIER_ACQUIRED();
    }
    *quit = *err;
  }
  __syncthreads();
  const bool leave = *quit != 0;
  __syncthreads();
  return leave;
}
