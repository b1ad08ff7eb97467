"""The IR: golden text of printed programs, the type checker (accepts what tracing builds, rejects broken IR),
and immutability.

Golden files live in tests/golden/*.txt; regenerate them with GDSL_UPDATE_GOLDEN=1 (then review the diff).
"""
import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

import gdsl
import gdsl.numpy as gnp
from gdsl.core import typecheck
from gdsl.core.ir import Eqn, FunctionDef, Jaxpr, Lit, Program, ShapedArray, Var, walk_eqns
from gdsl.core.typecheck import typecheck_jaxpr, typecheck_program
from gdsl.primitives import REGISTRY

GOLDEN = Path(__file__).parent / "golden"
W = (np.arange(9, dtype=np.float32).reshape(3, 3) - 4) / 8


def while_program(x, n):
    """A while loop whose cond closes over a traced argument and whose body closes over a numpy constant."""
    def cond(s):
        return s[0] < n

    def body(s):
        i, h = s
        return i + 1, gnp.tanh(h @ W)
    return gdsl.while_loop(cond, body, (0, x))


def cond_program(x, y):
    """A cond with operands, branches closing over different outer values (the union is passed to both)."""
    return gdsl.cond(gnp.sum(x) > 0, lambda v: v * 2.0 + y, lambda v: gnp.maximum(v, W[0]), x)


def recursive_program(tree, root, emb, Wt, b):
    left, right, is_leaf, word = tree

    @gdsl.recurse(result=gdsl.ShapeDtype((2,), gdsl.float32), max_depth=16)
    def encode(node):
        return gdsl.cond(is_leaf[node], lambda: emb[word[node]],
                         lambda: gnp.tanh(gnp.concatenate([encode(left[node]), encode(right[node])]) @ Wt + b))
    return encode(root)


TREE = (np.array([0, 0, 0, 0, 1], np.int32), np.array([0, 0, 0, 2, 3], np.int32),
        np.array([True, True, True, False, False]), np.array([0, 1, 2, 0, 0], np.int32))
CASES = {
    "while": (while_program, (np.ones(3, np.float32), np.int32(4))),
    "cond": (cond_program, (np.ones(3, np.float32), np.float32(0.5))),
    "recurse": (recursive_program, (TREE, np.int32(4), np.ones((3, 2), np.float32), np.ones((4, 2), np.float32),
                                    np.zeros(2, np.float32))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_ir(name):
    fn, args = CASES[name]
    text = str(gdsl.make_ir(fn)(*args)) + "\n"
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("GDSL_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with GDSL_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"printed IR of {name} changed; if intended, regenerate with " \
                                     f"GDSL_UPDATE_GOLDEN=1 and review the diff:\n{text}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_printing_is_deterministic_and_lowered_ir_matches(name):
    fn, args = CASES[name]
    assert str(gdsl.make_ir(fn)(*args)) == str(gdsl.make_ir(fn)(*args))
    assert gdsl.jit(fn, backend="interpret").lower(*args).ir == str(gdsl.make_ir(fn)(*args))


def test_golden_programs_run():
    """The golden programs compute what they say (so the golden text is of a correct program)."""
    x = np.ones(3, np.float32)
    _, h = gdsl.jit(while_program, backend="interpret")(x, np.int32(4))
    ref = x
    for _ in range(4):
        ref = np.tanh(ref @ W)
    np.testing.assert_allclose(h, ref, rtol=1e-6)
    out = gdsl.jit(cond_program, backend="interpret")(-x, np.float32(0.5))
    np.testing.assert_allclose(out, np.maximum(-x, W[0]))


# ----------------------------------------------------------------------------------------------------------
# the type checker


def test_gdsl_check_is_on_for_the_suite(monkeypatch):
    """conftest sets GDSL_CHECK=1, so every program traced by the suite goes through the type checker."""
    assert os.environ.get("GDSL_CHECK") == "1"
    calls = []
    real = typecheck.typecheck_program
    monkeypatch.setattr(typecheck, "typecheck_program", lambda p: (calls.append(p), real(p))[1])
    gdsl.jit(while_program, backend="interpret")(np.ones(3, np.float32), np.int32(2))
    assert len(calls) == 1


@pytest.mark.parametrize("name", sorted(CASES))
def test_typechecker_accepts_traced_programs(name):
    fn, args = CASES[name]
    typecheck_program(gdsl.make_ir(fn)(*args))


def _f32(*shape):
    return ShapedArray(tuple(shape), np.dtype(np.float32))


def test_typechecker_rejects_wrong_out_aval():
    x = Var(_f32(3))
    bad = Var(_f32(4))  # add of two f32[3] is f32[3]
    jaxpr = Jaxpr((x,), (Eqn(REGISTRY["add"], (x, x), {}, (bad,)),), (bad,))
    with pytest.raises(typecheck.IRTypeError, match="add"):
        typecheck_jaxpr(jaxpr)
    wrong_dtype = Var(ShapedArray((3,), np.dtype(np.int32)))
    with pytest.raises(typecheck.IRTypeError):
        typecheck_jaxpr(Jaxpr((x,), (Eqn(REGISTRY["add"], (x, x), {}, (wrong_dtype,)),), (wrong_dtype,)))


def test_typechecker_rejects_unbound_variables():
    x, stray = Var(_f32(3)), Var(_f32(3))
    out = Var(_f32(3))
    with pytest.raises(typecheck.IRTypeError, match="bound"):
        typecheck_jaxpr(Jaxpr((x,), (Eqn(REGISTRY["add"], (x, stray), {}, (out,)),), (out,)))
    with pytest.raises(typecheck.IRTypeError, match="bound"):
        typecheck_jaxpr(Jaxpr((x,), (), (stray,)))
    # used before its equation binds it
    y = Var(_f32(3))
    eqns = (Eqn(REGISTRY["mul"], (y, x), {}, (out,)), Eqn(REGISTRY["add"], (x, x), {}, (y,)))
    with pytest.raises(typecheck.IRTypeError, match="bound"):
        typecheck_jaxpr(Jaxpr((x,), eqns, (out,)))


def test_typechecker_rejects_reads_from_an_enclosing_jaxpr():
    """Sub-programs are closed: a loop body may not read the outer program's variables."""
    program = gdsl.make_ir(while_program)(np.ones(3, np.float32), np.int32(2))
    eqn = next(e for e in program.jaxpr.eqns if e.primitive.name == "while")
    body = eqn.params["body_jaxpr"]
    outer_var = program.jaxpr.in_binders[-1]  # `n`, which only cond's consts may see
    leaky_eqn = Eqn(REGISTRY["add"], (body.in_binders[-2], outer_var), {}, (Var(body.in_binders[-2].aval),))
    leaky = dataclasses.replace(body, eqns=(leaky_eqn,) + body.eqns)
    params = dict(eqn.params, body_jaxpr=leaky)
    broken = dataclasses.replace(program.jaxpr, eqns=tuple(
        dataclasses.replace(e, params=params) if e is eqn else e for e in program.jaxpr.eqns))
    with pytest.raises(typecheck.IRTypeError):
        typecheck_program(dataclasses.replace(program, jaxpr=broken))


def test_typechecker_rejects_recurse_call_outside_its_function():
    program = gdsl.make_ir(recursive_program)(*CASES["recurse"][1])
    call = next(e for e in walk_eqns(program.jaxpr) if e.primitive.name == "recurse_call")
    args = tuple(Var(a) for a in call.params["arg_avals"])
    outs = tuple(Var(a) for a in call.params["result"])
    stray = Jaxpr(args, (Eqn(call.primitive, args, dict(call.params), outs),), outs)
    with pytest.raises(typecheck.IRTypeError, match="outside"):
        typecheck_jaxpr(stray)


def _recursive_ir(call_result):
    """main(n) = recurse f(n); f's body calls f(node) claiming result `call_result`, then keeps 2 elements."""
    i32 = ShapedArray((), np.dtype(np.int32))
    node, call_out, ret = Var(i32), Var(call_result), Var(_f32(2))
    call = Eqn(REGISTRY["recurse_call"], (node,), {"name": "f", "arg_avals": (i32,), "result": (call_result,)},
               (call_out,))
    keep = Eqn(REGISTRY["slice"], (call_out,), {"start": (0,), "limit": (2,), "step": (1,)}, (ret,))
    fn = FunctionDef("f", Jaxpr((node,), (call, keep) if call_result.shape != (2,) else (call,),
                                (ret,) if call_result.shape != (2,) else (call_out,)), 0, 4)
    arg, out = Var(i32), Var(_f32(2))
    return Jaxpr((arg,), (Eqn(REGISTRY["recurse"], (arg,), {"fn": fn}, (out,)),), (out,))


def test_typechecker_rejects_recurse_call_with_wrong_types():
    typecheck_jaxpr(_recursive_ir(_f32(2)))  # the well-typed version passes
    with pytest.raises(typecheck.IRTypeError, match="differ"):
        typecheck_jaxpr(_recursive_ir(_f32(5)))


def test_typechecker_rejects_bad_consts_and_literals():
    program = gdsl.make_ir(while_program)(np.ones(3, np.float32), np.int32(2))
    assert program.nconsts >= 1
    bad_consts = tuple(c.astype(np.float16) if c.dtype == np.float32 else c for c in program.consts)
    with pytest.raises(typecheck.IRTypeError, match="const"):
        typecheck_program(dataclasses.replace(program, consts=bad_consts))
    x = Var(_f32())
    lit = Lit(np.float16(1), _f32())  # value dtype disagrees with its type
    out = Var(_f32())
    with pytest.raises(typecheck.IRTypeError, match="literal"):
        typecheck_jaxpr(Jaxpr((x,), (Eqn(REGISTRY["add"], (x, lit), {}, (out,)),), (out,)))


def test_typechecker_rejects_a_variable_bound_twice():
    x = Var(_f32(3))
    y = Var(_f32(3))
    eqns = (Eqn(REGISTRY["add"], (x, x), {}, (y,)), Eqn(REGISTRY["mul"], (x, x), {}, (y,)))
    with pytest.raises(typecheck.IRTypeError, match="twice"):
        typecheck_jaxpr(Jaxpr((x,), eqns, (y,)))


# ----------------------------------------------------------------------------------------------------------
# immutability


def test_ir_is_immutable():
    program = gdsl.make_ir(recursive_program)(*CASES["recurse"][1])
    entry = next(e for e in program.jaxpr.eqns if e.primitive.name == "recurse")
    objects = [program, program.jaxpr, entry, entry.params["fn"], program.jaxpr.in_binders[0].aval,
               gdsl.ShapeDtype((1,), gdsl.float32)]
    lits = [a for e in walk_eqns(program.jaxpr) for a in e.inputs if isinstance(a, Lit)]
    assert lits, "the recursive program has literals (node - 1 style constants)"
    for obj in objects + lits[:1]:
        field = dataclasses.fields(obj)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, field, None)
    with pytest.raises(AttributeError):
        program.jaxpr.in_binders[0].aval = _f32(1)
    assert isinstance(program.jaxpr.eqns, tuple) and isinstance(program.jaxpr.in_binders, tuple)
    assert all(isinstance(e.outs, tuple) and isinstance(e.inputs, tuple) for e in walk_eqns(program.jaxpr))


def test_no_ir_object_contains_itself():
    """A recursive function is named by its calls, not contained: walking the IR terminates."""
    program = gdsl.make_ir(recursive_program)(*CASES["recurse"][1])
    names = [e.params["name"] for e in walk_eqns(program.jaxpr) if e.primitive.name == "recurse_call"]
    assert names and set(names) == {"encode"}
    assert isinstance(program, Program)
