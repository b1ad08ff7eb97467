"""The `hip` backend: the C-family plan and renderer (gdsl/backends/cfamily/) in the HIP dialect, compiled with
hiprtc and run through CuPy for ROCm (gdsl/backends/hip/runtime.py) with the executor the CUDA backend uses.

    lower(program, options)   schedule and render for the device's arch (its wavefront size: 64 on CDNA,
                              32 on RDNA); without a device, options["arch"] (default gfx90a) or
                              options["wave"] (32 or 64) decide it. Needs no GPU.
    load(lowering)            hiprtc for the device's own gfx arch, the co-residency check (re-scheduling at
                              the grid that fits), then an Executable (gdsl/backends/cfamily/executor.py)

Options: those of every C-family backend (gdsl/backends/cfamily/lower.py) plus arch and wave. Only the
atomic grid barrier exists here (hiprtc has no cooperative-groups grid.sync).
"""
from __future__ import annotations

from gdsl.backends.cfamily import executor
from gdsl.backends.cfamily import lower as cfamily_lower
from gdsl.backends.cfamily.executor import Lowering
from gdsl.backends.cfamily.lower import check_options
from gdsl.backends.hip import runtime
from gdsl.backends.hip.dialect import DEFAULT_ARCH, HIPDialect
from gdsl.backends.hip.toolchain import compile_hip, hiprtc_available

KNOWN_OPTIONS = cfamily_lower.KNOWN_OPTIONS | {"arch", "wave"}
LOWERING_CHAIN = HIPDialect.lowering_chain      # where this backend's lowering rules are looked up
ELEMENTWISE_TABLE = HIPDialect().elementwise    # the elementwise family: one C expression per primitive
DEFAULT_GRID = 110          # an MI250X GCD's compute units (gfx90a), assumed when no GPU is here to ask


def unavailable_reason() -> str | None:
    missing = runtime.unavailable_reason()
    if missing:
        return missing + "; .lower(...).source still works"
    return hiprtc_available()


def _device() -> dict | None:
    return runtime.device_properties() if runtime.unavailable_reason() is None else None


def dialect_for(options, device: dict | None = None) -> HIPDialect:
    """The dialect of a lowering: the options' arch/wave if given, else the device's arch, else gfx90a."""
    arch = options.get("arch") or (device["arch"] if device else None)
    return HIPDialect(arch=arch, wave=options.get("wave"))


def lower_with_grid(program, opts, grid: int) -> Lowering:
    """Schedule for `grid` vEUs and render the HIP dialect (options already checked, arch and wave included)."""
    dialect = HIPDialect(arch=opts["arch"], wave=opts["wave"])
    return cfamily_lower.lower_with_grid(program, opts, grid, dialect)


def lower(program, options) -> Lowering:
    """Without a `grid` option: one vEU per compute unit of the device (110 without one); with narrow=True
    then only as many as the waves use (cfamily.lower.narrowed)."""
    device = _device()
    dialect = dialect_for(options, device)
    opts = dict(check_options(options, dialect), arch=dialect.arch, wave=dialect.warp_size)
    if opts["grid"]:
        return lower_with_grid(program, opts, opts["grid"])
    lowering = lower_with_grid(program, opts, device["compute_units"] if device else DEFAULT_GRID)
    return cfamily_lower.narrowed(program, opts, lowering, lower_with_grid)


def compile_lowering(lowering: Lowering, arch: str | None = None) -> bytes:
    """The code object of a lowering (hiprtc in a subprocess; needs no GPU), for its own arch by default."""
    return compile_hip(lowering.source, arch or lowering.options.get("arch") or DEFAULT_ARCH)


def load(lowering: Lowering):
    """Compile for the device's arch, check co-residency (re-scheduling if needed), build the executable."""
    reason = unavailable_reason()
    if reason:
        from gdsl.errors import BackendUnavailableError
        raise BackendUnavailableError(reason)
    device = runtime.HipDevice()
    opts = lowering.options
    if opts["wave"] != device.props["wave"] or opts["arch"].split(":")[0] != device.props["gfx"]:
        # Rendered for another target (an explicit arch/wave option): re-render for this device's own.
        opts = dict(opts, arch=device.arch, wave=device.props["wave"])
        lowering = lower_with_grid(lowering.program, opts, lowering.plan.grid)
    return executor.load_coresident(lowering, device, lower_with_grid, backend="hip")


def to_device(x):
    return executor.to_device(x, "hip")
