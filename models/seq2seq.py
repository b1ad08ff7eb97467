"""Seq2seq: an LSTM decoder in a `while_loop` whose exit depends on the data (greedy decoding to EOS).

Hidden 256, vocab 3797, at most 50 steps, EOS = 0, SOS = 1. Per step: embed the token → LSTM cell →
`Linear(256→3797)` + `mask[step]` → argmax → store; continue while `max(tokens) > EOS and step < 50`.
`mask[50, bs, 3797]` adds 1e6 at the reference token of each step (EOS once a sentence has ended) so that
decoding follows the reference sentence. Inputs `h, c` are given. Returns `(tokens[50, bs], h, steps)`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

import gdsl
import gdsl.nn
import gdsl.numpy as gnp
from models import common, lstm, npnn

BATCHES = (1, 64)
BENCH_INPUTS = 10        # successive batches the benchmark cycles over (the paper iterated over its data)
FORCE = 1e6
OVERHEAD_STEPS = 10      # decoding steps of the overhead test (the paper's)


@dataclass(frozen=True)
class Config:
    hidden: int = 256
    vocab: int = 3797
    max_len: int = 50
    eos: int = 0
    sos: int = 1
    mean_len: float = 10.0   # synthetic sentence lengths (Tatoeba eng-fra stand-in): mean ≈ 10,
    min_len: int = 3         # range min_len..max_sentence
    max_sentence: int = 49
    fixed_steps: int | None = None   # decode exactly this many steps, written out at trace time with no exit
    #                                  test (the overhead test; the model's result where decoding stops there)


def small() -> Config:
    return Config(hidden=16, vocab=40, max_len=12, mean_len=5.0, min_len=2, max_sentence=11)


def init_weights(cfg: Config, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    H, V, bound = cfg.hidden, cfg.vocab, 1.0 / np.sqrt(cfg.hidden)
    return {"emb": rng.standard_normal((V, H)).astype(np.float32),
            "W_ih": common.uniform(rng, (4, H, H), bound), "W_hh": common.uniform(rng, (4, H, H), bound),
            "b_ih": common.uniform(rng, (4, H), bound), "b_hh": common.uniform(rng, (4, H), bound),
            "W_out": common.uniform(rng, (H, V), bound), "b_out": common.uniform(rng, (V,), bound)}


def sentence_lengths(cfg: Config, n: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of short sentences: log-normal (σ = 0.45) with mean ≈ cfg.mean_len, clipped to the range."""
    sigma = 0.45
    raw = rng.lognormal(np.log(cfg.mean_len) - sigma ** 2 / 2, sigma, size=n)
    return np.clip(np.rint(raw), cfg.min_len, cfg.max_sentence).astype(np.int32)


def make_inputs(cfg: Config, batch: int, seed: int = 0, steps: int | None = None) -> dict:
    """One batch of reference sentences as the forcing mask, plus random initial h, c.

    Sentence b has length L_b and tokens uniform in 1..vocab-1; the decoder is forced to emit them at
    steps 0..L_b-1 and EOS from step L_b on, so the loop runs max_b(L_b) + 1 steps (EOS included).
    `steps` given: every sentence has length steps − 1, so that decoding takes exactly `steps` steps.
    """
    rng = np.random.default_rng(40_000 + seed)
    lengths = sentence_lengths(cfg, batch, rng) if steps is None else np.full(batch, steps - 1)
    targets = np.full((cfg.max_len, batch), cfg.eos, np.int64)
    for b, n in enumerate(lengths):
        targets[:n, b] = rng.integers(1, cfg.vocab, size=n)
    mask = np.zeros((cfg.max_len, batch, cfg.vocab), np.float32)
    np.put_along_axis(mask, targets[:, :, None], FORCE, axis=2)
    return {"mask": mask,
            "h": rng.standard_normal((batch, cfg.hidden)).astype(np.float32),
            "c": rng.standard_normal((batch, cfg.hidden)).astype(np.float32)}


def mask_lengths(inputs, cfg: Config) -> np.ndarray:
    """The reference sentence lengths encoded in a mask (the first forced EOS of each row)."""
    forced = inputs["mask"].argmax(axis=2)                   # [max_len, bs]
    is_eos = forced == cfg.eos
    return np.where(is_eos.any(axis=0), is_eos.argmax(axis=0), cfg.max_len)


def describe(out, inputs, cfg: Config) -> str:
    steps = out[2]
    return f"decoded {int(steps)} steps (reference lengths {mask_lengths(inputs, cfg).tolist()[:16]})"


# ---------------------------------------------------------------------------------------------------------
def reference(weights, inputs, cfg: Config):
    w = npnn.f64(weights)
    mask, h, c = (inputs[k].astype(np.float64) for k in ("mask", "h", "c"))
    bs = h.shape[0]
    tokens = np.zeros((cfg.max_len, bs), np.int32)
    tok = np.full(bs, cfg.sos)
    step = 0
    while tok.max() > cfg.eos and step < cfg.max_len:
        x = w["emb"][tok]
        pre = [x @ w["W_ih"][k] + w["b_ih"][k] + h @ w["W_hh"][k] + w["b_hh"][k] for k in range(4)]
        i, f, g, o = npnn.sigmoid(pre[0]), npnn.sigmoid(pre[1]), np.tanh(pre[2]), npnn.sigmoid(pre[3])
        c = f * c + i * g
        h = o * np.tanh(c)
        tok = (h @ w["W_out"] + w["b_out"] + mask[step]).argmax(axis=1)
        tokens[step] = tok
        step += 1
    return tokens, h.astype(np.float32), np.int32(step)


# ---------------------------------------------------------------------------------------------------------
def forward(weights, inputs, cfg: Config):
    mask = inputs["mask"]
    bs = inputs["h"].shape[0]

    def keep_going(carry):
        step, tok, _, _, _ = carry
        return (gnp.max(tok) > cfg.eos) & (step < cfg.max_len)

    def decode_step(carry):
        step, tok, h, c, tokens = carry
        x = gnp.take(weights["emb"], tok, axis=0)
        h, c = lstm.lstm_cell(x, h, c, weights["W_ih"], weights["W_hh"], weights["b_ih"], weights["b_hh"])
        logits = gdsl.nn.linear(h, weights["W_out"], weights["b_out"]) + mask[step]
        tok = gnp.argmax(logits, axis=1).astype(gdsl.int32)
        return step + 1, tok, h, c, tokens.at[step].set(tok)

    init = (gnp.zeros((), dtype=gdsl.int32), gnp.full((bs,), cfg.sos, dtype=gdsl.int32), inputs["h"],
            inputs["c"], gnp.zeros((cfg.max_len, bs), dtype=gdsl.int32))
    if cfg.fixed_steps is None:
        steps, _, h, _, tokens = gdsl.while_loop(keep_going, decode_step, init)
    else:       # the step counter a Python int: static slices and stores, no loop
        _, _, h, _, tokens = common.unrolled_fori_loop(0, cfg.fixed_steps,
                                                       lambda n, carry: decode_step((n,) + carry[1:]), init)
        steps = np.int32(cfg.fixed_steps)
    return tokens, h, steps


def make_forward(cfg: Config, backend=None, control=None, **options):
    def seq2seq_forward(weights, inputs):
        return forward(weights, inputs, cfg)
    return common.make_jit(seq2seq_forward, backend=backend, control=control, **options)


def overhead_test(cfg: Config) -> common.OverheadTest:
    """Figure 15: OVERHEAD_STEPS decoding steps (every sentence ends there), as the while loop vs written
    out with no exit test. A CUDA graph cannot hold the while loop."""
    return common.OverheadTest({"control flow": cfg, "unrolled": common.replace(cfg, fixed_steps=OVERHEAD_STEPS)},
                               f"{OVERHEAD_STEPS} steps", inputs={"steps": OVERHEAD_STEPS},
                               no_control_flow=("torch-cudagraph",))


# ---------------------------------------------------------------------------------------------------------
# PyTorch twin: nn.Embedding `embedding.weight[V,H]`, nn.LSTMCell `lstm.weight_ih[4H,H]`,
# `lstm.weight_hh[4H,H]`, `lstm.bias_ih[4H]`, `lstm.bias_hh[4H]` (gate rows i,f,g,o), nn.Linear
# `out.weight[V,H]`, `out.bias[V]`.

def from_state_dict(sd, cfg: Config) -> dict[str, np.ndarray]:
    sd = {k: common.leaf_to_numpy(v).astype(np.float32) for k, v in sd.items()}
    H = cfg.hidden

    def gates_T(m):
        return np.ascontiguousarray(m.reshape(4, H, -1).transpose(0, 2, 1))
    return {"emb": sd["embedding.weight"], "W_ih": gates_T(sd["lstm.weight_ih"]),
            "W_hh": gates_T(sd["lstm.weight_hh"]), "b_ih": sd["lstm.bias_ih"].reshape(4, H),
            "b_hh": sd["lstm.bias_hh"].reshape(4, H), "W_out": np.ascontiguousarray(sd["out.weight"].T),
            "b_out": sd["out.bias"]}


def to_state_dict(weights, cfg: Config) -> dict[str, np.ndarray]:
    H = cfg.hidden
    return {"embedding.weight": weights["emb"],
            "lstm.weight_ih": weights["W_ih"].transpose(0, 2, 1).reshape(4 * H, H),
            "lstm.weight_hh": weights["W_hh"].transpose(0, 2, 1).reshape(4 * H, H),
            "lstm.bias_ih": weights["b_ih"].reshape(4 * H), "lstm.bias_hh": weights["b_hh"].reshape(4 * H),
            "out.weight": weights["W_out"].T, "out.bias": weights["b_out"]}


def _torch_setup(weights, batches, device):
    torch, dev = common.torch_setup(device)
    w = common.torch_tree(torch, weights, dev)
    w["b"] = (w["b_ih"] + w["b_hh"]).unsqueeze(1)        # [4, 1, H]
    return torch, dev, w, [common.torch_tree(torch, b, dev) for b in common.as_batches(batches)]


def _torch_step(torch, w):
    def step(tok, h, c, mask_row):
        h, c = lstm.cell(torch, w["emb"][tok], h, c, w["W_ih"], w["W_hh"], w["b"])
        return torch.argmax(h @ w["W_out"] + w["b_out"] + mask_row, dim=1), h, c
    return step


def _torch_while(torch, w, cfg, step):
    """The artifact's loop: Python `while`, its condition read back from the GPU each step (with
    cfg.fixed_steps: that many steps and no read-back)."""
    def keep_going(n, tok):
        if cfg.fixed_steps is not None:
            return n < cfg.fixed_steps
        return n < cfg.max_len and bool(tok.max() > cfg.eos)

    def fwd(inputs):
        with torch.no_grad():
            h, c, mask = inputs["h"], inputs["c"], inputs["mask"]
            tok = torch.full((h.shape[0],), cfg.sos, dtype=torch.int64, device=h.device)
            tokens = torch.zeros((cfg.max_len, h.shape[0]), dtype=torch.int64, device=h.device)
            n = 0
            while keep_going(n, tok):
                tok, h, c = step(tok, h, c, mask[n])
                tokens[n] = tok
                n += 1
            return tokens, h, n
    return fwd


def torch_eager(weights, cfg, batches, device=None) -> common.Runner:
    torch, dev, w, xs = _torch_setup(weights, batches, device)
    fwd = _torch_while(torch, w, cfg, _torch_step(torch, w))
    note = "host loop, one GPU->host sync per step" if cfg.fixed_steps is None else f"{cfg.fixed_steps} steps, no sync"
    return common.Runner("torch-eager", run=lambda i: fwd(xs[i]), sync=common.torch_sync(torch, dev), note=note)


def torch_compile(weights, cfg, batches, device=None) -> common.Runner:
    torch, dev, w, xs = _torch_setup(weights, batches, device)
    fwd = _torch_while(torch, w, cfg, common.torch_compile(torch, _torch_step(torch, w)))
    return common.Runner("torch-compile", run=lambda i: fwd(xs[i]), sync=common.torch_sync(torch, dev),
                         note="compiled decode step, host loop with a sync per step")


def torch_cudagraph(weights, cfg, batches, device=None) -> common.Runner:
    """No control flow: always all max_len steps, finished batches frozen by torch.where (same outputs);
    with cfg.fixed_steps, those steps."""
    torch, dev, w, xs = _torch_setup(weights, batches, device)
    step = _torch_step(torch, w)
    if cfg.fixed_steps is not None:
        return common.torch_cuda_graphs(torch, dev, _torch_while(torch, w, cfg, step), [(x,) for x in xs])

    def fwd(inputs):
        h, c, mask = inputs["h"], inputs["c"], inputs["mask"]
        tok = torch.full((h.shape[0],), cfg.sos, dtype=torch.int64, device=h.device)
        tokens = torch.zeros((cfg.max_len, h.shape[0]), dtype=torch.int64, device=h.device)
        active = torch.ones((), dtype=torch.bool, device=h.device)
        steps = torch.zeros((), dtype=torch.int64, device=h.device)
        for n in range(cfg.max_len):
            active = active & (tok.max() > cfg.eos)
            new_tok, new_h, new_c = step(tok, h, c, mask[n])
            tok = torch.where(active, new_tok, tok)
            h, c = torch.where(active, new_h, h), torch.where(active, new_c, c)
            tokens[n] = torch.where(active, new_tok, tokens[n])
            steps = steps + active.long()
        return tokens, h, steps
    runner = common.torch_cuda_graphs(torch, dev, fwd, [(x,) for x in xs])
    runner.note = f"no control flow: all {cfg.max_len} steps"
    return runner


def jax_jit(weights, cfg, batches, device=None) -> common.Runner:
    jax, jnp = common.jax_setup()
    F = common.jax_ops(jax, jnp)

    def fwd(w, inputs):
        b = (w["b_ih"] + w["b_hh"])[:, None, :]

        def body(carry):
            n, tok, h, c, tokens = carry
            h, c = lstm.cell(F, w["emb"][tok], h, c, w["W_ih"], w["W_hh"], b)
            tok = jnp.argmax(h @ w["W_out"] + w["b_out"] + inputs["mask"][n], axis=1).astype(jnp.int32)
            return n + 1, tok, h, c, tokens.at[n].set(tok)
        bs = inputs["h"].shape[0]
        init = (jnp.int32(0), jnp.full((bs,), cfg.sos, jnp.int32), inputs["h"], inputs["c"],
                jnp.zeros((cfg.max_len, bs), jnp.int32))
        if cfg.fixed_steps is not None:
            _, _, h, _, tokens = common.unrolled_fori_loop(0, cfg.fixed_steps,
                                                           lambda n, carry: body((n,) + carry[1:]), init)
            return tokens, h, cfg.fixed_steps
        n, _, h, _, tokens = jax.lax.while_loop(lambda s: (s[1].max() > cfg.eos) & (s[0] < cfg.max_len),
                                                body, init)
        return tokens, h, n
    return common.jax_runner(jax, jax.jit(fwd), weights, batches)


if __name__ == "__main__":
    raise SystemExit(common.main(sys.modules[__name__]))
