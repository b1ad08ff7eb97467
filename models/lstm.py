"""LSTM: 10 stacked LSTM layers run over 64 time steps (a static loop over time, layers unrolled inside).

Per layer `W_ih[4,H,H]`, `W_hh[4,H,H]` (x·W form, gates i,f,g,o = σ,σ,tanh,σ) and 8 bias vectors
(`b_ih[4,H]`, `b_hh[4,H]`); state starts at zero; returns the last layer's `h` after the last step.
Weights are stored stacked over layers: `W_ih[L,4,H,H]`, `W_hh[L,4,H,H]`, `b_ih[L,4,H]`, `b_hh[L,4,H]`.
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
OVERHEAD_STEPS = 16      # time steps of the overhead test (see overhead_test)


@dataclass(frozen=True)
class Config:
    seq_len: int = 64
    layers: int = 10
    hidden: int = 256          # input size = hidden size
    unrolled: bool = False     # the time loop written out at trace time: no loop in the program


def small() -> Config:
    return Config(seq_len=5, layers=3, hidden=16)


def init_weights(cfg: Config, seed: int = 0) -> dict[str, np.ndarray]:
    """PyTorch's LSTM initialisation: uniform(±1/√H) for every weight and bias."""
    rng = np.random.default_rng(seed)
    L, H = cfg.layers, cfg.hidden
    bound = 1.0 / np.sqrt(H)
    return {"W_ih": common.uniform(rng, (L, 4, H, H), bound), "W_hh": common.uniform(rng, (L, 4, H, H), bound),
            "b_ih": common.uniform(rng, (L, 4, H), bound), "b_hh": common.uniform(rng, (L, 4, H), bound)}


def make_inputs(cfg: Config, batch: int, seed: int = 0) -> dict:
    """x[seq_len, batch, hidden] ~ N(0, 1), as the artifact's torch.randn(64, bs, 256)."""
    rng = np.random.default_rng(10_000 + seed)
    return {"x": rng.standard_normal((cfg.seq_len, batch, cfg.hidden)).astype(np.float32)}


# ---------------------------------------------------------------------------------------------------------
def reference(weights, inputs, cfg: Config) -> np.ndarray:
    w = npnn.f64(weights)
    x = inputs["x"].astype(np.float64)
    T, bs, H = x.shape
    h = [np.zeros((bs, H)) for _ in range(cfg.layers)]
    c = [np.zeros((bs, H)) for _ in range(cfg.layers)]
    for t in range(T):
        inp = x[t]
        for l in range(cfg.layers):
            pre = [inp @ w["W_ih"][l, k] + w["b_ih"][l, k] + h[l] @ w["W_hh"][l, k] + w["b_hh"][l, k]
                   for k in range(4)]
            i, f, g, o = npnn.sigmoid(pre[0]), npnn.sigmoid(pre[1]), np.tanh(pre[2]), npnn.sigmoid(pre[3])
            c[l] = f * c[l] + i * g
            h[l] = o * np.tanh(c[l])
            inp = h[l]
    return h[-1].astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
def lstm_cell(x, h, c, W_ih, W_hh, b_ih, b_hh):
    """One LSTM cell in gdsl: the four gates come from two batched matmuls x·W_ih[4] and h·W_hh[4]."""
    H = h.shape[-1]
    gates = gnp.matmul(x, W_ih) + gnp.matmul(h, W_hh) + (b_ih + b_hh).reshape((4, 1, H))   # [4, bs, H]
    i, f, g, o = gdsl.nn.sigmoid(gates[0]), gdsl.nn.sigmoid(gates[1]), gnp.tanh(gates[2]), gdsl.nn.sigmoid(gates[3])
    c = f * c + i * g
    return o * gnp.tanh(c), c


def forward(weights, inputs, cfg: Config):
    x = inputs["x"]
    _, bs, H = x.shape

    def step(t, state):
        hs, cs = state
        inp, new_h, new_c = x[t], [], []
        for l in range(cfg.layers):
            h, c = lstm_cell(inp, hs[l], cs[l], weights["W_ih"][l], weights["W_hh"][l],
                             weights["b_ih"][l], weights["b_hh"][l])
            new_h.append(h)
            new_c.append(c)
            inp = h
        return tuple(new_h), tuple(new_c)

    zeros = tuple(gnp.zeros((bs, H), dtype=gdsl.float32) for _ in range(cfg.layers))
    loop = common.unrolled_fori_loop if cfg.unrolled else gdsl.fori_loop
    hs, _ = loop(0, x.shape[0], step, (zeros, zeros))
    return hs[-1]


def make_forward(cfg: Config, backend=None, control=None, **options):
    def lstm_forward(weights, inputs):
        return forward(weights, inputs, cfg)
    return common.make_jit(lstm_forward, backend=backend, control=control, **options)


def overhead_test(cfg: Config) -> common.OverheadTest:
    """Figure 15: the time loop as a fori_loop vs written out. PyTorch's loop is Python's either way.

    At most OVERHEAD_STEPS steps, to bound NVRTC's time on the unrolled kernel: 16 steps × 10 layers are
    230 KiB of CUDA and 25 s (identical cells share uTask functions; the kernel body still grows)."""
    cfg = common.replace(cfg, seq_len=min(cfg.seq_len, OVERHEAD_STEPS))
    return common.OverheadTest({"control flow": cfg, "unrolled": common.replace(cfg, unrolled=True)},
                               f"{cfg.seq_len} steps")


# ---------------------------------------------------------------------------------------------------------
# PyTorch twin: torch.nn.LSTM(H, H, num_layers=L). Keys weight_ih_l{k}[4H,H], weight_hh_l{k}[4H,H],
# bias_ih_l{k}[4H], bias_hh_l{k}[4H] (gate rows i,f,g,o); an optional prefix (e.g. "lstm.") is accepted.

def from_state_dict(sd, cfg: Config) -> dict[str, np.ndarray]:
    sd = {k.rsplit(".", 1)[-1]: common.leaf_to_numpy(v) for k, v in sd.items()}
    L, H = cfg.layers, cfg.hidden

    def gates_T(m):  # [4H, in] -> [4, in, H]
        return np.ascontiguousarray(m.reshape(4, H, -1).transpose(0, 2, 1)).astype(np.float32)
    return {"W_ih": np.stack([gates_T(sd[f"weight_ih_l{k}"]) for k in range(L)]),
            "W_hh": np.stack([gates_T(sd[f"weight_hh_l{k}"]) for k in range(L)]),
            "b_ih": np.stack([sd[f"bias_ih_l{k}"].reshape(4, H) for k in range(L)]).astype(np.float32),
            "b_hh": np.stack([sd[f"bias_hh_l{k}"].reshape(4, H) for k in range(L)]).astype(np.float32)}


def to_state_dict(weights, cfg: Config) -> dict[str, np.ndarray]:
    """Inverse of from_state_dict (numpy arrays under nn.LSTM's names)."""
    sd, H = {}, cfg.hidden
    for k in range(cfg.layers):
        sd[f"weight_ih_l{k}"] = weights["W_ih"][k].transpose(0, 2, 1).reshape(4 * H, H)
        sd[f"weight_hh_l{k}"] = weights["W_hh"][k].transpose(0, 2, 1).reshape(4 * H, H)
        sd[f"bias_ih_l{k}"] = weights["b_ih"][k].reshape(4 * H)
        sd[f"bias_hh_l{k}"] = weights["b_hh"][k].reshape(4 * H)
    return sd


def cell(F, x, h, c, W_ih, W_hh, b):
    """The same cell for an array namespace F (torch, or common.jax_ops); b = b_ih + b_hh as [4, 1, H]."""
    gates = F.matmul(x, W_ih) + F.matmul(h, W_hh) + b
    i, f, g, o = F.sigmoid(gates[0]), F.sigmoid(gates[1]), F.tanh(gates[2]), F.sigmoid(gates[3])
    c = f * c + i * g
    return o * F.tanh(c), c


def _stack_step(F, w, cfg):
    def step(inp, hs, cs):
        new_h, new_c = [], []
        for l in range(cfg.layers):
            h, c = cell(F, inp, hs[l], cs[l], w["W_ih"][l], w["W_hh"][l], w["b"][l])
            new_h.append(h)
            new_c.append(c)
            inp = h
        return tuple(new_h), tuple(new_c)
    return step


def _torch_fwd(torch, w, cfg, step_fn=None):
    """The artifact's time-major loop (a Python loop over time, layers unrolled) in PyTorch: the same
    program whether cfg.unrolled or not."""
    step = _stack_step(torch, w, cfg)
    step = step_fn(step) if step_fn else step

    def fwd(x):
        with torch.no_grad():
            hs, cs = (tuple(torch.zeros(x.shape[1], cfg.hidden, device=x.device) for _ in range(cfg.layers))
                      for _ in range(2))      # distinct tensors: torch.compile guards on aliasing
            for t in range(x.shape[0]):
                hs, cs = step(x[t], hs, cs)
            return hs[-1]
    return fwd


def _torch_setup(weights, cfg, batches, device):
    torch, dev = common.torch_setup(device)
    w = common.torch_tree(torch, weights, dev)
    w["b"] = (w["b_ih"] + w["b_hh"]).unsqueeze(2)    # [L, 4, 1, H]
    xs = [torch.as_tensor(b["x"], device=dev) for b in common.as_batches(batches)]
    return torch, dev, w, xs


def torch_eager(weights, cfg, batches, device=None) -> common.Runner:
    torch, dev, w, xs = _torch_setup(weights, cfg, batches, device)
    fwd = _torch_fwd(torch, w, cfg)
    return common.Runner("torch-eager", run=lambda i: fwd(xs[i]), sync=common.torch_sync(torch, dev))


def torch_cudagraph(weights, cfg, batches, device=None) -> common.Runner:
    torch, dev, w, xs = _torch_setup(weights, cfg, batches, device)
    return common.torch_cuda_graphs(torch, dev, _torch_fwd(torch, w, cfg), [(x,) for x in xs])


def torch_compile(weights, cfg, batches, device=None) -> common.Runner:
    """torch.compile of one time step (10 fused cells); the time loop stays in Python."""
    torch, dev, w, xs = _torch_setup(weights, cfg, batches, device)
    fwd = _torch_fwd(torch, w, cfg, step_fn=lambda f: common.torch_compile(torch, f))
    return common.Runner("torch-compile", run=lambda i: fwd(xs[i]), sync=common.torch_sync(torch, dev),
                         note="compiled time step, Python time loop")


# cuDNN: the peer an LSTM user would pick, torch.nn.LSTM(H, H, num_layers=L) with the zoo's weights loaded
# through to_state_dict (one cuDNN call per forward: all steps and layers inside the library).

def nn_lstm_forward(weights, cfg, device):
    """(torch, device, fwd) where fwd(x) = last layer's h of torch.nn.LSTM holding these weights."""
    torch, dev = common.torch_setup(device)
    net = torch.nn.LSTM(cfg.hidden, cfg.hidden, num_layers=cfg.layers)
    net.load_state_dict({k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in to_state_dict(weights, cfg).items()})
    net = net.to(dev).eval()

    def fwd(x):
        with torch.no_grad():
            out, _ = net(x)            # h0 = c0 = 0, as the reference
            return out[-1]
    return torch, dev, fwd


def _cudnn_setup(weights, cfg, batches, device):
    torch, dev, fwd = nn_lstm_forward(weights, cfg, device)
    if dev.type != "cuda":
        raise common.BaselineUnavailable("cuDNN needs a CUDA device")
    if not torch.backends.cudnn.is_available() or not torch.backends.cudnn.enabled:
        raise common.BaselineUnavailable("PyTorch has no usable cuDNN here")
    xs = [torch.as_tensor(b["x"], device=dev) for b in common.as_batches(batches)]
    return torch, dev, fwd, xs


def torch_cudnn(weights, cfg, batches, device=None) -> common.Runner:
    """torch.nn.LSTM on cuDNN, eager (TF32 off)."""
    torch, dev, fwd, xs = _cudnn_setup(weights, cfg, batches, device)
    return common.Runner("torch-cudnn", run=lambda i: fwd(xs[i]), sync=common.torch_sync(torch, dev),
                         note="torch.nn.LSTM (cuDNN)")


def torch_cudnn_graph(weights, cfg, batches, device=None) -> common.Runner:
    """torch.nn.LSTM on cuDNN captured in a CUDA graph (TF32 off)."""
    torch, dev, fwd, xs = _cudnn_setup(weights, cfg, batches, device)
    runner = common.torch_cuda_graphs(torch, dev, fwd, [(x,) for x in xs], system="torch-cudnn-graph")
    runner.note = "torch.nn.LSTM (cuDNN) in a CUDA graph"
    return runner


def jax_jit(weights, cfg, batches, device=None) -> common.Runner:
    jax, jnp = common.jax_setup()
    F = common.jax_ops(jax, jnp)

    def fwd(w, inputs):
        x = inputs["x"]
        step = _stack_step(F, dict(w, b=(w["b_ih"] + w["b_hh"])[:, :, None, :]), cfg)
        zeros = (jnp.zeros((x.shape[1], cfg.hidden), jnp.float32),) * cfg.layers
        loop = common.unrolled_fori_loop if cfg.unrolled else jax.lax.fori_loop
        return loop(0, x.shape[0], lambda t, s: step(x[t], *s), (zeros, zeros))[0][-1]
    return common.jax_runner(jax, jax.jit(fwd), weights, batches)


if __name__ == "__main__":
    raise SystemExit(common.main(sys.modules[__name__]))
