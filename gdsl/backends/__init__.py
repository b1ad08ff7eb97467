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

ALL_BACKENDS = ("interpret", "cpu", "cuda", "hip")
_NOT_BUILT = {
    "cpu": "the llvmlite CPU backend is not built yet (tracked in issue 3); use backend='interpret'",
    "cuda": "the CUDA code generator is not built yet (tracked in issue 4); use backend='interpret'",
    "hip": "the HIP backend is not built yet; use backend='interpret'",
}


def backend_module(name: str):
    """The backend's module (importing it needs no device). BackendUnavailableError if it does not exist."""
    if name not in ALL_BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; gdsl has {', '.join(ALL_BACKENDS)}")
    try:
        module = importlib.import_module(f"gdsl.backends.{name}")
    except ImportError as e:
        raise BackendUnavailableError(f"backend {name!r} cannot be imported: {e}") from None
    if not hasattr(module, "lower"):
        raise BackendUnavailableError(f"backend {name!r}: {_NOT_BUILT.get(name, 'not built')}")
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
