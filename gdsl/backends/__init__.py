"""Backend registry. A backend is a module `gdsl.backends.NAME` with

    unavailable_reason() -> str | None        why it cannot run here (None: it can)
    lower(program, options) -> Lowering       plan + source; never needs the device
    load(lowering) -> Executable              compile/load; Executable(flat_args) -> flat results
    to_device(x), KNOWN_OPTIONS

Core code never imports a backend directly: it asks this registry.
"""
from __future__ import annotations

import functools
import importlib
import os

from gdsl.errors import BackendUnavailableError

# Every backend, in the order `backends()` lists them, with what it is and when it can run. Adding a backend
# is a module gdsl/backends/NAME (the contract above) and a line here; docs/backends.md walks through one.
BACKENDS = {
    "interpret": "the numpy reference interpreter, the oracle every backend is checked against; always usable",
    "cpu": "LLVM IR through llvmlite, threads as vEUs; usable wherever llvmlite loads",
    "cuda": "one persistent CUDA kernel through NVRTC and CuPy; usable with an NVIDIA GPU, CuPy and NVRTC",
    "hip": "the HIP dialect compiled by hiprtc; lowers and compiles here, runs only where an AMD GPU is usable",
}
ALL_BACKENDS = tuple(BACKENDS)


def backend_module(name: str):
    """The backend's module (importing it needs no device). BackendUnavailableError if it does not exist."""
    if name not in ALL_BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; gdsl has {', '.join(ALL_BACKENDS)}")
    try:
        module = importlib.import_module(f"gdsl.backends.{name}")
    except ImportError as e:
        raise BackendUnavailableError(f"backend {name!r} cannot be imported: {e}") from None
    if not hasattr(module, "lower"):
        raise BackendUnavailableError(f"backend {name!r}: gdsl.backends.{name} defines no lower()")
    return module


@functools.cache
def unavailable_reason(name: str) -> str | None:
    try:
        module = backend_module(name)
    except BackendUnavailableError as e:
        return str(e)
    return module.unavailable_reason()


def usable_backend(name: str):
    """The module of a backend that can run here, or BackendUnavailableError saying what is missing."""
    reason = unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is not usable here: {reason}")
    return backend_module(name)


def backends() -> list[str]:
    """Names of the backends usable on this machine."""
    return [name for name in ALL_BACKENDS if unavailable_reason(name) is None]


def default_backend() -> str:
    """GDSL_BACKEND if set, else "cuda" when a CUDA GPU is usable, else "cpu" (else "interpret")."""
    env = os.environ.get("GDSL_BACKEND")
    if env:
        return env
    for name in ("cuda", "cpu"):
        if unavailable_reason(name) is None:
            return name
    return "interpret"


class _CallableModule(type(os)):
    """`gdsl.backends()` is public API while `gdsl.backends` is also this package (gdsl.backends.cuda, ...):
    calling the package lists the usable backends."""

    def __call__(self) -> list[str]:
        return backends()


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
