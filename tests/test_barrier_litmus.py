"""The grid barrier publishes every thread's writes to every other block (benchmarks/barrier_litmus.py): the CUDA
dialect's release/acquire barrier and the prelude's fenced one, each on the GPU over many rounds with no stale load,
and each compiled by NVRTC where there is no GPU."""
import importlib.util
from pathlib import Path

import pytest
from strategies import needs_nvrtc

from gdsl.backends.cuda import dialect as cuda_dialect

SPEC = importlib.util.spec_from_file_location(
    "barrier_litmus", Path(__file__).resolve().parents[1] / "benchmarks" / "barrier_litmus.py")
litmus = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(litmus)


def test_the_cuda_header_carries_the_ordering_in_the_barrier_s_instructions():
    source = litmus.source("release")
    assert "atom.release.gpu" in source and "ld.acquire.gpu" in source
    assert "atom.release.gpu" not in litmus.source("fence")
    assert cuda_dialect.RELEASE_BARRIER      # (and the switch is left as it was)


@needs_nvrtc
@pytest.mark.parametrize("scheme", ["release", "fence"])
def test_the_litmus_kernel_compiles(scheme):
    from gdsl.backends.cuda import toolchain as cuda_toolchain
    assert cuda_toolchain.compile_cuda(litmus.source(scheme), "sm_90")[:4] == b"\x7fELF"


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["release", "fence"])
@pytest.mark.parametrize("per_sm", [1, 2])
def test_no_stale_load_after_the_barrier(scheme, per_sm):
    bad, checked, grid = litmus.violations(scheme, per_sm, rounds=20_000)
    assert checked == 2 * 20_000 * grid * litmus.BLOCK and bad == 0
