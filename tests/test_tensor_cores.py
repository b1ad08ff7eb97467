"""Float32 GEMM tiles on the tensor cores (the CUDA dialect's gdsl_gemm_tile_tc, 3xTF32: float32 accuracy).

Since the wide FFMA tile takes up to 16 k groups (gemm.WIDE_MAX_GROUPS), every tile of the scheduler's menu
runs on it by default (the 16 x 16 tiles were faster so on the H200); the tensor-core tile takes the small
tiles the wide tile cannot, and these tests reach it with the wide tile limited to 8 k groups (`tc_menu`).
Without a GPU: which tiles go to the tensor cores (small FFMA register tiles only, float32 only, the CUDA
dialect only, not with tensor_cores=False), the warp grid of a tile, and NVRTC compiling the routine for
sm_90 (its mma.sync path) and sm_75 (the FFMA fallback); on the CPU emulator with CUDA's tensor-core code
(emulator.EmulatedTensorCores), a matmul and a convolution with ragged edges against float64. On a GPU (`-m gpu`):
matmuls and convolutions with ragged edges against float64, as close as the FFMA tile's results are.
"""
import numpy as np
import pytest
from strategies import needs_cxx, needs_nvrtc

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import emulator, gemm
from gdsl.backends.cfamily.dialect import Dialect
from gdsl.backends.cfamily.gemm import tensor_core_warps
from gdsl.backends.cfamily.lower import check_options, lower_with_grid
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.backends.cuda.dialect import CUDADialect

TC_CALL = "gdsl_gemm_tile_tc<"


def matmul_tanh(a, b):
    return gnp.tanh(a @ b)


def conv(x, w):
    return gdsl.nn.conv2d(x, w, stride=1, padding=1)


def ops_source(fn, *args, **options):
    """The generated CUDA after the device library (the uTask functions and the kernel)."""
    source = gdsl.jit(fn, backend="cuda", **options).lower(*args).source
    return source.split("-- ops")[-1]


@pytest.fixture
def tc_menu(monkeypatch):
    """The wide tile limited to 8 k groups: the 16 x 16 tiles go to the tensor cores (the default before)."""
    monkeypatch.setattr(gemm, "WIDE_MAX_GROUPS", 8)


def operands(m, k, n, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)


def test_warp_grid_covers_the_tile_with_whole_fragments():
    cuda = CUDADialect()
    assert tensor_core_warps(16, 16, 256, cuda) == (1, 2)     # 2 fragments, the other 6 warps split k
    assert tensor_core_warps(16, 32, 256, cuda) == (1, 4)
    assert tensor_core_warps(64, 64, 256, cuda) == (2, 4)     # 8 warps, a 32 x 16 warp tile each
    assert tensor_core_warps(16, 12, 256, cuda) is None       # not whole 16 x 8 fragments
    assert tensor_core_warps(16, 8, 256, cuda) is None        # one fragment for eight warps
    assert tensor_core_warps(16, 16, 256, Dialect()) is None  # a dialect without tensor cores


def test_sixteen_by_sixteen_tiles_take_the_wide_tile_by_default():
    a, b = operands(64, 256, 256)
    source = ops_source(matmul_tanh, a, b)
    assert "gdsl_gemm_tile_wide<16, 16, 32, 256, 4, 4, 16," in source and TC_CALL not in source


def test_small_float32_tiles_go_to_the_tensor_cores(tc_menu):
    a, b = operands(64, 256, 256)
    assert TC_CALL in ops_source(matmul_tanh, a, b)            # 16 x 16 tiles: one output per FFMA thread
    assert TC_CALL not in ops_source(matmul_tanh, a, b, tensor_cores=False)
    ints = [x.astype(np.int32) for x in operands(64, 256, 256)]
    assert TC_CALL not in ops_source(lambda a, b: a @ b, *ints)  # integer GEMMs stay exact
    big_a, big_b = operands(4096, 256, 512)                    # 64 x 64 tiles: the wide FFMA tile
    assert "gdsl_gemm_tile_wide<64, 64" in ops_source(matmul_tanh, big_a, big_b)
    assert TC_CALL not in ops_source(matmul_tanh, big_a, big_b)


def test_option_is_accepted_where_it_has_no_effect():
    a, b = operands(16, 8, 16)
    expected = np.tanh(a.astype(np.float64) @ b)
    for backend in ("cpu", "interpret"):
        got = gdsl.jit(matmul_tanh, backend=backend, tensor_cores=False)(a, b)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_90", "sm_75"])
def test_tensor_core_tile_compiles(arch, tc_menu):
    a, b = operands(40, 48, 72)
    x = np.zeros((2, 16, 9, 9), np.float32)
    w = np.zeros((32, 16, 3, 3), np.float32)
    for fn, args in ((matmul_tanh, (a, b)), (conv, (x, w))):
        source = gdsl.jit(fn, backend="cuda").lower(*args).source
        assert TC_CALL in source.split("-- ops")[-1]
        assert cuda_toolchain.compile_cuda(source, arch)[:4] == b"\x7fELF"


@needs_cxx
def test_emulated_tensor_core_tiles_are_float32_accurate(tc_menu):
    """The tile's mma.sync fragments, k groups and ragged edges run on the emulator: the 16 x 16 tiles of a 17 x 24
    matmul and of a convolution's implicit GEMM (25 pixels by 16 channels)."""
    tensor_cores = emulator.EmulatedTensorCores()
    a, b = operands(17, 40, 24, seed=3)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 16, 5, 5)).astype(np.float32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    for fn, args in ((matmul_tanh, (a, b)), (conv, (x, w))):
        opts = check_options({"control": "device", "block": 256}, tensor_cores)
        assert TC_CALL in lower_with_grid(gdsl.make_ir(fn)(*args), opts, 4, tensor_cores).rendered.source
        expected = np.asarray(gdsl.jit(fn, backend="interpret")(*(v.astype(np.float64) for v in args)))
        got = emulator.emulate(fn, *args, grid=4, block=256, dialect=tensor_cores)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", [(64, 256, 256), (17, 40, 24), (100, 33, 70), (64, 1000, 48)])
def test_tensor_core_matmul_is_float32_accurate(m, k, n, tc_menu):
    import cupy as cp
    a, b = operands(m, k, n, seed=m + n)
    expected = np.tanh(a.astype(np.float64) @ b.astype(np.float64))
    errors = {}
    for tc in (True, False):
        fn = gdsl.jit(matmul_tanh, backend="cuda", tensor_cores=tc)
        assert (TC_CALL in fn.lower(a, b).source.split("-- ops")[-1]) == tc
        got = cp.asnumpy(fn(cp.asarray(a), cp.asarray(b)))
        errors[tc] = np.max(np.abs(got - expected) / (np.abs(a) @ np.abs(b) + 1))
    assert errors[True] < 1e-6                  # float32 rounding of a k-term sum, not TF32's 1e-3
    assert errors[True] < 4 * errors[False] + 1e-7


@pytest.mark.gpu
def test_tensor_core_convolution_is_float32_accurate(tc_menu):
    import cupy as cp
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 16, 15, 15)).astype(np.float32)
    w = rng.standard_normal((24, 16, 3, 3)).astype(np.float32)
    expected = np.asarray(gdsl.jit(conv, backend="interpret")(x.astype(np.float64), w.astype(np.float64)))
    fn = gdsl.jit(conv, backend="cuda")
    assert TC_CALL in fn.lower(x, w).source.split("-- ops")[-1]
    got = cp.asnumpy(fn(cp.asarray(x), cp.asarray(w)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5)
