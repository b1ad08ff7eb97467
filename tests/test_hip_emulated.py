"""The HIP dialect's own code, run where no AMD GPU is (gdsl/backends/hip/emulated.py):

- on the CPU emulator with 64-lane wavefronts (CDNA) and 32 (RDNA): the HIP header's `__shfl_xor`
  reductions and GEMV lane split, `__builtin_amdgcn_s_sleep` in the grid barrier, the `_Float16` half
  helpers, against the interpreter: every program of backend_programs.PROGRAMS and hypothesis random programs;
- on an NVIDIA GPU through the CUDA compatibility header (32-lane wavefronts): NVRTC compiles every program's
  HIP source here (CI), and with a GPU (`-m gpu`) it runs against the interpreter.
"""
import functools

import pytest
from backend_programs import PROGRAMS
from hypothesis import given, settings
from strategies import BACKEND_TOLERANCE, assert_trees_close, needs_cxx, needs_nvrtc, programs

import gdsl
from gdsl.backends.cfamily import emulator, executor
from gdsl.backends.cfamily.lower import check_options, lower_with_grid
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.backends.hip.dialect import HIPDialect
from gdsl.backends.hip.emulated import EmulatedHIPDialect, cuda_compat_source
from gdsl.jit import _as_dtype, leaf_aval, make_ir
from gdsl.tracing.pytree import tree_flatten, tree_unflatten

CASES = [(name, "device") for name in PROGRAMS] + \
    [(name, "host") for name in ("loop", "branch", "recursion", "reductions", "gemv_batch1")]


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("GDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "gdsl-cache"))


def expected_or_none(fn, args):
    try:
        return gdsl.jit(fn, backend="interpret")(*args)
    except gdsl.RecursionDepthError:
        return None


def check_emulated(fn, args, *, wave, control="device", grid=3, block=64, partition=None):
    run = functools.partial(emulator.emulate, fn, *args, control=control, grid=grid, block=block,
                            partition=partition, dialect=EmulatedHIPDialect(wave))
    expected = expected_or_none(fn, args)
    if expected is None:
        with pytest.raises(gdsl.RecursionDepthError):
            run()
    else:
        assert_trees_close(gdsl.to_numpy(run()), expected, tolerance=BACKEND_TOLERANCE)


# ------------------------------------------------------------------------------------ CPU emulator
def test_emulated_source_is_the_hip_dialect():
    fn, args = PROGRAMS["reductions"]
    program = make_ir(fn)(*args)
    dialect = EmulatedHIPDialect(64)
    opts = check_options({"block": 128}, dialect)
    source = lower_with_grid(program, opts, 2, dialect).source
    assert "#define GDSL_EMU_HIP" in source and source.count("#define GDSL_WARP 64") == 2
    assert "__shfl_xor((v), (m), (w))" in source and "__builtin_amdgcn_s_sleep(1)" in source
    assert "_Float16 x; __builtin_memcpy" in source and "_reduce<" in source


@needs_cxx
@pytest.mark.parametrize("name,control", CASES)
def test_emulated_wave64_matches_interpreter(name, control):
    fn, args = PROGRAMS[name]
    check_emulated(fn, args, wave=64, control=control, block=128)


@needs_cxx
@pytest.mark.parametrize("name", ["reductions", "long_reductions", "ties_and_nans", "softmax_rows", "gemv_batch1",
                                  "half_types", "loop"])
def test_emulated_wave64_one_wavefront_block(name):
    """block == wave: the block reductions end after the wavefront's shuffles (no shared-memory step)."""
    fn, args = PROGRAMS[name]
    check_emulated(fn, args, wave=64, block=64)


@needs_cxx
@pytest.mark.parametrize("name", ["reductions", "int_reductions", "gemv_batch1", "matmuls", "recursion"])
def test_emulated_wave32_rdna_matches_interpreter(name):
    fn, args = PROGRAMS[name]
    check_emulated(fn, args, wave=32, block=64)


@needs_cxx
@settings(max_examples=6, deadline=None)
@given(programs(max_depth=2))
def test_emulated_wave64_random_programs(prog):
    for control, partition in (("device", None), ("device", True), ("host", None)):
        check_emulated(prog.fn, prog.args, wave=64, control=control, grid=2, block=64, partition=partition)


def test_block_smaller_than_a_wavefront_is_rejected():
    with pytest.raises(ValueError, match="from 64 to 1024"):
        check_options({"block": 32}, EmulatedHIPDialect(64))
    assert check_options({"block": 32}, EmulatedHIPDialect(32))["block"] == 32


# ------------------------------------------------------------------- NVIDIA through the compatibility header
def hip_lowering_for_nvidia(name, control="device", grid=4, block=128):
    fn, args = PROGRAMS[name]
    dialect = HIPDialect(wave=32)
    opts = check_options({"control": control, "block": block}, dialect)
    return fn, args, lower_with_grid(make_ir(fn)(*args), opts, grid, dialect)


@needs_nvrtc
@pytest.mark.parametrize("name,control", CASES)
def test_hip_source_compiles_with_nvrtc_through_the_compat_header(name, control):
    _, _, lowering = hip_lowering_for_nvidia(name, control)
    assert "GDSL_WARP 32" in lowering.source and "__shfl_xor(" in lowering.source
    cubin = cuda_toolchain.compile_cuda(cuda_compat_source(lowering.source), "sm_90")
    assert cubin[:4] == b"\x7fELF"


class NvidiaHipDevice(executor.CupyDevice):
    """HIP-dialect code on an NVIDIA GPU: NVRTC through the compatibility header, CUDA's cooperative launch."""
    name = "cuda"

    def __init__(self):
        super().__init__()
        self.arch = cuda_toolchain.device_arch()

    def compile_code(self, source):
        return cuda_toolchain.compile_cuda(cuda_compat_source(source), self.arch)

    def max_grid(self, spec, block):
        from gdsl.backends.cuda import runtime
        return runtime.max_coresident_blocks(self.kernels[spec.name], block)

    def launch(self, spec, grid, block, args, cooperative):
        self.kernels[spec.name]((grid,), (block,), tuple(args), enable_cooperative_groups=cooperative)


def run_on_nvidia(fn, args, lowering):
    flat, _ = tree_flatten((tuple(args), {}))
    flat = [_as_dtype(x, leaf_aval(x)) for x in flat]
    outs = executor.Executable(lowering.plan, lowering.rendered, NvidiaHipDevice())(flat)
    return tree_unflatten(lowering.program.out_tree, outs)


@pytest.mark.gpu
@pytest.mark.parametrize("name,control", CASES)
def test_hip_dialect_runs_on_nvidia(name, control):
    fn, args, lowering = hip_lowering_for_nvidia(name, control, grid=8)
    expected = expected_or_none(fn, args)
    if expected is None:
        with pytest.raises(gdsl.RecursionDepthError):
            run_on_nvidia(fn, args, lowering)
        return
    assert_trees_close(gdsl.to_numpy(run_on_nvidia(fn, args, lowering)), expected, tolerance=BACKEND_TOLERANCE)
