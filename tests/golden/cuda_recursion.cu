#define GDSL_SMEM_BYTES 16
#define GDSL_RESIDENT_BASE 16

// ---------------------------------------------------------------------------------------- ops
GDSL_DEV void op4_copy(float* o0, const float* i0, int t, char* smem) {
  const int lo = t * 1024;
  const int hi = lo + 1024 < 4 ? lo + 1024 : 4;
  for (int i = lo + (int)threadIdx.x; i < hi; i += 256) {
    o0[i] = (float)(i0[i]);
  }
}

GDSL_DEV void op0_dynamic_slice(float* o0, const float* i0, int i1, int i2, int t, char* smem) {
  const int lo = t * 1024;
  const int hi = lo + 1024 < 4 ? lo + 1024 : 4;
  long long s0 = (long long)(i1);
  s0 = s0 < 0 ? 0 : (s0 > 6 ? 6 : s0);
  long long s1 = (long long)(i2);
  s1 = s1 < 0 ? 0 : (s1 > 0 ? 0 : s1);
  for (int i = lo + (int)threadIdx.x; i < hi; i += 256) {
    o0[i] = (float)(__ldg(i0 + (int)((s0 + 0) * 4 + (s1 + (i % 4)))));
  }
}

GDSL_DEV void op2_tanh_add(float* o0, const float* i0, const float* i1, int t, char* smem) {
  const int lo = t * 1024;
  const int hi = lo + 1024 < 4 ? lo + 1024 : 4;
  for (int i = lo + (int)threadIdx.x; i < hi; i += 256) {
    o0[i] = (float)(tanhf((i0[i] + i1[i])));
  }
}

// ---------------------------------------------------------------------------------------- kernels
extern "C" __global__ void __launch_bounds__(256, 1) gdsl_main(const float* __restrict__ in0, const int* __restrict__ in1, const int* __restrict__ in2, const bool* __restrict__ in3, float* out0, char* __restrict__ gdsl_ws) {
  __shared__ __align__(16) char gdsl_smem[GDSL_SMEM_BYTES];
  unsigned* gdsl_bar = (unsigned*)(gdsl_ws + 0); (void)gdsl_bar;
  int* gdsl_err = (int*)(gdsl_ws + 128);
  if (blockIdx.x == 0 && threadIdx.x == 0) *gdsl_err = 0;
  float* t1 = (float*)(gdsl_ws + 256);
  int d_enc = 0; int r_enc[8]; int b_enc = 0;
  int gdsl_t; (void)gdsl_t;
  int u0_s[19];
  bool u2 = false;
  int u3 = 0;
  int u4 = 0;
  bool u5 = false;
  int u6 = 0;
  bool u7 = false;
  int u8 = 0;
  int u9 = 0;
  int u10_s[19];
  bool u11 = false;
  int u12 = 0;
  int u13 = 0;
  bool u14 = false;
  int u15 = 0;
  bool u16 = false;
  int u17 = 0;
  int u18 = 0;
  int u19_s[19];
  bool u20 = false;
  int u21 = 0;
  int u22 = 0;
  bool u23 = false;
  int u24_s[19];
  bool u25 = false;
  int u26 = 0;
  int u27 = 0;
  bool u28 = false;
  int u29 = 0;
  int u30 = 0;
  bool u31 = false;
  int u32 = 0;
  int u33 = 0;
  u0_s[b_enc + 1] = 0;
  if (d_enc >= 8) { if (blockIdx.x == 0 && threadIdx.x == 0) *gdsl_err = 1; goto gdsl_exit; }
  r_enc[d_enc] = 2; d_enc += 1; b_enc += 1; goto f_enc;
  f_enc_ret_2: ;
  b_enc -= 1;
  if (blockIdx.x < 1) op4_copy(out0, (t1 + (long long)(b_enc + 1) * 4), (int)blockIdx.x, gdsl_smem);
  goto gdsl_exit;
f_enc:
  u2 = (u0_s[b_enc] < 0);
  u3 = ((int)((unsigned long long)u0_s[b_enc] + (unsigned long long)7));
  u4 = (u2 ? u3 : u0_s[b_enc]);
  u5 = in3[(int)(((long long)(u4) < 0 ? 0LL : ((long long)(u4) > 6 ? 6LL : (long long)(u4))) * 1)];
  u6 = ((int)(u5));
  switch (u6) {
    case 0: {
      u7 = (u0_s[b_enc] < 0);
      u8 = ((int)((unsigned long long)u0_s[b_enc] + (unsigned long long)7));
      u9 = (u7 ? u8 : u0_s[b_enc]);
      u10_s[b_enc] = in1[(int)(((long long)(u9) < 0 ? 0LL : ((long long)(u9) > 6 ? 6LL : (long long)(u9))) * 1)];
      u11 = (u10_s[b_enc] < 0);
      u12 = ((int)((unsigned long long)u10_s[b_enc] + (unsigned long long)7));
      u13 = (u11 ? u12 : u10_s[b_enc]);
      u14 = in3[(int)(((long long)(u13) < 0 ? 0LL : ((long long)(u13) > 6 ? 6LL : (long long)(u13))) * 1)];
      u15 = ((int)(u14));
      u16 = (u0_s[b_enc] < 0);
      u17 = ((int)((unsigned long long)u0_s[b_enc] + (unsigned long long)7));
      u18 = (u16 ? u17 : u0_s[b_enc]);
      u19_s[b_enc] = in2[(int)(((long long)(u18) < 0 ? 0LL : ((long long)(u18) > 6 ? 6LL : (long long)(u18))) * 1)];
      u20 = (u19_s[b_enc] < 0);
      u21 = ((int)((unsigned long long)u19_s[b_enc] + (unsigned long long)7));
      u22 = (u20 ? u21 : u19_s[b_enc]);
      u23 = in3[(int)(((long long)(u22) < 0 ? 0LL : ((long long)(u22) > 6 ? 6LL : (long long)(u22))) * 1)];
      u24_s[b_enc] = ((int)(u23));
      if (d_enc >= 8) { if (blockIdx.x == 0 && threadIdx.x == 0) *gdsl_err = 1; goto gdsl_exit; }
      switch (u15) {
        case 0: {
          u0_s[b_enc + 1] = u10_s[b_enc];
          if (d_enc >= 8) { if (blockIdx.x == 0 && threadIdx.x == 0) *gdsl_err = 1; goto gdsl_exit; }
          r_enc[d_enc] = 0; d_enc += 1; b_enc += 1; goto f_enc;
          f_enc_ret_0: ;
          b_enc -= 1;
        } break;
        default: {
          u25 = (u10_s[b_enc] < 0);
          u26 = ((int)((unsigned long long)u10_s[b_enc] + (unsigned long long)7));
          u27 = (u25 ? u26 : u10_s[b_enc]);
          if (blockIdx.x < 1) op0_dynamic_slice((t1 + (long long)(b_enc + 1) * 4), in0, u27, 0, (int)blockIdx.x, gdsl_smem);
          __syncthreads();
        } break;
      }
      if (d_enc >= 8) { if (blockIdx.x == 0 && threadIdx.x == 0) *gdsl_err = 1; goto gdsl_exit; }
      switch (u24_s[b_enc]) {
        case 0: {
          u0_s[b_enc + 2] = u19_s[b_enc];
          if (d_enc >= 8) { if (blockIdx.x == 0 && threadIdx.x == 0) *gdsl_err = 1; goto gdsl_exit; }
          r_enc[d_enc] = 1; d_enc += 1; b_enc += 2; goto f_enc;
          f_enc_ret_1: ;
          b_enc -= 2;
        } break;
        default: {
          u28 = (u19_s[b_enc] < 0);
          u29 = ((int)((unsigned long long)u19_s[b_enc] + (unsigned long long)7));
          u30 = (u28 ? u29 : u19_s[b_enc]);
          if (blockIdx.x < 1) op0_dynamic_slice((t1 + (long long)(b_enc + 2) * 4), in0, u30, 0, (int)blockIdx.x, gdsl_smem);
          __syncthreads();
        } break;
      }
      if (blockIdx.x < 1) op2_tanh_add((t1 + (long long)(b_enc) * 4), (t1 + (long long)(b_enc + 1) * 4), (t1 + (long long)(b_enc + 2) * 4), (int)blockIdx.x, gdsl_smem);
      __syncthreads();
    } break;
    default: {
      u31 = (u0_s[b_enc] < 0);
      u32 = ((int)((unsigned long long)u0_s[b_enc] + (unsigned long long)7));
      u33 = (u31 ? u32 : u0_s[b_enc]);
      if (blockIdx.x < 1) op0_dynamic_slice((t1 + (long long)(b_enc) * 4), in0, u33, 0, (int)blockIdx.x, gdsl_smem);
      __syncthreads();
    } break;
  }
  d_enc -= 1;
  switch (r_enc[d_enc]) { case 0: goto f_enc_ret_0; case 1: goto f_enc_ret_1; default: goto f_enc_ret_2; }
gdsl_exit: ;
}

