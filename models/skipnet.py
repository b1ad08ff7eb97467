"""SkipNet: ResNet-101 whose 32 gated bottleneck blocks each sit in a `cond` driven by a gate computed on the fly.

Stem conv7×7/2 + BN + relu + maxpool3×3/2; bottlenecks [3,4,23,3] (64/128/256/512 planes × 4, stride 2 in
the 3×3 conv at the first block of groups 2–4, projection shortcut conv1×1 + BN at each group's first
block). The first block always runs; before each of the other 32: global avgpool → 1×1 conv (C→10) → a
shared LSTM cell (10→10, state carried across blocks) → 1×1 conv (10→1) → σ → the block runs for the
samples whose gate is > 0.5 (`cond` on `sum(mask) > 0`, blend `mask·block + (1−mask)·shortcut`), else the
shortcut is kept. avgpool → `Linear(2048→1000)`. Returns `(logits, gates[bs, 32] as int32 0/1)`.

Input `gate_control[bs, 32]` is added to each gate's pre-sigmoid value: 0 leaves the learned gate alone,
±FORCE forces the block on/off (the artifact's forced executed ratios).

Weights use the names of SkipNet's RecurrentGatedResNet state_dict: `conv1.weight`, `bn1.*`,
`group{g}_layer{i}.{conv1,conv2,conv3}.weight`, `group{g}_layer{i}.{bn1,bn2,bn3}.*`, `group{g}_ds{i}.0.weight`,
`group{g}_ds{i}.1.*` (projection shortcut), `group{g}_gate{i}.1.weight[10,C,1,1]`, `group{g}_gate{i}.1.bias`,
`control.rnn.{weight_ih_l0[40,10], weight_hh_l0[40,10], bias_ih_l0, bias_hh_l0}`,
`control.proj.weight[1,10,1,1]`, `control.proj.bias`, `fc.weight[1000,2048]`, `fc.bias`
(g = 1..4; bn.* = weight, bias, running_mean, running_var; the last block's gate is unused and ignored).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

import gdsl
import gdsl.nn
import gdsl.numpy as gnp
from models import common, convnet, npnn

BATCHES = (1,)
RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)
OVERHEAD_RATIO = 0.5     # forced executed ratio of the overhead test
FORCE = 50.0        # σ(±50) is 1 or 0 in float32: the gate is decided whatever the network computes


@dataclass(frozen=True)
class Config:
    layers: tuple = (3, 4, 23, 3)
    base: int = 64
    image: int = 224
    classes: int = 1000
    gate_dim: int = 10          # embed = hidden size of the gate's LSTM
    expansion: int = 4
    executed: tuple | None = None   # blocks decided at trace time: exactly those marked True run, no cond
    #                                 (the overhead test's "no skip" and "trace"); None: a cond per block

    @property
    def num_gates(self) -> int:
        return sum(self.layers) - 1


def small() -> Config:
    return Config(layers=(1, 1, 2, 1), base=4, image=32, classes=10)


def layout(cfg: Config):
    """[(name, c_in, planes, stride, has_projection)] of every bottleneck block, in order."""
    out, c_in = [], cfg.base
    for g, n in enumerate(cfg.layers, start=1):
        planes = cfg.base * 2 ** (g - 1)
        for i in range(n):
            stride = 2 if i == 0 and g > 1 else 1
            projection = i == 0 and (stride != 1 or c_in != planes * cfg.expansion)
            out.append((f"group{g}_layer{i}", c_in, planes, stride, projection))
            c_in = planes * cfg.expansion
    return out


def init_weights(cfg: Config, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w: dict = {}
    E, G = cfg.expansion, cfg.gate_dim
    convnet.init_conv(rng, w, "conv1", cfg.base, 3, 7)
    convnet.init_bn(rng, w, "bn1", cfg.base)
    blocks = layout(cfg)
    for k, (name, c_in, planes, _stride, proj) in enumerate(blocks):
        convnet.init_conv(rng, w, name + ".conv1", planes, c_in, 1)
        convnet.init_bn(rng, w, name + ".bn1", planes)
        convnet.init_conv(rng, w, name + ".conv2", planes, planes, 3)
        convnet.init_bn(rng, w, name + ".bn2", planes)
        convnet.init_conv(rng, w, name + ".conv3", planes * E, planes, 1)
        convnet.init_bn(rng, w, name + ".bn3", planes * E, gamma=0.2)      # keeps 33 residual sums sane
        if proj:
            ds = name.replace("layer", "ds")
            convnet.init_conv(rng, w, ds + ".0", planes * E, c_in, 1)
            convnet.init_bn(rng, w, ds + ".1", planes * E)
        if k < len(blocks) - 1:                                            # the gate deciding block k+1
            gate = name.replace("layer", "gate") + ".1"
            w[gate + ".weight"] = common.he(rng, (G, planes * E, 1, 1), planes * E)
            w[gate + ".bias"] = np.zeros(G, np.float32)
    bound = 1.0 / np.sqrt(G)
    for n in ("ih", "hh"):
        w[f"control.rnn.weight_{n}_l0"] = common.uniform(rng, (4 * G, G), bound)
        w[f"control.rnn.bias_{n}_l0"] = common.uniform(rng, (4 * G,), bound)
    w["control.proj.weight"] = common.uniform(rng, (1, G, 1, 1), bound)
    w["control.proj.bias"] = np.zeros(1, np.float32)   # unbiased gate: about half fire on random images
    convnet.init_linear(rng, w, "fc", cfg.classes, cfg.base * 8 * E)
    return w


def make_inputs(cfg: Config, batch: int = 1, seed: int = 0, ratio: float | None = None) -> dict:
    """Random images; gate_control zeros (learned gates) or ±FORCE for the fixed pattern at `ratio`."""
    rng = np.random.default_rng(60_000 + seed)
    x = rng.standard_normal((batch, 3, cfg.image, cfg.image)).astype(np.float32)
    control = np.zeros((batch, cfg.num_gates), np.float32)
    if ratio is not None:
        control[:] = np.where(common.ratio_pattern(cfg.num_gates, ratio), FORCE, -FORCE)
    return {"x": x, "gate_control": control}


def describe(out, inputs, cfg: Config) -> str:
    gates = np.asarray(out[1])
    return f"gates fired {int(gates.sum())}/{gates.size}: " + " ".join("".join(map(str, g)) for g in gates[:4])


def _gate_names(cfg):
    return [name.replace("layer", "gate") + ".1" for name, *_ in layout(cfg)[:-1]]


# ---------------------------------------------------------------------------------------------------------
def reference(weights, inputs, cfg: Config):
    w = npnn.f64(weights)
    x = inputs["x"].astype(np.float64)
    bs, G = x.shape[0], cfg.gate_dim
    x = npnn.relu(convnet.np_bn(npnn.conv2d(x, w["conv1.weight"], stride=2, padding=3), w, "bn1"))
    x = npnn.max_pool2d(x, 3, stride=2, padding=1)
    h, c = np.zeros((bs, G)), np.zeros((bs, G))
    mask = np.ones(bs)
    gates = []
    for k, (name, _, _, stride, proj) in enumerate(layout(cfg)):
        shortcut = x
        if proj:
            ds = name.replace("layer", "ds")
            shortcut = convnet.np_bn(npnn.conv2d(x, w[ds + ".0.weight"], stride=stride), w, ds + ".1")
        if mask.sum() > 0:
            y = npnn.relu(convnet.np_bn(npnn.conv2d(x, w[name + ".conv1.weight"]), w, name + ".bn1"))
            y = npnn.conv2d(y, w[name + ".conv2.weight"], stride=stride, padding=1)
            y = npnn.relu(convnet.np_bn(y, w, name + ".bn2"))
            y = convnet.np_bn(npnn.conv2d(y, w[name + ".conv3.weight"]), w, name + ".bn3")
            m = mask[:, None, None, None]
            x = m * npnn.relu(y + shortcut) + (1 - m) * shortcut
        else:
            x = shortcut
        if k == cfg.num_gates:
            break
        gate = name.replace("layer", "gate") + ".1"
        pooled = npnn.global_avg_pool(x)[:, :, None, None]
        feat = npnn.conv2d(pooled, w[gate + ".weight"], w[gate + ".bias"])[:, :, 0, 0]
        pre = feat @ w["control.rnn.weight_ih_l0"].T + w["control.rnn.bias_ih_l0"] \
            + h @ w["control.rnn.weight_hh_l0"].T + w["control.rnn.bias_hh_l0"]
        i, f, g, o = (pre[:, j * G:(j + 1) * G] for j in range(4))
        c = npnn.sigmoid(f) * c + npnn.sigmoid(i) * np.tanh(g)
        h = npnn.sigmoid(o) * np.tanh(c)
        logit = h @ w["control.proj.weight"][:, :, 0, 0].T + w["control.proj.bias"]
        prob = npnn.sigmoid(logit[:, 0] + inputs["gate_control"][:, k])
        mask = (prob > 0.5).astype(np.float64)
        gates.append(mask)
    logits = npnn.global_avg_pool(x) @ w["fc.weight"].T + w["fc.bias"]
    return logits.astype(np.float32), np.stack(gates, axis=1).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------
def forward(weights, inputs, cfg: Config):
    w = weights
    relu, conv2d, bn = gdsl.nn.relu, gdsl.nn.conv2d, convnet.gdsl_bn
    G = cfg.gate_dim
    bs = inputs["x"].shape[0]
    W_ih = w["control.rnn.weight_ih_l0"].T.reshape((G, 4, G)).transpose((1, 0, 2))     # [4, G, G], x·W form
    W_hh = w["control.rnn.weight_hh_l0"].T.reshape((G, 4, G)).transpose((1, 0, 2))
    b_rnn = (w["control.rnn.bias_ih_l0"] + w["control.rnn.bias_hh_l0"]).reshape((4, 1, G))
    proj = w["control.proj.weight"].reshape((1, G)).T                                   # [G, 1]

    def gate(x, h, c, name, k):
        gw = name.replace("layer", "gate") + ".1"
        feat = gdsl.nn.global_avg_pool(x)                                                # [bs, C]
        feat = gdsl.nn.linear(feat, w[gw + ".weight"].reshape((G, -1)).T, w[gw + ".bias"])   # 1×1 conv C→10
        pre = gnp.matmul(feat, W_ih) + gnp.matmul(h, W_hh) + b_rnn                     # [4, bs, G]
        c = gdsl.nn.sigmoid(pre[1]) * c + gdsl.nn.sigmoid(pre[0]) * gnp.tanh(pre[2])
        h = gdsl.nn.sigmoid(pre[3]) * gnp.tanh(c)
        logit = gdsl.nn.linear(h, proj, w["control.proj.bias"])[:, 0] + inputs["gate_control"][:, k]
        return (gdsl.nn.sigmoid(logit) > 0.5).astype(gdsl.float32), h, c

    x = relu(bn(conv2d(inputs["x"], w["conv1.weight"], stride=2, padding=3), w, "bn1"))
    x = gdsl.nn.max_pool2d(x, 3, stride=2, padding=1)
    h = c = gnp.zeros((bs, G), dtype=gdsl.float32)
    mask, gates = gnp.ones((bs,), dtype=gdsl.float32), []
    for k, (name, _, _, stride, has_proj) in enumerate(layout(cfg)):
        shortcut = x
        if has_proj:
            ds = name.replace("layer", "ds")
            shortcut = bn(conv2d(x, w[ds + ".0.weight"], stride=stride), w, ds + ".1")

        def run_block(x, shortcut, mask, name=name, stride=stride):
            y = relu(bn(conv2d(x, w[name + ".conv1.weight"]), w, name + ".bn1"))
            y = relu(bn(conv2d(y, w[name + ".conv2.weight"], stride=stride, padding=1), w, name + ".bn2"))
            y = bn(conv2d(y, w[name + ".conv3.weight"]), w, name + ".bn3")
            m = mask.reshape((bs, 1, 1, 1))
            return m * relu(y + shortcut) + (1 - m) * shortcut

        def skip_block(x, shortcut, mask):
            return shortcut

        if cfg.executed is None:
            x = gdsl.cond(gnp.sum(mask) > 0, run_block, skip_block, x, shortcut, mask)
        else:
            x = (run_block if cfg.executed[k] else skip_block)(x, shortcut, mask)
        if k < cfg.num_gates:
            mask, h, c = gate(x, h, c, name, k)
            gates.append(mask)
    logits = gdsl.nn.linear(gdsl.nn.global_avg_pool(x), w["fc.weight"].T, w["fc.bias"])
    return logits, gnp.stack(gates, axis=1).astype(gdsl.int32)


def make_forward(cfg: Config, backend=None, control=None, **options):
    def skipnet_forward(weights, inputs):
        return forward(weights, inputs, cfg)
    return common.make_jit(skipnet_forward, backend=backend, control=control, **options)


def overhead_test(cfg: Config, ratio: float = OVERHEAD_RATIO) -> common.OverheadTest:
    """Figure 16 at the forced 50 % pattern: a cond per block, vs every block run ("no skip", blended by
    the gate mask), vs only the executed blocks traced ("trace"; the first block always runs). The gates
    are computed in every program. A CUDA graph cannot hold the conds."""
    ran = (True,) + tuple(bool(r) for r in common.ratio_pattern(cfg.num_gates, ratio))
    return common.OverheadTest({"control flow": cfg, "no skip": common.replace(cfg, executed=(True,) * len(ran)),
                                "trace": common.replace(cfg, executed=ran)},
                               f"{sum(ran) - 1}/{cfg.num_gates} gates fire", inputs={"ratio": ratio},
                               no_control_flow=("torch-cudagraph",))


# ---------------------------------------------------------------------------------------------------------
def from_state_dict(sd, cfg: Config) -> dict[str, np.ndarray]:
    """Weights from a RecurrentGatedResNet state_dict (names in the module docstring; extras ignored)."""
    return convnet.from_state_dict(sd, init_weights(cfg).keys())


def to_state_dict(weights, cfg: Config) -> dict[str, np.ndarray]:
    return dict(weights)


def generic_forward(O, w, inputs, cfg: Config, branch):
    """SkipNet for an op namespace O (convnet.torch_ops / jax_ops) and a branch combinator
    `branch(pred, run, skip, *operands)` (Python if, lax.cond, or always-run; unused with cfg.executed)."""
    G = cfg.gate_dim
    x = O.relu(O.bn(O.conv(inputs["x"], w["conv1.weight"], 2, 3), w, "bn1"))
    x = O.max_pool(x, 3, 2, 1)
    bs = x.shape[0]
    h = c = O.zeros((bs, G), x)
    mask, gates = O.zeros((bs,), x) + 1, []
    for k, (name, _, _, stride, has_proj) in enumerate(layout(cfg)):
        shortcut = x
        if has_proj:
            ds = name.replace("layer", "ds")
            shortcut = O.bn(O.conv(x, w[ds + ".0.weight"], stride, 0), w, ds + ".1")

        def run(x, shortcut, mask, name=name, stride=stride):
            y = O.relu(O.bn(O.conv(x, w[name + ".conv1.weight"]), w, name + ".bn1"))
            y = O.relu(O.bn(O.conv(y, w[name + ".conv2.weight"], stride, 1), w, name + ".bn2"))
            y = O.bn(O.conv(y, w[name + ".conv3.weight"]), w, name + ".bn3")
            m = mask.reshape(bs, 1, 1, 1)
            return m * O.relu(y + shortcut) + (1 - m) * shortcut

        def skip(x, shortcut, mask):
            return shortcut

        if cfg.executed is None:
            x = branch(mask.sum() > 0, run, skip, x, shortcut, mask)
        else:
            x = (run if cfg.executed[k] else skip)(x, shortcut, mask)
        if k == cfg.num_gates:
            break
        gw = name.replace("layer", "gate") + ".1"
        feat = O.conv(O.gap(x).reshape(bs, -1, 1, 1), w[gw + ".weight"]).reshape(bs, G) + w[gw + ".bias"]
        pre = O.matmul(feat, w["control.rnn.weight_ih_l0"].T) + w["control.rnn.bias_ih_l0"] \
            + O.matmul(h, w["control.rnn.weight_hh_l0"].T) + w["control.rnn.bias_hh_l0"]
        c = O.sigmoid(pre[:, G:2 * G]) * c + O.sigmoid(pre[:, :G]) * O.tanh(pre[:, 2 * G:3 * G])
        h = O.sigmoid(pre[:, 3 * G:]) * O.tanh(c)
        logit = O.matmul(h, w["control.proj.weight"].reshape(1, G).T)[:, 0] + w["control.proj.bias"]
        mask = (O.sigmoid(logit + inputs["gate_control"][:, k]) > 0.5) * 1.0
        gates.append(mask)
    logits = O.linear(O.gap(x), w, "fc")
    return logits, gates


def _with_gate_bits(torch, logits, gates):
    return logits, torch.stack(gates, dim=1).int()


def _torch(weights, cfg, batches, device, branch, system, compile_=False, note=""):
    return convnet.torch_runner(
        weights, batches, device, system,
        lambda torch, O, w, inputs: _with_gate_bits(torch, *generic_forward(O, w, inputs, cfg, branch)), compile_,
        convnet.branch_note(cfg, note))


def torch_eager(weights, cfg, batches, device=None) -> common.Runner:
    return _torch(weights, cfg, batches, device, common.host_if, "torch-eager", note="host if, one sync per gate")


def torch_compile(weights, cfg, batches, device=None) -> common.Runner:
    return _torch(weights, cfg, batches, device, common.host_if, "torch-compile", compile_=True,
                  note="graph breaks at each data-dependent if")


def torch_cudagraph(weights, cfg, batches, device=None) -> common.Runner:
    return _torch(weights, cfg, batches, device, common.always_run, "torch-cudagraph",
                  note="no control flow: every block run, blended by the gate mask")


def jax_jit(weights, cfg, batches, device=None) -> common.Runner:
    jax, jnp = common.jax_setup()
    O = convnet.jax_ops(jax, jnp)

    def fwd(w, inputs):
        logits, gates = generic_forward(O, w, inputs, cfg, jax.lax.cond)
        return logits, jnp.stack(gates, axis=1).astype(jnp.int32)
    return common.jax_runner(jax, jax.jit(fwd), weights, batches)


if __name__ == "__main__":
    raise SystemExit(common.main(sys.modules[__name__]))
