"""Attention: 32 decoding steps of multi-head attention with an in-place KV-cache write (a static loop).

12 heads × 64; cache length 64 with the first 32 slots given; `W_q, W_k, W_v, W_o[12,64,64]`. Step at
`g = 32..63`: `q = x·W_q`; `K[:,:,g] = x·W_k`; `V[:,:,g] = x·W_v`; `a = softmax(0.125·q·Kᵀ)` over all 64
slots (no mask: unwritten slots are zero keys); `x = (a·V)·W_o`. x is `[bs,12,1,64]`; returns `(K, V, x)`.
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
OVERHEAD_STEPS = 32      # decoding steps of the overhead test (all of them; see overhead_test)


@dataclass(frozen=True)
class Config:
    heads: int = 12
    head_dim: int = 64
    cache_len: int = 64
    start_len: int = 32
    unrolled: bool = False     # the decoding loop written out at trace time: no loop in the program

    @property
    def scale(self) -> float:
        return float(self.head_dim) ** -0.5          # 0.125 at head_dim 64


def small() -> Config:
    return Config(heads=2, head_dim=8, cache_len=8, start_len=4)


def init_weights(cfg: Config, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape, d = (cfg.heads, cfg.head_dim, cfg.head_dim), cfg.head_dim
    return {name: common.xavier(rng, shape, d, d) for name in ("W_q", "W_k", "W_v", "W_o")}


def make_inputs(cfg: Config, batch: int, seed: int = 0) -> dict:
    """x ~ N(0,1) [bs,heads,1,dim]; K, V [bs,heads,cache,dim] with the first start_len slots N(0,1), rest 0."""
    rng = np.random.default_rng(30_000 + seed)
    x = rng.standard_normal((batch, cfg.heads, 1, cfg.head_dim)).astype(np.float32)
    K = np.zeros((batch, cfg.heads, cfg.cache_len, cfg.head_dim), np.float32)
    V = np.zeros_like(K)
    K[:, :, :cfg.start_len] = rng.standard_normal(K[:, :, :cfg.start_len].shape)
    V[:, :, :cfg.start_len] = rng.standard_normal(V[:, :, :cfg.start_len].shape)
    return {"x": x, "K": K, "V": V}


# ---------------------------------------------------------------------------------------------------------
def reference(weights, inputs, cfg: Config):
    w = npnn.f64(weights)
    x, K, V = (inputs[k].astype(np.float64) for k in ("x", "K", "V"))
    K, V = K.copy(), V.copy()
    for g in range(cfg.start_len, cfg.cache_len):
        q = x @ w["W_q"]                                    # [bs,h,1,d] @ [h,d,d]
        K[:, :, g] = (x @ w["W_k"])[:, :, 0]
        V[:, :, g] = (x @ w["W_v"])[:, :, 0]
        a = npnn.softmax(cfg.scale * (q @ K.transpose(0, 1, 3, 2)), axis=-1)   # [bs,h,1,cache]
        x = (a @ V) @ w["W_o"]
    return K.astype(np.float32), V.astype(np.float32), x.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
def forward(weights, inputs, cfg: Config):
    W_q, W_k, W_v, W_o = (weights[k] for k in ("W_q", "W_k", "W_v", "W_o"))

    def step(g, carry):
        K, V, x = carry
        q = gnp.matmul(x, W_q)
        K = K.at[:, :, g].set(gnp.matmul(x, W_k)[:, :, 0])
        V = V.at[:, :, g].set(gnp.matmul(x, W_v)[:, :, 0])
        a = gdsl.nn.softmax(cfg.scale * gnp.matmul(q, gnp.swapaxes(K, 2, 3)), axis=-1)
        return K, V, gnp.matmul(gnp.matmul(a, V), W_o)

    loop = common.unrolled_fori_loop if cfg.unrolled else gdsl.fori_loop
    return loop(cfg.start_len, cfg.cache_len, step, (inputs["K"], inputs["V"], inputs["x"]))


def make_forward(cfg: Config, backend=None, control=None, **options):
    def attention_forward(weights, inputs):
        return forward(weights, inputs, cfg)
    return common.make_jit(attention_forward, backend=backend, control=control, **options)


def overhead_test(cfg: Config) -> common.OverheadTest:
    """Figure 15: the decoding loop as a fori_loop vs written out. PyTorch's loop is Python's either way.

    At most the last OVERHEAD_STEPS steps (more slots given, each step as wide), to bound NVRTC's time on
    the unrolled kernel; all 32 steps are 91 KiB of CUDA and 5 s (identical steps share uTask functions)."""
    cfg = common.replace(cfg, start_len=max(cfg.start_len, cfg.cache_len - OVERHEAD_STEPS))
    return common.OverheadTest({"control flow": cfg, "unrolled": common.replace(cfg, unrolled=True)},
                               f"{cfg.cache_len - cfg.start_len} steps")


# ---------------------------------------------------------------------------------------------------------
# PyTorch twin: the artifact's Attention module, keys `weight_q`, `weight_k`, `weight_v`, `weight_o`, each
# [heads, dim, dim] in x·W form.

def from_state_dict(sd, cfg: Config) -> dict[str, np.ndarray]:
    sd = {k.rsplit(".", 1)[-1]: common.leaf_to_numpy(v) for k, v in sd.items()}
    return {f"W_{n}": sd[f"weight_{n}"].astype(np.float32) for n in "qkvo"}


def to_state_dict(weights, cfg: Config) -> dict[str, np.ndarray]:
    return {f"weight_{n}": weights[f"W_{n}"] for n in "qkvo"}


def _torch_setup(weights, batches, device):
    torch, dev = common.torch_setup(device)
    return torch, dev, common.torch_tree(torch, weights, dev), \
        [common.torch_tree(torch, b, dev) for b in common.as_batches(batches)]


def _torch_fwd(torch, w, cfg, step_fn=None):
    def step(g, K, V, x):
        # K, V are updated in place, as the artifact's ScatterND; g is a Python int (static loop)
        q = torch.matmul(x, w["W_q"])
        K[:, :, g] = torch.matmul(x, w["W_k"])[:, :, 0]
        V[:, :, g] = torch.matmul(x, w["W_v"])[:, :, 0]
        a = torch.softmax(cfg.scale * torch.matmul(q, K.transpose(2, 3)), dim=-1)
        return torch.matmul(torch.matmul(a, V), w["W_o"])
    step = step_fn(step) if step_fn else step

    def fwd(inputs):
        with torch.no_grad():
            K, V, x = inputs["K"].clone(), inputs["V"].clone(), inputs["x"]
            for g in range(cfg.start_len, cfg.cache_len):
                x = step(g, K, V, x)
            return K, V, x
    return fwd


def torch_eager(weights, cfg, batches, device=None) -> common.Runner:
    torch, dev, w, xs = _torch_setup(weights, batches, device)
    fwd = _torch_fwd(torch, w, cfg)
    return common.Runner("torch-eager", run=lambda i: fwd(xs[i]), sync=common.torch_sync(torch, dev))


def torch_cudagraph(weights, cfg, batches, device=None) -> common.Runner:
    torch, dev, w, xs = _torch_setup(weights, batches, device)
    return common.torch_cuda_graphs(torch, dev, _torch_fwd(torch, w, cfg), [(x,) for x in xs])


def torch_compile(weights, cfg, batches, device=None) -> common.Runner:
    """torch.compile of the whole forward (the 32 steps are unrolled by Dynamo)."""
    torch, dev, w, xs = _torch_setup(weights, batches, device)
    fwd = common.torch_compile(torch, _torch_fwd(torch, w, cfg))
    return common.Runner("torch-compile", run=lambda i: fwd(xs[i]), sync=common.torch_sync(torch, dev))


def jax_jit(weights, cfg, batches, device=None) -> common.Runner:
    jax, jnp = common.jax_setup()

    def fwd(w, inputs):
        def step(g, carry):
            K, V, x = carry
            q = x @ w["W_q"]
            K = K.at[:, :, g].set((x @ w["W_k"])[:, :, 0])
            V = V.at[:, :, g].set((x @ w["W_v"])[:, :, 0])
            a = jax.nn.softmax(cfg.scale * (q @ jnp.swapaxes(K, 2, 3)), axis=-1)
            return K, V, (a @ V) @ w["W_o"]
        loop = common.unrolled_fori_loop if cfg.unrolled else jax.lax.fori_loop
        return loop(cfg.start_len, cfg.cache_len, step, (inputs["K"], inputs["V"], inputs["x"]))
    return common.jax_runner(jax, jax.jit(fwd), weights, batches)


if __name__ == "__main__":
    raise SystemExit(common.main(sys.modules[__name__]))
