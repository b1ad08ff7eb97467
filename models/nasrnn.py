"""NASRNN: the NAS cell of Zoph & Le run over 1000 time steps (a static loop over time).

`W_ih[8,H,H]`, `W_hh[8,H,H]` (x·W form), no bias. Per step: `s_k = x·W_ih[k] + m·W_hh[k]`;
l0..l7 = σ,relu,σ,relu,tanh,σ,tanh,σ of s0..s7; `a = tanh(l0·l1)`, `b = tanh(l2+l3)`, `c' = tanh(l4·l5)`,
`d = σ(l6+l7)`; `c = tanh(a + c)·b`; `m = tanh(c·tanh(c' + d))`. State (m, c) starts at zero; returns `c + m`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

import gdsl
import gdsl.nn
import gdsl.numpy as gnp
from models import common, npnn

BATCHES = (1, 64)
OVERHEAD_STEPS = 200     # time steps of the overhead test (see overhead_test)


@dataclass(frozen=True)
class Config:
    seq_len: int = 1000
    hidden: int = 256          # input size = hidden size
    unrolled: bool = False     # the time loop written out at trace time: no loop in the program


def small() -> Config:
    return Config(seq_len=12, hidden=16)


def init_weights(cfg: Config, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    H, bound = cfg.hidden, 1.0 / np.sqrt(cfg.hidden)
    return {"W_ih": common.uniform(rng, (8, H, H), bound), "W_hh": common.uniform(rng, (8, H, H), bound)}


def make_inputs(cfg: Config, batch: int, seed: int = 0) -> dict:
    """x[seq_len, batch, hidden] ~ N(0, 1), as the artifact's torch.randn(1000, bs, 256)."""
    rng = np.random.default_rng(20_000 + seed)
    return {"x": rng.standard_normal((cfg.seq_len, batch, cfg.hidden)).astype(np.float32)}


# ---------------------------------------------------------------------------------------------------------
def reference(weights, inputs, cfg: Config) -> np.ndarray:
    w = npnn.f64(weights)
    x = inputs["x"].astype(np.float64)
    m = np.zeros(x.shape[1:])
    c = np.zeros(x.shape[1:])
    acts = [npnn.sigmoid, npnn.relu, npnn.sigmoid, npnn.relu, np.tanh, npnn.sigmoid, np.tanh, npnn.sigmoid]
    for t in range(x.shape[0]):
        l = [acts[k](x[t] @ w["W_ih"][k] + m @ w["W_hh"][k]) for k in range(8)]
        a, b = np.tanh(l[0] * l[1]), np.tanh(l[2] + l[3])
        c2, d = np.tanh(l[4] * l[5]), npnn.sigmoid(l[6] + l[7])
        c = np.tanh(a + c) * b
        m = np.tanh(c * np.tanh(c2 + d))
    return (c + m).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
def forward(weights, inputs, cfg: Config):
    x, W_ih, W_hh = inputs["x"], weights["W_ih"], weights["W_hh"]
    sigmoid, relu = gdsl.nn.sigmoid, gdsl.nn.relu

    def step(t, state):
        m, c = state
        s = gnp.matmul(x[t], W_ih) + gnp.matmul(m, W_hh)            # [8, bs, H]
        l0, l1, l2, l3 = sigmoid(s[0]), relu(s[1]), sigmoid(s[2]), relu(s[3])
        l4, l5, l6, l7 = gnp.tanh(s[4]), sigmoid(s[5]), gnp.tanh(s[6]), sigmoid(s[7])
        a, b = gnp.tanh(l0 * l1), gnp.tanh(l2 + l3)
        c2, d = gnp.tanh(l4 * l5), sigmoid(l6 + l7)
        c = gnp.tanh(a + c) * b
        m = gnp.tanh(c * gnp.tanh(c2 + d))
        return m, c

    zeros = gnp.zeros(x.shape[1:], dtype=gdsl.float32)
    loop = common.unrolled_fori_loop if cfg.unrolled else gdsl.fori_loop
    m, c = loop(0, x.shape[0], step, (zeros, zeros))
    return c + m


def make_forward(cfg: Config, backend=None, control=None, **options):
    def nasrnn_forward(weights, inputs):
        return forward(weights, inputs, cfg)
    return common.make_jit(nasrnn_forward, backend=backend, control=control, **options)


def overhead_test(cfg: Config) -> common.OverheadTest:
    """Figure 15: the time loop as a fori_loop vs written out. PyTorch's loop is Python's either way.

    At most OVERHEAD_STEPS steps, to bound NVRTC's time on the unrolled kernel: 200 steps are 258 KiB of
    CUDA and 30 s (identical steps share uTask functions; the kernel body still grows)."""
    cfg = common.replace(cfg, seq_len=min(cfg.seq_len, OVERHEAD_STEPS))
    return common.OverheadTest({"control flow": cfg, "unrolled": common.replace(cfg, unrolled=True)},
                               f"{cfg.seq_len} steps")


# ---------------------------------------------------------------------------------------------------------
# PyTorch twin: the artifact's NasRNN module, keys `weight_ih[8,H,H]`, `weight_hh[8,H,H]` (x·W form).

def from_state_dict(sd, cfg: Config) -> dict[str, np.ndarray]:
    sd = {k.rsplit(".", 1)[-1]: common.leaf_to_numpy(v) for k, v in sd.items()}
    return {"W_ih": sd["weight_ih"].astype(np.float32), "W_hh": sd["weight_hh"].astype(np.float32)}


def to_state_dict(weights, cfg: Config) -> dict[str, np.ndarray]:
    return {"weight_ih": weights["W_ih"], "weight_hh": weights["W_hh"]}


def _cell(F, x, m, c, W_ih, W_hh):
    """The NAS cell for an array namespace F with matmul/sigmoid/relu/tanh (torch or jax.numpy+nn)."""
    s = F.matmul(x, W_ih) + F.matmul(m, W_hh)
    l0, l1, l2, l3 = F.sigmoid(s[0]), F.relu(s[1]), F.sigmoid(s[2]), F.relu(s[3])
    l4, l5, l6, l7 = F.tanh(s[4]), F.sigmoid(s[5]), F.tanh(s[6]), F.sigmoid(s[7])
    a, b = F.tanh(l0 * l1), F.tanh(l2 + l3)
    c2, d = F.tanh(l4 * l5), F.sigmoid(l6 + l7)
    c = F.tanh(a + c) * b
    return F.tanh(c * F.tanh(c2 + d)), c


def _torch_fwd(torch, w, step_fn=None):
    def step(x, m, c):
        return _cell(torch, x, m, c, w["W_ih"], w["W_hh"])
    step = step_fn(step) if step_fn else step

    def fwd(x):
        with torch.no_grad():
            m, c = torch.zeros(x.shape[1:], device=x.device), torch.zeros(x.shape[1:], device=x.device)
            for t in range(x.shape[0]):
                m, c = step(x[t], m, c)
            return c + m
    return fwd


def _torch_setup(weights, batches, device):
    torch, dev = common.torch_setup(device)
    return torch, dev, common.torch_tree(torch, weights, dev), \
        [torch.as_tensor(b["x"], device=dev) for b in common.as_batches(batches)]


def torch_eager(weights, cfg, batches, device=None) -> common.Runner:
    torch, dev, w, xs = _torch_setup(weights, batches, device)
    fwd = _torch_fwd(torch, w)
    return common.Runner("torch-eager", run=lambda i: fwd(xs[i]), sync=common.torch_sync(torch, dev))


def torch_cudagraph(weights, cfg, batches, device=None) -> common.Runner:
    torch, dev, w, xs = _torch_setup(weights, batches, device)
    return common.torch_cuda_graphs(torch, dev, _torch_fwd(torch, w), [(x,) for x in xs])


def torch_compile(weights, cfg, batches, device=None) -> common.Runner:
    """torch.compile of one time step (a fused NAS cell); the 1000-step loop stays in Python."""
    torch, dev, w, xs = _torch_setup(weights, batches, device)
    fwd = _torch_fwd(torch, w, step_fn=lambda f: common.torch_compile(torch, f))
    return common.Runner("torch-compile", run=lambda i: fwd(xs[i]), sync=common.torch_sync(torch, dev),
                         note="compiled time step, Python time loop")


def jax_jit(weights, cfg, batches, device=None) -> common.Runner:
    jax, jnp = common.jax_setup()
    F = common.jax_ops(jax, jnp)

    def fwd(w, inputs):
        x = inputs["x"]
        zeros = jnp.zeros(x.shape[1:], jnp.float32)
        loop = common.unrolled_fori_loop if cfg.unrolled else jax.lax.fori_loop
        m, c = loop(0, x.shape[0], lambda t, s: _cell(F, x[t], *s, w["W_ih"], w["W_hh"]), (zeros, zeros))
        return c + m
    return common.jax_runner(jax, jax.jit(fwd), weights, batches)


if __name__ == "__main__":
    raise SystemExit(common.main(sys.modules[__name__]))
