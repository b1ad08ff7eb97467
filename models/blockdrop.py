"""BlockDrop: ResNet-32 for CIFAR with one `cond` per residual block (15), driven by a policy.

conv3×3 3→16 + BN + relu; 3 stages × 5 BasicBlocks (16/32/64 channels; stride 2 at the first block of
stages 2 and 3, whose shortcut is avgpool(2) + zero channels); block b runs only if `sum(action[:, b]) > 0`,
and then per sample `x = mask·relu(shortcut + block(x)) + (1−mask)·shortcut`, else `x = shortcut`;
global avgpool → `Linear(64→10)`. Actions are `policy_probs > 0.5`; the probs are an input (the policy net is
not timed). BasicBlock = conv3×3 → BN → relu → conv3×3 → BN.

Weights use the names of BlockDrop's FlatResNet32 state_dict: `conv1.weight`, `bn1.*`,
`blocks.{stage}.{block}.conv1.weight`, `blocks.{stage}.{block}.bn1.*`, `...conv2.weight`, `...bn2.*`,
`fc.weight[10,64]`, `fc.bias` (bn.* = weight, bias, running_mean, running_var).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

import gdsl
import gdsl.nn
import gdsl.numpy as gnp
from models import common, convnet, npnn

BATCHES = (1, 64)
RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)
OVERHEAD_RATIO = 0.5     # executed ratio of the overhead test


@dataclass(frozen=True)
class Config:
    blocks_per_stage: int = 5
    widths: tuple = (16, 32, 64)
    image: int = 32
    classes: int = 10
    executed: tuple | None = None   # blocks decided at trace time: exactly those marked True run, no cond
    #                                 (the overhead test's "no skip" and "trace"); None: a cond per block

    @property
    def num_blocks(self) -> int:
        return self.blocks_per_stage * len(self.widths)


def small() -> Config:
    return Config(blocks_per_stage=2, widths=(4, 8, 16), image=8, classes=10)


def layout(cfg: Config):
    """[(prefix, c_in, c_out, stride)] of every residual block, in order."""
    out, c_in = [], cfg.widths[0]
    for s, c in enumerate(cfg.widths):
        for b in range(cfg.blocks_per_stage):
            stride = 2 if s > 0 and b == 0 else 1
            out.append((f"blocks.{s}.{b}", c_in, c, stride))
            c_in = c
    return out


def init_weights(cfg: Config, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w: dict = {}
    convnet.init_conv(rng, w, "conv1", cfg.widths[0], 3, 3)
    convnet.init_bn(rng, w, "bn1", cfg.widths[0])
    for p, c_in, c, _ in layout(cfg):
        convnet.init_conv(rng, w, p + ".conv1", c, c_in, 3)
        convnet.init_bn(rng, w, p + ".bn1", c)
        convnet.init_conv(rng, w, p + ".conv2", c, c, 3)
        convnet.init_bn(rng, w, p + ".bn2", c, gamma=0.3)     # small residual branches: a sane scale at depth
    convnet.init_linear(rng, w, "fc", cfg.classes, cfg.widths[-1])
    return w


def make_inputs(cfg: Config, batch: int, seed: int = 0, ratio: float | None = None) -> dict:
    """Random images and policy probabilities.

    ratio None: each block runs for the batch with probability ½; a running block has per-sample probs
    uniform in (0, 1) with at least one sample above ½, a skipped block has all probs below ½.
    ratio r: the fixed pattern common.ratio_pattern(num_blocks, r), every sample acting alike.
    """
    rng = np.random.default_rng(50_000 + seed)
    x = rng.standard_normal((batch, 3, cfg.image, cfg.image)).astype(np.float32)
    n = cfg.num_blocks
    if ratio is None:
        runs = rng.random(n) < 0.5
        probs = np.where(runs, rng.random((batch, n)), 0.5 * rng.random((batch, n)))
        lead = rng.integers(0, batch, size=n)
        probs[lead, np.arange(n)] = np.where(runs, 0.5 + 0.5 * rng.random(n) + 1e-3, probs[lead, np.arange(n)])
    else:
        probs = np.broadcast_to(np.where(common.ratio_pattern(n, ratio), 0.9, 0.1), (batch, n))
    return {"x": x, "probs": np.ascontiguousarray(probs, dtype=np.float32)}


def executed_blocks(inputs) -> np.ndarray:
    """Which blocks run for this batch (the branch decisions)."""
    return (inputs["probs"] > 0.5).any(axis=0)


def describe(out, inputs, cfg: Config) -> str:
    ran = executed_blocks(inputs)
    return f"{int(ran.sum())}/{ran.size} blocks executed: {''.join('1' if r else '0' for r in ran)}"


# ---------------------------------------------------------------------------------------------------------
def reference(weights, inputs, cfg: Config) -> np.ndarray:
    w = npnn.f64(weights)
    x = inputs["x"].astype(np.float64)
    action = (inputs["probs"] > 0.5).astype(np.float64)
    x = npnn.relu(convnet.np_bn(npnn.conv2d(x, w["conv1.weight"], padding=1), w, "bn1"))
    for t, (p, c_in, c, stride) in enumerate(layout(cfg)):
        shortcut = x
        if stride != 1 or c_in != c:
            pooled = npnn.avg_pool2d(x, stride)
            shortcut = np.concatenate([pooled, np.zeros_like(pooled)], axis=1)
        if action[:, t].sum() > 0:
            y = npnn.conv2d(x, w[p + ".conv1.weight"], stride=stride, padding=1)
            y = npnn.relu(convnet.np_bn(y, w, p + ".bn1"))
            y = convnet.np_bn(npnn.conv2d(y, w[p + ".conv2.weight"], padding=1), w, p + ".bn2")
            m = action[:, t][:, None, None, None]
            x = m * npnn.relu(shortcut + y) + (1 - m) * shortcut
        else:
            x = shortcut
    x = npnn.global_avg_pool(x)
    return (x @ w["fc.weight"].T + w["fc.bias"]).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
def forward(weights, inputs, cfg: Config):
    w = weights
    relu, conv2d, bn = gdsl.nn.relu, gdsl.nn.conv2d, convnet.gdsl_bn
    bs = inputs["x"].shape[0]
    action = (inputs["probs"] > 0.5).astype(gdsl.float32)
    x = relu(bn(conv2d(inputs["x"], w["conv1.weight"], padding=1), w, "bn1"))
    for t, (p, c_in, c, stride) in enumerate(layout(cfg)):
        shortcut = x
        if stride != 1 or c_in != c:
            pooled = gdsl.nn.avg_pool2d(x, stride)
            shortcut = gnp.concatenate([pooled, gnp.zeros_like(pooled)], axis=1)

        def run_block(x, shortcut, mask, p=p, stride=stride):
            y = relu(bn(conv2d(x, w[p + ".conv1.weight"], stride=stride, padding=1), w, p + ".bn1"))
            y = bn(conv2d(y, w[p + ".conv2.weight"], padding=1), w, p + ".bn2")
            return mask * relu(shortcut + y) + (1 - mask) * shortcut

        def skip_block(x, shortcut, mask):
            return shortcut

        mask = action[:, t].reshape((bs, 1, 1, 1))
        if cfg.executed is None:
            x = gdsl.cond(gnp.sum(action[:, t]) > 0, run_block, skip_block, x, shortcut, mask)
        else:
            x = (run_block if cfg.executed[t] else skip_block)(x, shortcut, mask)
    return gdsl.nn.linear(gdsl.nn.global_avg_pool(x), w["fc.weight"].T, w["fc.bias"])


def make_forward(cfg: Config, backend=None, control=None, **options):
    def blockdrop_forward(weights, inputs):
        return forward(weights, inputs, cfg)
    return common.make_jit(blockdrop_forward, backend=backend, control=control, **options)


def overhead_test(cfg: Config, ratio: float = OVERHEAD_RATIO) -> common.OverheadTest:
    """Figure 16 at the 50 % pattern: a cond per block, vs every block run ("no skip", blended by the
    mask), vs only the executed blocks traced ("trace"). A CUDA graph cannot hold the conds."""
    ran = tuple(bool(r) for r in common.ratio_pattern(cfg.num_blocks, ratio))
    return common.OverheadTest({"control flow": cfg, "no skip": common.replace(cfg, executed=(True,) * len(ran)),
                                "trace": common.replace(cfg, executed=ran)},
                               f"{sum(ran)}/{len(ran)} blocks run", inputs={"ratio": ratio},
                               no_control_flow=("torch-cudagraph",))


# ---------------------------------------------------------------------------------------------------------
def from_state_dict(sd, cfg: Config) -> dict[str, np.ndarray]:
    """Weights from a FlatResNet32 state_dict (names in the module docstring; extra keys are ignored)."""
    return convnet.from_state_dict(sd, init_weights(cfg).keys())


def to_state_dict(weights, cfg: Config) -> dict[str, np.ndarray]:
    return dict(weights)


def generic_forward(O, w, inputs, cfg: Config, branch):
    """BlockDrop for an op namespace O (convnet.torch_ops / jax_ops) and a branch combinator
    `branch(pred, run, skip, *operands)` (Python if, lax.cond, or always-run; unused with cfg.executed)."""
    x, probs = inputs["x"], inputs["probs"]
    action = (probs > 0.5).float() if hasattr(probs, "float") else (probs > 0.5).astype(probs.dtype)
    x = O.relu(O.bn(O.conv(x, w["conv1.weight"], padding=1), w, "bn1"))
    for t, (p, c_in, c, stride) in enumerate(layout(cfg)):
        shortcut = x
        if stride != 1 or c_in != c:
            pooled = O.avg_pool(x, stride)
            shortcut = O.cat([pooled, O.zeros_like(pooled)], 1)

        def run(x, shortcut, mask, p=p, stride=stride):
            y = O.relu(O.bn(O.conv(x, w[p + ".conv1.weight"], stride, 1), w, p + ".bn1"))
            y = O.bn(O.conv(y, w[p + ".conv2.weight"], 1, 1), w, p + ".bn2")
            return mask * O.relu(shortcut + y) + (1 - mask) * shortcut

        def skip(x, shortcut, mask):
            return shortcut

        mask = action[:, t].reshape(-1, 1, 1, 1)
        if cfg.executed is None:
            x = branch(action[:, t].sum() > 0, run, skip, x, shortcut, mask)
        else:
            x = (run if cfg.executed[t] else skip)(x, shortcut, mask)
    return O.linear(O.gap(x), w, "fc")


def _torch(weights, cfg, batches, device, branch, system, compile_=False, note=""):
    return convnet.torch_runner(weights, batches, device, system,
                                lambda torch, O, w, inputs: generic_forward(O, w, inputs, cfg, branch), compile_,
                                convnet.branch_note(cfg, note))


def torch_eager(weights, cfg, batches, device=None) -> common.Runner:
    return _torch(weights, cfg, batches, device, common.host_if, "torch-eager", note="host if, one sync per block")


def torch_compile(weights, cfg, batches, device=None) -> common.Runner:
    return _torch(weights, cfg, batches, device, common.host_if, "torch-compile", compile_=True,
                  note="graph breaks at each data-dependent if")


def torch_cudagraph(weights, cfg, batches, device=None) -> common.Runner:
    return _torch(weights, cfg, batches, device, common.always_run, "torch-cudagraph",
                  note="no control flow: every block run, blended by the mask")


def jax_jit(weights, cfg, batches, device=None) -> common.Runner:
    jax, jnp = common.jax_setup()
    O = convnet.jax_ops(jax, jnp)
    fwd = jax.jit(lambda w, inputs: generic_forward(O, w, inputs, cfg, jax.lax.cond))
    return common.jax_runner(jax, fwd, weights, batches)


if __name__ == "__main__":
    raise SystemExit(common.main(sys.modules[__name__]))
