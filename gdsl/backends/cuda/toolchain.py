"""CUDA C++ source -> CUBIN through NVRTC, with no GPU and no driver needed (CI compiles every kernel).

We call NVRTC through `cupy_backends.cuda.libs.nvrtc` (CuPy 14 moved it there from `cupy.cuda.nvrtc`)
and not through CuPy's RawModule, because CuPy's own compile path asks the driver for the current device.
We ask NVRTC for a CUBIN (`--gpu-architecture=sm_XY`), not PTX: ptxas then runs inside NVRTC, so its errors
show up in CI too, and the driver never has to JIT PTX that may be newer than it understands.
"""
from __future__ import annotations

import functools
import os
import re

from gdsl.backends.toolchain import cached_compile, compile_error
from gdsl.errors import BackendUnavailableError

INSTALL_HINT = "pip install 'gdsl[cuda]'"
# Threads ptxas (inside NVRTC) compiles the functions of one program with (its --split-compile; 0: one per CPU,
# None: the option left out, one thread). The machine code is the same: on SkipNet's device kernel the CUBIN's
# .text was byte-identical with and without it, so it costs no run time; it cuts the wall time of programs whose
# uTask functions are called (compiled apart from the kernel: gdsl/backends/cfamily/render.py).
PTXAS_THREADS: int | None = 0


def _nvrtc():
    from cupy_backends.cuda.libs import nvrtc
    return nvrtc


@functools.cache
def nvrtc_version() -> tuple[int, int]:
    """NVRTC's (major, minor); raises if cupy or libnvrtc is missing."""
    return tuple(_nvrtc().getVersion())


def nvrtc_available() -> str | None:
    """None if NVRTC can compile here, else a message naming what is missing and how to install it."""
    try:
        nvrtc_version()
    except ImportError as e:
        return f"the CUDA backend needs CuPy ({e}); install it with: {INSTALL_HINT}"
    except Exception as e:  # cuda-pathfinder raises its own error type when libnvrtc.so is not found
        return f"the CUDA backend needs NVRTC ({type(e).__name__}: {e}); install it with: {INSTALL_HINT}"
    return None


def cuda_include_dir() -> str | None:
    """The folder holding cuda_fp16.h / cuda_bf16.h: the nvidia-cuda-runtime wheel first, else a CUDA install."""
    candidates = []
    try:
        import nvidia  # a namespace package shared by the nvidia-* wheels
        for root in nvidia.__path__:
            candidates += [os.path.join(root, "cu13", "include"), os.path.join(root, "cuda_runtime", "include")]
    except ImportError:
        pass
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    candidates.append("/usr/local/cuda/include")
    return next((d for d in candidates if os.path.exists(os.path.join(d, "cuda_fp16.h"))), None)


def compile_cuda(source: str, arch: str = "sm_90", *, options=(), name: str = "gdsl.cu") -> bytes:
    """Compile CUDA C++ `source` to a CUBIN (an ELF file) for `arch` ("sm_90", "sm_90a", ...).

    Cached on disk under `cache_dir()/cuda/`, keyed by (source, arch, options, NVRTC version): a hit returns
    the stored bytes without calling NVRTC. Raises CompileError (NVRTC's log plus the offending source
    line) when NVRTC rejects the source, BackendUnavailableError when NVRTC is not installed.
    """
    if not arch.startswith("sm_"):
        raise ValueError(f"compile_cuda needs a real architecture like 'sm_90' (a CUBIN), got {arch!r}")
    missing = nvrtc_available()
    if missing:
        raise BackendUnavailableError(missing)
    opts = [f"--gpu-architecture={arch}", "--std=c++17", *options]
    if PTXAS_THREADS is not None:
        opts += ["-Xptxas", f"--split-compile={PTXAS_THREADS}"]
    include = cuda_include_dir()
    if include:
        opts.append(f"-I{include}")
    key = ("cuda", source, arch, tuple(options), nvrtc_version())
    return cached_compile("cuda", key, lambda: _nvrtc_compile(source, name, opts), suffix=".cubin",
                          what="NVRTC")


def _nvrtc_compile(source: str, name: str, opts: list[str]) -> bytes:
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError:
            log = nvrtc.getProgramLog(prog)
            raise compile_error("NVRTC", log, source, re.escape(name) + r"\((\d+)\): error") from None
        return nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)


def device_arch() -> str:
    """The current CUDA device's architecture as "sm_XY" (needs a GPU)."""
    import cupy
    return f"sm_{cupy.cuda.Device().compute_capability}"
