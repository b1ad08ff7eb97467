"""Reductions whose lanes load several elements before folding them (gdsl/backends/cfamily/reductions.py's switch
LANE_LOAD_BATCH, 8 by default): sums, maxima, minima, argmax and argmin over long rows (one row a block) and short
ones (a lane group a row), NaNs and ties included, give the same bits as one element at a time on the emulator, and
NVRTC compiles them."""
import numpy as np
import pytest
from strategies import cuda_lowering, emulated, needs_cxx, needs_nvrtc

import gdsl.numpy as gnp
from gdsl.backends.cfamily import reductions
from gdsl.backends.cuda import toolchain as cuda_toolchain


def _reductions(x, y):
    """One long row (3797: Seq2seq's logits) and 40 short rows of 37, each reduced every way."""
    return (gnp.sum(x), gnp.max(x), gnp.min(x), gnp.argmax(x), gnp.argmin(x),
            gnp.sum(y, axis=1), gnp.max(y, axis=1), gnp.argmax(y, axis=1), gnp.argmin(y, axis=1))


def _args():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(3797).astype(np.float32)
    x[[5, 3000]] = x.max() + 1.0                          # a tie for the maximum: the first index wins
    y = np.round(rng.standard_normal((40, 37)), 1).astype(np.float32)   # ties within rows
    y[3, 7] = np.nan                                                    # NaN wins argmax and argmin
    return x, y


def test_the_default_loads_eight_elements_a_lane_and_off_is_one_at_a_time(monkeypatch):
    assert reductions.LANE_LOAD_BATCH == 8
    assert "float xs[8];" in cuda_lowering(_reductions, _args()).source
    monkeypatch.setattr(reductions, "LANE_LOAD_BATCH", 0)
    assert "xs[" not in cuda_lowering(_reductions, _args()).source


@needs_cxx
@pytest.mark.parametrize("batch", [2, 8])
def test_batched_loads_give_the_same_bits(monkeypatch, batch):
    args = _args()
    monkeypatch.setattr(reductions, "LANE_LOAD_BATCH", 0)
    before = emulated(_reductions, args)
    monkeypatch.setattr(reductions, "LANE_LOAD_BATCH", batch)
    after = emulated(_reductions, args)
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert after[3] == 5 and after[7][3] == 7 and after[8][3] == 7


@needs_nvrtc
def test_batched_loads_compile(monkeypatch):
    monkeypatch.setattr(reductions, "LANE_LOAD_BATCH", 8)
    source = cuda_lowering(_reductions, _args()).source
    assert "float xs[8];" in source
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"
