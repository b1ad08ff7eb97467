"""Random programs with nested control flow (strategies.programs): the interpreter under jit against the same
function run eagerly, plus the properties later backends rely on (every program traces, type-checks, prints
its control flow and runs to finite results), and a check that `check_backend` itself can fail."""
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import CONSTRUCTS, FLOAT_CONTROL, assert_trees_close, bf16, check_backend, f16, f32, programs

import gdsl
from gdsl import backends as backend_registry
from gdsl.core.typecheck import typecheck_program

KEYWORDS = {"while": "= while[", "fori": "= while[", "cond": "= cond[", "switch": "= cond[",
            "recurse": "= recurse["}


@pytest.mark.parametrize("constructs", [CONSTRUCTS] + [(c,) for c in CONSTRUCTS],
                         ids=["all"] + list(CONSTRUCTS))
@given(data=st.data())
def test_jit_interpret_matches_eager(constructs, data):
    """Eager-compatible programs (f32 and f16; bfloat16 is left out because numpy's own operators on
    ml_dtypes arrays do not keep Python scalars weak, so eager bfloat16 code is not gdsl semantics)."""
    prog = data.draw(programs(eager_compatible=True, constructs=constructs, dtypes=(f32, f16)))
    expected = prog.fn(*prog.args)
    got = gdsl.jit(prog.fn, backend="interpret")(*prog.args)
    # The same numpy rules run in the same order: the results must be bit-identical.
    assert_trees_close(got, expected, exact=True)


@given(prog=programs(dtypes=(f32, f16, bf16)))
def test_random_programs_trace_typecheck_print_and_run(prog):
    """Full-feature programs (traced-array features included), as later backends will draw them."""
    program = gdsl.make_ir(prog.fn)(*prog.args)
    typecheck_program(program)
    text = str(program)
    for construct in prog.constructs:
        assert KEYWORDS[construct] in text, f"{construct} missing from the printed IR:\n{text}"
    first = check_backend(prog.fn, prog.args, "interpret")  # the reuse path, here against itself
    for leaf in gdsl.tree_flatten(first)[0]:
        assert np.all(np.isfinite(np.asarray(leaf, np.float64))), "programs must keep values finite"


@settings(max_examples=10)
@given(prog=programs(max_depth=2))
def test_jit_cache_reuses_compiled_random_program(prog):
    jitted = gdsl.jit(prog.fn, backend="interpret")
    a = jitted(*prog.args)
    b = jitted(*prog.args)
    assert jitted.trace_count == 1
    assert_trees_close(a, b, exact=True)


# ----------------------------------------------------------------------------------------------------------
# check_backend must be able to fail: a fake backend that is subtly wrong


def _install_fake_backend(monkeypatch, perturb):
    """Registers `gdsl.backends.fake`: the interpreter with `perturb` applied to every result."""
    from gdsl.backends import interpret
    module = types.ModuleType("gdsl.backends.fake")
    module.KNOWN_OPTIONS = interpret.KNOWN_OPTIONS
    module.unavailable_reason = lambda: None
    module.lower = interpret.lower
    module.to_device = interpret.to_device

    def load(lowering):
        run = interpret.load(lowering)
        return lambda flat: [perturb(np.asarray(x)) for x in run(flat)]
    module.load = load
    monkeypatch.setitem(sys.modules, "gdsl.backends.fake", module)
    monkeypatch.setattr(backend_registry, "ALL_BACKENDS", backend_registry.ALL_BACKENDS + ("fake",))
    backend_registry.unavailable_reason.cache_clear()


@pytest.fixture
def fake_backend(monkeypatch):
    yield lambda perturb: _install_fake_backend(monkeypatch, perturb)
    backend_registry.unavailable_reason.cache_clear()


def _program():
    def fn(x, n):
        return gdsl.fori_loop(0, n, lambda i, h: gdsl.numpy.tanh(h * 1.5 + 0.1), x), n * 2
    return fn, (np.linspace(-1, 1, 4).astype(np.float32), np.int32(3))


def test_check_backend_accepts_a_correct_backend(fake_backend):
    fake_backend(lambda x: x)
    fn, args = _program()
    check_backend(fn, args, "fake")


@pytest.mark.parametrize("perturb", [
    lambda x: x + np.asarray(1e-2, x.dtype) if x.dtype.kind == "f" else x,      # float values off
    lambda x: x + 1 if x.dtype.kind == "i" else x,                             # int values off
    lambda x: x.astype(np.float16) if x.dtype == np.float32 else x,            # wrong dtype
    lambda x: x.reshape(1, -1) if x.ndim == 1 else x,                          # wrong shape
], ids=["float", "int", "dtype", "shape"])
def test_check_backend_detects_a_wrong_backend(fake_backend, perturb):
    fake_backend(perturb)
    fn, args = _program()
    with pytest.raises(AssertionError):
        check_backend(fn, args, "fake")


def test_check_backend_requires_recursion_depth_errors(fake_backend):
    """Where the interpreter raises RecursionDepthError the backend must too (not return a value)."""
    fake_backend(lambda x: x)

    @gdsl.recurse(result=gdsl.ShapeDtype((), gdsl.int32), max_depth=3)
    def count(n):
        return gdsl.cond(n <= 0, lambda: n, lambda: count(n - 1) + 1)

    # Backend "fake" shares the interpreter, so it raises too: check_backend passes ...
    assert check_backend(lambda n: count(n), (np.int32(5),), "fake") is None
    # ... but a backend that silently returns a value fails the check.
    sys.modules["gdsl.backends.fake"].load = lambda lowering: (lambda flat: [np.zeros((), np.int32)])
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        check_backend(lambda n: count(n), (np.int32(5),), "fake")


@pytest.mark.parametrize("backend", ["cpu", "cuda", "hip"])
@settings(max_examples=max(5, settings.default.max_examples // 2))
@given(data=st.data())
def test_backend_matches_interpreter_on_random_programs(backend, data):
    """Every backend usable here against the interpreter (each backend's own tests add its options). float16
    and bfloat16 programs take their control decisions on integers only (float_control=False), so that a
    last-bit difference cannot send the backend down another path than the interpreter."""
    if backend not in gdsl.backends():
        pytest.skip(f"backend {backend!r} is not usable here")
    if data.draw(st.booleans()):
        prog = data.draw(programs(dtypes=(f32,)))
    else:
        prog = data.draw(programs(dtypes=(f16, bf16), float_control=False))
    check_backend(prog.fn, prog.args, backend)


@settings(max_examples=10)
@given(prog=programs(float_control=False, max_depth=3, max_statements=4))
def test_float_control_false_keeps_decisions_on_integers(prog):
    for text in FLOAT_CONTROL:
        assert text not in prog.source
