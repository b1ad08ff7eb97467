"""The model zoo (models/): references against independent checks, data generators, gdsl forwards against the
references on every usable backend (small configurations), baselines, weight loading, CLI and bench.

Full-size models run only in the GPU tests (`-m gpu`); the CPU part stays small.
"""
from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

import gdsl
from models import MODELS, common, load, npnn

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")
needs_jax = pytest.mark.skipif(not HAS_JAX, reason="JAX is not installed")
CPU_BACKENDS = [b for b in ("interpret", "cpu") if b in gdsl.backends()]

# (model, batch, input variant) cases of the small configurations
SMALL_CASES = [
    ("lstm", 2, {}), ("nasrnn", 3, {}), ("attention", 2, {}), ("seq2seq", 1, {}), ("seq2seq", 5, {}),
    ("blockdrop", 1, {}), ("blockdrop", 4, {}), ("blockdrop", 2, {"ratio": 0.5}), ("skipnet", 1, {}),
    ("skipnet", 2, {"ratio": 0.5}), ("rae", 1, {}), ("rae", 1, {"tree": "fixed"}),
]


def case_id(case):
    name, batch, variant = case
    return f"{name}-bs{batch}" + "".join(f"-{k}{v}" for k, v in variant.items())


def small_problem(name, batch, variant, seed=0, n_inputs=1):
    return common.build_problem(load(name), batch, small=True, seed=seed, n_inputs=n_inputs, **variant)


# ---------------------------------------------------------------------------------------------------------
# references against hand computations and independent implementations

def sig(v):
    return 1 / (1 + math.exp(-v))


def test_lstm_reference_by_hand():
    m = load("lstm")
    cfg = m.Config(seq_len=2, layers=1, hidden=1)
    w = {"W_ih": np.array([[[[0.5]], [[-0.3]], [[0.8]], [[0.1]]]], np.float32),
         "W_hh": np.array([[[[0.2]], [[0.4]], [[-0.6]], [[0.7]]]], np.float32),
         "b_ih": np.array([[0.1, 0.2, 0.0, -0.1]], np.float32), "b_hh": np.array([[0.0, 0.1, 0.3, 0.2]], np.float32)}
    xs = [1.5, -0.5]
    h = c = 0.0
    for x in xs:
        i = sig(0.5 * x + 0.2 * h + 0.1)
        f = sig(-0.3 * x + 0.4 * h + 0.3)
        g = math.tanh(0.8 * x - 0.6 * h + 0.3)
        o = sig(0.1 * x + 0.7 * h + 0.1)
        c = f * c + i * g
        h = o * math.tanh(c)
    out = m.reference(w, {"x": np.array(xs, np.float32).reshape(2, 1, 1)}, cfg)
    assert out.shape == (1, 1) and out[0, 0] == pytest.approx(h, rel=1e-6)


@needs_torch
def test_lstm_reference_matches_torch_nn_lstm():
    import torch
    m = load("lstm")
    cfg = m.Config(seq_len=4, layers=3, hidden=8)
    torch.manual_seed(0)
    net = torch.nn.LSTM(cfg.hidden, cfg.hidden, num_layers=cfg.layers)
    inputs = m.make_inputs(cfg, 2, seed=1)
    with torch.no_grad():
        out, _ = net(torch.from_numpy(inputs["x"]))
    ref = m.reference(m.from_state_dict(net.state_dict(), cfg), inputs, cfg)
    assert common.rel_error(ref, out[-1].numpy()) < 1e-5


@needs_torch
def test_seq2seq_twin_is_torch_embedding_lstmcell_linear():
    import torch
    m = load("seq2seq")
    cfg = m.small()
    torch.manual_seed(0)
    net = torch.nn.ModuleDict({"embedding": torch.nn.Embedding(cfg.vocab, cfg.hidden),
                               "lstm": torch.nn.LSTMCell(cfg.hidden, cfg.hidden),
                               "out": torch.nn.Linear(cfg.hidden, cfg.vocab)})
    w = m.from_state_dict(net.state_dict(), cfg)
    inputs = m.make_inputs(cfg, 3, seed=2)
    tokens = m.reference(w, inputs, cfg)[0]
    # first decoding step through the real modules
    with torch.no_grad():
        emb = net["embedding"](torch.full((3,), cfg.sos))
        h1, _ = net["lstm"](emb, (torch.from_numpy(inputs["h"]), torch.from_numpy(inputs["c"])))
        tok = (net["out"](h1) + torch.from_numpy(inputs["mask"][0])).argmax(1).numpy()
    np.testing.assert_array_equal(tokens[0], tok)


def test_nasrnn_reference_by_hand():
    m = load("nasrnn")
    cfg = m.Config(seq_len=2, hidden=1)
    wi = np.linspace(-0.8, 0.9, 8).astype(np.float32).reshape(8, 1, 1)
    wh = np.linspace(0.7, -0.6, 8).astype(np.float32).reshape(8, 1, 1)
    xs = [0.9, -1.2]
    acts = [sig, lambda v: max(v, 0.0), sig, lambda v: max(v, 0.0), math.tanh, sig, math.tanh, sig]
    mm = c = 0.0
    for x in xs:
        l = [acts[k](float(wi[k, 0, 0]) * x + float(wh[k, 0, 0]) * mm) for k in range(8)]
        a, b = math.tanh(l[0] * l[1]), math.tanh(l[2] + l[3])
        c2, d = math.tanh(l[4] * l[5]), sig(l[6] + l[7])
        c = math.tanh(a + c) * b
        mm = math.tanh(c * math.tanh(c2 + d))
    out = m.reference({"W_ih": wi, "W_hh": wh}, {"x": np.array(xs, np.float32).reshape(2, 1, 1)}, cfg)
    assert out[0, 0] == pytest.approx(c + mm, rel=1e-6)


@needs_torch
def test_attention_reference_matches_torch_sdpa():
    import torch
    m = load("attention")
    cfg = m.small()
    w, inputs = m.init_weights(cfg, seed=3), m.make_inputs(cfg, 2, seed=3)
    K, V, x = (torch.from_numpy(inputs[k]).double() for k in ("K", "V", "x"))
    W = {k: torch.from_numpy(v).double() for k, v in w.items()}
    for g in range(cfg.start_len, cfg.cache_len):
        K[:, :, g], V[:, :, g] = (x @ W["W_k"])[:, :, 0], (x @ W["W_v"])[:, :, 0]
        x = torch.nn.functional.scaled_dot_product_attention(x @ W["W_q"], K, V) @ W["W_o"]
    refK, _, refx = m.reference(w, inputs, cfg)
    assert common.rel_error(refx, x.numpy()) < 1e-5 and common.rel_error(refK, K.numpy()) < 1e-6
    np.testing.assert_array_equal(refK[:, :, :cfg.start_len], inputs["K"][:, :, :cfg.start_len])


def test_seq2seq_stops_at_eos_where_the_mask_sentence_ends():
    m = load("seq2seq")
    cfg = m.small()
    w = m.init_weights(cfg)
    for seed, batch in [(0, 1), (1, 1), (2, 4), (3, 7)]:
        inputs = m.make_inputs(cfg, batch, seed=seed)
        lengths = m.mask_lengths(inputs, cfg)
        tokens, _, steps = m.reference(w, inputs, cfg)
        assert int(steps) == min(lengths.max() + 1, cfg.max_len)
        forced = inputs["mask"].argmax(axis=2)
        for b, n in enumerate(lengths):
            np.testing.assert_array_equal(tokens[:n, b], forced[:n, b])
            assert np.all(tokens[n:, b] == cfg.eos) and np.all(tokens[:n, b] != cfg.eos)


def test_conv_and_pools_against_naive_loops():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    out = npnn.conv2d(x, w, b, stride=2, padding=1)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    naive = np.zeros((2, 4, 4, 3))
    for n, o, i, j in np.ndindex(*naive.shape):
        naive[n, o, i, j] = (xp[n, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3] * w[o]).sum() + b[o]
    np.testing.assert_allclose(out, naive, rtol=1e-12)
    one = rng.standard_normal((5, 3, 1, 1))
    np.testing.assert_allclose(npnn.conv2d(x, one, stride=2),
                               np.einsum("nchw,oc->nohw", x[:, :, ::2, ::2], one[:, :, 0, 0]))
    mp = npnn.max_pool2d(x, 3, stride=2, padding=1)
    xm = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    assert mp.shape == (2, 3, 4, 3) and mp[1, 2, 1, 1] == xm[1, 2, 2:5, 2:5].max()
    assert npnn.avg_pool2d(x[:, :, :6], 2)[0, 1, 2, 1] == pytest.approx(x[0, 1, 4:6, 2:4].mean())


@needs_torch
def test_conv_against_torch():
    import torch
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((1, 8, 15, 15)), rng.standard_normal((16, 8, 7, 7))
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=2, padding=3).numpy()
    np.testing.assert_allclose(npnn.conv2d(x, w, stride=2, padding=3), ref, rtol=1e-10, atol=1e-10)


def test_blockdrop_skipped_blocks_do_not_matter():
    m = load("blockdrop")
    cfg = m.small()
    w = m.init_weights(cfg)
    inputs = m.make_inputs(cfg, 3, seed=4, ratio=0.5)
    ran = m.executed_blocks(inputs)
    out = m.reference(w, inputs, cfg)
    poked = dict(w)
    for t, (p, *_rest) in enumerate(m.layout(cfg)):
        poked[p + ".conv1.weight"] = w[p + ".conv1.weight"] * (1 if ran[t] else 100.0)
    np.testing.assert_array_equal(m.reference(poked, inputs, cfg), out)
    poked[m.layout(cfg)[int(np.argmax(ran))][0] + ".conv2.weight"] *= 2
    assert common.rel_error(m.reference(poked, inputs, cfg), out) > 1e-3


def test_skipnet_forced_gates_follow_the_pattern():
    m = load("skipnet")
    cfg = m.small()
    w = m.init_weights(cfg)
    for ratio in (0.0, 0.5, 1.0):
        _, gates = m.reference(w, m.make_inputs(cfg, 2, seed=0, ratio=ratio), cfg)
        np.testing.assert_array_equal(gates, np.broadcast_to(common.ratio_pattern(cfg.num_gates, ratio), gates.shape))


def test_skipnet_full_size_gates_fire_about_half():
    m = load("skipnet")
    cfg = m.Config()
    _, gates = m.reference(m.init_weights(cfg), m.make_inputs(cfg, 1, seed=0), cfg)
    assert gates.shape == (1, 32) and 0.25 <= gates.mean() <= 0.75


def test_rae_reference_on_a_three_node_tree_by_hand():
    m = load("rae")
    cfg = m.small()
    w = m.init_weights(cfg, seed=5)
    inputs = m.pack((None, None), cfg, np.random.default_rng(0))
    assert int(inputs["root"]) == 2 and list(inputs["left"][:3]) == [0, 0, 0] and inputs["right"][2] == 1
    expect = np.tanh(np.concatenate([inputs["x"][0], inputs["x"][1]]).astype(np.float64) @ w["W"] + w["b"])
    np.testing.assert_allclose(m.reference(w, inputs, cfg), expect, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# synthetic data generators

def test_seq2seq_sentence_lengths():
    m = load("seq2seq")
    cfg = m.Config()
    lengths = m.sentence_lengths(cfg, 20000, np.random.default_rng(0))
    assert 9.0 <= lengths.mean() <= 11.0 and lengths.min() >= 3 and lengths.max() <= 49
    inputs = m.make_inputs(cfg, 64, seed=3)
    assert inputs["mask"].shape == (50, 64, 3797) and inputs["mask"].dtype == np.float32
    assert np.all((inputs["mask"] == m.FORCE).sum(axis=2) == 1) and set(np.unique(inputs["mask"])) == {0, m.FORCE}
    lens = m.mask_lengths(inputs, cfg)
    assert lens.min() >= 3 and lens.max() <= 49
    np.testing.assert_array_equal(m.make_inputs(cfg, 64, seed=3)["mask"], inputs["mask"])   # seeded
    assert not np.array_equal(m.make_inputs(cfg, 64, seed=4)["mask"], inputs["mask"])      # successive batches


def test_blockdrop_policy_runs_about_half_the_blocks():
    m = load("blockdrop")
    cfg = m.Config()
    for batch in (1, 64):
        frac = np.mean([m.executed_blocks(m.make_inputs(cfg, batch, seed=s)).mean() for s in range(40)])
        assert 0.4 <= frac <= 0.6, (batch, frac)
    inputs = m.make_inputs(cfg, 64, seed=0)
    assert inputs["x"].shape == (64, 3, 32, 32) and inputs["probs"].shape == (64, 15)
    ran = m.executed_blocks(inputs)
    assert 0 < (inputs["probs"][:, ran] > 0.5).mean() < 1       # per-sample masks differ inside running blocks
    for ratio, count in zip(m.RATIOS, (0, 3, 7, 11, 15)):
        assert m.executed_blocks(m.make_inputs(cfg, 2, seed=1, ratio=ratio)).sum() == count


def test_rae_trees_are_valid():
    m = load("rae")
    cfg = m.Config()
    leaves = []
    for seed in range(300):
        t = m.make_inputs(cfg, 1, seed=seed)
        root = int(t["root"])
        for n in range(root + 1):
            if not t["is_leaf"][n]:
                assert t["left"][n] < n and t["right"][n] < n
        st = m.tree_stats(t)
        assert st["nodes"] == root + 1 == 2 * st["leaves"] - 1 <= cfg.nodes
        assert 2 <= st["leaves"] <= 64 and st["depth"] < cfg.max_depth
        leaves.append(st["leaves"])
    assert 16 <= np.mean(leaves) <= 22 and 6 <= np.std(leaves) <= 12
    fixed = m.make_inputs(cfg, 1, tree="fixed")
    assert m.tree_stats(fixed) == {"nodes": 65, "leaves": 33, "depth": 13} and int(fixed["root"]) == 64


# ---------------------------------------------------------------------------------------------------------
# gdsl forwards against the references

# every small case on the interpreter; one per model on the compiled CPU backend (its compiles cost seconds)
CPU_CASES = [c for c in SMALL_CASES if case_id(c) in (
    "lstm-bs2", "nasrnn-bs3", "attention-bs2", "seq2seq-bs5", "blockdrop-bs2-ratio0.5", "skipnet-bs1", "rae-bs1",
    "rae-bs1-treefixed")]
BACKEND_CASES = [("interpret", c) for c in SMALL_CASES] + \
    [(b, c) for b in CPU_BACKENDS if b != "interpret" for c in CPU_CASES]


@pytest.mark.parametrize("backend,case", BACKEND_CASES, ids=[f"{b}-{case_id(c)}" for b, c in BACKEND_CASES])
def test_gdsl_forward_matches_reference(case, backend):
    name, batch, variant = case
    prob = small_problem(name, batch, variant)
    fn = prob.model.make_forward(prob.cfg, backend=backend)
    out = fn(prob.weights, prob.batches[0])
    assert common.compare(out, prob.references()[0]) == []


def test_gdsl_host_control_and_recompile_cache():
    prob = small_problem("seq2seq", 3, {}, n_inputs=2)
    fn = prob.model.make_forward(prob.cfg, backend="interpret", control="host")
    refs = prob.references()
    for b, ref in zip(prob.batches, refs):
        assert common.compare(fn(prob.weights, b), ref) == []


def test_rae_recursion_deeper_than_max_depth_raises():
    m = load("rae")
    cfg = common.replace(m.small(), max_depth=8)
    inputs = m.make_inputs(cfg, 1, tree="fixed")                 # depth 13 > 8
    with pytest.raises(gdsl.RecursionDepthError):
        common.to_numpy(m.make_forward(cfg, backend="interpret")(m.init_weights(cfg), inputs))


# ---------------------------------------------------------------------------------------------------------
# baselines, weights, CLI, bench

@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip(name):
    m = load(name)
    cfg = m.small()
    w = m.init_weights(cfg, seed=1)
    back = m.from_state_dict(m.to_state_dict(w, cfg), cfg)
    assert back.keys() == w.keys()
    for k in w:
        assert back[k].dtype == np.float32
        np.testing.assert_array_equal(back[k], w[k])


@pytest.mark.parametrize("name", MODELS)
def test_weights_and_inputs_are_seeded_float32(name):
    m = load(name)
    cfg = m.small()
    w1, w2 = m.init_weights(cfg, seed=7), m.init_weights(cfg, seed=7)
    assert all(v.dtype == np.float32 and np.array_equal(v, w2[k]) for k, v in w1.items())
    assert any(not np.array_equal(v, m.init_weights(cfg, seed=8)[k]) for k, v in w1.items())
    x = m.make_inputs(cfg, 1, seed=0)
    assert all(np.array_equal(v, m.make_inputs(cfg, 1, seed=0)[k]) for k, v in x.items())


@pytest.mark.parametrize("system", [pytest.param("torch_eager", marks=needs_torch),
                                    pytest.param("jax_jit", marks=needs_jax)])
@pytest.mark.parametrize("name", MODELS)
def test_baselines_match_reference(name, system):
    variant = {"tree": "fixed"} if name == "rae" else {}
    prob = small_problem(name, 1 if name in ("skipnet", "rae") else 2, variant, n_inputs=2)
    runner = getattr(prob.model, system)(prob.weights, prob.cfg, prob.batches)
    for i, ref in enumerate(prob.references()):
        assert common.compare(runner.output(i), ref) == []


def test_cli_check(capsys):
    assert common.main(load("blockdrop"), ["--small", "--check", "--backend", "interpret", "--batch", "2",
                                           "--ratio", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "matches the numpy reference" in text and "3/6 blocks executed" in text


def test_cli_check_fails_on_mismatch(monkeypatch, capsys):
    m = load("nasrnn")
    monkeypatch.setattr(m, "reference", lambda w, x, cfg: np.zeros((1, cfg.hidden), np.float32) + 1)
    assert common.main(m, ["--small", "--check", "--backend", "interpret"]) == 1
    assert "CHECK FAILED" in capsys.readouterr().out


def test_compare_flags_tokens_and_relative_error():
    assert common.compare((np.ones(4), np.arange(3)), (np.ones(4), np.arange(3))) == []
    assert "relative error" in common.compare(np.ones(4) * 1.01, np.ones(4))[0]
    assert "1 of 3" in common.compare(np.array([0, 1, 5]), np.arange(3))[0]
    assert "non-finite" in common.compare(np.array([np.nan, 1.0]), np.ones(2))[0]


def test_bench_records_the_commit_it_is_told(monkeypatch):
    """GDSL_GIT_COMMIT wins over the checkout's own history (a copied tree may carry an older one), else git's."""
    from models import bench
    monkeypatch.setenv("GDSL_GIT_COMMIT", "89ab38a")
    assert bench._git() == ("89ab38a", None)
    monkeypatch.delenv("GDSL_GIT_COMMIT")
    commit, _ = bench._git()
    assert commit is None or len(commit) == 40


def test_bench_small_writes_json(tmp_path):
    from models import bench
    path = tmp_path / "b.json"
    assert bench.main(["--small", "--models", "rae,blockdrop", "--batch", "1", "--systems",
                       "gdsl-device,gdsl-host", "--backend", "interpret", "--runs", "3", "--warmup", "1",
                       "--inputs", "2", "--sweep", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert {"card", "driver", "versions", "git_commit"} <= data["environment"].keys()
    rows = {(r["model"], r["variant"]) for r in data["rows"]}
    assert ("rae", "fixed tree") in rows and ("blockdrop", "50% run") in rows and len(rows) == 9
    assert ("blockdrop", "0% run, ungated part traced") in rows
    for r in data["rows"]:
        for res in r["systems"].values():
            assert res["status"] == "ok" and res["runs"] == 3 and res["median_ms"] > 0


def test_bench_records_what_the_autotuner_chose(tmp_path, monkeypatch):
    """The gdsl-autotune row says which candidate ran (the default's options or another's), so that a row where
    it is slower than gdsl-device tells a search that chose another schedule from two runs of the same one."""
    from models import bench
    monkeypatch.setenv("GDSL_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "b.json"
    assert bench.main(["--small", "--models", "rae", "--batch", "1", "--systems", "gdsl-autotune", "--backend", "cpu",
                       "--runs", "2", "--warmup", "1", "--no-floor", "--json", str(path)]) == 0
    (res,) = json.loads(path.read_text())["rows"][0]["systems"].values()
    assert res["status"] == "ok" and res["autotune_choice"]["control"] in ("device", "host")
    assert res["note"] == f"chose {res['autotune_choice']}"


@pytest.mark.parametrize("name", MODELS)
def test_bench_offers_the_cudnn_peers_on_the_lstm_rows_only(name):
    from models import bench
    systems = bench.model_systems(load(name), bench.SYSTEMS)
    cudnn = [s for s in systems if "cudnn" in s]
    assert cudnn == (["torch-cudnn", "torch-cudnn-graph"] if name == "lstm" else [])
    assert {"gdsl-device", "torch-eager", "jax"} <= set(systems)


@needs_torch
def test_cudnn_peer_holds_the_zoo_weights():
    """torch.nn.LSTM with the zoo's weights loaded (on the CPU here: the same module cuDNN runs)."""
    m = load("lstm")
    prob = small_problem("lstm", 3, {}, n_inputs=2)
    torch, dev, fwd = m.nn_lstm_forward(prob.weights, prob.cfg, "cpu")
    for batch, ref in zip(prob.batches, prob.references()):
        assert common.compare(fwd(torch.as_tensor(batch["x"])), ref) == []


@needs_torch
def test_cudnn_peer_without_a_gpu_is_unavailable():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the GPU test covers it")
    prob = small_problem("lstm", 1, {})
    for system in ("torch_cudnn", "torch_cudnn_graph"):
        with pytest.raises(common.BaselineUnavailable, match="cuDNN needs a CUDA device"):
            getattr(prob.model, system)(prob.weights, prob.cfg, prob.batches)


# ---------------------------------------------------------------------------------------------------------
# floors (models/floor.py): what a forward executes, counted from its plan on its data

FLOOR_BACKEND = "cpu"
needs_cpu_backend = pytest.mark.skipif(FLOOR_BACKEND not in gdsl.backends(), reason="no cpu backend here")


def lowered_small(name, batch, variant=None, control=None, n_inputs=1):
    prob = small_problem(name, batch, variant or {}, n_inputs=n_inputs)
    fn = prob.model.make_forward(prob.cfg, backend=FLOOR_BACKEND, control=control)
    return prob, fn.lower(prob.weights, prob.batches[0])


def grid_syncs_in(block) -> int:
    from gdsl.schedule.plan import Sync, walk
    return sum(1 for s in walk(block) if isinstance(s, Sync) and s.scope == "grid")


@needs_cpu_backend
def test_floor_count_of_small_lstm():
    from gdsl.schedule.plan import Loop
    from gdsl.schedule.simulate import Simulator
    from models import floor
    prob, lowered = lowered_small("lstm", 2)
    cfg, bs, H = prob.cfg, 2, prob.cfg.hidden
    plan = floor.plan_of(lowered)
    flat = floor.flat_arguments(prob.weights, prob.batches[0])
    count = floor.count_plan(plan, flat)
    # the same barriers as gdsl's own simulator, uTask by uTask, with the same results
    sim = Simulator(plan, check=False)
    expected = sim.run(flat)
    counter = floor._Counter(plan)
    assert all(np.array_equal(a, b) for a, b in zip(counter.run(flat), expected))
    assert count.grid_barriers == sim.stats["grid_barriers"] > 0 and count.launches == 0
    # barriers per loop iteration x iterations: the time loop runs seq_len trips
    (loop,) = [s for s in plan.kernels[0].body if isinstance(s, Loop)]
    assert count.loops == [{"trips": cfg.seq_len,
                            "grid_barriers": cfg.seq_len * grid_syncs_in(loop.cond + loop.body)}]
    assert count.grid_barriers == count.loops[0]["grid_barriers"] + grid_syncs_in(plan.kernels[0].body) \
        - grid_syncs_in(loop.cond + loop.body)
    # flops: two batched matmuls [bs,H] x [4,H,H] per cell, plus the cell's elementwise math
    matmul = 2 * (2 * 4 * bs * H * H) * cfg.layers * cfg.seq_len
    assert count.flops_by_family["contraction"] == matmul
    assert matmul < count.flops < matmul + 40 * 4 * bs * H * cfg.layers * cfg.seq_len
    # compulsory bytes: every weight, the input and the output, once
    w_bytes = sum(a.nbytes for a in prob.weights.values())
    assert count.bytes == w_bytes + prob.batches[0]["x"].nbytes + bs * H * 4


@needs_cpu_backend
def test_floor_count_follows_the_data():
    """Data-dependent loops and branches count what ran: seq2seq's trips are its decoded steps; a skipped
    BlockDrop block costs no barrier, no flop and no weight bytes."""
    from models import floor
    prob, lowered = lowered_small("seq2seq", 3, n_inputs=3)
    plan = floor.plan_of(lowered)
    trips = []
    for batch, ref in zip(prob.batches, prob.references()):
        count = floor.count_plan(plan, floor.flat_arguments(prob.weights, batch))
        steps = int(common.tree_leaves(ref)[-1])
        assert count.loops[0]["trips"] == steps
        trips.append(steps)
    assert len(set(trips)) > 1, "the seeds should give different sentence lengths"
    counts = {}
    for ratio in (0.0, 1.0):
        prob, lowered = lowered_small("blockdrop", 2, {"ratio": ratio})
        counts[ratio] = floor.count_forward(lowered, prob.weights, prob.batches[0])
    none, every = counts[0.0], counts[1.0]
    assert none.grid_barriers < every.grid_barriers
    assert none.flops < every.flops and none.bytes < every.bytes


@needs_cpu_backend
def test_floor_count_of_host_control_counts_launches():
    from models import floor
    prob, lowered = lowered_small("nasrnn", 2, control="host")
    count = floor.count_forward(lowered, prob.weights, prob.batches[0])
    assert count.launches >= prob.cfg.seq_len
    assert count.dependent_steps == count.grid_barriers + count.launches


FLOOR_CASES = [("lstm", 2, {}), ("nasrnn", 2, {}), ("attention", 2, {}), ("seq2seq", 3, {}),
               ("blockdrop", 2, {"ratio": 0.5}), ("skipnet", 1, {}), ("rae", 1, {"tree": "fixed"})]


@pytest.mark.parametrize("control", ["device", "host"])
@pytest.mark.parametrize("case", FLOOR_CASES, ids=case_id)
def test_floor_barriers_are_those_of_the_generated_cuda(case, control, monkeypatch):
    """The grid Syncs counted on cuda are the ones the renderer emits (lowering needs no GPU). Counted in the
    unrolled source: a loop over repeated blocks (render.ROLL_REPEATS) or kernels merged into one
    (MERGE_KERNELS) run the same barriers from fewer lines."""
    from gdsl.backends.cfamily import render
    from gdsl.backends.cuda.dialect import CUDADialect
    from models import floor
    monkeypatch.setattr(render, "ROLL_REPEATS", False)
    monkeypatch.setattr(render, "MERGE_KERNELS", False)
    name, batch, variant = case
    prob = small_problem(name, batch, variant)
    lowered = prob.model.make_forward(prob.cfg, backend="cuda", control=control).lower(prob.weights, prob.batches[0])
    rendered = floor.rendered_grid_syncs(lowered)
    assert len(rendered) == lowered.source.count(CUDADialect().grid_sync("atomic"))
    count = floor.count_forward(lowered, prob.weights, prob.batches[0])
    assert count.grid_barriers <= count.plan_grid_barriers


# The default cuda plans of the zoo's loops at the paper's sizes (lowered without a GPU): grid barriers per step
# of the time loop, as docs/schedule.md's "Recurrent loops of the zoo" counts them, and no work in the loop that
# reads only what the loop never writes (issue 11's criterion for the LSTM and NASRNN loops).
LOOP_BARRIERS_PER_STEP = {("lstm", 1): 1, ("lstm", 64): 2, ("nasrnn", 1): 0, ("nasrnn", 64): 2,
                          ("seq2seq", 1): 2, ("seq2seq", 64): 4, ("attention", 1): 0, ("attention", 64): 0}


@pytest.mark.parametrize("name,batch", LOOP_BARRIERS_PER_STEP, ids=[f"{n}-bs{b}" for n, b in LOOP_BARRIERS_PER_STEP])
def test_zoo_loops_at_paper_size_keep_no_invariant_work_and_their_barriers(name, batch):
    from gdsl.schedule.scheduler import loop_grid_barriers, loop_invariant_work
    prob = common.build_problem(load(name), batch)
    lowered = prob.model.make_forward(prob.cfg, backend="cuda").lower(prob.weights, prob.batches[0])
    plan = lowered.lowering.plan
    assert loop_invariant_work(plan) == []
    assert loop_grid_barriers(plan) == LOOP_BARRIERS_PER_STEP[name, batch]


@pytest.mark.parametrize("name", ["lstm", "nasrnn"])
def test_zoo_loops_at_batch_64_take_one_grid_barrier_a_step_with_owner_computes(name):
    """The dependences need one grid barrier a step (the new state to every vEU); the default plans keep two,
    because the owner-computes layout that needs one is slower at batch 64 (docs/schedule.md): it is built."""
    from gdsl.schedule.scheduler import loop_grid_barriers
    prob = common.build_problem(load(name), 64)
    lowered = prob.model.make_forward(prob.cfg, backend="cuda", owner=True).lower(prob.weights, prob.batches[0])
    assert loop_grid_barriers(lowered.lowering.plan) == 1


def test_invariant_work_left_in_a_loop_is_found():
    """Without LICM (hoist=False) the LSTM's bias sums stay in its loop, and the check names them."""
    from gdsl.schedule.scheduler import loop_invariant_work
    prob = small_problem("lstm", 2, {})
    lowered = prob.model.make_forward(prob.cfg, backend="cuda", hoist=False).lower(prob.weights, prob.batches[0])
    found = loop_invariant_work(lowered.lowering.plan)
    assert found and all(name.endswith("_add") for name in found)


@needs_cpu_backend
@pytest.mark.parametrize("case", FLOOR_CASES, ids=case_id)
def test_floor_count_computing_only_control_values_is_the_full_count(case):
    """Ops that cannot steer control flow are skipped while counting: the counts stay those of the full run."""
    from models import floor
    name, batch, variant = case
    prob = small_problem(name, batch, variant, n_inputs=2)
    for backend in (FLOOR_BACKEND, "cuda"):
        lowered = prob.model.make_forward(prob.cfg, backend=backend).lower(prob.weights, prob.batches[0])
        plan, rendered = floor.plan_of(lowered), floor.rendered_grid_syncs(lowered)
        for batch_inputs in prob.batches:
            flat = floor.flat_arguments(prob.weights, batch_inputs)
            assert floor.count_plan(plan, flat, rendered) == floor.count_plan(plan, flat, rendered, all_values=True)


def test_floor_terms_pick_the_binding_term():
    from models import floor
    count = {"dependent_steps": 1000, "bytes": 4.8e6, "flops": 6.7e9}
    ceilings = {"barrier_us": 1.0, "copy_gbps": 4800.0, "fp32_tflops": 67.0}
    f = floor.floor_terms(count, ceilings)
    assert f["terms_ms"] == pytest.approx({"barriers": 1.0, "bytes": 0.001, "flops": 0.1})
    assert f["binding"] == "barriers" and f["floor_ms"] == pytest.approx(1.0)
    f = floor.floor_terms(dict(count, flops=6.7e11), ceilings)
    assert f["binding"] == "flops" and f["floor_ms"] == pytest.approx(10.0)


def test_floor_needs_a_plan():
    from models import floor
    prob = small_problem("lstm", 1, {})
    lowered = prob.model.make_forward(prob.cfg, backend="interpret").lower(prob.weights, prob.batches[0])
    with pytest.raises(floor.FloorUnavailable, match="no schedule"):
        floor.count_forward(lowered, prob.weights, prob.batches[0])


@needs_cpu_backend
def test_floor_ceilings_measured_on_the_cpu():
    from models import floor
    barrier = floor.measure_barrier_us(FLOOR_BACKEND, grid=2, block=1, runs=3)
    assert 0 < barrier["barrier_us"] < 1e4 and "grid barriers counted from its plan" in barrier["how"]
    assert floor.measure_copy_gbps(FLOOR_BACKEND, runs=3)["copy_gbps"] > 0.1
    assert floor.measure_fp32_tflops(FLOOR_BACKEND, runs=2)["fp32_tflops"] > 1e-4


def test_floor_cuda_ceilings_fail_loudly_without_a_gpu():
    from models import floor
    if "cuda" in gdsl.backends():
        pytest.skip("a CUDA device is present: the GPU test measures it")
    with pytest.raises(floor.FloorUnavailable, match="CUDA device|CuPy"):
        floor.measure_copy_gbps("cuda")
    with pytest.raises(floor.FloorUnavailable, match="no bandwidth measurement"):
        floor.measure_copy_gbps("interpret")


@needs_cpu_backend
def test_bench_prints_time_over_floor(tmp_path, capsys):
    from models import bench
    path = tmp_path / "f.json"
    assert bench.main(["--small", "--models", "lstm,seq2seq", "--batch", "1", "--systems", "gdsl-device,gdsl-host",
                       "--backend", FLOOR_BACKEND, "--runs", "3", "--warmup", "1", "--inputs", "2",
                       "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "time / floor" in out and "binds)" in out
    data = json.loads(path.read_text())
    assert data["ceilings"]["backend"] == FLOOR_BACKEND and data["ceilings"]["device"]["copy_gbps"] > 0
    for row in data["rows"]:
        for res in row["systems"].values():
            f = res["floor"]
            assert f["status"] == "ok" and f["counted_inputs"] == 2
            assert f["floor_ms"] == max(f["terms_ms"].values()) > 0 and f["binding"] in f["terms_ms"]
            assert f["time_over_floor"] == pytest.approx(res["median_ms"] / f["floor_ms"])
            assert f["count"]["dependent_steps"] > 0 and f["count"]["flops"] > 0 and f["count"]["bytes"] > 0


def test_bench_floor_off_and_unavailable(tmp_path):
    from models import bench
    path = tmp_path / "n.json"
    args = ["--small", "--models", "nasrnn", "--batch", "1", "--systems", "gdsl-device", "--backend", "interpret",
            "--runs", "2", "--warmup", "1", "--json", str(path)]
    assert bench.main(args) == 0
    res = json.loads(path.read_text())["rows"][0]["systems"]["gdsl-device"]
    assert res["floor"]["status"] == "unavailable" and "no schedule" in res["floor"]["reason"]
    assert bench.main(args + ["--no-floor"]) == 0
    assert "floor" not in json.loads(path.read_text())["rows"][0]["systems"]["gdsl-device"]


# ---------------------------------------------------------------------------------------------------------
# the control-flow overhead tests (models.bench --overhead): programs without control flow, same results

OVERHEAD_CASES = [(name, program) for name in MODELS
                  for program in load(name).overhead_test(load(name).small()).programs]


@pytest.mark.parametrize("name,program", OVERHEAD_CASES, ids=[f"{n}-{p.replace(' ', '_')}" for n, p in OVERHEAD_CASES])
def test_overhead_programs_match_reference(name, program):
    m = load(name)
    test = m.overhead_test(m.small())
    prob = common.build_problem(m, 1, cfg=test.programs[program], n_inputs=2, **test.inputs)
    ir = gdsl.make_ir(lambda w, x: m.forward(w, x, prob.cfg))(prob.weights, prob.batches[0])
    assert any(e.primitive.family == "control" for e in ir.jaxpr.eqns) == (program == "control flow")
    refs = prob.references()
    for backend in CPU_BACKENDS if program != "control flow" else ["interpret"]:
        fn = m.make_forward(prob.cfg, backend=backend)
        for batch, ref in zip(prob.batches, refs):
            assert common.compare(fn(prob.weights, batch), ref) == [], backend


@pytest.mark.parametrize("system", [pytest.param("torch_eager", marks=needs_torch),
                                    pytest.param("jax_jit", marks=needs_jax)])
@pytest.mark.parametrize("name,program", [c for c in OVERHEAD_CASES if c[1] != "control flow"],
                         ids=[f"{n}-{p.replace(' ', '_')}" for n, p in OVERHEAD_CASES if p != "control flow"])
def test_overhead_baselines_match_reference(name, program, system):
    m = load(name)
    test = m.overhead_test(m.small())
    prob = common.build_problem(m, 1, cfg=test.programs[program], **test.inputs)
    runner = getattr(m, system)(prob.weights, prob.cfg, prob.batches)
    assert common.compare(runner.output(0), prob.references()[0]) == []


def test_bench_overhead_small(tmp_path):
    from models import bench
    path = tmp_path / "o.json"
    assert bench.main(["--overhead", "--small", "--models", "seq2seq,blockdrop", "--systems", "gdsl-device,gdsl-host",
                       "--backend", CPU_BACKENDS[-1], "--runs", "3", "--warmup", "1", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["model"], r["variant"]) for r in rows] == [
        ("seq2seq", "control flow"), ("seq2seq", "unrolled"),
        ("blockdrop", "control flow"), ("blockdrop", "no skip"), ("blockdrop", "trace")]
    assert rows[0]["test"] == "10 steps" and rows[0]["data"].startswith("decoded 10 steps")
    for r in rows:
        assert r["batch"] == 1 and all(res["status"] == "ok" and res["runs"] == 3 for res in r["systems"].values())
    for cf, programs in ((rows[0], ["unrolled"]), (rows[2], ["no skip", "trace"])):
        assert list(cf["overhead"]) == programs
        for by_system in cf["overhead"].values():
            assert by_system.keys() == {"gdsl-device", "gdsl-host"} and all(v > -1 for v in by_system.values())


# ---------------------------------------------------------------------------------------------------------
# full size on the GPU (python -m pytest -m gpu)

def _cuda_usable() -> bool:
    return "cuda" in gdsl.backends()


FULL_CASES = [(n, b) for n in MODELS for b in load(n).BATCHES]


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_usable(), reason="no usable CUDA GPU for gdsl")
@pytest.mark.parametrize("control", ["device", "host"])
@pytest.mark.parametrize("name,batch", FULL_CASES, ids=[f"{n}-bs{b}" for n, b in FULL_CASES])
def test_full_size_on_cuda(name, batch, control):
    m = load(name)
    prob = common.build_problem(m, batch, small=False, n_inputs=2 if name in ("seq2seq", "rae") else 1)
    runner = common.gdsl_runner(m, prob.weights, prob.cfg, prob.batches, backend="cuda", control=control)
    for i, ref in enumerate(prob.references()):
        assert common.compare(runner.output(i), ref) == []


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_usable(), reason="no usable CUDA GPU for gdsl")
@pytest.mark.parametrize("name", ["blockdrop", "skipnet"])
def test_full_size_executed_ratios_on_cuda(name):
    m = load(name)
    for ratio in m.RATIOS:
        prob = common.build_problem(m, 1, ratio=ratio)
        runner = common.gdsl_runner(m, prob.weights, prob.cfg, prob.batches, backend="cuda")
        assert common.compare(runner.output(0), prob.references()[0]) == []


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_usable(), reason="no usable CUDA GPU for gdsl")
@needs_torch
@pytest.mark.parametrize("batch", load("lstm").BATCHES)
def test_cudnn_peers_match_reference_on_cuda(batch):
    m = load("lstm")
    prob = common.build_problem(m, batch, n_inputs=2)
    for system in ("torch_cudnn", "torch_cudnn_graph"):
        runner = getattr(m, system)(prob.weights, prob.cfg, prob.batches)
        for i, ref in enumerate(prob.references()):
            assert common.compare(runner.output(i), ref) == [], system


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_usable(), reason="no usable CUDA GPU for gdsl")
def test_floor_on_cuda():
    """The card's ceilings are in the range of an H100/H200's and the LSTM's floor binds on barriers."""
    from models import floor
    m = load("lstm")
    prob = common.build_problem(m, 1)
    runner = common.gdsl_runner(m, prob.weights, prob.cfg, prob.batches, backend="cuda")
    assert common.compare(runner.output(0), prob.references()[0]) == []
    ceilings = floor.Ceilings("cuda")
    f = floor.forward_floor(runner.lower(0), ceilings, [(prob.weights, prob.batches[0])])
    c = f["ceilings"]
    assert 0.1 < c["barrier_us"] < 20 and 500 < c["copy_gbps"] < 10_000 and 5 < c["fp32_tflops"] < 200
    assert f["binding"] == "barriers" and f["count"]["dependent_steps"] >= prob.cfg.seq_len
    ms = float(np.median(common.time_runner(runner, 1, runs=10)))
    assert ms > 0.9 * f["floor_ms"], f"measured {ms} ms under the floor {f}"


def test_bench_ablation_sets_one_or_several_options():
    from models.bench import ablation
    assert ablation("gdsl-device[wavefront=False]") == ("device", {"wavefront": False})
    assert ablation("gdsl-device[resident_calls=True+narrow=True]") == ("device", {"resident_calls": True,
                                                                                 "narrow": True})
    assert ablation("gdsl-host[grid=32]") == ("host", {"grid": 32})


def test_a_bench_cut_short_leaves_its_picture(tmp_path, monkeypatch):
    """The plot is redrawn after every row (as the JSON is written), so a run stopped by a time limit keeps it."""
    from models import bench
    drawn = []
    monkeypatch.setattr(bench, "plot", lambda rows, path, env, title="", quiet=False: drawn.append((len(rows), title)))
    assert bench.main(["--small", "--models", "rae,blockdrop", "--batch", "1", "--systems", "gdsl-device",
                       "--backend", "interpret", "--runs", "2", "--warmup", "1", "--inputs", "1", "--no-floor",
                       "--plot", str(tmp_path / "p.png")]) == 0
    assert drawn == [(1, "gdsl model zoo (so far)"), (2, "gdsl model zoo (so far)"), (2, "gdsl model zoo")]
