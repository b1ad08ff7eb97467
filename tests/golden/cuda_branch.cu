#define GDSL_SMEM_BYTES 16
#define GDSL_RESIDENT_BASE 16

// ---------------------------------------------------------------------------------------- ops
GDSL_DEV void op0_exp(float* o0, const float* i0, int t, char* smem) {
  const int lo = t * 1024;
  const int hi = lo + 1024 < 5 ? lo + 1024 : 5;
  for (int i = lo + (int)threadIdx.x; i < hi; i += 256) {
    o0[i] = (float)(expf(__ldg(i0 + i)));
  }
}

GDSL_DEV void op1_add(float* o0, float i0, const float* i1, int t, char* smem) {
  const int lo = t * 1024;
  const int hi = lo + 1024 < 5 ? lo + 1024 : 5;
  for (int i = lo + (int)threadIdx.x; i < hi; i += 256) {
    o0[i] = (float)((i0 + __ldg(i1 + i)));
  }
}

GDSL_DEV void op2_mul(float* o0, const float* i0, int t, char* smem) {
  const int lo = t * 1024;
  const int hi = lo + 1024 < 5 ? lo + 1024 : 5;
  for (int i = lo + (int)threadIdx.x; i < hi; i += 256) {
    o0[i] = (float)((__ldg(i0 + i) * 2.0f));
  }
}

// ---------------------------------------------------------------------------------------- kernels
extern "C" __global__ void __launch_bounds__(256, 1) gdsl_main(const float* __restrict__ in0, const float* __restrict__ in1, float* out0, char* __restrict__ gdsl_ws) {
  __shared__ __align__(16) char gdsl_smem[GDSL_SMEM_BYTES];
  unsigned* gdsl_bar = (unsigned*)(gdsl_ws + 0); (void)gdsl_bar;
  float* t2 = (float*)(gdsl_ws + 256);
  int gdsl_t; (void)gdsl_t;
  bool u0 = false;
  int u1 = 0;
  float u3 = 0.0f;
  u0 = (in1[0] > 0.0f);
  u1 = ((int)(u0));
  switch (u1) {
    case 0: {
      if (blockIdx.x < 1) op0_exp(t2, in0, (int)blockIdx.x, gdsl_smem);
      gdsl_grid_sync_atomic(gdsl_bar);
      { float v = ((float)t2[0]);
        v = (v + ((float)t2[1]));
        v = (v + ((float)t2[2]));
        v = (v + ((float)t2[3]));
        v = (v + ((float)t2[4]));
        u3 = v; }
      if (blockIdx.x < 1) op1_add(out0, u3, in0, (int)blockIdx.x, gdsl_smem);
      gdsl_grid_sync_atomic(gdsl_bar);
    } break;
    default: {
      if (blockIdx.x < 1) op2_mul(out0, in0, (int)blockIdx.x, gdsl_smem);
      gdsl_grid_sync_atomic(gdsl_bar);
    } break;
  }
}

