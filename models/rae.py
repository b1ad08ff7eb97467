"""RAE: a recursive autoencoder's encoder, recursion over a binary parse tree (`gdsl.recurse`).

Node arrays of 127: `left, right` (int32), `is_leaf` (bool), `x[127,512]` leaf vectors, `root` (int32);
`enc(n) = x[n]` if leaf else `tanh(concat(enc(left[n]), enc(right[n]))·W + b)` with `W[1024→512]`.
Trees are numbered in post-order (children before parents, root last); unused slots are padding leaves.
Returns `enc(root)[512]`. Batch 1 (one tree per call); the benchmark iterates over 100 random trees.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

import gdsl
import gdsl.numpy as gnp
from models import common, npnn

BATCHES = (1,)
BENCH_INPUTS = 100       # random trees per benchmark row (the paper timed 100 SST trees)


@dataclass(frozen=True)
class Config:
    hidden: int = 512
    nodes: int = 127             # capacity of the node arrays (2**7 - 1)
    mean_leaves: float = 19.0    # sentence length ≈ 19 ± 9 (SST), clipped to min..max leaves
    std_leaves: float = 9.0
    min_leaves: int = 2
    max_leaves: int = 64
    max_depth: int = 64          # gdsl.recurse stack depth: enough for any tree in 127 nodes
    known_tree: tuple | None = None   # a tree known at trace time (nested pairs, leaves None): the recursion
    #                                   written out over it, no recurse or cond (inputs: that tree, packed)


def small() -> Config:
    return Config(hidden=16, mean_leaves=8.0, std_leaves=4.0, max_leaves=16)


def init_weights(cfg: Config, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    H = cfg.hidden
    return {"W": common.xavier(rng, (2 * H, H), 2 * H, H),
            "b": common.uniform(rng, (H,), 1.0 / np.sqrt(2 * H))}


# ---------------------------------------------------------------------------------------------------------
# trees: nested tuples (a leaf is None) packed into post-order node arrays

def random_tree(n_leaves: int, rng: np.random.Generator):
    """Random bracketing of n leaves: split the span at a uniformly random point, recursively."""
    if n_leaves == 1:
        return None
    k = int(rng.integers(1, n_leaves))
    return (random_tree(k, rng), random_tree(n_leaves - k, rng))


def fixed_tree():
    """The overhead test's tree shape: 65 nodes, 33 leaves, depth 13 (edges from root to deepest leaf).

    A chain of 13 internal nodes alternating sides; the side children of the 6 top chain nodes are
    4-leaf balanced subtrees, of the 7th a 2-leaf subtree, of the others single leaves."""
    def side(depth):
        if depth < 6:
            return ((None, None), (None, None))
        return (None, None) if depth == 6 else None

    def chain(depth):
        if depth == 12:
            return (None, None)
        return (chain(depth + 1), side(depth)) if depth % 2 == 0 else (side(depth), chain(depth + 1))
    return chain(0)


def post_order(tree) -> list:
    """The nodes of a tree in post-order (node ids = positions, root last): None for a leaf, (left id,
    right id) for an inner node."""
    order: list = []

    def visit(t):                       # returns the node id
        order.append(None if t is None else (visit(t[0]), visit(t[1])))
        return len(order) - 1
    visit(tree)
    return order


def pack(tree, cfg: Config, rng: np.random.Generator) -> dict:
    order = post_order(tree)
    if len(order) > cfg.nodes:
        raise ValueError(f"tree of {len(order)} nodes does not fit {cfg.nodes}")
    left = np.zeros(cfg.nodes, np.int32)
    right = np.zeros(cfg.nodes, np.int32)
    is_leaf = np.ones(cfg.nodes, bool)
    for n, children in enumerate(order):
        if children is not None:
            left[n], right[n] = children
            is_leaf[n] = False
    x = np.zeros((cfg.nodes, cfg.hidden), np.float32)
    leaves = [n for n, o in enumerate(order) if o is None]
    x[leaves] = rng.uniform(-1, 1, size=(len(leaves), cfg.hidden))
    return {"left": left, "right": right, "is_leaf": is_leaf, "x": x, "root": np.asarray(len(order) - 1, np.int32)}


def make_inputs(cfg: Config, batch: int = 1, seed: int = 0, tree: str = "random") -> dict:
    """One tree: random (leaves ≈ N(19, 9) clipped to 2..64, random bracketing) or the fixed 65-node one."""
    if batch != 1:
        raise ValueError("RAE encodes one tree per call (batch 1)")
    rng = np.random.default_rng(70_000 + seed)
    if tree == "fixed":
        return pack(fixed_tree(), cfg, rng)
    n = int(np.clip(np.rint(rng.normal(cfg.mean_leaves, cfg.std_leaves)), cfg.min_leaves, cfg.max_leaves))
    return pack(random_tree(n, rng), cfg, rng)


def tree_stats(inputs) -> dict:
    """nodes, leaves and depth (edges) of the tree reachable from root."""
    left, right, is_leaf = inputs["left"], inputs["right"], inputs["is_leaf"]

    def walk(n):
        if is_leaf[n]:
            return 1, 1, 0
        a, b = walk(left[n]), walk(right[n])
        return a[0] + b[0] + 1, a[1] + b[1], max(a[2], b[2]) + 1
    nodes, leaves, depth = walk(int(inputs["root"]))
    return {"nodes": nodes, "leaves": leaves, "depth": depth}


def describe(out, inputs, cfg: Config) -> str:
    return "tree: " + ", ".join(f"{k} {v}" for k, v in tree_stats(inputs).items())


# ---------------------------------------------------------------------------------------------------------
def reference(weights, inputs, cfg: Config) -> np.ndarray:
    W, b = npnn.f64(weights)["W"], npnn.f64(weights)["b"]
    x = inputs["x"].astype(np.float64)

    def enc(n):
        if inputs["is_leaf"][n]:
            return x[n]
        return np.tanh(np.concatenate([enc(inputs["left"][n]), enc(inputs["right"][n])]) @ W + b)
    return enc(int(inputs["root"])).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
def forward(weights, inputs, cfg: Config):
    left, right, is_leaf, x = inputs["left"], inputs["right"], inputs["is_leaf"], inputs["x"]
    W, b = weights["W"], weights["b"]
    if cfg.known_tree is not None:
        return unrolled_encode(gnp, cfg.known_tree, x, W, b)

    @gdsl.recurse(result=gdsl.ShapeDtype((cfg.hidden,), gdsl.float32), max_depth=cfg.max_depth)
    def encode(node):
        return gdsl.cond(is_leaf[node],
                         lambda: x[node],
                         lambda: gnp.tanh(gnp.concatenate([encode(left[node]), encode(right[node])]) @ W + b))
    return encode(inputs["root"])


def make_forward(cfg: Config, backend=None, control=None, **options):
    def rae_forward(weights, inputs):
        return forward(weights, inputs, cfg)
    return common.make_jit(rae_forward, backend=backend, control=control, **options)


def unrolled_encode(F, tree, x, W, b):
    """enc(root) of a tree known at trace time, node by node in post-order, for an array namespace F with
    tanh and concatenate (gdsl.numpy, jax.numpy, torch)."""
    enc: list = []
    for n, children in enumerate(post_order(tree)):
        enc.append(x[n] if children is None else F.tanh(F.concatenate([enc[children[0]], enc[children[1]]]) @ W + b))
    return enc[-1]


def overhead_test(cfg: Config) -> common.OverheadTest:
    """Figure 18 on the fixed tree: gdsl.recurse vs the recursion written out over the tree at trace time
    ("trace"). PyTorch recurses on the host either way; JAX, which has no recursion, runs a jitted node
    function per node vs one jit of the whole tree; only the traced tree fits in a CUDA graph."""
    return common.OverheadTest({"control flow": cfg, "trace": common.replace(cfg, known_tree=fixed_tree())},
                               "fixed tree", inputs={"tree": "fixed"})


# ---------------------------------------------------------------------------------------------------------
# PyTorch twin: the artifact's RAE module, nn.Linear `encoder.weight[512,1024]`, `encoder.bias[512]`.

def from_state_dict(sd, cfg: Config) -> dict[str, np.ndarray]:
    sd = {k: common.leaf_to_numpy(v).astype(np.float32) for k, v in sd.items()}
    return {"W": np.ascontiguousarray(sd["encoder.weight"].T), "b": sd["encoder.bias"]}


def to_state_dict(weights, cfg: Config) -> dict[str, np.ndarray]:
    return {"encoder.weight": weights["W"].T, "encoder.bias": weights["b"]}


def _host_recursion(combine, leaf):
    """Recursion on the host over the tree arrays (numpy); math through combine/leaf on the device."""
    def fwd(tree):
        left, right, is_leaf = tree["left"], tree["right"], tree["is_leaf"]

        def enc(n):
            return leaf(tree, n) if is_leaf[n] else combine(enc(left[n]), enc(right[n]))
        return enc(int(tree["root"]))
    return fwd


def torch_eager(weights, cfg, batches, device=None) -> common.Runner:
    """Eager PyTorch recursion with the tree on the host (the paper's PyTorch row for RAE)."""
    torch, dev = common.torch_setup(device)
    W, b = (torch.as_tensor(weights[k], device=dev) for k in ("W", "b"))
    trees = [dict(t, x_dev=torch.as_tensor(t["x"], device=dev)) for t in common.as_batches(batches)]
    fwd = _host_recursion(lambda l, r: torch.tanh(torch.cat([l, r]) @ W + b), lambda t, n: t["x_dev"][n])

    def run(i):
        with torch.no_grad():
            return fwd(trees[i])
    return common.Runner("torch-eager", run=run, sync=common.torch_sync(torch, dev), note="tree on host")


def torch_cudagraph(weights, cfg, batches, device=None) -> common.Runner:
    """Only for a tree known at trace time (cfg.known_tree): one CUDA graph of the written-out recursion."""
    if cfg.known_tree is None:
        raise common.BaselineUnavailable("recursion over a data-dependent tree: no single CUDA graph")
    torch, dev = common.torch_setup(device)
    W, b = (torch.as_tensor(weights[k], device=dev) for k in ("W", "b"))
    xs = [(torch.as_tensor(t["x"], device=dev),) for t in common.as_batches(batches)]
    return common.torch_cuda_graphs(torch, dev, lambda x: unrolled_encode(torch, cfg.known_tree, x, W, b), xs)


def torch_compile(weights, cfg, batches, device=None) -> common.Runner:
    raise common.BaselineUnavailable("recursion over a data-dependent tree: torch.compile would specialise "
                                     "and recompile per tree")


def jax_jit(weights, cfg, batches, device=None) -> common.Runner:
    """JAX has no recursion: Python recursion per tree calling a jitted node function (eager per tree);
    for a tree known at trace time (cfg.known_tree), one jit of the whole written-out recursion."""
    jax, jnp = common.jax_setup()
    if cfg.known_tree is not None:
        fwd = jax.jit(lambda w, t: unrolled_encode(jnp, cfg.known_tree, t["x"], w["W"], w["b"]))
        runner = common.jax_runner(jax, fwd, weights, batches)
        runner.note = "one jit of the whole tree"
        return runner
    W, b = jax.device_put(weights["W"]), jax.device_put(weights["b"])
    combine = jax.jit(lambda l, r, W, b: jnp.tanh(jnp.concatenate([l, r]) @ W + b))
    trees = [dict(t, x_dev=jax.device_put(t["x"])) for t in common.as_batches(batches)]
    fwd = _host_recursion(lambda l, r: combine(l, r, W, b), lambda t, n: t["x_dev"][n])
    return common.Runner("jax", run=lambda i: fwd(trees[i]), sync=jax.block_until_ready,
                         note="eager recursion per tree, jitted node function")


if __name__ == "__main__":
    raise SystemExit(common.main(sys.modules[__name__]))
