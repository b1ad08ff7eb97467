"""A plan's block barrier right after a wave of GEMV tiles that end with one (gdsl_gemv_tile whose k slices
reduce through shared memory; render.TAIL_BARRIERS, on by default, Renderer.block_sync_after): left out on
the tiles' vEUs, kept on the others. The emulated kernels still compute their references; the full-size
NASRNN's kernel (two such waves a step) compiles; with the switch off every barrier is rendered as before."""
import re

import pytest
from strategies import emulated_model_mismatches, needs_cxx, needs_nvrtc, zoo_lowered

from gdsl.backends.cfamily import render
from gdsl.backends.cuda import toolchain as cuda_toolchain

CONDITIONAL = re.compile(r"^ *if \(!\((.*blockIdx.*)\)\) __syncthreads\(\);$", re.M)   # (the C family's block barrier)


@pytest.fixture
def tail_barriers(monkeypatch):
    monkeypatch.setattr(render, "TAIL_BARRIERS", True)


@needs_cxx
@pytest.mark.parametrize("name", ["nasrnn", "attention"])
def test_emulated_models_leave_out_the_second_barrier(name, rendered_sources, tail_barriers):
    assert emulated_model_mismatches(name, 1, grid=8, block=64) == []
    assert any(CONDITIONAL.search(r.source) for r in rendered_sources)


@needs_cxx
def test_switch_off_renders_every_barrier(rendered_sources, monkeypatch):
    monkeypatch.setattr(render, "TAIL_BARRIERS", False)
    assert emulated_model_mismatches("nasrnn", 1, grid=8, block=64) == []
    assert not any(CONDITIONAL.search(r.source) for r in rendered_sources)


@needs_nvrtc
def test_nasrnn_kernel_compiles(tail_barriers):
    source = zoo_lowered("nasrnn", 1).source
    assert source.count("if (!(blockIdx.x < 256)) __syncthreads();") == 2     # the step's two GEMV waves
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"
