"""The HIP backend: the same programs as the CUDA tests, rendered in the HIP dialect, compile through hiprtc
for gfx90a (no AMD GPU needed: CI installs libamdhip64-5). Running HIP kernels needs ROCm and an AMD GPU."""
import pytest
from backend_programs import PROGRAMS

import gdsl
from gdsl.backends.hip import toolchain as hip_toolchain

needs_hiprtc = pytest.mark.skipif(hip_toolchain.hiprtc_available() is not None,
                                  reason=str(hip_toolchain.hiprtc_available()))


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("GDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "gdsl-cache"))


@needs_hiprtc
@pytest.mark.parametrize("control", ["device", "host"])
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_hip_source_compiles_for_gfx90a(name, control):
    fn, args = PROGRAMS[name]
    source = gdsl.jit(fn, backend="hip", control=control).lower(*args).source
    assert "__shfl_xor(" in source and "GDSL_WARP 64" in source
    assert hip_toolchain.compile_hip(source, "gfx90a")[:4] == b"\x7fELF"


def test_hip_is_not_runnable_here_but_lowers():
    assert "hip" not in gdsl.backends()
    assert "AMD GPU" in gdsl.backends.unavailable_reason("hip")
    fn, args = PROGRAMS["recursion"]
    lowered = gdsl.jit(fn, backend="hip").lower(*args)
    assert "gdsl_main" in lowered.source and "control=device" in lowered.plan
    with pytest.raises(gdsl.BackendUnavailableError):
        gdsl.jit(fn, backend="hip")(*args)
