"""A GEMV tile shallower than its default chunk (gemm.SHALLOW_GEMV_CHUNK): a matmul of batch-1 rows whose depth k
is less than GEMV_KC (256) stages a chunk of k, so that the tile prefetches its B values before A's staging where
they fit (gdsl_gemv_tile's PREFETCH: PER x CPT values a thread, PER counted over the chunk), instead of loading
them in its FMA loop behind the barrier. Checked: the tiles of Attention's plan, the switch, the C-family
emulator against numpy for depths that are and are not whole k slices of the tile, and NVRTC."""
import numpy as np
import pytest
from strategies import needs_cxx, needs_nvrtc, zoo_lowered

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import emulator, gemm
from gdsl.backends.cuda import toolchain as cuda_toolchain


def test_attentions_products_stage_their_own_depth(monkeypatch):
    """Every product of Attention's step is 64 deep: each tile stages 64, not 256 (the sibling QKV GEMV, 48 B
    values a thread, still loads them in its loop: more than GEMV_PREFETCH); with the switch off, 256. (a . V is
    not a tile: the second GEMV of the fused q . K^T -> softmax -> a . V, cfamily/gemv_rows.py.)"""
    source = zoo_lowered("attention", 1).source
    assert "gdsl_gemv_tile<1, 64, 256, 64, float, true>(64, 64," in source          # q . K^T, K read along k
    assert source.count("gdsl_gemv_tile<1, 64, 256, 64, float, false>(64, 64,") == 1     # @ W_o
    assert "gdsl_gemv_tile<1, 192, 256, 64, float, false>(192, 64," in source       # x @ [W_q | W_k | W_v]
    assert ", 256, 256, float," not in source
    monkeypatch.setattr(gemm, "SHALLOW_GEMV_CHUNK", False)
    old = zoo_lowered("attention", 1).source
    assert "gdsl_gemv_tile<1, 64, 256, 256, float, true>(64, 64," in old and ", 256, 64, float," not in old


def _product(x, w):
    return gnp.tanh(gnp.matmul(x, w))


@needs_cxx
@pytest.mark.parametrize("k", [64, 40, 7])
def test_emulated_shallow_depths(k):
    """Four uTasks of 16 columns (16 column threads, 16 k slices): k = 64 prefetches (4 B values a thread); 40 and
    7 are not whole k slices: their tiles load in the loop, bounded by k; all match numpy."""
    rng = np.random.default_rng(k)
    x = rng.standard_normal((1, k)).astype(np.float32)
    w = rng.standard_normal((k, 64)).astype(np.float32)
    source = gdsl.jit(_product, backend="cuda").lower(x, w).source
    assert f"gdsl_gemv_tile<1, 16, 256, {k}, float, false>(64, {k}," in source
    got = emulator.emulate(_product, x, w, block=256)
    np.testing.assert_allclose(got, np.tanh(x.astype(np.float64) @ w), rtol=1e-5, atol=1e-5)


@needs_nvrtc
def test_attention_compiles():
    assert cuda_toolchain.compile_cuda(zoo_lowered("attention", 64).source, "sm_90")[:4] == b"\x7fELF"
