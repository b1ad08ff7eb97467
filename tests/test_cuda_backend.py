"""The CUDA backend.

Without a GPU (CI): every program of backend_programs.PROGRAMS, in both placements, lowers to a source that
NVRTC compiles to an sm_90 CUBIN; the generated code of three tiny programs is golden text
(tests/golden/, regenerate with GDSL_UPDATE_GOLDEN=1); and the generated code runs on the CPU emulator
(gdsl.backends.cfamily.emulator: CUDA's spelling compiled by g++, threads as std::threads) against the
interpreter. On a GPU (`-m gpu`): cuda == interpreter for the same programs, random programs with nested
control flow, recursion overflow, dlpack inputs, the grid fallback and both barrier kinds.
"""
import functools
import os
import re
from pathlib import Path

import numpy as np
import pytest
from backend_programs import GOLDEN, PROGRAMS
from hypothesis import given, settings
from strategies import check_backend, needs_cxx, needs_nvrtc, programs

import gdsl
from gdsl.backends.cfamily import emulator
from gdsl.backends.cfamily.lower import check_options, lower_with_grid
from gdsl.backends.cuda import LOWERING_CHAIN, cccl_include_dir, compile_options
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.backends.cuda.dialect import CUDADialect
from gdsl.jit import make_ir
from gdsl.primitives import registry
from gdsl.schedule.plan import Sync, plan_statements

GOLDEN_DIR = Path(__file__).with_name("golden")
CONTROLS = ("device", "host")
CASES = [(name, control) for name in PROGRAMS for control in CONTROLS]


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """A cache shared by this module's tests (compiles are reused across them) but not with the user's."""
    monkeypatch.setenv("GDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "gdsl-cache"))


def lowered(name, control, **options):
    fn, args = PROGRAMS[name]
    return gdsl.jit(fn, backend="cuda", control=control, **options).lower(*args)


# ------------------------------------------------------------------------------------------ CI: no GPU
@needs_nvrtc
@pytest.mark.parametrize("name,control", CASES)
def test_source_compiles_to_sm90_cubin(name, control):
    lowering = lowered(name, control, grid=132)
    cubin = cuda_toolchain.compile_cuda(lowering.source, "sm_90")
    assert cubin[:4] == b"\x7fELF"
    kernels = [line for line in lowering.source.splitlines() if line.startswith('extern "C" __global__')]
    plan, specs = lowering.lowering.plan, lowering.lowering.rendered.kernels
    # Host control: a kernel per plan kernel, but kernels of the same text are one (render.MERGE_KERNELS).
    assert len(specs) == len(plan.kernels) and len(kernels) == len({spec.name for spec in specs})
    assert len(kernels) == 1 if control == "device" else len(kernels) <= len(plan.kernels)


@needs_nvrtc
@pytest.mark.parametrize("name", ["loop", "recursion", "matmuls", "reductions", "nested_while_cond_recurse"])
@pytest.mark.parametrize("block,barrier", [(64, "atomic"), (512, "atomic"), (1024, "atomic"), (256, "coop")])
def test_other_blocks_and_barriers_compile(name, block, barrier):
    if barrier == "coop" and cccl_include_dir() is None:
        pytest.skip("cooperative_groups.h needs the CCCL headers CuPy ships")
    lowering = lowered(name, "device", grid=132, block=block, barrier=barrier)
    source = lowering.source
    assert cuda_toolchain.compile_cuda(source, "sm_90", options=compile_options(barrier))[:4] == b"\x7fELF"
    # A plan whose work all runs on one vEU has no grid barrier to render (the small recursion's).
    grid_syncs = any(isinstance(s, Sync) and s.scope == "grid" for s in plan_statements(lowering.lowering.plan))
    assert ("cooperative_groups::this_grid().sync()" in source) == (barrier == "coop" and grid_syncs)


def test_one_kernel_per_forward_with_device_control():
    for name in ("loop", "branch", "recursion", "nested_while_cond_recurse"):
        source = lowered(name, "device", grid=132).source
        assert source.count('extern "C" __global__') == 1
        # The small recursion's work all runs on vEU 0: its barriers are block syncs (docs/schedule.md,
        # "Recursive calls"); the other programs have work on several vEUs between grid barriers.
        assert ("gdsl_grid_sync_atomic(gdsl_bar);" in source) == (name != "recursion")


def _generated_part(source: str) -> str:
    """The generated code (op functions and kernels), without the dialect header and the shared prelude."""
    return source[source.index("#define GDSL_SMEM_BYTES"):]


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_source(name):
    text = _generated_part(lowered(name, "device", grid=132).source)
    path = GOLDEN_DIR / f"cuda_{name}.cu"
    if os.environ.get("GDSL_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; run with GDSL_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"generated code of {name} changed; regenerate with GDSL_UPDATE_GOLDEN=1"


def test_lower_needs_no_gpu_and_checks_options():
    fn, args = PROGRAMS["loop"]
    assert "gdsl_main" in gdsl.jit(fn, backend="cuda").lower(*args).source
    for bad in ({"block": 100}, {"block": 2048}, {"barrier": "spin"}, {"control": "hybrid"}, {"grid": 0}):
        with pytest.raises(ValueError):
            gdsl.jit(fn, backend="cuda", **bad).lower(*args)


def _transpose_source(backend):
    return gdsl.jit(lambda x: x.T, backend=backend).lower(np.ones((3, 5), np.float32)).source


def test_a_dialect_rule_overrides_the_shared_one(monkeypatch):
    """A rule registered under the dialect's name wins over the shared "cfamily" one, for that dialect only."""
    assert LOWERING_CHAIN == ("cuda", "cfamily")
    shared = registry.lowering_rule("transpose", LOWERING_CHAIN)
    assert "for (int i = lo" in _transpose_source("cuda")
    monkeypatch.setitem(registry.LOWERINGS, ("cuda", "utask", "transpose"),
                        lambda ops: "  // the CUDA dialect's own transpose\n" + shared(ops))
    assert "// the CUDA dialect's own transpose" in _transpose_source("cuda")
    assert "// the CUDA dialect's own transpose" not in _transpose_source("hip")


def test_a_kind_without_a_rule_names_the_kind_and_the_backend(monkeypatch):
    monkeypatch.delitem(registry.LOWERINGS, ("cfamily", "utask", "transpose"))
    with pytest.raises(NotImplementedError, match="'transpose' on backend 'cuda'"):
        _transpose_source("cuda")
    monkeypatch.delitem(registry.LOWERINGS, ("cfamily", "uniform", "reduce_max"))
    with pytest.raises(NotImplementedError, match="uniform lowering rule for op kind 'reduce_max'"):
        gdsl.jit(lambda x: x.max(), backend="cuda").lower(np.ones((4,), np.float32))


class ProbeDialect(CUDADialect):
    """The CUDA dialect with every index, barrier and warp size spelled differently."""
    block_index, thread_index, block_barrier, warp_size = "PROBE_VEU", "PROBE_LANE", "PROBE_BARRIER();", 64


@pytest.mark.parametrize("name", ["reductions", "long_reductions", "gemv_batch1", "matmuls", "recursion",
                                  "structural", "updates", "heads"])
def test_indices_barriers_and_warp_size_come_from_the_dialect(name):
    fn, args = PROGRAMS[name]
    opts = check_options({"control": "device"}, ProbeDialect)
    source = lower_with_grid(make_ir(fn)(*args), opts, 8, ProbeDialect()).rendered.source
    generated = _generated_part(source)
    for literal in ("blockIdx", "threadIdx", "__syncthreads"):
        assert literal not in generated, f"{literal} spelled in the generated code of {name}"
    assert "PROBE_VEU" in generated
    if name != "matmuls":    # (every op of matmuls is a GEMM tile: its thread loops are the shared prelude's)
        assert "PROBE_LANE" in generated
    assert "#define GDSL_WARP 64\n" in source
    with pytest.raises(ValueError, match="from 64 to 1024"):
        check_options({"block": 32}, ProbeDialect)


def test_views_replace_contiguous_slices():
    """x[t] of a sequence and static weight slices become pointers, not copies."""
    def f(xs, w):
        return gdsl.fori_loop(0, xs.shape[0], lambda t, h: gdsl.numpy.tanh(xs[t] @ w[1] + h), xs[0])
    source = gdsl.jit(f, backend="cuda", grid=132).lower(np.ones((5, 1, 8), np.float32),
                                                        np.ones((3, 8, 8), np.float32)).source
    assert "op_slice" not in source and "_dynamic_slice(" not in source.split("// ----")[-1]


def test_identical_utasks_share_one_function(monkeypatch):
    """Ten identical layers: one tanh function for ten sites and one GEMV for nine (the first reads the
    argument, not a temporary). Inlined while small; past the inlining budget, called instead. The GEMV,
    a tiled uTask, is called from its nine sites whatever the budget (CALL_TILED_UTASKS) when its uTasks are
    long enough (CALL_MIN_UTASK_NS; this 64x64 one is short: inlined by default). The ten layers are
    rendered one by one here (ROLL_REPEATS off: rolled, they are one loop with one site each)."""
    from gdsl.backends.cfamily import render
    monkeypatch.setattr(render, "ROLL_REPEATS", False)

    def layers(x, w):
        for k in range(10):
            x = gdsl.numpy.tanh(x @ w[k])
        return x

    def ops():        # (epilogue=False: the tanh stays an op of its own, not the GEMV's epilogue)
        source = gdsl.jit(layers, backend="cuda", grid=8, epilogue=False).lower(
            np.ones((1, 64), np.float32), np.ones((10, 64, 64), np.float32)).source
        return _generated_part(source).split('extern "C"')[0]
    assert "GDSL_SHARED_OP void" not in ops()          # a short tile: inlined
    monkeypatch.setattr(render, "CALL_MIN_UTASK_NS", 0.0)
    small = ops()
    assert small.count("GDSL_DEV void") == 2 and small.count("GDSL_SHARED_OP void") == 1
    assert "// called from 9 sites" in small
    assert "#define GDSL_SHARED_OP static __device__ __noinline__" in CUDADialect().header
    monkeypatch.setattr(render, "CALL_TILED_UTASKS", False)
    assert ops().count("GDSL_DEV void") == 3 and "GDSL_SHARED_OP" not in ops()
    monkeypatch.setattr(render, "CALL_TILED_UTASKS", True)
    monkeypatch.setattr(render, "INLINE_BUDGET", 0)
    large = ops()
    assert large.count("GDSL_SHARED_OP void") == 2 and large.count("GDSL_DEV void") == 1
    assert "// called from 10 sites" in large and "// called from 9 sites" in large


def test_large_programs_call_their_functions(monkeypatch):
    """Past LARGE_KERNEL_BUDGET of estimated inlined code the functions with the largest inlined share are
    called, one of a single call site too (the kernel compiles in time growing faster than its size), until
    LARGE_KERNEL_INLINED is left; under the budget, and with CALL_IN_LARGE_KERNELS off, the rendering is the
    one of the inlining budget alone."""
    from gdsl.backends.cfamily import render
    monkeypatch.setattr(render, "ROLL_REPEATS", False)

    def layers(x, w):
        for k in range(10):
            x = gdsl.numpy.tanh(x @ w[k])
        return x

    def ops():        # three functions: the tanh (10 sites), the GEMV of a temporary (9), the first GEMV (1)
        source = gdsl.jit(layers, backend="cuda", grid=8, epilogue=False).lower(
            np.ones((1, 64), np.float32), np.ones((10, 64, 64), np.float32)).source
        return _generated_part(source).split('extern "C"')[0]
    default = ops()
    assert default.count("GDSL_DEV void") == 3 and "GDSL_SHARED_OP" not in default
    monkeypatch.setattr(render, "LARGE_KERNEL_BUDGET", 0)
    monkeypatch.setattr(render, "LARGE_KERNEL_INLINED", 10**9)
    assert ops() == default                            # past the budget, but already under what may stay
    monkeypatch.setattr(render, "LARGE_KERNEL_INLINED", 0)
    every = ops()
    assert every.count("GDSL_SHARED_OP void") == 3 and "GDSL_DEV void" not in every
    assert "// called from 1 sites" in every
    monkeypatch.setattr(render, "CALL_IN_LARGE_KERNELS", False)
    assert ops() == default


def _independent_layers(x, w):
    """Four products of one shape that depend on nothing but the inputs: one wave, four tasks."""
    return [gdsl.numpy.tanh(x @ w[k]) for k in range(4)]


INDEPENDENT_ARGS = (np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64),
                    np.linspace(-0.1, 0.1, 4 * 64 * 64, dtype=np.float32).reshape(4, 64, 64))


def test_wave_of_one_function_has_one_call_site(monkeypatch):
    """Tasks of one wave that call the same uTask function on disjoint vEUs share one call site (each vEU
    picks its task's arguments), so NVRTC compiles the function once; GROUP_WAVE_TASKS=False: one site each."""
    from gdsl.backends.cfamily import render

    def kernel():
        source = gdsl.jit(_independent_layers, backend="cuda", grid=16).lower(*INDEPENDENT_ARGS).source
        return source.split('extern "C"')[1]
    grouped = kernel()
    assert grouped.count("4 tasks of ") == 1          # the four products, each with its tanh as epilogue
    assert len(re.findall(r"\bop\w+_matmul_tanh\(", grouped)) == 1
    monkeypatch.setattr(render, "GROUP_WAVE_TASKS", False)
    assert len(re.findall(r"\bop\w+_matmul_tanh\(", kernel())) == 4


@needs_cxx
@pytest.mark.parametrize("group", [True, False])
def test_emulated_wave_of_one_function(group, monkeypatch):
    from strategies import BACKEND_TOLERANCE, assert_trees_close

    from gdsl.backends.cfamily import render
    monkeypatch.setattr(render, "GROUP_WAVE_TASKS", group)
    got = emulator.emulate(_independent_layers, *INDEPENDENT_ARGS, grid=6, block=64)
    expected = gdsl.jit(_independent_layers, backend="interpret")(*INDEPENDENT_ARGS)
    assert_trees_close(gdsl.to_numpy(got), expected, tolerance=BACKEND_TOLERANCE)


@needs_cxx
@pytest.mark.parametrize("name,control", CASES)
def test_emulated_matches_interpreter(name, control):
    fn, args = PROGRAMS[name]
    try:
        expected = gdsl.jit(fn, backend="interpret")(*args)
    except gdsl.RecursionDepthError:
        with pytest.raises(gdsl.RecursionDepthError):
            emulator.emulate(fn, *args, control=control, grid=3, block=64)
        return
    got = emulator.emulate(fn, *args, control=control, grid=3, block=64)
    from strategies import BACKEND_TOLERANCE, assert_trees_close
    assert_trees_close(gdsl.to_numpy(got), expected, tolerance=BACKEND_TOLERANCE)


@needs_cxx
@pytest.mark.parametrize("partition", [True, False])
def test_emulated_partitioned_loop(partition):
    fn, args = PROGRAMS["heads"]
    lowering = lowered("heads", "device", grid=4, partition=partition).lowering
    assert lowering.plan.stats["partitioned_loops"] == (1 if partition else 0)
    got = emulator.emulate(fn, *args, grid=4, block=64, partition=partition)
    from strategies import BACKEND_TOLERANCE, assert_trees_close
    assert_trees_close(gdsl.to_numpy(got), gdsl.jit(fn, backend="interpret")(*args), tolerance=BACKEND_TOLERANCE)


@needs_cxx
@settings(max_examples=6, deadline=None)
@given(programs(max_depth=2))
def test_emulated_random_programs(prog):
    from strategies import BACKEND_TOLERANCE, assert_trees_close
    try:
        expected = gdsl.jit(prog.fn, backend="interpret")(*prog.args)
    except gdsl.RecursionDepthError:
        expected = None
    for control, partition in (("device", None), ("device", True), ("host", None)):
        run = functools.partial(emulator.emulate, prog.fn, *prog.args, control=control, grid=2, block=32,
                                partition=partition)
        if expected is None:
            with pytest.raises(gdsl.RecursionDepthError):
                run()
        else:
            assert_trees_close(gdsl.to_numpy(run()), expected, tolerance=BACKEND_TOLERANCE)


# ------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("name,control", CASES)
def test_gpu_matches_interpreter(name, control):
    fn, args = PROGRAMS[name]
    check_backend(fn, args, "cuda", control=control)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["loop", "recursion", "nested_while_cond_recurse", "while_data_exit",
                                  "switch_in_loop", "large", "matmuls", "heads"])
@pytest.mark.parametrize("options", [{"barrier": "coop"}, {"block": 128}, {"block": 1024}, {"grid": 7},
                                     {"grid": 100_000}, {"partition": True}, {"partition": False}])
def test_gpu_schedule_options(name, options):
    fn, args = PROGRAMS[name]
    if options.get("barrier") == "coop" and cccl_include_dir() is None:
        pytest.skip("no CCCL headers")
    check_backend(fn, args, "cuda", **options)    # grid=100000 cannot be co-resident: re-scheduled


@pytest.mark.gpu
@settings(max_examples=40, deadline=None)
@given(programs())
def test_gpu_random_programs(prog):
    for control in CONTROLS:
        check_backend(prog.fn, prog.args, "cuda", control=control)
    check_backend(prog.fn, prog.args, "cuda", control="device", partition=True)


@pytest.mark.gpu
def test_gpu_results_are_cupy_and_inputs_stay_on_device():
    import cupy
    fn, args = PROGRAMS["loop"]
    f = gdsl.jit(fn, backend="cuda")
    out = f(*[cupy.asarray(a) for a in args])
    assert isinstance(out, cupy.ndarray)
    np.testing.assert_allclose(gdsl.to_numpy(out), gdsl.jit(fn, backend="interpret")(*args), rtol=2e-4, atol=2e-5)
    f(*args)
    assert f.trace_count == 1     # numpy and CuPy arguments of one signature share the compiled kernel


@pytest.mark.gpu
def test_gpu_dlpack_input_from_torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    fn, args = PROGRAMS["loop"]
    targs = [torch.as_tensor(a, device="cuda") for a in args]
    got = gdsl.jit(fn, backend="cuda")(*targs)
    np.testing.assert_allclose(gdsl.to_numpy(got), gdsl.jit(fn, backend="interpret")(*args), rtol=2e-4, atol=2e-5)


@pytest.mark.gpu
def test_gpu_recursion_overflow_then_recovers():
    fn, args = PROGRAMS["recursion_overflow"]
    f = gdsl.jit(fn, backend="cuda")
    for control in CONTROLS:
        g = gdsl.jit(fn, backend="cuda", control=control)
        with pytest.raises(gdsl.RecursionDepthError):
            g(*args)
    ok_args = PROGRAMS["recursion_depth_ok"][1]
    np.testing.assert_allclose(gdsl.to_numpy(f(*ok_args)), gdsl.jit(fn, backend="interpret")(*ok_args),
                               rtol=2e-4, atol=2e-5)
