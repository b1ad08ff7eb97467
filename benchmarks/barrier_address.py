"""Grid barrier cost by the address of its counter (the BlockDrop bimodality suspect: where the counter lies
in L2). A persistent kernel of `grid` blocks runs REPS grid barriers (gdsl's atomic scheme) on a counter at
byte offset `off` of one buffer; CUDA events time it."""
import cupy as cp
import numpy as np

SRC = r'''
extern "C" __global__ void bar(unsigned* base, long long off_words, int reps) {
  unsigned* bar = base + off_words;
  for (int r = 0; r < reps; ++r) {
    __syncthreads();
    if (threadIdx.x == 0) {
      const unsigned add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1u) : 1u;
      __threadfence();
      const unsigned old = atomicAdd(bar, add);
      while (((old ^ *(volatile unsigned*)bar) & 0x80000000u) == 0u) { }
      __threadfence();
    }
    __syncthreads();
  }
}
'''
mod = cp.RawModule(code=SRC)
k = mod.get_function("bar")
REPS = 2000


def time_at(buf, off_bytes, grid):
    buf[:] = 0
    args = (buf, np.int64(off_bytes // 4), np.int32(REPS))
    k((grid,), (256,), args)
    cp.cuda.Device().synchronize()
    ts = []
    for _ in range(5):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        k((grid,), (256,), args)
        e1.record()
        e1.synchronize()
        ts.append(cp.cuda.get_elapsed_time(e0, e1) * 1000 / REPS)
    return float(np.median(ts))


for grid in (132, 264):
    buf = cp.zeros(64 << 20 >> 2, dtype=cp.uint32)
    offs = [i * 4096 for i in range(16)] + [i * (1 << 20) for i in range(1, 17)] + [i * 128 for i in range(1, 9)]
    res = [(o, time_at(buf, o, grid)) for o in offs]
    us = np.array([r for _, r in res])
    print(f"grid {grid}: per barrier min {us.min():.3f} median {np.median(us):.3f} max {us.max():.3f} us")
    print("  " + " ".join(f"{o // 128}:{t:.2f}" for o, t in res))
    fresh = []
    for _ in range(8):
        b = cp.zeros(1 << 20, dtype=cp.uint32)
        fresh.append(time_at(b, 0, grid))
        del b
    print("  fresh buffers, offset 0:", " ".join(f"{t:.2f}" for t in fresh))
