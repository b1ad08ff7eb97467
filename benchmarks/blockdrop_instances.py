"""BlockDrop bs1's bimodality: the same kernel in several jit instances (each its own workspace and module),
each timed with CUDA events; the workspace address (its L2 placement) printed beside. Device control, cuda."""
import cupy as cp
import numpy as np

from gdsl.tracing.pytree import tree_map
from models import common, load

m = load("blockdrop")
prob = common.build_problem(m, 1)
w = tree_map(cp.asarray, prob.weights)
x = tree_map(cp.asarray, prob.batches[0])
for i in range(8):
    f = m.make_forward(prob.cfg, backend="cuda")
    f(w, x)
    cp.cuda.Device().synchronize()
    ws = None
    for entry in getattr(f, "_cache", {}).values():
        found = getattr(entry.get("executable"), "ws", None)
        ws = found if found is not None else ws
    times = []
    for _ in range(40):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        f(w, x)
        e1.record()
        e1.synchronize()
        times.append(cp.cuda.get_elapsed_time(e0, e1))
    addr = ws.data.ptr if ws is not None and hasattr(ws, "data") else None
    where = "?" if addr is None else f"{addr:#x} (mod 2 MB {addr % (2 << 20):#x})"
    print(f"instance {i}: median {np.median(times):.3f} ms (p10 {np.percentile(times, 10):.3f}, "
          f"p90 {np.percentile(times, 90):.3f}), workspace {where}", flush=True)
