"""CUDA C++ source -> CUBIN through NVRTC, with no GPU and no driver needed (CI compiles every kernel).

We call NVRTC through `cupy_backends.cuda.libs.nvrtc` (CuPy 14 moved it there from `cupy.cuda.nvrtc`)
and not through CuPy's RawModule, because CuPy's own compile path asks the driver for the current device.
We ask NVRTC for a CUBIN (`--gpu-architecture=sm_XY`), not PTX: ptxas then runs inside NVRTC, so its errors
show up in CI too, and the driver never has to JIT PTX that may be newer than it understands.

A program with many called uTask functions (SkipNet's: ~40 `GDSL_SHARED_OP` functions) may be compiled as
relocatable device code instead (`SEPARATE_MIN_CALLED`, off by default: it costs run time): NVRTC's `-rdc=true`
makes ptxas compile each function alone (its whole-program mode spent several times the CPU on the same
functions), and nvJitLink (the `nvidia-nvjitlink` wheel, through ctypes) links the one relocatable object into
the CUBIN the driver loads, in ~10 ms and without a GPU:

    NVRTC -rdc=true -> relocatable CUBIN -> nvJitLinkCreate/AddData/Complete -> GetLinkedCubin -> CUBIN
"""
from __future__ import annotations

import ctypes
import functools
import os
import re

from gdsl.backends.toolchain import cached_compile, compile_error
from gdsl.errors import BackendUnavailableError, CompileError

INSTALL_HINT = "pip install 'gdsl[cuda]'"
# Threads ptxas (inside NVRTC) compiles the functions of one program with (its --split-compile; 0: one per CPU,
# None: the option left out, one thread). The machine code is the same: on SkipNet's device kernel the CUBIN's
# .text was byte-identical with and without it, so it costs no run time; it cuts the wall time of programs whose
# uTask functions are called (compiled apart from the kernel: gdsl/backends/cfamily/render.py).
PTXAS_THREADS: int | None = 0
# A program whose source defines at least this many called uTask functions (GDSL_SHARED_OP, gdsl/backends/cfamily/
# render.py) is compiled as relocatable device code and linked by nvJitLink (None: never; also never when
# nvJitLink is not installed). ptxas's whole-program mode spent ~3x the CPU of its separate (-c) mode on SkipNet's
# device kernel (15-17 s against 4-5 s for the same PTX), almost all of it in the called functions (and its
# --split-compile ran nothing in parallel there: CPU = wall). The functions are `static` (the CUDA dialect's
# GDSL_SHARED_OP), so ptxas compiles them with the register budget of the kernels calling them and nvJitLink
# accepts the link. Runtime cost: a call follows the ABI (the callee saves the registers it uses: ~60 stores and
# loads per call of a tiled function) where whole-program mode may pick its own convention. The zoo's other
# programs have at most 6 called functions and compile as before.
# Off by default (None): measured on the H200 (2026-12-02, SkipNet bs1, two alternated pairs in one process each,
# medians of 30), the linked CUBIN ran 2.753 and 2.544 ms against 2.335 and 2.345 whole-program (+9-18 %), a cost
# paid at every call for a compile (~8 s instead of ~17-21 s wall on two cores) paid once and cached. Set it
# (16 compiles SkipNet separately) where compile time matters more.
SEPARATE_MIN_CALLED: int | None = None


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
    if not compiles_separately(source):
        return cached_compile("cuda", key, lambda: _nvrtc_compile(source, name, opts), suffix=".cubin",
                              what="NVRTC")
    key += ("separate", nvjitlink_version())
    return cached_compile("cuda", key, lambda: link_cubin(_nvrtc_compile(source, name, [*opts, "-rdc=true"]), arch),
                          suffix=".cubin", what="NVRTC (separate compilation)")


def compiles_separately(source: str) -> bool:
    """Is `source` compiled as relocatable device code and linked (SEPARATE_MIN_CALLED)?"""
    if SEPARATE_MIN_CALLED is None or source.count("\nGDSL_SHARED_OP ") < SEPARATE_MIN_CALLED:
        return False
    return nvjitlink_available()


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


# ---- nvJitLink (its C API through ctypes: nvJitLink.h of CUDA 13) ----

_NVJITLINK_INPUT_CUBIN = 1


@functools.cache
def _nvjitlink():
    """The nvJitLink library (ctypes.CDLL), or None when it is not installed."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib  # comes with cupy-cuda13x
        return ctypes.CDLL(load_nvidia_dynamic_lib("nvJitLink").abs_path)
    except Exception:  # ImportError, or cuda-pathfinder's own error when the library is not found
        return None


def nvjitlink_available() -> bool:
    """Can nvJitLink link here (the nvidia-nvjitlink wheel, or a CUDA install cuda-pathfinder finds)?"""
    return _nvjitlink() is not None


@functools.cache
def nvjitlink_version() -> tuple[int, int]:
    """nvJitLink's (major, minor); needs the library (compiles_separately checked it)."""
    major, minor = ctypes.c_uint(), ctypes.c_uint()
    _nvjitlink().nvJitLinkVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def link_cubin(relocatable: bytes, arch: str) -> bytes:
    """The executable CUBIN of one relocatable CUBIN (NVRTC with -rdc=true), linked by nvJitLink for `arch`."""
    lib = _nvjitlink()
    handle = ctypes.c_void_p()
    options = (ctypes.c_char_p * 1)(f"-arch={arch}".encode())
    _check_link(lib, handle, lib.nvJitLinkCreate(ctypes.byref(handle), 1, options), "create")
    try:
        _check_link(lib, handle, lib.nvJitLinkAddData(handle, _NVJITLINK_INPUT_CUBIN, relocatable,
                                                      ctypes.c_size_t(len(relocatable)), b"gdsl"), "add")
        _check_link(lib, handle, lib.nvJitLinkComplete(handle), "link")
        size = ctypes.c_size_t()
        _check_link(lib, handle, lib.nvJitLinkGetLinkedCubinSize(handle, ctypes.byref(size)), "size")
        cubin = ctypes.create_string_buffer(size.value)
        _check_link(lib, handle, lib.nvJitLinkGetLinkedCubin(handle, cubin), "read")
        return cubin.raw
    finally:
        lib.nvJitLinkDestroy(ctypes.byref(handle))


def _check_link(lib, handle, result: int, step: str) -> None:
    """Raise CompileError with nvJitLink's error log when `result` is not NVJITLINK_SUCCESS (0)."""
    if result == 0:
        return
    log = ""
    size = ctypes.c_size_t()
    if handle.value and lib.nvJitLinkGetErrorLogSize(handle, ctypes.byref(size)) == 0 and size.value:
        buf = ctypes.create_string_buffer(size.value)
        lib.nvJitLinkGetErrorLog(handle, buf)
        log = buf.value.decode(errors="replace")
    raise CompileError(f"nvJitLink failed ({step}, error {result}):\n{log}", log=log)


def device_arch() -> str:
    """The current CUDA device's architecture as "sm_XY" (needs a GPU)."""
    import cupy
    return f"sm_{cupy.cuda.Device().compute_capability}"
