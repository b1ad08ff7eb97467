"""Uniform reductions computed by each vEU's threads together (gdsl/backends/cfamily/reductions.py's
cooperative_reduction, past UNROLL_MAX elements; up to scheduler.UNIFORM_REDUCTION_MAX_INPUT = 8192): Seq2seq
bs1's argmax over 3797 logits is a uniform (no op a step; under a bound of 64 it was an op on one vEU); sums,
maxima, minima, argmax and argmin over 3797 elements give the interpreter's results on the emulator (NaN and ties
included), and NVRTC compiles Seq2seq bs1 that way."""
import numpy as np
import pytest
from strategies import assert_trees_close, cuda_lowering, emulated, interpreted, needs_cxx, needs_nvrtc, zoo_lowered

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.schedule import scheduler


def _scalars(x, y):
    """Reductions of a long vector to scalars, used as uniforms: an index and a scale."""
    i = gnp.argmax(x)
    return i, gnp.argmin(x), gnp.sum(x), gnp.max(x), gnp.min(x), y[i] * gnp.max(x)


def _args(nan=False):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(3797).astype(np.float32)
    x[[17, 2900]] = x.max() + 1.0                      # a tie: the first index wins
    if nan:
        x[1234] = np.nan
    return x, rng.standard_normal(3797).astype(np.float32)


def test_seq2seq_argmax_is_a_uniform_and_an_op_under_a_bound_of_64(monkeypatch):
    assert scheduler.UNIFORM_REDUCTION_MAX_INPUT == 8192
    lowered = zoo_lowered("seq2seq", 1)
    text = str(lowered.lowering.plan)
    assert "    every vEU: u17 = argmax t16" in text and "_argmax(" not in text
    assert "gdsl_block_argreduce<256>(v, k, better, gdsl_smem);" in lowered.source
    monkeypatch.setattr(scheduler, "UNIFORM_REDUCTION_MAX_INPUT", 64)
    text = str(zoo_lowered("seq2seq", 1).lowering.plan)
    assert "= op9_argmax(t16)" in text and "= argmax t16" not in text


@needs_cxx
@pytest.mark.parametrize("nan", [False, True])
def test_emulated_matches_the_interpreter(nan):
    args = _args(nan)
    plan = cuda_lowering(_scalars, args).plan
    assert str(plan).count("every vEU") >= 1 and "argmax in0" in str(plan)
    expected = interpreted(gdsl.make_ir(_scalars)(*args), list(args))
    got = emulated(_scalars, args)
    assert_trees_close(got, expected)
    assert int(got[0]) == (1234 if nan else 17)


@needs_nvrtc
def test_seq2seq_compiles():
    assert cuda_toolchain.compile_cuda(zoo_lowered("seq2seq", 1).source, "sm_90")[:4] == b"\x7fELF"
