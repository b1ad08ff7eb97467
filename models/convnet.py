"""What the two ResNets (BlockDrop, SkipNet) share: parameter naming, initialisation, and conv / batch-norm
for each framework. Weights use PyTorch state_dict names (`<layer>.weight`, `<bn>.running_mean`, ...), so
`from_state_dict` of those models is a filter and a cast.

Batch norm parameters of a prefix p: p.weight (γ), p.bias (β), p.running_mean, p.running_var; eps 1e-5.
"""
from __future__ import annotations

import numpy as np

from models import common, npnn

BN_EPS = 1e-5
BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def init_conv(rng, weights: dict, name: str, c_out: int, c_in: int, k: int, gain: float = 1.0):
    weights[name + ".weight"] = common.he(rng, (c_out, c_in, k, k), c_in * k * k, gain)


def init_bn(rng, weights: dict, prefix: str, c: int, gamma: float = 1.0):
    """Random inference statistics near the identity, so that activations keep a sane scale."""
    weights[prefix + ".weight"] = (gamma * rng.uniform(0.8, 1.2, c)).astype(np.float32)
    weights[prefix + ".bias"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
    weights[prefix + ".running_mean"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
    weights[prefix + ".running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)


def init_linear(rng, weights: dict, name: str, c_out: int, c_in: int):
    bound = 1.0 / np.sqrt(c_in)
    weights[name + ".weight"] = common.uniform(rng, (c_out, c_in), bound)
    weights[name + ".bias"] = common.uniform(rng, (c_out,), bound)


def from_state_dict(sd, names) -> dict[str, np.ndarray]:
    """The entries of a state_dict named in `names`, as float32 numpy (missing keys raise KeyError)."""
    return {k: common.leaf_to_numpy(sd[k]).astype(np.float32) for k in names}


# ---------------------------------------------------------------------------------------------------------
def np_bn(x, w, p):
    return npnn.batch_norm(x, *(w[f"{p}.{k}"] for k in ("running_mean", "running_var", "weight", "bias")), BN_EPS)


def gdsl_bn(x, w, p):
    import gdsl.nn
    return gdsl.nn.batch_norm(x, w[p + ".running_mean"], w[p + ".running_var"], w[p + ".weight"],
                              w[p + ".bias"], eps=BN_EPS)


def torch_ops(torch):
    """conv / bn / pools in PyTorch with the signatures the models use."""
    from types import SimpleNamespace
    F = torch.nn.functional
    return SimpleNamespace(
        conv=lambda x, w, stride=1, padding=0: F.conv2d(x, w, stride=stride, padding=padding),
        bn=lambda x, w, p: F.batch_norm(x, w[p + ".running_mean"], w[p + ".running_var"], w[p + ".weight"],
                                        w[p + ".bias"], False, 0.0, BN_EPS),
        relu=torch.relu, sigmoid=torch.sigmoid, tanh=torch.tanh, matmul=torch.matmul,
        avg_pool=lambda x, k: F.avg_pool2d(x, k),
        max_pool=lambda x, k, s, p: F.max_pool2d(x, k, s, p),
        gap=lambda x: x.mean(dim=(2, 3)),
        cat=lambda xs, axis: torch.cat(xs, dim=axis), zeros_like=torch.zeros_like,
        zeros=lambda shape, like: torch.zeros(shape, dtype=like.dtype, device=like.device),
        linear=lambda x, w, name: x @ w[name + ".weight"].t() + w[name + ".bias"])


def jax_ops(jax, jnp):
    """The same operations in JAX (lax.conv_general_dilated, reduce_window), full fp32 precision."""
    from types import SimpleNamespace
    lax = jax.lax

    def conv(x, w, stride=1, padding=0):
        return lax.conv_general_dilated(x, w, (stride, stride), [(padding, padding)] * 2,
                                        dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                        precision=lax.Precision.HIGHEST)

    def bn(x, w, p):
        scale = w[p + ".weight"] / jnp.sqrt(w[p + ".running_var"] + BN_EPS)
        shift = w[p + ".bias"] - w[p + ".running_mean"] * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    def avg_pool(x, k):
        return lax.reduce_window(x, 0.0, lax.add, (1, 1, k, k), (1, 1, k, k), "VALID") / (k * k)

    def max_pool(x, k, s, p):
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, k, k), (1, 1, s, s),
                                 ((0, 0), (0, 0), (p, p), (p, p)))
    return SimpleNamespace(
        conv=conv, bn=bn, relu=jax.nn.relu, sigmoid=jax.nn.sigmoid, tanh=jnp.tanh, matmul=jnp.matmul,
        avg_pool=avg_pool, max_pool=max_pool, gap=lambda x: x.mean(axis=(2, 3)),
        cat=lambda xs, axis: jnp.concatenate(xs, axis=axis), zeros_like=jnp.zeros_like,
        zeros=lambda shape, like: jnp.zeros(shape, like.dtype),
        linear=lambda x, w, name: jnp.matmul(x, w[name + ".weight"].T, precision=lax.Precision.HIGHEST)
        + w[name + ".bias"])


def branch_note(cfg, note: str) -> str:
    """A runner's note: `note` where the blocks are decided at run time, else how many run (cfg.executed)."""
    if cfg.executed is None:
        return note
    return f"{sum(cfg.executed)}/{len(cfg.executed)} blocks, decided at trace time"


def torch_runner(weights, batches, device, system, forward, compile_=False, note="") -> common.Runner:
    """A PyTorch Runner for `forward(torch, O, w, inputs)` (O: torch_ops): eager, torch.compile'd, or one
    CUDA graph per input set (system "torch-cudagraph")."""
    torch, dev = common.torch_setup(device)
    w = common.torch_tree(torch, weights, dev)
    xs = [common.torch_tree(torch, b, dev) for b in common.as_batches(batches)]
    O = torch_ops(torch)

    def fwd(inputs):
        with torch.no_grad():
            return forward(torch, O, w, inputs)
    if system == "torch-cudagraph":
        runner = common.torch_cuda_graphs(torch, dev, fwd, [(x,) for x in xs])
        runner.note = note
        return runner
    fn = common.torch_compile(torch, fwd) if compile_ else fwd
    return common.Runner(system, run=lambda i: fn(xs[i]), sync=common.torch_sync(torch, dev), note=note)
