"""The primitive registry has no gaps: every primitive has its shape rule and numpy rule, and every backend
has a lowering rule for every op kind.

Backend contract checked here (never skipped: importing a backend needs no device):
- each backend module `gdsl.backends.NAME` (cpu, cuda, hip) exposes ELEMENTWISE_TABLE (its dialect's
  elementwise table, one row per elementwise primitive) and LOWERING_CHAIN (the backend names its rules are
  looked up under, gdsl.primitives.registry.lowering_rule);
- every op kind (primitives and the scheduler's "fused" and "copy") but control flow has a "utask" rule on
  each backend, and every kind marked uniform a "uniform" rule, or is an elementwise primitive of the table;
- every primitive of the registry, control flow included, has a sample program (SAMPLES below: a new
  primitive without a sample fails test_samples_cover_the_registry), every backend lowers each sample, and
  where usable here computes what the interpreter computes.
"""
import importlib

import numpy as np
import pytest
from strategies import check_backend

import gdsl
import gdsl.nn
import gdsl.numpy as gnp
from gdsl.core.ir import ShapedArray, walk_eqns
from gdsl.primitives import REGISTRY, Primitive
from gdsl.primitives import elementwise as ew
from gdsl.primitives.registry import (
    CONTROL,
    ELEMENTWISE,
    FAMILIES,
    GATHER,
    LOWERINGS,
    OP_KINDS,
    OpKind,
    has_lowering,
    lowering_rule,
)
from gdsl.tracing.trace import bind1


def missing_rules(registry) -> list[str]:
    """'name: what is missing' for every primitive of `registry` lacking a rule."""
    gaps = []
    for name, prim in registry.items():
        if not isinstance(prim, Primitive) or prim.name != name:
            gaps.append(f"{name}: registered under another name or not a Primitive")
            continue
        if not callable(prim.abstract_eval):
            gaps.append(f"{name}: no abstract_eval (shape/dtype rule)")
        if not callable(prim.impl):
            gaps.append(f"{name}: no impl (numpy rule)")
        if prim.family not in FAMILIES:
            gaps.append(f"{name}: unknown family {prim.family!r}")
    return gaps


def test_every_primitive_has_both_rules():
    assert len(REGISTRY) > 40
    assert missing_rules(REGISTRY) == []


def test_the_registry_walk_finds_gaps():
    """The walk above can fail: a primitive declared without rules is reported."""
    fake = dict(REGISTRY)
    fake["mystery"] = Primitive("mystery", "elementwise")
    fake["half"] = Primitive("half", "reduce", abstract_eval=lambda x: [x])
    assert missing_rules(fake) == ["mystery: no abstract_eval (shape/dtype rule)", "mystery: no impl (numpy rule)",
                                   "half: no impl (numpy rule)"]


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError):
        gdsl.primitives.primitive("add", "elementwise")


def test_rules_return_lists():
    """Rules take arrays positionally and return lists (STYLE: every rule returns a list)."""
    f32 = ShapedArray((2, 3), np.dtype(np.float32))
    for name, prim in REGISTRY.items():
        if prim.family != "elementwise":
            continue
        avals = [ShapedArray((2, 3), np.dtype(np.bool_))] + [f32, f32] if name == "select" else \
            [f32] * getattr(prim, "arity", 1)
        params = {"new_dtype": np.dtype(np.int32)} if name == "convert_element_type" else {}
        if name == "not" or name in ("and", "or"):
            avals = [ShapedArray((2, 3), np.dtype(np.int32))] * prim.arity
        out = prim.abstract_eval(*avals, **params)
        assert isinstance(out, list) and all(isinstance(a, ShapedArray) for a in out), name
        values = [np.ones(a.shape, a.dtype) for a in avals]
        result = prim.impl(*values, **params)
        assert isinstance(result, list) and len(result) == len(out), name
        assert np.asarray(result[0]).shape == out[0].shape, name


def test_elementwise_primitives_come_from_the_table():
    for name in list(ew.UNARY) + list(ew.BINARY):
        prim = REGISTRY[name]
        assert prim.family == "elementwise"
        assert prim.arity == (1 if name in ew.UNARY else 2)


# ----------------------------------------------------------------------------------------------------------
# backends: their elementwise tables, and every primitive run through each built backend

BACKENDS = ("cpu", "cuda", "hip")


def _backend(name):
    """The backend's module: importing it needs no device, so a failure here is a real error, never a skip."""
    return importlib.import_module(f"gdsl.backends.{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_elementwise_table_covers_the_core_table(backend):
    """One elementwise table per dialect, with a row for every row of the core elementwise table (and select;
    convert_element_type may be a rule instead: the walk below checks it)."""
    table = _backend(backend).ELEMENTWISE_TABLE
    required = set(ew.UNARY) | set(ew.BINARY) | {ew.select_p.name}
    assert sorted(required - set(table)) == []
    assert sorted(set(table) - set(REGISTRY)) == [], "entries for primitives the registry does not know"


def missing_lowerings(table, chain) -> list[str]:
    """'kind: role' for every op kind that has no rule in `chain` (elementwise primitives: none in `table`)."""
    gaps = []
    for name, kind in sorted(OP_KINDS.items()):
        if kind.family == CONTROL:      # loops, branches and calls are plan nodes, rendered by the renderer
            continue
        if kind.optional:               # the scheduler makes it only where the backend has its rule
            continue
        covered = kind.family == ELEMENTWISE and name in table
        if not covered and not has_lowering(name, chain, "utask"):
            gaps.append(f"{name}: utask")
        if kind.uniform and not covered and not has_lowering(name, chain, "uniform"):
            gaps.append(f"{name}: uniform")
    return gaps


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_op_kind_has_a_rule_on_every_backend(backend):
    module = _backend(backend)
    assert missing_lowerings(module.ELEMENTWISE_TABLE, module.LOWERING_CHAIN) == []


def test_optional_kinds_have_a_rule_on_the_c_family_backends():
    """The scheduler's optional kinds (row chains) are made for cuda and hip: they have the rules."""
    optional = [name for name, kind in OP_KINDS.items() if kind.optional]
    assert optional
    for backend in ("cuda", "hip"):
        module = _backend(backend)
        assert all(has_lowering(name, module.LOWERING_CHAIN, "utask") for name in optional)


def test_a_missing_rule_is_found_and_named(monkeypatch):
    """The walk above can fail, and a lookup of a kind without a rule names the kind and the backend."""
    monkeypatch.setitem(OP_KINDS, "mystery", OpKind("mystery", GATHER, uniform=True))
    module = _backend("cpu")
    assert missing_lowerings(module.ELEMENTWISE_TABLE, module.LOWERING_CHAIN) == ["mystery: utask",
                                                                                  "mystery: uniform"]
    with pytest.raises(NotImplementedError, match="'mystery'.*'cpu'"):
        lowering_rule("mystery", module.LOWERING_CHAIN)


def test_a_dialect_rule_overrides_the_shared_one(monkeypatch):
    """A rule registered under a dialect's name wins over the shared C-family rule for that dialect only."""
    hip, cuda = _backend("hip"), _backend("cuda")
    shared = lowering_rule("matmul", cuda.LOWERING_CHAIN)
    monkeypatch.setitem(LOWERINGS, (hip.LOWERING_CHAIN[0], "utask", "matmul"), "hip's own")
    assert lowering_rule("matmul", hip.LOWERING_CHAIN) == "hip's own"
    assert lowering_rule("matmul", cuda.LOWERING_CHAIN) is shared


def _bind(name, *args, **params):
    return bind1(REGISTRY[name], *args, **params)


_F = np.linspace(-1.5, 2, 6, dtype=np.float32).reshape(2, 3)
_P = np.linspace(0.5, 3, 6, dtype=np.float32).reshape(2, 3)   # positive: log, sqrt, rsqrt
_I = np.array([[7, -7, 3], [0, 5, -2]], np.int32)
_J = np.array([[2, 2, -2], [3, -1, 1]], np.int32)
_B = np.array([[True, False, True], [False, False, True]])
_IMG = np.linspace(-1, 1, 2 * 3 * 5 * 5, dtype=np.float32).reshape(2, 3, 5, 5)
_KER = np.linspace(-0.5, 0.5, 4 * 3 * 3 * 3, dtype=np.float32).reshape(4, 3, 3, 3)


def _recursive_sum(n):
    @gdsl.recurse(result=gdsl.ShapeDtype((), gdsl.int32), max_depth=16)
    def total(k):
        return gdsl.cond(k <= 0, lambda: k, lambda: total(k - 1) + k)
    return total(n)


# primitive name -> (function, arguments): a small program that contains the primitive.
SAMPLES = {
    **{name: (lambda x, name=name: _bind(name, x), (_P if name in ("log", "sqrt", "rsqrt") else _F,))
       for name in ew.UNARY if name != "not"},
    "not": (lambda x, b: (_bind("not", x), _bind("not", b)), (_I, _B)),
    **{name: (lambda x, y, name=name: _bind(name, x, y), (_F, _P)) for name in ew.BINARY
       if name not in ("and", "or")},
    "floor_divide": (lambda a, b, x, y: (gnp.floor_divide(a, b), gnp.floor_divide(x, y)), (_I, _J, _F, _P)),
    "rem": (lambda a, b, x, y: (gnp.remainder(a, b), gnp.remainder(x, y)), (_I, _J, _F, _P)),
    "pow": (lambda a, b, x, y: (gnp.power(a, gnp.abs(b)), gnp.power(y, x)), (_I, _J, _F, _P)),
    "and": (lambda a, b, p: (a & b, p & ~p), (_I, _J, _B)),
    "or": (lambda a, b, p: (a | b, p | ~p), (_I, _J, _B)),
    "select": (lambda p, x, y: gnp.where(p, x, y), (_B, _F, _P)),
    "convert_element_type": (lambda x, i: (x.astype(gdsl.int32), i.astype(gdsl.float16), x.astype(gdsl.bool_)),
                             (_F, _I)),
    "reduce_sum": (lambda x, i: (gnp.sum(x, axis=1), gnp.sum(i)), (_F, _I)),
    "reduce_max": (lambda x: gnp.max(x, axis=0), (_F,)),
    "reduce_min": (lambda x: gnp.min(x, axis=1), (_F,)),
    "argmax": (lambda x: gnp.argmax(x, axis=1), (_F,)),
    "argmin": (lambda x: gnp.argmin(x), (_F,)),
    "matmul": (lambda x, y: x @ y.T, (_F, _P)),
    "conv2d": (lambda x, w: gdsl.nn.conv2d(x, w, stride=2, padding=1), (_IMG, _KER)),
    "avg_pool2d": (lambda x: gdsl.nn.avg_pool2d(x, 3, 2, 1), (_IMG,)),
    "max_pool2d": (lambda x: gdsl.nn.max_pool2d(x, 2), (_IMG,)),
    "reshape": (lambda x: x.reshape(3, 2) * 2, (_F,)),
    "transpose": (lambda x: x.T, (_F,)),
    "broadcast_to": (lambda x: gnp.broadcast_to(x[0], (4, 3)), (_F,)),
    "concatenate": (lambda x, y: gnp.concatenate([x, y], axis=1), (_F, _P)),
    "slice": (lambda x: x[:, 1:3], (_F,)),
    "dynamic_slice": (lambda x, i: x[i], (_F, np.int32(1))),
    "dynamic_update_slice": (lambda x, i: x.at[i].set(5.0), (_F, np.int32(1))),
    "take": (lambda x, idx: gnp.take(x, idx, axis=1), (_F, np.array([2, 0, 2], np.int32))),
    "iota": (lambda x: x + gnp.arange(3, dtype=gdsl.float32), (_F,)),
    "while": (lambda x, n: gdsl.fori_loop(0, n, lambda i, v: v * 0.5 + 1, x), (_F, np.int32(3))),
    "cond": (lambda x, p: gdsl.cond(p, lambda: x * 2, lambda: x - 1), (_F, np.bool_(True))),
    "recurse": (_recursive_sum, (np.int32(5),)),
    "recurse_call": (_recursive_sum, (np.int32(5),)),
}


def test_samples_cover_the_registry():
    """Every primitive has a sample program below, and the sample does contain it."""
    assert sorted(set(REGISTRY) - set(SAMPLES)) == []
    for name, (fn, args) in SAMPLES.items():
        program = gdsl.make_ir(fn)(*args)
        used = {eqn.primitive.name for eqn in walk_eqns(program.jaxpr)}
        used |= {eqn.primitive.name for e in walk_eqns(program.jaxpr) if e.primitive.name == "recurse"
                 for eqn in walk_eqns(e.params["fn"].jaxpr)}
        assert name in used, f"the sample for {name} does not contain it: {sorted(used)}"


@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_handles_every_primitive(backend, name):
    """Each backend lowers (plan + source, no device needed) a program containing each primitive, and
    where it is usable here, computes what the interpreter computes."""
    fn, args = SAMPLES[name]
    lowered = gdsl.jit(fn, backend=backend).lower(*args)
    assert lowered.plan and lowered.source
    if backend in gdsl.backends():
        check_backend(fn, args, backend)


def test_backend_registry_names_the_missing_backends():
    """Every backend the registry knows is either usable or says why not."""
    from gdsl.backends import ALL_BACKENDS, unavailable_reason
    assert "interpret" in gdsl.backends()
    for name in ALL_BACKENDS:
        reason = unavailable_reason(name)
        assert (reason is None) == (name in gdsl.backends())
        if reason is not None:
            assert name.lower() in reason.lower() or "backend" in reason, reason
    assert callable(gdsl.backends) and gdsl.backends() == gdsl.backends.backends()
