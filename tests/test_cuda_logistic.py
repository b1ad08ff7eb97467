"""The CUDA dialect's logistic: 1 / (1 + e^-x) with the SFU's reciprocal (cuda/dialect.py APPROX_LOGISTIC).

Without a GPU: the generated source calls gdsl_logistic (no correctly rounded division, whose slow-path branch
kept ptxas from interleaving a cell's gates) and NVRTC compiles it; with the switch off the table's division
comes back. On a GPU: the values over the whole float range, the ends and NaN included, against float64.
"""
import numpy as np
import pytest
from strategies import needs_nvrtc

import gdsl
from gdsl.backends.cuda import dialect as cuda_dialect
from gdsl.backends.cuda import toolchain as cuda_toolchain


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GDSL_CACHE_DIR", str(tmp_path / "gdsl-cache"))


def cell(x, c):
    """Two gates and a state update: the independent logistic calls of one element."""
    i, f = gdsl.nn.sigmoid(x[0]), gdsl.nn.sigmoid(x[1])
    return f * c + i * gdsl.numpy.tanh(x[2])


def inputs():
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    return x, np.ones(64, np.float32)


@needs_nvrtc
@pytest.mark.parametrize("approx", [True, False])
def test_logistic_source(approx, monkeypatch):
    monkeypatch.setattr(cuda_dialect, "APPROX_LOGISTIC", approx)
    source = gdsl.jit(cell, backend="cuda").lower(*inputs()).source
    assert source.count("gdsl_logistic(") == (3 if approx else 1)       # the header's definition, then the calls
    assert ("(1.0f / (1.0f + expf(-" in source) != approx
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"


@pytest.mark.gpu
def test_gpu_logistic_within_a_few_ulp():
    edges = np.array([-np.inf, -1e30, -100.0, -88.0, -87.5, -87.0, -80.0, -20.0, -1e-8, 0.0, 1e-8, 0.5, 20.0,
                      100.0, np.inf, np.nan], np.float32)
    x = np.concatenate([edges, np.linspace(-90, 90, 4096, dtype=np.float32)])
    got = gdsl.to_numpy(gdsl.jit(gdsl.nn.sigmoid, backend="cuda")(x))
    want = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    ulp = np.spacing(want[ok].astype(np.float32)).astype(np.float64)
    err = np.abs(got[ok] - want[ok])
    # within 4 ulp of the float64 value, or a result under float32's normal range flushed to 0 (x < -87.3)
    assert np.all((err <= 4 * ulp) | ((want[ok] < np.finfo(np.float32).tiny) & (got[ok] == 0)))
