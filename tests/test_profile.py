"""gdsl.profile: the per-vEU timeline of a persistent kernel (docs/profile.md).

CPU (CI): a small program with a loop, a branch and dependent ops is profiled; the trace is checked against
the plan (one track per vEU, op names, nesting of uTasks in loop iterations, a consumer starting after the
barrier behind its producer, summary totals, a full buffer reported). The C-family instrumentation is
checked by compiling it (NVRTC, hiprtc) and by running it on the g++ emulator; on a GPU the CUDA profile runs.
"""
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from strategies import needs_cxx, needs_nvrtc

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import emulator
from gdsl.backends.cpu import cpu_count
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.backends.hip import toolchain as hip_toolchain
from gdsl.primitives.linalg import matmul_p
from gdsl.profiling.profile import _collect, run_profile
from gdsl.profiling.sites import TraceSites
from gdsl.schedule.plan import Wave, plan_statements

needs_hiprtc = pytest.mark.skipif(hip_toolchain.hiprtc_available() is not None,
                                  reason=str(hip_toolchain.hiprtc_available()))
two_threads = pytest.mark.skipif(cpu_count() < 2, reason="grid barriers between threads need two cores")
STEPS = 4


def program(x, w, n):
    """A loop whose body is a matmul (several uTasks), a tanh of it, another matmul and a branch."""
    def body(i, h):
        a = gnp.tanh(h @ w)
        b = a @ w + 1.0
        return gdsl.cond(i % 2 == 0, lambda: b * 0.5, lambda: b - 1.0)
    return gdsl.fori_loop(0, n, body, x)


def arguments():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((64, 64)).astype(np.float32),
            (0.01 * rng.standard_normal((64, 64))).astype(np.float32), np.int32(STEPS))


@pytest.fixture(scope="module")
def cpu_profile():
    f = gdsl.jit(program, backend="cpu", grid=2)
    return f, gdsl.profile(f, *arguments())


def plan_of(f):
    return f._entry(arguments(), {})[0]["lowering"].plan


def plan_ops(plan) -> list:
    return [task.op for stmt in plan_statements(plan) if isinstance(stmt, Wave) for task in stmt.tasks]


def by_track(events, kind=None, name=None) -> dict:
    out: dict = {}
    for e in events:
        if (kind is None or e.kind == kind) and (name is None or e.name == name):
            out.setdefault(e.track, []).append(e)
    return out


def producer_consumer(plan):
    """(producer, consumer) op names: the loop's first matmul and the tanh that reads it."""
    ops = plan_ops(plan)
    producer = next(op for op in ops if op.kind == matmul_p.name)
    consumer = next(op for op in ops if any(v.storage is producer.outputs[0].storage for v in op.inputs))
    return producer.name, consumer.name


# ------------------------------------------------------------------------------------------ CPU
def test_trace_is_valid_json_with_one_track_per_veu(cpu_profile, tmp_path):
    f, p = cpu_profile
    path = tmp_path / "trace.json"
    p.save(path)
    trace = json.loads(path.read_text())
    names = [e for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"]
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    threads = f._entry(arguments(), {})[0]["profiled"][True][0].threads
    assert len(names) == len(p.tracks) == threads
    assert {e["tid"] for e in slices} <= {e["tid"] for e in names}
    assert len(slices) == len(p.events) and all(e["dur"] >= 0 for e in slices)
    assert trace["otherData"]["truncated"] is False and not p.truncated and p.unmatched == 0


def test_event_names_are_the_plans(cpu_profile):
    f, p = cpu_profile
    plan = plan_of(f)
    op_names = {op.name for op in plan_ops(plan)}
    seen = {e.name for e in p.events if e.kind == "op"}
    # every op ran (the branch's two on alternate iterations): one branch case per iteration
    assert seen == op_names
    cases = [e for e in p.events if e.kind == "case" and e.track == 0]
    assert len(cases) == STEPS and {e.args["case"] for e in cases} == {0, 1}


def test_utasks_nest_inside_loop_iterations(cpu_profile):
    _, p = cpu_profile
    for events in by_track(p.events).values():
        loops = [e for e in events if e.kind == "loop"]
        iterations = [e for e in events if e.kind == "iteration"]
        assert len(loops) == 1 and len(iterations) == STEPS
        assert all(loops[0].begin <= it.begin <= it.end <= loops[0].end for it in iterations)
        assert all(it.depth == loops[0].depth + 1 for it in iterations)
        inside = [e for e in events if e.kind == "op" and loops[0].begin <= e.begin <= loops[0].end]
        assert inside
        for op in inside:
            holder = [it for it in iterations if it.begin <= op.begin and op.end <= it.end]
            assert len(holder) == 1 and op.depth > holder[0].depth
        # slices of one track never overlap unless nested
        ordered = sorted(events, key=lambda e: (e.begin, e.depth))
        for a, b in zip(ordered, ordered[1:]):
            assert b.begin >= a.end or (b.depth > a.depth and b.end <= a.end)


@two_threads
def test_consumer_starts_after_the_barrier_behind_its_producer(cpu_profile):
    f, p = cpu_profile
    producer, consumer = producer_consumer(plan_of(f))
    produced = by_track(p.events, "op", producer)
    consumed = by_track(p.events, "op", consumer)
    barriers = by_track(p.events, "barrier")
    assert len(produced) == 2, "the producer's uTasks run on both threads"
    for k in range(STEPS):
        done = max(events[k].end for events in produced.values())
        for track, events in consumed.items():
            start = events[k].begin
            assert start >= done
            wait = [b for b in barriers[track] if produced[track][k].end <= b.begin and b.end <= start]
            assert wait, "a barrier wait lies between the producer and the consumer on the consumer's vEU"


def test_summary_adds_up(cpu_profile):
    _, p = cpu_profile
    ops, barriers = p.op_totals(), p.barrier_totals()
    assert sum(t for _, t in ops.values()) == pytest.approx(sum(e.duration for e in p.events if e.kind == "op"))
    assert sum(n for n, _ in ops.values()) == sum(1 for e in p.events if e.kind == "op")
    assert sum(t for _, t in barriers.values()) == pytest.approx(
        sum(e.duration for e in p.events if e.kind == "barrier"))
    veu_time = p.kernel_ns * len(p.tracks)
    assert sum(t for _, t in ops.values()) + sum(t for _, t in barriers.values()) <= veu_time * (1 + 1e-9)
    iterations, per = p.loop_totals()["loop 0"]
    assert iterations == STEPS and per > 0
    text = p.summary()
    shares = [float(line.split()[-2].rstrip("%")) for line in text.splitlines()[1:]
              if line.split() and line.split()[-2].endswith("%")]
    other = float(next(line for line in text.splitlines() if line.startswith("other")).split()[-1].rstrip("%"))
    assert sum(shares) + other == pytest.approx(100, abs=0.1 * len(shares) + 0.1)
    assert all(name in text for name in ops)


def test_instrumented_build_is_a_separate_cache_entry(cpu_profile):
    f, _ = cpu_profile
    entry = f._entry(arguments(), {})[0]
    assert "gdsl_trace" not in entry["lowering"].source and "clock_gettime" not in entry["lowering"].source
    assert "gdsl_trace_event" in entry["profiled"][True][0].source
    assert f.trace_count == 1


def test_plan_capacity_bounds_the_records_written():
    f = gdsl.jit(program, backend="cpu", grid=2)
    p = gdsl.profile(f, *arguments())
    sites = TraceSites(plan_of(f), iterations=STEPS)
    assert not p.truncated
    written = {e.track: 0 for e in p.events}
    for e in p.events:
        written[e.track] += 2
    assert max(written.values()) <= sites.capacity


def test_a_full_buffer_truncates_and_says_so():
    f = gdsl.jit(program, backend="cpu", grid=2)
    with pytest.warns(UserWarning, match="trace buffer filled up"):
        p = run_profile(f, arguments(), capacity=10)
    assert p.truncated and p.dropped > 0
    assert "TRUNCATED" in p.summary()
    assert all(e.end >= e.begin for e in p.events)
    assert all(sum(1 for e in p.events if e.track == k) <= 10 for k in p.tracks)
    assert json.loads(json.dumps(p.chrome_trace()))["otherData"]["truncated"] is True


def test_plot_writes_a_png(cpu_profile, tmp_path):
    pytest.importorskip("matplotlib")
    _, p = cpu_profile
    p.plot(tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_needs_a_jitted_device_control_function():
    with pytest.raises(TypeError, match="gdsl.jit"):
        gdsl.profile(program, *arguments())
    with pytest.raises(ValueError, match="control='device'"):
        gdsl.profile(gdsl.jit(program, backend="cpu", control="host"), *arguments())


def test_recursion_calls_are_events():
    emb = np.arange(8, dtype=np.float32)

    def f(n):
        @gdsl.recurse(result=gdsl.ShapeDtype((), gdsl.float32), max_depth=8)
        def down(k):
            return gdsl.cond(k <= 0, lambda: gnp.sum(gnp.tanh(emb)), lambda: down(k - 1) + 1.0)
        return down(n)
    for peel, n_calls in ((False, 4), (None, 3)):     # (by default the base case runs at its call site: no call)
        jitted = gdsl.jit(f, backend="cpu", grid=1, peel=peel)
        p = gdsl.profile(jitted, np.int32(3))
        calls = [e for e in p.events if e.kind == "call"]
        assert len(calls) == n_calls
        depths = sorted(e.depth for e in calls)
        assert depths == sorted(set(depths))     # each call nests inside the previous one


# ------------------------------------------------------------------------------------------ C family
def lower_c(backend, profile, grid=4, block=64):
    from gdsl.jit import make_ir
    program_ir = make_ir(program)(*arguments())
    if backend == "hip":
        from gdsl.backends import hip
        return hip.lower(program_ir, {"grid": grid, "block": block, "profile": profile})
    from gdsl.backends.cfamily.lower import check_options, lower_with_grid
    from gdsl.backends.cuda import CUDADialect
    dialect = emulator.EmulatorDialect if backend == "emulator" else CUDADialect
    opts = check_options({"block": block, "profile": profile}, dialect)
    return lower_with_grid(program_ir, opts, grid, dialect())


@needs_nvrtc
def test_instrumented_cuda_source_compiles_and_normal_source_has_no_trace_code():
    normal, traced = lower_c("cuda", None), lower_c("cuda", True)
    assert "gdsl_trace" not in normal.source and "globaltimer" not in normal.source
    assert "mov.u64 %0, %%globaltimer;" in traced.source and "gdsl_trace_buf" in traced.source
    assert cuda_toolchain.compile_cuda(traced.source, "sm_90")[:4] == b"\x7fELF"


@needs_hiprtc
def test_instrumented_hip_source_compiles():
    traced = lower_c("hip", True)
    assert "__builtin_amdgcn_s_memrealtime" in traced.source
    assert hip_toolchain.compile_hip(traced.source, "gfx90a")[:4] == b"\x7fELF"


@needs_cxx
def test_emulated_cuda_profile_records_every_utask():
    from gdsl.backends.cfamily.executor import Executable
    lowering = lower_c("emulator", True, grid=3, block=32)
    executable = Executable(lowering.plan, lowering.rendered, emulator.EmulatedDevice())
    executable(list(arguments()))
    p = _collect(executable, lowering, "emulator", dialect=emulator.EmulatorDialect)
    assert len(p.tracks) == 3 and not p.truncated and p.unmatched == 0
    producer, consumer = producer_consumer(lowering.plan)
    ops = {op.name: op for op in plan_ops(lowering.plan)}
    for name in (producer, consumer):
        events = [e for e in p.events if e.name == name]
        assert len(events) == STEPS * ops[name].n_utasks
        assert sorted({e.args["uTask"] for e in events}) == list(range(ops[name].n_utasks))
    first = [e for e in p.events if e.name == producer]
    after = [e for e in p.events if e.name == consumer]
    for k in range(STEPS):           # iteration k's consumer uTasks start after all its producer uTasks end
        per = ops[producer].n_utasks
        done = max(e.end for e in sorted(first, key=lambda e: e.begin)[k * per:(k + 1) * per])
        n = ops[consumer].n_utasks
        assert min(e.begin for e in sorted(after, key=lambda e: e.begin)[k * n:(k + 1) * n]) >= done


@needs_cxx
def test_a_rescheduled_kernel_is_read_with_its_own_plan():
    """Loading may re-schedule an instrumented plan whose grid cannot be co-resident (executor.load_coresident):
    the profile reads the plan and trace sites of what ran, not of the lowering it asked for, and its summary
    says that the grid differs from the normal build's."""
    from gdsl.backends.cfamily.executor import Executable
    asked, ran = lower_c("emulator", True, grid=3, block=32), lower_c("emulator", True, grid=2, block=32)
    executable = Executable(ran.plan, ran.rendered, emulator.EmulatedDevice())
    executable(list(arguments()))
    p = _collect(executable, asked, "emulator", dialect=emulator.EmulatorDialect, normal_grid=3)
    assert len(p.tracks) == 2 and not p.truncated and p.unmatched == 0 and p.plan == str(ran.plan)
    assert "re-scheduled for 2 vEUs" in p.summary().splitlines()[0] and "normal build runs 3" in p.summary()
    assert {e.name for e in p.events if e.kind == "op"} == {op.name for op in plan_ops(ran.plan)}
    same = _collect(executable, ran, "emulator", dialect=emulator.EmulatorDialect, normal_grid=2)
    assert "re-scheduled" not in same.summary()


@needs_cxx
def test_load_keeps_the_lowering_it_rescheduled():
    """executor.load_coresident on a device that holds 2 blocks at once: the plan asked for 3 vEUs is
    re-scheduled for 2, and the Executable keeps that Lowering (gdsl.jit shows it as the function's lowering,
    the profile reads its trace sites); the run matches the one asked for."""
    from gdsl.backends.cfamily.executor import Executable, load_coresident
    from gdsl.backends.cfamily.lower import lower_with_grid

    class TwoBlocks(emulator.EmulatedDevice):
        def compile(self, rendered):
            self.load(rendered)

        def max_grid(self, spec, block):
            return 2

    asked = lower_c("emulator", True, grid=3, block=32)
    executable = load_coresident(asked, TwoBlocks(), lambda prog, opts, grid: lower_with_grid(
        prog, opts, grid, emulator.EmulatorDialect()), backend="emulator")
    assert executable.lowering.plan.grid == 2 and executable.plan is executable.lowering.plan
    got = executable(list(arguments()))
    want = Executable(asked.plan, asked.rendered, emulator.EmulatedDevice())(list(arguments()))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    p = _collect(executable, asked, "emulator", dialect=emulator.EmulatorDialect, normal_grid=3)
    assert len(p.tracks) == 2 and p.unmatched == 0 and "re-scheduled for 2 vEUs" in p.note


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_gpu_profile(tmp_path):
    f = gdsl.jit(program, backend="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = gdsl.profile(f, *arguments())
    p.save(tmp_path / "gpu.json")
    trace = json.loads((tmp_path / "gpu.json").read_text())
    assert len([e for e in trace["traceEvents"] if e["name"] == "thread_name"]) == plan_of(f).grid
    assert all(0 <= e.begin <= e.end <= p.kernel_ns for e in p.events)
    assert p.loop_totals()["loop 0"][0] == STEPS
    assert os.path.getsize(tmp_path / "gpu.json") > 0


def test_docs_example_runs():
    docs = Path(__file__).resolve().parent.parent / "docs" / "profile.md"
    blocks = re.findall(r"```python\n(.*?)```", docs.read_text(), re.S)
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(docs), "exec"), namespace)
    assert namespace["p"].loop_totals()["loop 0"][0] == 8
