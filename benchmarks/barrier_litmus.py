"""Does gdsl's grid barrier publish every thread's writes to every other block? A litmus test on the GPU.

    python benchmarks/barrier_litmus.py [--per-sm 1,2] [--rounds 100000] [--schemes release,fence,relaxed]

A persistent kernel of one or two blocks a multiprocessor (all resident at once), 256 threads each, runs `rounds`
rounds. In round r every thread stores r with a plain store into its own word of one of two buffers (by r's
parity), then the grid barrier (`gdsl_grid_sync_atomic`, the prelude's code and the CUDA dialect's header), then
every thread loads the words of two threads of other blocks (one of the next block, whose line it read two rounds
before and may hold in its L1, and one that moves each round, its own block's once in `grid` rounds) and counts
each that is not r. A barrier that orders only thread 0's own writes, or leaves a stale line in a reader's L1,
shows as a count above zero.

Schemes: `release` (the CUDA default, RELEASE_BARRIER: atom.add.release.gpu / ld.acquire.gpu, the block barriers
carrying the other threads' writes), `fence` (the prelude's default: __threadfence around a relaxed atomicAdd and a
volatile spin), and `relaxed`, a deliberately broken control (no fence, no ordering: relaxed atomic and volatile
spin) that says whether the test can see a reordering on this GPU at all. Prints a JSON line per (scheme, grid):
violations and loads checked. Needs a GPU and CuPy.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: gdsl/

from gdsl.backends.cfamily.render import PRELUDE
from gdsl.backends.cuda import dialect as cuda_dialect

BLOCK = 256
KERNEL = r"""
extern "C" __global__ void __launch_bounds__(256, 2) litmus(unsigned* bar, unsigned* data, unsigned long long* bad,
                                                             int rounds) {
  const int n = gridDim.x * blockDim.x, me = blockIdx.x * blockDim.x + threadIdx.x;
  unsigned long long wrong = 0;
  for (int r = 1; r <= rounds; ++r) {
    unsigned* buf = data + (r & 1) * n;
    buf[me] = (unsigned)r;
    gdsl_grid_sync_atomic(bar);
    const int next = ((blockIdx.x + 1) % gridDim.x) * blockDim.x + (threadIdx.x * 5 + 3) % blockDim.x;
    const int moving = ((blockIdx.x + r) % gridDim.x) * blockDim.x + (threadIdx.x + r) % blockDim.x;
    wrong += (buf[next] != (unsigned)r) + (buf[moving] != (unsigned)r);
  }
  if (wrong) atomicAdd(bad, wrong);
}
"""
# The broken control: the arrival and the spin with no ordering at all.
RELAXED = r"""
#define GDSL_BARRIER_ARRIVE(bar, add) atomicAdd((bar), (add))
#define GDSL_BARRIER_LOAD(bar) (*(volatile unsigned*)(bar))
#define GDSL_BARRIER_ACQUIRED() ((void)0)
"""
SCHEMES = ("release", "fence", "relaxed")


def source(scheme: str) -> str:
    """The litmus kernel over the prelude, the barrier's ordering as `scheme` gives it."""
    dialect = cuda_dialect.CUDADialect()
    saved = cuda_dialect.RELEASE_BARRIER
    cuda_dialect.RELEASE_BARRIER = scheme == "release"
    try:
        header = dialect.header
    finally:
        cuda_dialect.RELEASE_BARRIER = saved
    return "\n".join([header, RELAXED if scheme == "relaxed" else "", "#define GDSL_GEMV_LAST_CHUNK_SYNC 1",
                      "#define GDSL_GEMV_LOOP_UNROLL 16", PRELUDE, KERNEL])


def violations(scheme: str, per_sm: int, rounds: int) -> tuple[int, int, int]:
    """(loads that saw a stale value, loads checked, blocks) over `rounds` rounds of `per_sm` blocks on each
    multiprocessor (at most 2: the kernel's launch bounds keep two resident, and every block must be)."""
    import cupy as cp
    grid = per_sm * cp.cuda.Device().attributes["MultiProcessorCount"]
    kernel = cp.RawModule(code=source(scheme), options=("-std=c++17",)).get_function("litmus")
    bar = cp.zeros(32, cp.uint32)
    data = cp.zeros(2 * grid * BLOCK, cp.uint32)
    bad = cp.zeros(1, cp.uint64)
    kernel((grid,), (BLOCK,), (bar, data, bad, cp.int32(rounds)))
    cp.cuda.Device().synchronize()
    return int(bad.get()[0]), 2 * rounds * grid * BLOCK, grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-sm", default="1,2", help="blocks a multiprocessor (1 or 2)")
    parser.add_argument("--rounds", type=int, default=100_000)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    results = []
    for scheme in args.schemes.split(","):
        for per_sm in (int(g) for g in args.per_sm.split(",")):
            bad, checked, grid = violations(scheme, per_sm, args.rounds)
            results.append({"scheme": scheme, "grid": grid, "rounds": args.rounds, "violations": bad,
                            "loads": checked})
            print(json.dumps(results[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
