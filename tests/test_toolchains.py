"""The CUDA and HIP toolchains (compile without a GPU, in CI) and the CUDA runtime (on a GPU only)."""
import numpy as np
import pytest
from strategies import needs_nvrtc

import gdsl
import gdsl.numpy
from gdsl.backends.cuda import runtime
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.backends.hip import toolchain as hip_toolchain
from gdsl.errors import BackendUnavailableError, CompileError

# A persistent kernel in the shape gdsl generates: every block loops over the work by a grid stride and the
# phases are separated by a grid barrier (an atomic counter, so it needs all blocks resident: a cooperative
# launch). Phase 0: a = float(x) (fp16 input). Then `rounds` times: b[i] = a[n-1-i] * 0.5 + 1, swap a and b;
# each round reads what other blocks wrote in the round before, so a broken barrier shows in the result.
PERSISTENT_KERNEL = r"""
#include <cuda_fp16.h>

__device__ void grid_barrier(unsigned* counter, unsigned* generation) {
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned target = (++*generation) * gridDim.x;  // counter only grows: no reset race between barriers
        __threadfence();                                   // publish this block's writes before arriving
        atomicAdd(counter, 1u);
        while (*(volatile unsigned*)counter < target) { }
        __threadfence();
    }
    __syncthreads();
}

extern "C" __global__ void reverse_rounds(const __half* x, float* a, float* b, unsigned* counter,
                                          int n, int rounds) {
    unsigned generation = 0;
    int stride = gridDim.x * blockDim.x;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) a[i] = __half2float(x[i]);
    grid_barrier(counter, &generation);
    for (int r = 0; r < rounds; ++r) {
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) b[i] = a[n - 1 - i] * 0.5f + 1.0f;
        grid_barrier(counter, &generation);
        float* t = a; a = b; b = t;
    }
}
"""


def reverse_rounds_reference(x: np.ndarray, rounds: int) -> np.ndarray:
    a = x.astype(np.float32)
    for _ in range(rounds):
        a = a[::-1] * np.float32(0.5) + np.float32(1)
    return a


# CI installs libamdhip64-5 (.ci/run), so these run there; skipped only on a machine without it.
needs_hiprtc = pytest.mark.skipif(hip_toolchain.hiprtc_available() is not None,
                                  reason=str(hip_toolchain.hiprtc_available()))
needs_clang = pytest.mark.skipif(hip_toolchain.clang_available() is not None,
                                 reason=str(hip_toolchain.clang_available()))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test compiles into its own empty cache, so a test never passes thanks to an earlier one."""
    monkeypatch.setenv("GDSL_CACHE_DIR", str(tmp_path / "cache"))


def _elf_machine(binary: bytes) -> int:
    assert binary[:4] == b"\x7fELF"
    return int.from_bytes(binary[18:20], "little")


# ---- CUDA: NVRTC, no GPU needed ----

@needs_nvrtc
def test_nvrtc_compiles_persistent_kernel_to_cubin():
    cubin = cuda_toolchain.compile_cuda(PERSISTENT_KERNEL, "sm_90")
    assert _elf_machine(cubin) == 190  # EM_CUDA


@needs_nvrtc
def test_nvrtc_error_quotes_offending_line():
    broken = PERSISTENT_KERNEL.replace("a[n - 1 - i] * 0.5f", "a[n - 1 - i] * undefined_scale")
    with pytest.raises(CompileError) as info:
        cuda_toolchain.compile_cuda(broken, "sm_90")
    err = info.value
    assert "undefined_scale" in err.log
    assert err.line is not None and "b[i] = a[n - 1 - i] * undefined_scale" in err.line
    assert err.line.strip() in str(err) and err.log.strip() in str(err)
    assert err.source == broken


@needs_nvrtc
def test_nvrtc_cache_hit_does_not_compile(monkeypatch, tmp_path):
    first = cuda_toolchain.compile_cuda(PERSISTENT_KERNEL, "sm_90")
    assert list((tmp_path / "cache" / "cuda").glob("*.cubin"))
    from cupy_backends.cuda.libs import nvrtc
    calls = []
    monkeypatch.setattr(nvrtc, "createProgram", lambda *a: calls.append(a))
    assert cuda_toolchain.compile_cuda(PERSISTENT_KERNEL, "sm_90") == first
    assert calls == []
    # A different arch is a different key: NVRTC is asked (and here fails, as it is patched out).
    with pytest.raises(Exception):  # noqa: B017  (how the patched-out NVRTC fails is beside the point)
        cuda_toolchain.compile_cuda(PERSISTENT_KERNEL, "sm_80")
    assert len(calls) == 1


needs_nvjitlink = pytest.mark.skipif(cuda_toolchain.nvrtc_available() is not None
                                     or not cuda_toolchain.nvjitlink_available(),
                                     reason="NVRTC or nvJitLink (the nvidia-nvjitlink wheel) is not installed")
ET_REL, ET_EXEC = 1, 2


def _elf_type(binary: bytes) -> int:
    return int.from_bytes(binary[16:18], "little")


def _called_layers(x, w):
    """Ten GEMV + tanh layers: three distinct uTask functions (the first GEMV, the others, the tanh)."""
    for k in range(10):
        x = gdsl.numpy.tanh(x @ w[k])
    return x


CALLED_LAYERS_ARGS = (np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64),
                      np.linspace(-0.1, 0.1, 10 * 64 * 64, dtype=np.float32).reshape(10, 64, 64))


def _call_every_function(monkeypatch):
    """Make the renderer call every uTask function (GDSL_SHARED_OP), as it does SkipNet's."""
    from gdsl.backends.cfamily import render
    monkeypatch.setattr(render, "LARGE_KERNEL_BUDGET", 0)
    monkeypatch.setattr(render, "LARGE_KERNEL_INLINED", 0)


@needs_nvjitlink
def test_many_called_functions_compile_separately_and_link(monkeypatch):
    """From SEPARATE_MIN_CALLED called functions on, NVRTC makes relocatable device code (ET_REL) and
    nvJitLink links it into an executable CUBIN (ET_EXEC) the driver loads; below it, one whole-program
    compile as before. Two vEUs per SM, as SkipNet: the kernel's launch bounds cap its registers at 128, which
    the called functions must keep to as well or the link fails (SkipNet's extern conv2d tiles took 254; the
    dialect's GDSL_SHARED_OP is static, so they take their callers' budget)."""
    _call_every_function(monkeypatch)
    source = gdsl.jit(_called_layers, backend="cuda", grid=264, epilogue=False).lower(*CALLED_LAYERS_ARGS).source
    assert source.count("\nGDSL_SHARED_OP ") == 3 and "__launch_bounds__(256, 2)" in source
    monkeypatch.setattr(cuda_toolchain, "SEPARATE_MIN_CALLED", 4)
    assert not cuda_toolchain.compiles_separately(source)
    whole = cuda_toolchain.compile_cuda(source, "sm_90")
    monkeypatch.setattr(cuda_toolchain, "SEPARATE_MIN_CALLED", 3)
    assert cuda_toolchain.compiles_separately(source)
    objects, link = [], cuda_toolchain.link_cubin
    monkeypatch.setattr(cuda_toolchain, "link_cubin", lambda cubin, arch: objects.append(cubin) or link(cubin, arch))
    linked = cuda_toolchain.compile_cuda(source, "sm_90")
    assert [_elf_type(o) for o in objects] == [ET_REL]
    assert _elf_machine(linked) == 190 and _elf_type(linked) == _elf_type(whole) == ET_EXEC
    assert linked != whole and b"gdsl_main" in linked
    monkeypatch.setattr(cuda_toolchain, "SEPARATE_MIN_CALLED", None)
    assert not cuda_toolchain.compiles_separately(source)


@needs_nvjitlink
def test_nvjitlink_error_is_a_compile_error():
    with pytest.raises(CompileError, match="nvJitLink failed"):
        cuda_toolchain.link_cubin(b"not a relocatable object", "sm_90")


# ---- HIP: hiprtc in a subprocess and clang, no GPU needed ----

HIP_KERNEL = r"""
extern "C" __global__ void scale_count(const __half* x, float* y, unsigned* counter, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        y[i] = __half2float(x[i]) * 2.0f;
    __syncthreads();
    __threadfence();
    if (threadIdx.x == 0) atomicAdd(counter, 1u);
}
"""
HIP_BROKEN = HIP_KERNEL.replace("* 2.0f", "* missing_factor")


@needs_hiprtc
def test_hiprtc_compiles_gfx90a_code_object():
    assert _elf_machine(hip_toolchain.compile_hip(HIP_KERNEL, "gfx90a")) == 0xE0  # EM_AMDGPU


@needs_hiprtc
def test_hiprtc_error_quotes_offending_line():
    with pytest.raises(CompileError) as info:
        hip_toolchain.compile_hip(HIP_BROKEN, "gfx90a")
    assert "missing_factor" in info.value.log
    assert "y[i] = __half2float(x[i]) * missing_factor;" in info.value.line
    assert info.value.line.strip() in str(info.value)


@needs_hiprtc
def test_hiprtc_crash_stays_in_its_subprocess(monkeypatch, tmp_path):
    # Debian's hiprtc 5.2 aborts on gfx942 (other builds of libamdhip64.so.5 compile it): either way the test
    # process survives, with a code object or a clear error.
    try:
        assert _elf_machine(hip_toolchain.compile_hip(HIP_KERNEL, "gfx942")) == 0xE0
    except BackendUnavailableError as e:
        assert "crashed" in str(e)
    # And a worker that does abort, whatever hiprtc build is installed, gives BackendUnavailableError.
    aborting = tmp_path / "aborting_worker.py"
    aborting.write_text("import os\nos.abort()\n")
    monkeypatch.setattr(hip_toolchain, "_WORKER", aborting)
    with pytest.raises(BackendUnavailableError, match=r"crashed \(SIGABRT\) compiling for gfx90a"):
        hip_toolchain.compile_hip(HIP_KERNEL, "gfx90a")


@needs_clang
def test_clang_route_compiles_and_reports_errors():
    assert _elf_machine(hip_toolchain.compile_hip_clang(HIP_KERNEL, "gfx942")) == 0xE0
    with pytest.raises(CompileError) as info:
        hip_toolchain.compile_hip_clang(HIP_BROKEN, "gfx90a")
    assert "missing_factor" in info.value.line


# ---- CUDA runtime: needs a GPU ----

@pytest.mark.gpu
@pytest.mark.skipif(not runtime.cuda_usable(), reason="no usable CUDA GPU")
@pytest.mark.parametrize("control", ["device", "host"])
def test_gpu_separately_compiled_program_matches_interpreter(control, monkeypatch):
    """A program whose called functions were compiled as relocatable code and linked by nvJitLink runs and
    gives the interpreter's results."""
    from strategies import check_backend
    if not cuda_toolchain.nvjitlink_available():
        pytest.skip("nvJitLink (the nvidia-nvjitlink wheel) is not installed")
    _call_every_function(monkeypatch)
    monkeypatch.setattr(cuda_toolchain, "SEPARATE_MIN_CALLED", 1)
    check_backend(_called_layers, CALLED_LAYERS_ARGS, "cuda", control=control, epilogue=False)

@pytest.mark.gpu
@pytest.mark.skipif(not runtime.cuda_usable(), reason="no usable CUDA GPU")
def test_cooperative_launch_with_grid_barrier():
    import cupy as cp
    kernel = runtime.load_module(cuda_toolchain.compile_cuda(PERSISTENT_KERNEL, cuda_toolchain.device_arch())
                                 ).get_function("reverse_rounds")
    block, n, rounds = 256, 1_000_003, 7
    grid = runtime.max_coresident_blocks(kernel, block)
    assert grid > 0
    x = np.random.default_rng(0).standard_normal(n).astype(np.float16)
    a, b = cp.empty(n, cp.float32), cp.empty(n, cp.float32)
    counter = cp.zeros(1, cp.uint32)
    args = (cp.asarray(x), a, b, counter, np.int32(n), np.int32(rounds))
    runtime.launch(kernel, grid, block, args, cooperative=True)
    result = (b if rounds % 2 else a).get()  # the pointer swap leaves the last round in b when rounds is odd
    np.testing.assert_allclose(result, reverse_rounds_reference(x, rounds), rtol=1e-6)
    assert int(counter.get()[0]) == grid * (rounds + 1)
    with pytest.raises(ValueError, match="exceeds"):
        runtime.launch(kernel, grid + 1, block, args, cooperative=True)
    with pytest.raises(TypeError, match="numpy scalar"):
        runtime.launch(kernel, grid, block, (*args[:4], n, rounds), cooperative=True)
