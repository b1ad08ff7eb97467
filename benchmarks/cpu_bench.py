"""gdsl-cpu against the interpreter, PyTorch CPU eager and JAX-CPU jit on three control-flow models.

    python benchmarks/cpu_bench.py [--runs 20] [--models lstm,nasrnn,rae]

Models (float32 inference, batch 1, random weights with a fixed seed):
  LSTM    2 stacked layers, hidden 256, 64 time steps (fori_loop over time, layers unrolled in the body)
  NASRNN  hidden 256, 100 steps, the NAS cell of models/README.md (W_ih, W_hh [8,256,256], no bias)
  RAE     recursive tree encoder, hidden 512 (W[1024,512], b[512]) over a random binary tree of 20 leaves
Each system is timed as the median of `runs` calls after warm-up, all in this one process; ratios are
against gdsl-cpu with its default options (one thread per core for these models, see
gdsl/backends/cpu/__init__.py), "gdsl-cpu 1t" is grid=1 (one thread). PyTorch runs with its default
threads and with one ("1t"). The first-call time (trace + schedule + LLVM IR + O3 + MCJIT, on a cold
cache) is printed too. Timings on a machine shared with other work vary a lot: compare rows of one run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import gdsl
import gdsl.nn
import gdsl.numpy as gnp
from models import rae

# ------------------------------------------------------------------------------------------------ models

def lstm_weights(rng, layers=2, hidden=256):
    b = 1 / np.sqrt(hidden)

    def u(*shape):
        return rng.uniform(-b, b, size=shape).astype(np.float32)
    return {"W_ih": u(layers, 4, hidden, hidden), "W_hh": u(layers, 4, hidden, hidden),
            "b": u(layers, 4, 1, hidden) + u(layers, 4, 1, hidden)}


def lstm_gdsl(w, x):
    layers, hidden = w["W_ih"].shape[0], w["W_ih"].shape[-1]

    def step(t, state):
        hs, cs = state
        inp, new_h, new_c = x[t], [], []
        for l in range(layers):
            gates = gnp.matmul(inp, w["W_ih"][l]) + gnp.matmul(hs[l], w["W_hh"][l]) + w["b"][l]   # [4, 1, H]
            i, f = gdsl.nn.sigmoid(gates[0]), gdsl.nn.sigmoid(gates[1])
            g, o = gnp.tanh(gates[2]), gdsl.nn.sigmoid(gates[3])
            c = f * cs[l] + i * g
            h = o * gnp.tanh(c)
            new_h.append(h)
            new_c.append(c)
            inp = h
        return tuple(new_h), tuple(new_c)
    zeros = tuple(gnp.zeros((x.shape[1], hidden), gdsl.float32) for _ in range(layers))
    return gdsl.fori_loop(0, x.shape[0], step, (zeros, zeros))[0][-1]


def lstm_torch(torch, w, x):
    layers = w["W_ih"].shape[0]
    hs = [torch.zeros(x.shape[1], w["W_ih"].shape[-1]) for _ in range(layers)]
    cs = [torch.zeros_like(h) for h in hs]
    for t in range(x.shape[0]):
        inp = x[t]
        for l in range(layers):
            gates = torch.matmul(inp, w["W_ih"][l]) + torch.matmul(hs[l], w["W_hh"][l]) + w["b"][l]
            i, f, g, o = torch.sigmoid(gates[0]), torch.sigmoid(gates[1]), torch.tanh(gates[2]), torch.sigmoid(gates[3])
            cs[l] = f * cs[l] + i * g
            hs[l] = o * torch.tanh(cs[l])
            inp = hs[l]
    return hs[-1]


def lstm_jax(jax, jnp, w, x):
    layers = w["W_ih"].shape[0]

    def step(t, state):
        hs, cs = state
        inp, new_h, new_c = x[t], [], []
        for l in range(layers):
            gates = jnp.matmul(inp, w["W_ih"][l]) + jnp.matmul(hs[l], w["W_hh"][l]) + w["b"][l]
            i, f = jax.nn.sigmoid(gates[0]), jax.nn.sigmoid(gates[1])
            g, o = jnp.tanh(gates[2]), jax.nn.sigmoid(gates[3])
            c = f * cs[l] + i * g
            new_h.append(o * jnp.tanh(c))
            new_c.append(c)
            inp = new_h[-1]
        return tuple(new_h), tuple(new_c)
    zeros = tuple(jnp.zeros((x.shape[1], w["W_ih"].shape[-1]), jnp.float32) for _ in range(layers))
    return jax.lax.fori_loop(0, x.shape[0], step, (zeros, zeros))[0][-1]


def nasrnn_weights(rng, hidden=256):
    s = 1 / np.sqrt(hidden)
    return {"W_ih": (rng.standard_normal((8, hidden, hidden)) * s).astype(np.float32),
            "W_hh": (rng.standard_normal((8, hidden, hidden)) * s).astype(np.float32)}


def _nas_cell(F, sigmoid, relu, x, m, c, W_ih, W_hh):
    s = F.matmul(x, W_ih) + F.matmul(m, W_hh)          # [8, bs, H]
    l = [sigmoid(s[0]), relu(s[1]), sigmoid(s[2]), relu(s[3]), F.tanh(s[4]), sigmoid(s[5]), F.tanh(s[6]),
         sigmoid(s[7])]
    a = F.tanh(l[0] * l[1])
    b = F.tanh(l[2] + l[3])
    c2 = F.tanh(l[4] * l[5])
    d = sigmoid(l[6] + l[7])
    c = F.tanh(a + c) * b
    m = F.tanh(c * F.tanh(c2 + d))
    return m, c


def nasrnn_gdsl(w, x):
    def step(t, state):
        m, c = state
        return _nas_cell(gnp, gdsl.nn.sigmoid, gdsl.nn.relu, x[t], m, c, w["W_ih"], w["W_hh"])
    zeros = gnp.zeros((x.shape[1], x.shape[2]), gdsl.float32)
    m, c = gdsl.fori_loop(0, x.shape[0], step, (zeros, zeros))
    return c + m


def nasrnn_torch(torch, w, x):
    m = c = torch.zeros(x.shape[1], x.shape[2])
    for t in range(x.shape[0]):
        m, c = _nas_cell(torch, torch.sigmoid, torch.relu, x[t], m, c, w["W_ih"], w["W_hh"])
    return c + m


def nasrnn_jax(jax, jnp, w, x):
    def step(t, state):
        return _nas_cell(jnp, jax.nn.sigmoid, jax.nn.relu, x[t], *state, w["W_ih"], w["W_hh"])
    zeros = jnp.zeros((x.shape[1], x.shape[2]), jnp.float32)
    m, c = jax.lax.fori_loop(0, x.shape[0], step, (zeros, zeros))
    return c + m


def rae_weights(rng, hidden=512):
    return {"W": (rng.standard_normal((2 * hidden, hidden)) / np.sqrt(2 * hidden)).astype(np.float32),
            "b": np.zeros(hidden, np.float32)}


def rae_gdsl(w, left, right, is_leaf, x, root):
    @gdsl.recurse(result=gdsl.ShapeDtype((x.shape[1],), gdsl.float32), max_depth=128)
    def enc(n):
        return gdsl.cond(is_leaf[n], lambda: x[n],
                         lambda: gnp.tanh(gnp.matmul(gnp.concatenate([enc(left[n]), enc(right[n])]), w["W"]) + w["b"]))
    return enc(root)


def rae_torch(torch, w, left, right, is_leaf, x, root):
    """The artifact's PyTorch baseline: the tree lives on the host (Python recursion)."""
    def enc(n):
        if is_leaf[n]:
            return x[n]
        return torch.tanh(torch.matmul(torch.cat([enc(left[n]), enc(right[n])]), w["W"]) + w["b"])
    return enc(root)


# ---------------------------------------------------------------------------------------------- timing

def median_ms(fn, runs, warmup=3, settle=0.3):
    """Median wall time of fn() in ms. `settle` seconds of rest first: thread pools of the previous system
    (OpenMP spins for a while after a parallel region) must not steal this one's cores."""
    time.sleep(settle)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def problems(rng):
    """name -> {gdsl: () -> (fn, args), torch: torch -> thunk, jax: (jax, jnp) -> (jitted, args) or None}."""
    lw = lstm_weights(rng)
    lx = rng.standard_normal((64, 1, 256)).astype(np.float32)
    nw = nasrnn_weights(rng)
    nx = rng.standard_normal((100, 1, 256)).astype(np.float32)
    rw = rae_weights(rng)
    tree = rae.pack(rae.random_tree(20, rng), rae.Config(), rng)   # the zoo's RAE data: ~20 leaves
    left, right, is_leaf, rx, root = (tree[k] for k in ("left", "right", "is_leaf", "x", "root"))

    def rae_fn(l, r, il, x, root):
        return rae_gdsl(rw, l, r, il, x, root)
    return {
        "lstm": {"gdsl": lambda: (lambda x: lstm_gdsl(lw, x), (lx,)),
                 "torch": lambda torch: lambda: lstm_torch(torch, tw(torch, lw), torch.from_numpy(lx)),
                 "jax": lambda jax, jnp: (jax.jit(lambda w, x: lstm_jax(jax, jnp, w, x)), (lw, lx)),
                 "desc": "LSTM 2 layers, hidden 256, 64 steps, bs 1"},
        "nasrnn": {"gdsl": lambda: (lambda x: nasrnn_gdsl(nw, x), (nx,)),
                   "torch": lambda torch: lambda: nasrnn_torch(torch, tw(torch, nw), torch.from_numpy(nx)),
                   "jax": lambda jax, jnp: (jax.jit(lambda w, x: nasrnn_jax(jax, jnp, w, x)), (nw, nx)),
                   "desc": "NASRNN hidden 256, 100 steps, bs 1"},
        "rae": {"gdsl": lambda: (rae_fn, (left, right, is_leaf, rx, root)),
                "torch": lambda torch: lambda: rae_torch(torch, tw(torch, rw), left.tolist(), right.tolist(),
                                                         is_leaf.tolist(), torch.from_numpy(rx), int(root)),
                "jax": None, "desc": "RAE hidden 512, random tree of 20 leaves (39 nodes)"},
    }


_torch_weights: dict = {}


def tw(torch, w):
    if id(w) not in _torch_weights:
        _torch_weights[id(w)] = {k: torch.from_numpy(v) for k, v in w.items()}
    return _torch_weights[id(w)]


def run_model(p, args, torch, jax, jnp):
    """(first-call seconds, max error against the interpreter, {system: median ms}, gdsl-cpu's grid)."""
    fn, fargs = p["gdsl"]()
    t0 = time.perf_counter()
    jitted = gdsl.jit(fn, backend="cpu", control=args.control)
    out = jitted(*fargs)
    compile_s = time.perf_counter() - t0
    ref = gdsl.jit(fn, backend="interpret")(*fargs)
    err = float(np.max(np.abs(out - ref)))
    times = {"gdsl-cpu": median_ms(lambda: jitted(*fargs), args.runs)}
    grid = jitted.lower(*fargs).lowering.plan.grid
    if grid != 1:
        single = gdsl.jit(fn, backend="cpu", control=args.control, grid=1)
        err = max(err, float(np.max(np.abs(single(*fargs) - ref))))
        times["gdsl-cpu 1t"] = median_ms(lambda: single(*fargs), args.runs)
    interp = gdsl.jit(fn, backend="interpret")
    times["interpret"] = median_ms(lambda: interp(*fargs), args.interpret_runs, warmup=1)
    if torch is not None:
        tf = p["torch"](torch)
        err = max(err, float(np.max(np.abs(tf().numpy() - ref))))
        threads = torch.get_num_threads()
        times["torch-eager"] = median_ms(tf, args.runs)
        if threads > 1:
            torch.set_num_threads(1)
            times["torch-eager 1t"] = median_ms(tf, args.runs)
            torch.set_num_threads(threads)
    if jax is not None and p["jax"] is not None:
        jf, jargs = p["jax"](jax, jnp)
        jf(*jargs).block_until_ready()
        times["jax-jit"] = median_ms(lambda: jf(*jargs).block_until_ready(), args.runs)
    return compile_s, err, times, grid


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--models", default="lstm,nasrnn,rae")
    ap.add_argument("--interpret-runs", type=int, default=5)
    ap.add_argument("--control", default="device")
    args = ap.parse_args(argv)
    probs = problems(np.random.default_rng(0))
    try:
        import torch
        torch.set_grad_enabled(False)
        torch_note = f"torch {torch.__version__} ({torch.get_num_threads()} threads; '1t': 1 thread)"
    except ImportError:
        torch, torch_note = None, "torch not installed"
    try:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import jax
        import jax.numpy as jnp
        jax_note = f"jax {jax.__version__}"
    except ImportError:
        jax = jnp = None
        jax_note = "jax not installed"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# {torch_note}; {jax_note}; {os.cpu_count()} CPUs (load average {load}); median of {args.runs} "
          f"runs (interpreter: {args.interpret_runs}) after warm-up")
    rows = []
    for name in args.models.split(","):
        rows.append((name, probs[name]["desc"], *run_model(probs[name], args, torch, jax, jnp)))
    systems = list(dict.fromkeys(s for row in rows for s in row[4]))
    print(f"\n{'model':8} {'compile s':>9} " + " ".join(f"{s:>15}" for s in systems))
    for name, _, compile_s, _, times, _ in rows:
        cells = " ".join(f"{times[s]:12.3f} ms" if s in times else f"{'n/a':>15}" for s in systems)
        print(f"{name:8} {compile_s:9.2f} {cells}")
    print("\nratios: time of each system / time of gdsl-cpu (above 1: gdsl-cpu is faster)")
    for name, _, _, _, times, _ in rows:
        print(f"{name:8} " + ", ".join(f"{s} {times[s] / times['gdsl-cpu']:.2f}" for s in systems[1:] if s in times))
    print()
    for name, desc, compile_s, err, _, grid in rows:
        print(f"# {name}: {desc}; gdsl-cpu's default grid: {grid} vEU(s) = threads ('1t': grid=1); "
              f"max |gdsl-cpu - interpreter| (and torch) = {err:.2e}; first call (trace + schedule + "
              f"LLVM IR + O3 + MCJIT) {compile_s:.2f} s")


if __name__ == "__main__":
    main()
