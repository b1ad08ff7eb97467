"""The floor of a forward on the card it runs on: what no schedule of the same plan can beat.

    floor = max(barriers × barrier cost, compulsory bytes / copy bandwidth, flops / fp32 peak)

Counting (`count_forward`, runs anywhere, no GPU): the lowered plan of a gdsl forward is executed with
numpy, one whole Op at a time (not uTask by uTask, as gdsl's simulator does, so that full-size models
count in seconds), on the forward's real inputs, so that data-dependent trip counts and branches are
those of the data. While it runs it counts

    grid barriers   `Sync("grid")` statements executed, plus kernel launches (host control: each launch
                    ends with every vEU finished, at least a barrier's worth of dependency). On the
                    C-family backends (cuda, hip) only the Syncs the renderer emits as grid barriers count:
                    it drops those that guard nothing once slices are views and demotes to a block barrier
                    those whose neighbourhood runs on one vEU (at be17c27 the full-size LSTM's plan at
                    batch 1 executes 50 grid Syncs per step, its CUDA 20: 1,282 per forward).
                    `rendered_grid_syncs` asks the renderer's own decision functions; the plan's own
                    count is kept beside it (`plan_grid_barriers`).
    flops           per executed Op: 2·M·N·K for matmul / conv2d (their GEMM view), one per element per
                    elementwise node of a fused chain, one per input element of a reduction or pooling
                    window, none for data movement; uniform (scalar) ops are not counted
    bytes           each input or const buffer that executed work reads, once, whole, plus the outputs
                    once (weights of a block that never runs are not compulsory)

Ceilings (`Ceilings`, measured on the backend's own device, in the same process as the timing):

    barrier cost    a gdsl program that is nothing but a loop of steps that each need a grid barrier, at
                    the plan's grid and block size, run with two trip counts; cost = Δtime / Δbarriers,
                    the barriers counted from its own plan (so launch and fixed costs cancel)
    copy bandwidth  a large device-to-device copy (CuPy on cuda, numpy on the cpu backend), bytes read
                    + bytes written over its median time
    fp32 peak       a large float32 matmul (CuPy/cuBLAS with TF32 off on cuda, numpy's BLAS on cpu)

The interpret backend has no plan: its floor is unavailable. A device whose ceilings cannot be measured
raises FloorUnavailable with the reason.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import numpy as np

import gdsl  # noqa: F401 - registers every primitive before the registry is read
from gdsl.primitives.registry import (
    CONTRACTION,
    CONVOLUTION,
    ELEMENTWISE,
    OP_KINDS,
    REDUCE,
    WINDOW,
    family_of,
)
from gdsl.schedule import utasks
from gdsl.schedule.plan import (
    CHAIN_PARTS,
    Assign,
    Branch,
    Buffer,
    Launch,
    Loop,
    Plan,
    Sync,
    Uniforms,
    Wave,
    plan_statements,
    sibling_parts,
)
from gdsl.schedule.shares import storage_elements
from gdsl.schedule.simulate import Simulator, frames_spanned
from gdsl.tracing.pytree import tree_flatten

TERMS = ("barriers", "bytes", "flops")
COMPULSORY_KINDS = ("input", "const")      # buffers a forward must read from memory at least once


class FloorUnavailable(RuntimeError):
    """The floor cannot be computed here (no plan, no device to measure the ceilings on)."""


# ---------------------------------------------------------------------------------------------------------
# counting: the plan executed one Op at a time

@dataclass
class PlanCount:
    """What one forward executes: grid barriers, kernel launches, flops and compulsory bytes."""
    grid_barriers: int = 0
    plan_grid_barriers: int = 0                   # every grid Sync of the plan executed, rendered or not
    flag_syncs: int = 0                           # flag syncs executed (gdsl/schedule/flags.py): no cost term
    launches: int = 0
    flops: float = 0.0
    bytes: int = 0
    flops_by_family: dict = field(default_factory=dict)
    loops: list = field(default_factory=list)     # per Loop statement, in plan order: trips, barriers

    @property
    def dependent_steps(self) -> int:
        """Grid barriers plus kernel boundaries: the steps every vEU must wait for one after another."""
        return self.grid_barriers + self.launches


class _Storage:
    """A buffer's values only: the counter checks no races, so it keeps none of the simulator's
    per-element writer/reader bookkeeping (which would take 9x the memory at full size)."""
    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data

    def reset(self):
        pass


def control_buffers(plan: Plan) -> set:
    """The buffers whose values can steer control flow: those a uniform op or a uniform copy reads (trip
    counts, predicates, branch indices, dynamic-slice starts are uniforms), and, transitively, every
    input of an Op that writes one of them. An Op writing none of them cannot change what runs."""
    stmts = list(plan_statements(plan))
    needed = {v.storage for s in stmts if isinstance(s, Uniforms) for u in s.ops for v in u.inputs}
    needed |= {s.src.storage for s in stmts if isinstance(s, Assign)}
    needed |= {s.pred.storage for s in stmts if isinstance(s, Loop)}
    needed |= {s.index.storage for s in stmts if isinstance(s, Branch)}
    needed = {b for b in needed if isinstance(b, Buffer)}
    ops = [t.op for s in stmts if isinstance(s, Wave) for t in s.tasks]
    changed = True
    while changed:
        changed = False
        for op in ops:
            if any(v.storage in needed for v in op.outputs):
                new = {v.storage for v in op.inputs if isinstance(v.storage, Buffer)} - needed
                if new:
                    needed |= new
                    changed = True
    return needed


class _Counter(Simulator):
    """gdsl's plan simulator (its semantics for uniforms, loops, branches, recursion frames) with waves
    run one whole Op at a time and barriers counted instead of checked. With `all_values=False` only
    the Ops that can steer control flow are computed (the counts do not depend on the others' values:
    a full-size LSTM then counts in a second instead of minutes of numpy matmuls); the outputs of such
    a run are not the forward's."""

    def __init__(self, plan: Plan, rendered_syncs: frozenset | None = None, all_values: bool = True):
        super().__init__(dataclasses.replace(plan, buffers=()), check=False)
        self.plan = plan
        self.rendered_syncs = rendered_syncs
        self.computed = None if all_values else control_buffers(plan)
        for buf in plan.buffers:
            copies = self.functions[buf.frame_of].frames if buf.frame_of else 1
            self.mem[buf] = _Storage(np.zeros((copies,) + buf.aval.shape, buf.aval.dtype))
        self.count = PlanCount()
        self.read_inputs: set = set()
        loops = [stmt for stmt in plan_statements(plan) if isinstance(stmt, Loop)]
        self._loop_index = {id(loop): k for k, loop in enumerate(loops)}
        self.count.loops = [{"trips": 0, "grid_barriers": 0} for _ in self._loop_index]

    def read(self, value, veu=None, op=None):
        """A buffer's values as a view (the simulator copies them for its checks; whole weight stacks
        copied per read would dominate the count's time)."""
        value = self.resolved(value)        # (a view at a run-time offset: where its reader runs)
        s = value.storage
        if not isinstance(s, Buffer):
            return super().read(value)
        if s.kind in COMPULSORY_KINDS:
            self.read_inputs.add(s)
        if value.rows is not None:          # gathered rows (plan.Value.rows): the simulator's gather
            return super().read(value)
        slot = self._slot(value)            # a view's window (plan.Value.offset), maybe across frames
        flat = self.mem[s].data[slot:slot + frames_spanned(value)].reshape(-1)
        window = flat[value.offset:value.offset + value.aval.size]
        if value.perm is not None:          # a transpose read in place (plan.Value.perm)
            return window.reshape(value.source_shape).transpose(value.perm)
        return window.reshape(value.aval.shape)

    def run_sync(self, stmt: Sync):
        if stmt.scope == "flags":
            self.count.flag_syncs += 1
        if self.grid_here(stmt):
            self.count.plan_grid_barriers += 1
            if self.rendered_syncs is None or id(stmt) in self.rendered_syncs:
                self.count.grid_barriers += 1

    def run_launch(self, stmt: Launch):
        self.count.launches += 1
        self.block(self.plan.kernels[stmt.kernel].body)

    def run_loop(self, stmt: Loop):
        record = self.count.loops[self._loop_index[id(stmt)]]
        before = self.count.grid_barriers
        while True:
            self.block(stmt.cond)
            if not bool(self.read(stmt.pred).reshape(())):
                break
            record["trips"] += 1
            self.block(stmt.body)
        record["grid_barriers"] += self.count.grid_barriers - before

    def run_wave(self, stmt: Wave):
        # Every Op of a wave computes from the values before the wave (as in the simulator), then writes.
        ops = [task.op for task in stmt.tasks]
        for op in ops:
            self.read_inputs |= {v.storage for v in op.inputs
                                 if isinstance(v.storage, Buffer) and v.storage.kind in COMPULSORY_KINDS}
        results = [(op, self._evaluate(op) if self._computes(op) else []) for op in ops]
        for op, outs in results:
            flops = op_flops(op)
            family = family_of(op.kind)
            self.count.flops += flops
            self.count.flops_by_family[family] = self.count.flops_by_family.get(family, 0.0) + flops
            for value, result in zip(op.outputs, outs):
                slot = self._slot(value)
                flat = self.mem[value.storage].data[slot:slot + 1].reshape(-1)   # a view, even when 0-d
                if value.window is not None:    # stored into a window of the storage (plan.StoreWindow)
                    if not self.dropped(value):
                        flat[storage_elements(self.resolved(value), None)] = result.reshape(-1)
                    continue
                flat[:result.size] = result.reshape(-1)

    def _computes(self, op) -> bool:
        return self.computed is None or any(v.storage in self.computed for v in op.outputs)

    def run(self, flat_args) -> list:
        outs = super().run(flat_args)
        self.count.bytes = (sum(b.aval.size * b.aval.dtype.itemsize for b in self.read_inputs)
                            + sum(v.aval.size * v.aval.dtype.itemsize for v in self.plan.outputs))
        return outs


def op_flops(op) -> float:
    """Floating-point operations of one Op (see the module docstring for what counts)."""
    if CHAIN_PARTS in op.params:          # a GEMV, a row chain, a GEMV as one op (plan.GEMV_ROWS_GEMV): theirs
        return sum(op_flops(part) for part in op.params[CHAIN_PARTS])
    out = op.outputs[0].aval
    family = family_of(op.kind)
    if family in (CONTRACTION, CONVOLUTION):       # (sibling matmuls as one op: each part's, plan.N_PARTS)
        dims = [utasks.gemm_dims(p.kind, [v.aval for v in p.inputs], p.outputs[0].aval, p.params)
                for p in sibling_parts(op)]
        return sum(2.0 * batch * m * n * k for batch, m, n, k in dims)
    if family == ELEMENTWISE:
        nodes = _elementwise_nodes(op.expr) if op.expr is not None else 1
        return float(nodes * out.size)
    if family in (REDUCE, WINDOW):
        return float(op.inputs[0].aval.size)
    return 0.0


def _elementwise_nodes(expr) -> int:
    """Arithmetic nodes of a fused expression (inputs, literals and broadcasts are free)."""
    kind = OP_KINDS.get(expr.op)
    own = 1 if kind is not None and kind.family == ELEMENTWISE else 0
    return own + sum(_elementwise_nodes(a) for a in expr.args)


def plan_of(lowered) -> Plan:
    """The Plan object of `f.lower(*args)` (whether `.plan` is the Plan or its text)."""
    for candidate in (getattr(lowered, "plan", None), getattr(getattr(lowered, "lowering", None), "plan", None)):
        if isinstance(candidate, Plan):
            return candidate
    raise FloorUnavailable(f"the {getattr(lowered, 'backend', '?')} backend has no schedule to count "
                           f"barriers from")


def flat_arguments(*args) -> list:
    """The flat argument list a jitted function of these positional pytrees receives (as gdsl.jit
    flattens them)."""
    flat, _ = tree_flatten((tuple(args), {}))
    return [np.asarray(a) for a in flat]


def count_plan(plan: Plan, flat_args, rendered_syncs: frozenset | None = None,
               all_values: bool = False) -> PlanCount:
    """Run `plan` on `flat_args` (numpy, consts excluded) and count what it executed; with
    `rendered_syncs` (ids of Sync statements) only those grid Syncs count as barriers. Only the Ops
    that can steer control flow are computed unless `all_values`."""
    counter = _Counter(plan, rendered_syncs, all_values)
    counter.run(flat_args)
    return counter.count


def count_forward(lowered, *args) -> PlanCount:
    """Count one forward of `lowered` (from `f.lower(*args)`) on the same numpy arguments."""
    return count_plan(plan_of(lowered), flat_arguments(*args), rendered_grid_syncs(lowered))


def _dialect(backend: str):
    """The C-family dialect a backend renders with (None: the backend is not C-family)."""
    if backend == "cuda":
        from gdsl.backends.cuda.dialect import CUDADialect
        return CUDADialect()
    if backend == "hip":
        from gdsl.backends.hip.dialect import HIPDialect
        return HIPDialect()
    return None


def rendered_grid_syncs(lowered) -> frozenset | None:
    """The grid Syncs of the plan that the C-family renderer emits as grid barriers (ids of the Sync
    statements), or None where the plan's Syncs are what runs (other backends).

    This follows the renderer's `block()` through the plan (the same walk: loop conditions, then bodies;
    branches in order; recursive functions from a fresh start) and asks the renderer's own `demoted` and
    `quiet_after` / `_loop_quiet` at each step, as `block()` does; tests/test_models.py checks that the
    result has as many barriers as the generated source. gdsl could report this itself (or put views in
    the plan, so that the plan says what runs), and then this function goes."""
    dialect = _dialect(getattr(lowered, "backend", None))
    lowering = getattr(lowered, "lowering", None)
    if dialect is None or getattr(lowering, "rendered", None) is None:
        return None
    from gdsl.backends.cfamily.render import Renderer
    plan = plan_of(lowered)
    renderer = Renderer(plan, dialect, barrier=lowering.options.get("barrier", "atomic"))
    syncs = [s for s in plan_statements(plan) if isinstance(s, Sync)]
    if len({id(s) for s in syncs}) != len(syncs):
        raise FloorUnavailable("the plan shares one Sync statement between places: barriers cannot be told apart")
    kept: set = set()

    def visit(stmts, quiet: bool) -> None:
        demoted = renderer.demoted(stmts)
        for index, stmt in enumerate(stmts):
            if isinstance(stmt, Sync):
                grid = stmt.scope == "grid" and index not in demoted
                if grid and not quiet:
                    kept.add(id(stmt))
                quiet = (grid and stmt.always_grid) or quiet     # (by return site: block on some paths)
            elif isinstance(stmt, Loop):
                entry, after_cond = renderer._loop_quiet(stmt, quiet)
                visit(stmt.cond, entry)
                visit(stmt.body, after_cond)
                quiet = after_cond
            elif isinstance(stmt, Branch):
                for branch in stmt.branches:
                    visit(branch, quiet)
                quiet = renderer.quiet_after([stmt], quiet)
            else:
                quiet = renderer.quiet_after([stmt], quiet)

    for kernel in plan.kernels:
        visit(kernel.body, False)
    for fn in plan.functions:
        visit(fn.body, False)
    return frozenset(kept)


def mean_count(counts: list[PlanCount]) -> dict:
    """The mean of several forwards' counts (the bench cycles over input sets)."""
    return {"grid_barriers": float(np.mean([c.grid_barriers for c in counts])),
            "plan_grid_barriers": float(np.mean([c.plan_grid_barriers for c in counts])),
            "flag_syncs": float(np.mean([c.flag_syncs for c in counts])),
            "launches": float(np.mean([c.launches for c in counts])),
            "dependent_steps": float(np.mean([c.dependent_steps for c in counts])),
            "flops": float(np.mean([c.flops for c in counts])),
            "bytes": float(np.mean([c.bytes for c in counts])),
            "flops_by_family": {k: float(np.mean([c.flops_by_family.get(k, 0.0) for c in counts]))
                                for k in counts[0].flops_by_family},
            "loops": counts[0].loops if len(counts) == 1 else None}


# ---------------------------------------------------------------------------------------------------------
# the floor

def floor_terms(count: dict, ceilings: dict) -> dict:
    """The three terms (ms) of one forward's floor, the floor and the term that binds."""
    barrier_us = ceilings["barrier_us"]
    terms = {"barriers": count["dependent_steps"] * barrier_us * 1e-3,
             "bytes": count["bytes"] / (ceilings["copy_gbps"] * 1e9) * 1e3,
             "flops": count["flops"] / (ceilings["fp32_tflops"] * 1e12) * 1e3}
    binding = max(terms, key=terms.get)
    return {"terms_ms": terms, "floor_ms": terms[binding], "binding": binding}


# ---------------------------------------------------------------------------------------------------------
# ceilings, measured on the device the forward runs on

BARRIER_STEPS = {"cuda": (1_000, 11_000), "cpu": (200, 2_200)}   # the two trip counts of the barrier loop
# Its vector: on cuda 4096 floats are 4 uTasks on 4 vEUs (a neighbourhood of several vEUs, so the renderer
# keeps every grid barrier; 4 per step at 770ed65, as many as the plan says); on the CPU, where a vEU is a
# thread and every element costs, as few as still give each thread some.
BARRIER_VECTOR = {"cuda": 4096, "cpu": 64}
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 27}
MATMUL_N = {"cuda": 8192, "cpu": 1024}


def _barrier_loop(steps: int):
    """A forward that is nothing but `steps` dependent steps: each rotates a vector by one element (every
    vEU reads what another wrote, so every step needs a grid barrier) and adds one."""
    import gdsl.numpy as gnp

    def barrier_loop(x):
        def step(i, v):
            return gnp.concatenate([v[1:], v[:1]]) + 1.0
        return gdsl.fori_loop(0, steps, step, x)
    return barrier_loop


def measure_barrier_us(backend: str, grid: int, block: int, runs: int = 20) -> dict:
    """The cost of one grid barrier (µs) at `grid` vEUs of `block` threads, on `backend`'s device."""
    from models import common
    steps = BARRIER_STEPS.get(backend)
    if steps is None:
        raise FloorUnavailable(f"no barrier measurement for the {backend} backend")
    put, sync = common._device_put_for(backend)
    x = np.random.default_rng(0).standard_normal(BARRIER_VECTOR[backend]).astype(np.float32)
    points = []
    for n in steps:
        fn = common.make_jit(_barrier_loop(n), backend=backend, control="device", grid=grid, block=block)
        count = count_forward(fn.lower(x), x)
        xd = put(x)
        runner = common.Runner("barrier", run=lambda i, fn=fn, xd=xd: fn(xd), sync=sync)
        ms = float(np.median(common.time_runner(runner, 1, runs=runs, warmup=3)))
        points.append((count.dependent_steps, ms))
    (b0, t0), (b1, t1) = points
    if b1 <= b0:
        raise FloorUnavailable(f"the barrier loop's plan has no grid barrier per step ({b0} and {b1} barriers "
                               f"at {steps} steps): the scheduler needs a new barrier program")
    return {"barrier_us": (t1 - t0) / (b1 - b0) * 1e3, "grid": grid, "block": block,
            "how": f"gdsl loop of {steps[0]} and {steps[1]} rotate+add steps, {b0} and {b1} grid barriers "
                   f"counted from its plan, {t0:.3f} and {t1:.3f} ms (median of {runs})"}


def _cuda_modules():
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - any failure here means no CUDA device to measure on
        raise FloorUnavailable(f"cannot measure the card's ceilings: CuPy sees no CUDA device ({e})") from None
    return cupy


def _time_cuda(cupy, fn, runs: int) -> float:
    """Median ms of fn() between CUDA events, after two warm-up calls."""
    for _ in range(2):
        fn()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(runs):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


def _time_host(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def measure_copy_gbps(backend: str, runs: int = 20) -> dict:
    """Device-to-device copy bandwidth (GB/s, bytes read + bytes written)."""
    nbytes = COPY_BYTES.get(backend)
    if backend == "cuda":
        cupy = _cuda_modules()
        src = cupy.random.standard_normal(nbytes // 4, dtype=cupy.float32)
        dst = cupy.empty_like(src)
        ms = _time_cuda(cupy, lambda: cupy.copyto(dst, src), runs)
        del src, dst
        cupy.get_default_memory_pool().free_all_blocks()    # give the 2 GiB back to the peers' allocators
        how = f"cupy.copyto of {nbytes >> 20} MiB float32"
    elif backend == "cpu":
        src = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
        dst = np.empty_like(src)
        ms = _time_host(lambda: np.copyto(dst, src), runs)
        how = f"numpy.copyto of {nbytes >> 20} MiB float32 (host memory)"
    else:
        raise FloorUnavailable(f"no bandwidth measurement for the {backend} backend")
    return {"copy_gbps": 2 * nbytes / (ms * 1e-3) / 1e9, "how": f"{how}: {ms:.3f} ms (median of {runs})"}


def measure_fp32_tflops(backend: str, runs: int = 10) -> dict:
    """float32 matmul rate (TFLOP/s) of an n×n×n product on random data."""
    n = MATMUL_N.get(backend)
    if backend == "cuda":
        cupy = _cuda_modules()
        if os.environ.get("CUPY_TF32", "0") != "0":
            raise FloorUnavailable("CUPY_TF32 is set: the matmul would run in TF32, not fp32")
        a = cupy.random.standard_normal((n, n), dtype=cupy.float32)
        b = cupy.random.standard_normal((n, n), dtype=cupy.float32)
        ms = _time_cuda(cupy, lambda: cupy.matmul(a, b), runs)
        del a, b
        cupy.get_default_memory_pool().free_all_blocks()
        how = f"cupy.matmul {n}x{n}x{n} float32 (cuBLAS, TF32 off)"
    elif backend == "cpu":
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n)).astype(np.float32)
        b = rng.standard_normal((n, n)).astype(np.float32)
        ms = _time_host(lambda: a @ b, runs)
        how = f"numpy matmul {n}x{n}x{n} float32 (host BLAS)"
    else:
        raise FloorUnavailable(f"no fp32 rate measurement for the {backend} backend")
    return {"fp32_tflops": 2.0 * n ** 3 / (ms * 1e-3) / 1e12, "how": f"{how}: {ms:.3f} ms (median of {runs})"}


class Ceilings:
    """The card's measured ceilings, measured once per process (the barrier cost once per grid/block)."""

    def __init__(self, backend: str):
        self.backend = backend
        self._device: dict | None = None
        self._barriers: dict = {}

    def device(self) -> dict:
        if self._device is None:
            copy, peak = measure_copy_gbps(self.backend), measure_fp32_tflops(self.backend)
            self._device = {"copy_gbps": copy["copy_gbps"], "fp32_tflops": peak["fp32_tflops"],
                            "how": {"copy": copy["how"], "fp32": peak["how"]}}
        return self._device

    def barrier(self, grid: int, block: int) -> dict:
        key = (grid, block)
        if key not in self._barriers:
            self._barriers[key] = measure_barrier_us(self.backend, grid, block)
        return self._barriers[key]

    def for_plan(self, plan: Plan) -> dict:
        device, barrier = self.device(), self.barrier(plan.grid, plan.block)
        return {"barrier_us": barrier["barrier_us"], "copy_gbps": device["copy_gbps"],
                "fp32_tflops": device["fp32_tflops"], "grid": plan.grid, "block": plan.block,
                "how": dict(device["how"], barrier=barrier["how"])}

    def summary(self) -> dict:
        return {"backend": self.backend, "device": self._device,
                "barriers": {f"{g}x{b}": v for (g, b), v in self._barriers.items()}}


def forward_floor(lowered, ceilings: Ceilings, arg_sets: list[tuple]) -> dict:
    """The floor of a jitted forward: its plan counted on each argument set, against the card's ceilings."""
    plan, rendered = plan_of(lowered), rendered_grid_syncs(lowered)
    counts = [count_plan(plan, flat_arguments(*args), rendered) for args in arg_sets]
    count = mean_count(counts)
    return dict(floor_terms(count, ceilings.for_plan(plan)), count=count,
                ceilings=ceilings.for_plan(plan))
