"""jit options that act at trace time (unroll) and the autotuner."""
import json

import numpy as np
import pytest
from strategies import requires_backend

import gdsl
import gdsl.numpy as gnp


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 8, 11])
@pytest.mark.parametrize("unroll", [2, 4])
def test_unrolled_fori_loop_matches(n, unroll):
    def f(x, n):
        return gdsl.fori_loop(0, n, lambda i, x: x * 2.0 + gnp.astype(i, gdsl.float32), x)
    x = np.float32(1.5)
    expected = gdsl.jit(f, backend="interpret")(x, n)
    jitted = gdsl.jit(f, backend="interpret", unroll=unroll)
    assert gdsl.to_numpy(jitted(x, n)) == gdsl.to_numpy(expected)
    # k bodies per iteration of the main loop, and a remainder loop
    assert jitted.lower(x, n).ir.count("while[") == 2


@requires_backend("cpu")
def test_autotune_picks_a_correct_candidate_and_caches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("GDSL_CACHE_DIR", str(tmp_path))

    def f(x, n):
        return gdsl.fori_loop(0, n, lambda i, x: gnp.tanh(x @ x), x)
    x = (np.random.default_rng(0).standard_normal((8, 8)) * 0.3).astype(np.float32)
    tuned = gdsl.jit(f, backend="cpu", autotune=True)
    assert tuned.lower(x, 3).autotune_choice is None           # no search before the first call
    got = gdsl.to_numpy(tuned(x, 3))
    np.testing.assert_allclose(got, gdsl.jit(f, backend="interpret")(x, 3), rtol=1e-5, atol=1e-6)
    cache = json.loads((tmp_path / "autotune.json").read_text())
    (chosen,) = cache.values()
    assert chosen["control"] in ("device", "host")
    assert tuned.lower(x, 3).autotune_choice == chosen          # what runs, and its plan, is the winner's
    assert gdsl.jit(f, backend="cpu").lower(x, 3).autotune_choice is None
    # a new jit object finds the winner on disk: it lowers once (no search)
    again = gdsl.jit(f, backend="cpu", autotune=True)
    calls = []
    import gdsl.backends.cpu as cpu
    original = cpu.lower
    monkeypatch.setattr(cpu, "lower", lambda p, o: calls.append(o) or original(p, o))
    np.testing.assert_allclose(gdsl.to_numpy(again(x, 3)), got)
    assert len(calls) == 2 and calls[-1] == chosen   # the jit's own lowering, then the cached winner's
