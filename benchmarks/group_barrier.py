"""What a barrier costs by how many vEUs it joins: the grid barrier against barriers of groups of vEUs.

    python benchmarks/group_barrier.py [--grids 132,264] [--groups 1,4,12,25,48,66,132,264] [--clusters 2,4,8]
                                       [--schemes atomic,release,red] [--json F]

A persistent kernel of `grid` blocks (256 threads, two a SM at most, as gdsl's batch-1 kernels run) splits its
blocks into consecutive groups of `group` (the last one smaller where `group` does not divide the grid); each
group runs REPS barriers on its own counter (gdsl's atomic scheme, `gdsl_grid_sync_atomic` /
`gdsl_group_sync_atomic`: one atomicAdd a block, the group's first block adding 2^31 - (size - 1), every block's
thread 0 spinning on the counter's top bit), the counters 128 bytes apart. CUDA events around two launches of
REPS and 10 x REPS barriers give the cost of one barrier (launch and fixed costs cancel). A group of 1 is a block
barrier and its fences. Why: the open batch-1 rows wait on grid barriers whose dependence joins a few vEUs (a
layer's GEMVs and its cell in the LSTM), so whether a barrier of just those vEUs is cheaper is the question (on
the H200 it is not: ~1.0-1.1 µs from 4 to 264 blocks, docs/performance.md, session 27). `--schemes`: the barrier's
own instructions three ways (SRC). `--clusters`: the same loop on Hopper's thread-block clusters (sm_90:
`__cluster_dims__`, `barrier.cluster.arrive.release` / `wait.acquire`, the hardware barrier of a cluster's
blocks on one GPC) for clusters of 2, 4 and 8 blocks, 128 blocks in all (a kernel with no cross-cluster
dependence, so every cluster runs alone where the grid does not fit at once). Needs a GPU and CuPy.
"""
from __future__ import annotations

import argparse
import json
import statistics

import cupy as cp
import numpy as np

# The group barrier in three schemes: `atomic`, gdsl's (a fence, atomicAdd returning the old value, a volatile spin
# on the top bit, a fence); `release`, the same with the ordering in the instructions (atom.add.release, spin
# with ld.acquire, no fences); `red`, a reduction that returns nothing (red.add.release) and a spin with ld.acquire
# on a phase bit the block keeps itself (read once at the start, before any barrier can complete), so that the
# last block to arrive does not first wait for its atomic's answer.
SRC = r'''
#define GROUP_KERNEL(NAME, SETUP, ARRIVE_AND_WAIT) \
extern "C" __global__ void __launch_bounds__(256, 2) NAME(unsigned* counters, int group, int reps) { \
  const int lo = blockIdx.x / group * group; \
  const int size = min(group, (int)gridDim.x - lo); \
  unsigned* bar = counters + (blockIdx.x / group) * 32; \
  SETUP \
  for (int r = 0; r < reps; ++r) { \
    __syncthreads(); \
    if (threadIdx.x == 0 && size > 1) { \
      const unsigned add = (int)blockIdx.x == lo ? 0x80000000u - (unsigned)(size - 1) : 1u; \
      ARRIVE_AND_WAIT \
    } \
    __syncthreads(); \
  } \
}
__device__ unsigned load_acquire(unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
GROUP_KERNEL(groups_atomic, ,
  __threadfence(); const unsigned old = atomicAdd(bar, add);
  while (((old ^ *(volatile unsigned*)bar) & 0x80000000u) == 0u) { }
  __threadfence();)
GROUP_KERNEL(groups_release, ,
  unsigned old;
  asm volatile("atom.release.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(bar), "r"(add) : "memory");
  while (((old ^ load_acquire(bar)) & 0x80000000u) == 0u) { })
GROUP_KERNEL(groups_red, unsigned phase = threadIdx.x == 0 ? (*(volatile unsigned*)bar & 0x80000000u) : 0u;,
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" :: "l"(bar), "r"(add) : "memory");
  while ((load_acquire(bar) & 0x80000000u) == phase) { }
  phase ^= 0x80000000u;)
'''
SCHEMES = ("atomic", "release", "red")
REPS = 1000
CLUSTER_SRC = r'''
#define CLUSTER_KERNEL(C) \
extern "C" __global__ void __cluster_dims__(C, 1, 1) __launch_bounds__(256, 2) cluster##C(int reps) { \
  for (int r = 0; r < reps; ++r) \
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory"); \
}
CLUSTER_KERNEL(2)
CLUSTER_KERNEL(4)
CLUSTER_KERNEL(8)
'''
CLUSTER_GRID = 128


def barrier_us(kernel, counters, grid: int, group: int, rounds: int = 7) -> float:
    """Median over `rounds` of (time of 10 x REPS barriers - time of REPS) / (9 x REPS), in µs (`counters` None:
    a cluster kernel, which takes the repetitions only)."""
    def launch(reps):
        if counters is not None:
            counters[:] = 0
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        args = (np.int32(reps),) if counters is None else (counters, np.int32(group), np.int32(reps))
        kernel((grid,), (256,), args)
        e1.record()
        e1.synchronize()
        return cp.cuda.get_elapsed_time(e0, e1) * 1000.0
    launch(REPS)                                          # (warm-up: the module, the clocks)
    return statistics.median((launch(10 * REPS) - launch(REPS)) / (9 * REPS) for _ in range(rounds))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grids", default="132,264")
    ap.add_argument("--groups", default="1,4,12,25,48,66,132,264")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="barrier schemes (see SRC)")
    ap.add_argument("--clusters", default="2,4,8", help="cluster sizes (2, 4, 8); empty: none")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    module = cp.RawModule(code=SRC)
    counters = cp.zeros(32 * 1024, dtype=cp.uint32)
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    card = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    rows = []
    print(f"{card}: µs per barrier (median of 7, {REPS} and {10 * REPS} barriers a launch)")
    for scheme in args.schemes.split(","):
        kernel = module.get_function(f"groups_{scheme}")
        for grid in map(int, args.grids.split(",")):
            for group in map(int, args.groups.split(",")):
                if group > grid:
                    continue
                us = barrier_us(kernel, counters, grid, group)
                rows.append({"scheme": scheme, "grid": grid, "group": group, "us_per_barrier": us})
                print(f"{scheme:8s} grid {grid:4d}  group {group:4d}  {us:7.3f} us", flush=True)
    clusters = cp.RawModule(code=CLUSTER_SRC, options=("-std=c++17",)) if args.clusters else None
    for size in map(int, filter(None, args.clusters.split(","))):
        us = barrier_us(clusters.get_function(f"cluster{size}"), None, CLUSTER_GRID, size)
        rows.append({"grid": CLUSTER_GRID, "cluster": size, "us_per_barrier": us})
        print(f"grid {CLUSTER_GRID:4d}  cluster {size:2d}  {us:7.3f} us (barrier.cluster)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "reps": REPS, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
