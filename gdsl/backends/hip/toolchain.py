"""HIP source -> AMDGPU code object (a bare ELF, e_machine 0xe0), with no AMD GPU needed.

Two routes, both cached on disk under `cache_dir()/hip/` and both raising CompileError (log + offending line):
- hiprtc (ROCm's libhiprtc, or Debian's ROCm 5.2 `libamdhip64.so.5`, through ctypes): the HIP dialect with its built-ins
  (`__half`, `atomicAdd`, math functions). It runs in a subprocess (`_hiprtc_worker.py`) because for some
  archs (gfx940/942, gfx1100/1101) it aborts the whole process; it handles gfx906, gfx908, gfx90a, gfx1030.
- clang (Debian's clang-19, no ROCm at all) with gdsl's own `prelude.h` for the CUDA-style names: newer
  archs too, but no device math library (no tanhf, erff; see the toolchain findings).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from gdsl.backends.toolchain import cached_compile, compile_error
from gdsl.errors import BackendUnavailableError, CompileError

# Where hiprtc lives, first found wins: its own library since ROCm 6 (ROCm 7 with cupy-rocm-7-0 on an AMD
# machine), inside the HIP runtime library in ROCm 5.2 (Debian's libamdhip64-5: the compile-only CI route).
HIPRTC_LIBRARIES = ("libhiprtc.so.7", "libhiprtc.so.6", "libhiprtc.so", "libamdhip64.so.5")
HIPRTC_LIBRARY = HIPRTC_LIBRARIES[-1]
PRELUDE = Path(__file__).with_name("prelude.h")
_WORKER = Path(__file__).with_name("_hiprtc_worker.py")
_DEFAULT_OPTIONS = ("-O3",)


@functools.cache
def hiprtc_library() -> str:
    """The first of HIPRTC_LIBRARIES that loads here; OSError naming them all if none does."""
    errors = []
    for name in HIPRTC_LIBRARIES:
        try:
            ctypes.CDLL(name)      # loading is harmless; only compiling for some archs crashes (ROCm 5.2)
            return name
        except OSError as e:
            errors.append(str(e))
    raise OSError("; ".join(errors))


@functools.cache
def _hiprtc_identity() -> str:
    """Which hiprtc build this is, for the cache key: hiprtcVersion() says (9, 0) for every 5.2 build, so we
    take the loaded library's real file (its name carries the full version) with its size and mtime."""
    stem = hiprtc_library().split(".so")[0]
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if stem in line}
    return ";".join(f"{p}:{os.stat(p).st_size}:{os.stat(p).st_mtime_ns}" for p in sorted(paths))


def hiprtc_available() -> str | None:
    """None if hiprtc can compile here, else a message saying what to install."""
    try:
        _hiprtc_identity()
    except OSError as e:
        return (f"hiprtc needs ROCm's libhiprtc (ROCm >= 6) or ROCm 5.2's {HIPRTC_LIBRARY} ({e}); "
                f"install ROCm, or for compiling only: apt-get install libamdhip64-5")
    return None


def compile_hip(source: str, arch: str = "gfx90a", *, options=()) -> bytes:
    """Compile HIP `source` with hiprtc to a code object for `arch`; `options` go to hiprtc after `-O3`.

    Cached by (source, arch, options, hiprtc build). Raises CompileError when hiprtc rejects the source,
    BackendUnavailableError when hiprtc is missing or crashes on this arch (try compile_hip_clang).
    """
    missing = hiprtc_available()
    if missing:
        raise BackendUnavailableError(missing)
    opts = (*_DEFAULT_OPTIONS, *options)
    key = ("hiprtc", source, arch, opts, _hiprtc_identity())
    return cached_compile("hip", key, lambda: _hiprtc_in_subprocess(source, arch, opts), suffix=".co",
                          what=f"hiprtc ({arch})")


def _hiprtc_in_subprocess(source: str, arch: str, opts: tuple) -> bytes:
    with tempfile.TemporaryDirectory(prefix="gdsl-hiprtc-") as tmp:
        out = os.path.join(tmp, "gdsl.co")
        done = subprocess.run([sys.executable, str(_WORKER), hiprtc_library(), arch, out, *opts],
                              input=source.encode(),
                              capture_output=True)
        log = (done.stdout + done.stderr).decode(errors="replace")
        if done.returncode == 0:
            return Path(out).read_bytes()
        if done.returncode == 1:
            # hiprtc names the source after a temporary file (`.../CompileSource:6:3: error: ...`).
            raise compile_error("hiprtc", log, source, r":(\d+):\d+: error")
        if done.returncode < 0:
            raise BackendUnavailableError(
                f"hiprtc crashed ({signal.Signals(-done.returncode).name}) compiling for {arch}; ROCm 5.2's "
                f"hiprtc handles gfx906, gfx908, gfx90a and gfx1030 (compile_hip_clang covers newer archs)\n{log}")
        raise CompileError(f"hiprtc failed for {arch}:\n{log}", log=log, source=source)


def clang_available(clang: str = "clang-19") -> str | None:
    """None if `clang` and the lld it links AMDGPU code objects with are installed, else what to install."""
    path = shutil.which(clang)
    lld_here = path and os.path.exists(os.path.join(os.path.dirname(os.path.realpath(path)), "ld.lld"))
    if not path or not (lld_here or shutil.which("ld.lld")):
        version = clang.rpartition("-")[2] if "-" in clang else "19"
        return f"the HIP clang route needs {clang} and lld: apt-get install clang-{version} lld-{version}"
    return None


def compile_hip_clang(source: str, arch: str = "gfx90a", clang: str = "clang-19", *, options=()) -> bytes:
    """Compile HIP `source` with plain clang and gdsl's prelude to a bare code object for `arch`.

    The route for machines without hiprtc and for archs hiprtc 5.2 cannot build. Cached by (source, arch,
    options, clang binary, prelude). Raises CompileError with clang's diagnostics and the offending line.
    """
    missing = clang_available(clang)
    if missing:
        raise BackendUnavailableError(missing)
    binary = os.path.realpath(shutil.which(clang))
    stat = os.stat(binary)
    opts = (*_DEFAULT_OPTIONS, *options)
    prelude_hash = hashlib.sha256(PRELUDE.read_bytes()).hexdigest()
    key = ("clang", source, arch, opts, f"{binary}:{stat.st_size}:{stat.st_mtime_ns}", prelude_hash)
    return cached_compile("hip", key, lambda: _clang(source, arch, binary, opts), suffix=".co",
                          what=f"clang ({arch})")


def _clang(source: str, arch: str, clang: str, opts: tuple) -> bytes:
    with tempfile.TemporaryDirectory(prefix="gdsl-clang-") as tmp:
        src, out = os.path.join(tmp, "gdsl.hip"), os.path.join(tmp, "gdsl.co")
        Path(src).write_text(source)
        # -nogpulib/-nogpuinc: no ROCm install to find; --no-gpu-bundle-output: a bare ELF, not an offload bundle;
        # -include the prelude rather than prepending it, so clang's line numbers are the source's own.
        cmd = [clang, "-x", "hip", f"--offload-arch={arch}", "--cuda-device-only", "--no-gpu-bundle-output",
               "-nogpulib", "-nogpuinc", "-include", str(PRELUDE), *opts, "-c", src, "-o", out]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise compile_error(f"clang ({arch})", done.stdout + done.stderr, source, r"gdsl\.hip:(\d+):\d+: error")
        return Path(out).read_bytes()
