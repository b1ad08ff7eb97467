"""A step's read-only operands prefetched into L1 before the step's waits (render.PREFETCH_STEP_READS, default
off; gdsl/backends/cfamily/prefetch.py): NASRNN's hoisted input gates prefetched at the top of the step, before
the first wait, and nothing the loop writes; none across a grid barrier (it invalidates L1: the LSTM's cells,
each right after one, get none); every zoo row with it compiled by NVRTC, the emulator against the references; the
sources the same as without it but for the prefetch lines."""
import dataclasses
import re

import numpy as np
import pytest
from strategies import emulated_model_mismatches, first_loop, needs_cxx, needs_nvrtc, zoo_lowered

from gdsl.backends.cfamily import prefetch, render
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.backends.cuda.dialect import CUDADialect
from gdsl.backends.hip.dialect import HIPDialect
from gdsl.schedule.plan import Sync, Wave, walk
from models import MODELS, load

ROWS = [(name, batch) for name in MODELS for batch in load(name).BATCHES]
PREFETCH = "prefetch.global.L1"


@pytest.fixture
def on(monkeypatch):
    monkeypatch.setattr(render, "PREFETCH_STEP_READS", True)


def _loop_text(source: str) -> str:
    """The main kernel's first loop, from `while (true) {` on."""
    kernels = source.split("-- kernels")[-1]
    return kernels[kernels.index("while (true) {"):]


def _without_prefetches(source: str) -> str:
    return "\n".join(line for line in source.split("\n") if PREFETCH not in line and "PREFETCH_STEP_READS" not in line)


def _written_in_loop(plan) -> set:
    loop = first_loop(plan)
    return {v.buffer.name for s in walk(loop.cond + loop.body) if isinstance(s, Wave) for t in s.tasks
            for v in t.op.outputs if v.buffer is not None}


def _prefetched(text: str) -> list[str]:
    """The buffer names whose elements the prefetch statements of `text` address."""
    return re.findall(r'prefetch\.global\.L1 \[%0\];" :: "l"\(\(*(\w+)', text)


def _check_before_first_wait(lowered, gate: str, offset: str):
    """The step's prefetches: after its uniform statements (`offset`, the uniform of the gate's offset, among
    them), before its first uTask call (the first wait is in it: a flag sync's load loop), of `gate` (the
    hoisted input projection) among others, never of a buffer the loop writes; the prefetched names."""
    loop = _loop_text(lowered.source)
    body = loop[:loop.index("gdsl_it0 += 1u;")]
    first_call = re.search(r"\bop\d+_\w+\(", body).start()
    first_prefetch = body.index(PREFETCH)
    assert first_prefetch < first_call
    assert PREFETCH not in body[first_call:]
    assert f"{offset} = " in body[:first_prefetch]
    names = _prefetched(body)
    assert gate in names
    assert not set(names) & _written_in_loop(lowered.lowering.plan)
    return names


def test_nasrnn_bs1_prefetches_the_hoisted_gates(on):
    """Each of the 256 vEUs fetches its column's 8 gate values of both halves of the doubled step: 16 lines, one
    per thread 0-15, of t1 at the step's run-time offsets."""
    lowered = zoo_lowered("nasrnn", 1)
    names = _check_before_first_wait(lowered, "t1", "u16")
    assert names == ["t1"] * 16
    body = _loop_text(lowered.source)
    for k in range(16):
        assert f"if (threadIdx.x == {k}) asm volatile(\"{PREFETCH}" in body
    assert "(long long)(u9) > 999 ? 999LL" in body and "(long long)(u16) > 999 ? 999LL" in body


def test_not_across_a_grid_barrier(on):
    """The LSTM's cells each follow a grid barrier (its fence invalidates L1) with no wave between: no prefetch.
    NASRNN's step with a grid barrier put after its first GEMV: the first cell, right after it, gets none; the
    second half's cell its 8 lines right after the barrier (waves lie between), none at the top of the step."""
    assert PREFETCH not in zoo_lowered("lstm", 1).source
    plan = zoo_lowered("nasrnn", 1).lowering.plan
    loop = first_loop(plan)
    first_wave = next(i for i, s in enumerate(loop.body) if isinstance(s, Wave))
    body = loop.body[:first_wave + 1] + (Sync("grid"),) + loop.body[first_wave + 1:]
    renderer = render.Renderer(plan, CUDADialect())
    lines = prefetch.StepPrefetch(renderer).lines(dataclasses.replace(loop, body=body))
    assert list(lines) == [first_wave + 2]
    text = "\n".join(lines[first_wave + 2])
    assert _prefetched(text) == ["t1"] * 8 and "u16" in text and "u9" not in text
    assert prefetch.fences(body) == {first_wave + 1}
    assert prefetch.fences(body, {first_wave + 1}) == set()


def test_line_budget_per_veu(on, monkeypatch):
    """No vEU prefetches more than MAX_LINES lines a step."""
    monkeypatch.setattr(prefetch, "MAX_LINES", 12)
    plan = zoo_lowered("nasrnn", 1).lowering.plan
    steps = prefetch.StepPrefetch(render.Renderer(plan, CUDADialect()))
    load_ = np.zeros(plan.grid, int)
    for c in steps.operands(first_loop(plan)):
        t = c.task
        load_[t.first:t.first + min(t.op.n_utasks, t.count)] += c.lines * -(-t.op.n_utasks // t.count)
    assert load_.max() == 12


def test_no_prefetch_where_the_dialect_has_none(on):
    plan = zoo_lowered("nasrnn", 1).lowering.plan
    assert not render.Renderer(plan, HIPDialect()).prefetched


def test_line_points():
    # a 256-float run starting on a line: one point a line; at an unknown phase each 32 floats and the last
    assert prefetch.line_points(np.arange(256), 4, 0) == tuple(range(0, 256, 32))
    assert prefetch.line_points(np.arange(256), 4, None) == tuple(range(0, 256, 32)) + (255,)
    assert prefetch.line_points(np.arange(256), 4, 64) == (0, 16) + tuple(range(48, 256, 32))
    assert prefetch.line_points(np.array([3, 40, 41, 300]), 4, None) == (3, 40, 41, 300)
    assert prefetch.progressions((0, 32, 64, 96, 255, 300)) == [(0, 32, 4), (255, 45, 2)]


@pytest.mark.parametrize("name,batch", ROWS)
def test_default_sources_unchanged_but_for_the_prefetches(name, batch, monkeypatch):
    default = zoo_lowered(name, batch, control="device").source
    assert PREFETCH not in default
    monkeypatch.setattr(render, "PREFETCH_STEP_READS", True)
    source = zoo_lowered(name, batch, control="device").source
    assert _without_prefetches(source) == default
    assert (PREFETCH in source) == ((name, batch) == ("nasrnn", 1))


@needs_nvrtc
@pytest.mark.parametrize("name,batch", ROWS)
def test_zoo_compiles_with_prefetches(name, batch, on):
    source = zoo_lowered(name, batch, control="device").source
    if PREFETCH not in source:
        pytest.skip("no prefetch: the default source, compiled by the other tests")
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"


@needs_cxx
@pytest.mark.parametrize("name,batch", [("nasrnn", 1), ("nasrnn", 4), ("attention", 1)])
def test_emulated_with_prefetches_matches_the_reference(name, batch, on, monkeypatch):
    sources = []
    original = render.Renderer.render

    def recorded(self):
        out = original(self)
        sources.append(out.source)
        return out
    monkeypatch.setattr(render.Renderer, "render", recorded)
    assert emulated_model_mismatches(name, batch) == []
    assert any("__builtin_prefetch(" in s for s in sources)


def test_line_budget_switch(on, monkeypatch):
    """prefetch.MAX_LINES = 8: NASRNN's vEUs fetch the first half step's 8 gate lines only."""
    monkeypatch.setattr(prefetch, "MAX_LINES", 8)
    body = _loop_text(zoo_lowered("nasrnn", 1).source)
    assert _prefetched(body) == ["t1"] * 8
    assert "(long long)(u16) > 999" not in body.split("op4_matmul(")[0]
