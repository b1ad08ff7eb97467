// ---------------------------------------------------------------------------------------- tensor-core instructions
// What the tensor-core tiles (tensor_cores.h) are built of, in CUDA's spelling (sm_80 and later: GDSL_TC); the CPU
// emulator has its own (cfamily/emu.h, GDSL_EMU_TC). Also the instructions of benchmarks/tc_wave.py's tile.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define GDSL_TC 1
#endif
// x rounded to TF32 (10 mantissa bits, to nearest, ties away from zero), as the bits of a float.
GDSL_DEV unsigned gdsl_tf32(float x) {
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

// c += a b for one 16 x 8 x 8 fragment of TF32 operands, float32 accumulation (layouts: tensor_cores.h).
GDSL_DEV void gdsl_mma_tf32(float* c, const unsigned* a, const unsigned* b) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 16 bytes from global memory to shared memory without passing through registers (cp.async.cg: L2 only), in the
// thread's current group of copies; gdsl_copy_commit closes the group, gdsl_copy_wait<N> waits until at most N of
// the thread's groups are still in flight.
GDSL_DEV void gdsl_copy16(float* dst, const float* src) {
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(d), "l"(src) : "memory");
}
GDSL_DEV void gdsl_copy_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> GDSL_DEV void gdsl_copy_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }
