"""One wave of the LSTM bs64 step's GEMMs alone: 76 x [64,256] @ [256,256] (304 tiles of 64x64x256), gdsl
(grid 264 and 132) against torch.bmm (cuBLAS, TF32 off); CUDA events. Needs a GPU and PyTorch:

    python benchmarks/gemm_wave.py
"""
import os
import re
import sys

import cupy as cp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import gdsl  # noqa: E402  (after the path)
import gdsl.numpy as gnp  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
rng = np.random.default_rng(0)
a = rng.standard_normal((76, 64, 256)).astype(np.float32)
b = (rng.standard_normal((76, 256, 256)) * 0.05).astype(np.float32)


def timed(f, n=30, k=20):
    """Median over n of the time of k calls back to back, per call (the host's dispatch overlaps the GPU)."""
    for _ in range(10):
        f()
    times = []
    for _ in range(n):
        s, e = cp.cuda.Event(), cp.cuda.Event()
        s.record()
        for _ in range(k):
            f()
        e.record()
        e.synchronize()
        times.append(cp.cuda.get_elapsed_time(s, e) / k)
    return float(np.median(times))


ref = a.astype(np.float64) @ b.astype(np.float64)
da, db = cp.asarray(a), cp.asarray(b)
for grid in (264, 132):
    fn = gdsl.jit(lambda x, y: gnp.matmul(x, y), backend="cuda", grid=grid)
    out = cp.asnumpy(fn(da, db))
    err = float(np.max(np.abs(out - ref)))
    tiles = re.findall(r"gdsl_gemm_tile\w*<[^>]*>", fn.lower(a, b).source.split("-- ops")[-1])
    print(f"gdsl grid {grid}: {timed(lambda fn=fn: fn(da, db)):.4f} ms, max err {err:.2e}, {tiles}")
ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
print(f"torch.bmm (cuBLAS): {timed(lambda: torch.bmm(ta, tb)):.4f} ms, "
      f"max err {float(np.max(np.abs(torch.bmm(ta, tb).cpu().numpy() - ref))):.2e}")
flops = 2 * 76 * 64 * 256 * 256
print(f"work: {flops / 1e9:.3f} GFLOP")
