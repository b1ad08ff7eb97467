"""Helpers shared by the model zoo: pytrees to numpy, comparison, timing, runners, framework set-up, CLI.

Every model module (`models/<name>.py`) exposes the same interface (see `models/__init__.py`); this file
holds what they all need, so that no model repeats it.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

REL_TOL = 1e-3  # ‖out − ref‖ / ‖ref‖ above this is a mismatch (models.md, the artifact's check_equal)


class BaselineUnavailable(RuntimeError):
    """A comparison system cannot run here (framework missing, no GPU, control flow it cannot express)."""


# ---------------------------------------------------------------------------------------------------------
# pytrees (tuple / list / dict / None of leaves), the same structures gdsl.jit accepts

def tree_map(fn: Callable, tree):
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(fn, v) for v in tree)
    if tree is None:
        return None
    return fn(tree)


def tree_leaves(tree) -> list:
    out: list = []
    tree_map(out.append, tree)
    return out


def leaf_to_numpy(x) -> np.ndarray:
    """One array of any framework (numpy, torch, jax, cupy, gdsl, dlpack, Python scalar) as numpy."""
    if isinstance(x, np.ndarray):
        return x
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        return x.detach().cpu().numpy()
    if mod == "cupy":
        return x.get()
    if mod in ("jax", "jaxlib"):
        return np.asarray(x)
    if isinstance(x, (int, float, bool, np.generic)):
        return np.asarray(x)
    if mod == "gdsl" or not hasattr(x, "__array__"):
        import gdsl
        return np.asarray(gdsl.to_numpy(x))
    return np.asarray(x)


def to_numpy(tree):
    """A pytree of arrays of any framework, as a pytree of numpy arrays."""
    return tree_map(leaf_to_numpy, tree)


# ---------------------------------------------------------------------------------------------------------
# comparison

def rel_error(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (0 when both are zero)."""
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    den = np.linalg.norm(ref)
    num = np.linalg.norm(out - ref)
    if den == 0:
        return float(num)
    return float(num / den)


def compare(out, ref, tol: float = REL_TOL) -> list[str]:
    """Mismatches between two pytrees, as messages (empty list: they agree).

    Floating leaves agree when rel_error <= tol; integer and boolean leaves (tokens, decisions, step counts)
    must be equal element for element.
    """
    out_leaves, ref_leaves = tree_leaves(to_numpy(out)), tree_leaves(to_numpy(ref))
    if len(out_leaves) != len(ref_leaves):
        return [f"output has {len(out_leaves)} arrays, reference {len(ref_leaves)}"]
    problems = []
    for k, (o, r) in enumerate(zip(out_leaves, ref_leaves)):
        o, r = np.asarray(o), np.asarray(r)
        if o.shape != r.shape:
            problems.append(f"output {k}: shape {o.shape} != reference {r.shape}")
        elif np.issubdtype(r.dtype, np.floating):
            if not np.all(np.isfinite(o)):
                problems.append(f"output {k}: {np.size(o) - np.isfinite(o).sum()} non-finite values")
            else:
                err = rel_error(o, r)
                if err > tol:
                    problems.append(f"output {k}: relative error {err:.3g} > {tol:g}")
        else:
            bad = int(np.sum(o.astype(np.int64) != r.astype(np.int64)))
            if bad:
                problems.append(f"output {k}: {bad} of {r.size} tokens/decisions differ")
    return problems


def summarize(tree) -> str:
    """One line per output: shape, dtype and a few numbers a person can eyeball."""
    lines = []
    for k, a in enumerate(tree_leaves(to_numpy(tree))):
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.floating):
            desc = f"norm {np.linalg.norm(a.astype(np.float64)):.6g}  mean {a.mean():.6g}" if a.size else ""
        else:
            flat = a.reshape(-1)
            desc = f"values {flat[:12].tolist()}{' ...' if flat.size > 12 else ''}"
        lines.append(f"  out[{k}] {a.dtype}{list(a.shape)}  {desc}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# runners and timing

@dataclass
class Runner:
    """One system ready to run a model on a list of prepared inputs.

    `run(i)` starts one forward on input set i and returns its raw output; `sync(out)` waits until the
    device has finished it; `fetch(out)` turns it into a numpy pytree.  `runner(i)` does run + sync.
    """
    system: str
    run: Callable[[int], Any]
    sync: Callable[[Any], None] = lambda out: None
    fetch: Callable[[Any], Any] = to_numpy
    note: str = ""
    lower: Callable[[int], Any] | None = None     # gdsl: f.lower(...) of input set i (its plan)

    def __call__(self, i: int = 0):
        out = self.run(i)
        self.sync(out)
        return out

    def output(self, i: int = 0):
        return self.fetch(self(i))


def time_runner(runner: Runner, n_inputs: int, runs: int = 50, warmup: int = 5) -> np.ndarray:
    """Milliseconds of `runs` forwards, cycling over the input sets, each between two device syncs.

    The clock is the host's perf_counter read after the device has finished (the runner's sync:
    cudaDeviceSynchronize for torch/cupy, block_until_ready for JAX), as the paper's timer did.
    """
    for k in range(max(warmup, n_inputs)):
        runner(k % n_inputs)
    times = np.empty(runs)
    for k in range(runs):
        t0 = time.perf_counter()
        runner(k % n_inputs)
        times[k] = (time.perf_counter() - t0) * 1e3
    return times


def stats(times_ms) -> dict:
    t = np.asarray(times_ms, np.float64)
    return {"median_ms": float(np.median(t)), "p10_ms": float(np.percentile(t, 10)),
            "p90_ms": float(np.percentile(t, 90)), "mean_ms": float(t.mean()), "min_ms": float(t.min()),
            "runs": int(t.size)}


def as_batches(inputs) -> list[dict]:
    """A single input dict or a list of them, as a list."""
    return [inputs] if isinstance(inputs, dict) else list(inputs)


# ---------------------------------------------------------------------------------------------------------
# gdsl

def make_jit(fun: Callable, backend: str | None = None, control: str | None = None, **options):
    """gdsl.jit(fun) with only the options that were given (None means gdsl's default)."""
    import gdsl
    opts = {k: v for k, v in dict(backend=backend, control=control, **options).items() if v is not None}
    return gdsl.jit(fun, **opts)


def parse_option(text: str) -> tuple[str, Any]:
    """"wavefront=False" -> ("wavefront", False), "grid=66" -> ("grid", 66): one jit option as the
    benchmark scripts take it (None, True, False and integers parsed, anything else a string)."""
    key, _, value = text.partition("=")
    if value.lstrip("-").isdigit():
        return key, int(value)
    return key, {"None": None, "True": True, "False": False}.get(value, value)


def set_switches(specs) -> None:
    """Set module switches, each "module.NAME=value" (a Python literal), as the benchmark scripts take them
    (benchmarks/switches.py, benchmarks/kernel_ab.py); SystemExit for a module without that switch."""
    for spec in specs:
        target, value = spec.split("=", 1)
        module, name = target.rsplit(".", 1)
        mod = importlib.import_module(module)
        if not hasattr(mod, name):
            raise SystemExit(f"{module} has no switch {name}")
        setattr(mod, name, ast.literal_eval(value))


def _device_put_for(backend: str | None):
    """How to place arrays for a gdsl backend: CuPy arrays for cuda (no copy per call), else numpy."""
    import gdsl
    if (backend or gdsl.default_backend()) == "cuda":
        try:
            import cupy
            return (lambda a: cupy.asarray(a)), (lambda out: cupy.cuda.runtime.deviceSynchronize())
        except ImportError:
            pass
    return (lambda a: a), (lambda out: None)


def gdsl_runner(model, weights, cfg, batches, backend=None, control=None, system=None, **options) -> Runner:
    """A Runner for `model.make_forward(cfg, backend, control)` with weights and inputs placed once, the
    weights bound once (`f.bind(weights)`, as a user with fixed weights calls it: no per-call key over them)."""
    put, sync = _device_put_for(backend)
    fn = model.make_forward(cfg, backend=backend, control=control, **options)
    w = tree_map(put, weights)
    bound = fn.bind(w)
    xs = [tree_map(put, b) for b in as_batches(batches)]
    name = system or ("gdsl" + (f"-{control}" if control else ""))
    return Runner(name, run=lambda i: bound(xs[i]), sync=sync, lower=lambda i: fn.lower(w, xs[i]))


# ---------------------------------------------------------------------------------------------------------
# frameworks for the baselines (imported lazily: none of them is needed by gdsl or the references)

def torch_setup(device: str | None = None):
    """(torch, device) with TF32 off so that fp32 results are comparable; BaselineUnavailable if absent."""
    try:
        import torch
    except ImportError as e:
        raise BaselineUnavailable(f"PyTorch is not installed ({e})") from None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise BaselineUnavailable("PyTorch sees no CUDA device")
    return torch, torch.device(dev)


def torch_sync(torch, device) -> Callable[[Any], None]:
    if device.type == "cuda":
        return lambda out: torch.cuda.synchronize(device)
    return lambda out: None


def torch_tree(torch, tree, device):
    return tree_map(lambda a: torch.as_tensor(np.ascontiguousarray(a), device=device), tree)


def torch_cuda_graphs(torch, device, fwd: Callable, arg_sets: list, system="torch-cudagraph") -> Runner:
    """Capture `fwd(*args)` once per argument set into its own CUDA graph; run(i) replays graph i."""
    if device.type != "cuda":
        raise BaselineUnavailable("CUDA graphs need a CUDA device")
    graphs, outs = [], []
    for args in arg_sets:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):
                fwd(*args)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # "thread_local": a CUDA call of another thread of this process (JAX's runtime, set up by an earlier
        # system) must not invalidate the capture. With the default ("global") the LSTM bs64 capture failed
        # once on the H200 (session 11, "operation failed due to a previous error during capture") and left
        # JAX's stream broken for every later row of that run.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"), torch.no_grad():
            out = fwd(*args)
        graphs.append(graph)
        outs.append(out)

    def run(i):
        graphs[i].replay()
        return outs[i]
    return Runner(system, run=run, sync=torch_sync(torch, device))


def torch_compile(torch, fn: Callable, **kw):
    """torch.compile(fn) or BaselineUnavailable (no inductor/compiler on this install)."""
    try:
        return torch.compile(fn, **kw)
    except Exception as e:  # noqa: BLE001 - any failure means the system is unavailable here
        raise BaselineUnavailable(f"torch.compile failed: {e}") from None


def jax_setup():
    """(jax, jax.numpy) with full fp32 matmul precision and no GPU memory pre-allocation."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import jax
        import jax.numpy as jnp
    except ImportError as e:
        raise BaselineUnavailable(f"JAX is not installed ({e})") from None
    jax.config.update("jax_default_matmul_precision", "highest")
    return jax, jnp


def jax_ops(jax, jnp):
    """jax.numpy with the activation names torch has at top level (sigmoid, relu), for shared cell code."""
    from types import SimpleNamespace
    return SimpleNamespace(matmul=jnp.matmul, tanh=jnp.tanh, exp=jnp.exp, sigmoid=jax.nn.sigmoid,
                           relu=jax.nn.relu, cat=jnp.concatenate, argmax=jnp.argmax)


def jax_runner(jax, fn: Callable, weights, batches, system="jax") -> Runner:
    """A Runner calling jitted `fn(weights, inputs)` with everything already on the default device."""
    w = jax.device_put(weights)
    xs = [jax.device_put(b) for b in as_batches(batches)]
    return Runner(system, run=lambda i: fn(w, xs[i]), sync=jax.block_until_ready)


def host_if(pred, run, skip, *operands):
    """A branch taken on the host: bool() reads the predicate back from the device (one sync)."""
    return run(*operands) if bool(pred) else skip(*operands)


def always_run(pred, run, skip, *operands):
    """No control flow: the branch body always runs (CUDA-graph-capturable; its result must not depend
    on skipping, e.g. a mask blend)."""
    return run(*operands)


def unrolled_fori_loop(lower: int, upper: int, body_fun: Callable, init_val):
    """fori_loop written out at trace time: `body_fun(i, val)` for each Python int i in range(lower, upper),
    so that the program holds no loop (the overhead test's unrolled programs)."""
    val = init_val
    for i in range(lower, upper):
        val = body_fun(i, val)
    return val


def ratio_pattern(n: int, ratio: float) -> np.ndarray:
    """Which of n gated blocks run at an executed ratio: floor(ratio·n) of them, spread evenly
    (50 % of 15 is 7 blocks, as the artifact's 0,1,0,1,... pattern)."""
    k = int(np.floor(ratio * n + 1e-9))
    b = np.arange(n)
    return ((b + 1) * k // n) > (b * k // n)


# ---------------------------------------------------------------------------------------------------------
# weight initialisation

def xavier(rng: np.random.Generator, shape, fan_in: int, fan_out: int) -> np.ndarray:
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


def he(rng: np.random.Generator, shape, fan_in: int, gain: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * gain * np.sqrt(2.0 / fan_in)).astype(np.float32)


def uniform(rng: np.random.Generator, shape, bound: float) -> np.ndarray:
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# command line: python -m models.NAME [--backend B] [--batch N] [--control device|host] [--small] [--check]

@dataclass
class Problem:
    """A model at one configuration with its weights and input sets, as the CLI and the bench build it."""
    model: Any
    cfg: Any
    weights: dict
    batches: list[dict]
    batch: int
    variant: dict = field(default_factory=dict)

    def references(self) -> list:
        return [self.model.reference(self.weights, b, self.cfg) for b in self.batches]


def build_problem(model, batch: int, small: bool = False, seed: int = 0, n_inputs: int = 1, cfg=None,
                  **variant) -> Problem:
    """The model at `cfg` (default: its full-size or small configuration) with its weights and
    `n_inputs` input sets made with the input variant's keywords (ratio=0.5, tree="fixed", ...)."""
    cfg = cfg or (model.small() if small else model.Config())
    weights = model.init_weights(cfg, seed=seed)
    params = inspect.signature(model.make_inputs).parameters
    for key in variant:
        if key not in params:
            raise SystemExit(f"{model.__name__} has no input variant {key!r}")
    batches = [model.make_inputs(cfg, batch, seed=seed + k, **variant) for k in range(n_inputs)]
    return Problem(model, cfg, weights, batches, batch, variant)


@dataclass
class OverheadTest:
    """A model's control-flow overhead test (the paper's Figures 15, 16 and 18): one computation written as
    several programs, each a configuration of the model. `programs` maps a name to it, "control flow" (the
    model as it is) first; `inputs` are make_inputs' keywords for data on which every program computes the
    same as the model; `label` says what they run (steps, executed ratio, tree); `no_control_flow` names
    the systems that cannot capture this control flow (their "control flow" runner would be a stand-in
    without it, so it is left out)."""
    programs: dict
    label: str
    inputs: dict = field(default_factory=dict)
    no_control_flow: tuple = ()


def variant_args(args) -> dict:
    out = {}
    if getattr(args, "ratio", None) is not None:
        out["ratio"] = args.ratio
    if getattr(args, "fixed_tree", False):
        out["tree"] = "fixed"
    return out


def main(model, argv=None) -> int:
    """The CLI of one model: run its gdsl forward once (after a compile call), print outputs and time."""
    name = getattr(model.__spec__, "name", model.__name__).split(".")[-1]
    p = argparse.ArgumentParser(prog=f"python -m models.{name}", description=(model.__doc__ or "").split("\n")[0])
    p.add_argument("--backend", default=None, help="gdsl backend (default: gdsl's default backend)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--control", choices=["device", "host"], default=None)
    p.add_argument("--small", action="store_true", help="the scaled-down configuration (seconds on interpret)")
    p.add_argument("--check", action="store_true", help="compare with the numpy reference; exit 1 on mismatch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=1, help="timed calls after the first (compiling) one")
    if "ratio" in inspect.signature(model.make_inputs).parameters:
        p.add_argument("--ratio", type=float, default=None, help="force this share of blocks to run (0..1)")
    if "tree" in inspect.signature(model.make_inputs).parameters:
        p.add_argument("--fixed-tree", action="store_true", help="the artifact's fixed 65-node tree")
    args = p.parse_args(argv)

    import gdsl
    prob = build_problem(model, args.batch, small=args.small, seed=args.seed, **variant_args(args))
    print(f"{name}: {prob.cfg}  batch {args.batch}  backend {args.backend or gdsl.default_backend()}  "
          f"control {args.control or 'device'}")
    t0 = time.perf_counter()
    runner = gdsl_runner(model, prob.weights, prob.cfg, prob.batches, backend=args.backend,
                         control=args.control)
    out = runner(0)
    first = time.perf_counter() - t0
    times = time_runner(runner, 1, runs=args.runs, warmup=0) if args.runs > 0 else np.array([first * 1e3])
    out = runner.fetch(out)
    print(summarize(out))
    print(f"first call (trace + compile + run) {first * 1e3:.1f} ms; median of {times.size} runs "
          f"{np.median(times):.3f} ms")
    if hasattr(model, "describe"):
        print("  " + model.describe(out, prob.batches[0], prob.cfg))
    if args.check:
        problems = compare(out, model.reference(prob.weights, prob.batches[0], prob.cfg))
        if problems:
            print("CHECK FAILED:\n  " + "\n  ".join(problems))
            return 1
        print("check: matches the numpy reference")
    return 0


def replace(cfg, **kw):
    return dataclasses.replace(cfg, **kw)
