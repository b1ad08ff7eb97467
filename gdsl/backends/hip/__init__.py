"""The `hip` backend: the C-family plan and renderer (gdsl/backends/cfamily/) in the HIP dialect, compiled with
hiprtc.

`lower()` works anywhere (its `.source` compiles in CI through hiprtc, for gfx90a); running needs ROCm and an
AMD GPU, which gdsl does not drive yet, so `unavailable_reason()` always names what is missing.
"""
from __future__ import annotations

from gdsl.backends.cfamily import lower as cfamily_lower
from gdsl.backends.cfamily.executor import Lowering
from gdsl.backends.cfamily.lower import check_options, lower_with_grid
from gdsl.backends.hip.dialect import HIPDialect
from gdsl.backends.hip.toolchain import compile_hip
from gdsl.errors import BackendUnavailableError

KNOWN_OPTIONS = cfamily_lower.KNOWN_OPTIONS
LOWERING_CHAIN = HIPDialect.lowering_chain      # where this backend's lowering rules are looked up
ELEMENTWISE_TABLE = HIPDialect().elementwise    # the elementwise family: one C expression per primitive
DEFAULT_GRID = 110          # an MI250X GCD's compute units (gfx90a)
DEFAULT_ARCH = "gfx90a"


def unavailable_reason() -> str | None:
    return ("no AMD GPU runtime is present: running HIP kernels needs ROCm (libamdhip64 with a /dev/kfd "
            "device) and an AMD GPU; gdsl only renders and compiles HIP here (f.lower(...).source)")


def lower(program, options) -> Lowering:
    opts = check_options(options, HIPDialect)
    return lower_with_grid(program, opts, opts["grid"] or DEFAULT_GRID, HIPDialect())


def compile_lowering(lowering: Lowering, arch: str = DEFAULT_ARCH) -> bytes:
    """The code object of a lowering (hiprtc in a subprocess; needs no GPU)."""
    return compile_hip(lowering.source, arch)


def load(lowering: Lowering):
    raise BackendUnavailableError(unavailable_reason())


def to_device(x):
    raise BackendUnavailableError(unavailable_reason())
