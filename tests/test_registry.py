"""The primitive registry has no gaps: every primitive has its shape rule and numpy rule, and every backend's
lowering tables cover the registry.

Backend contract checked here (skipped, naming the module, while a backend does not exist yet):
- each dialect's elementwise table (cpu: gdsl.backends.cpu.LOWERINGS; cuda and hip: their own LOWERINGS or
  the shared gdsl.backends.cfamily.elementwise.ELEMENTWISE) has a row for every row of the core elementwise
  table (gdsl.primitives.elementwise.UNARY and BINARY) and for select;
- every primitive of the registry, control flow included, has a sample program (SAMPLES below: a new
  primitive without a sample fails test_samples_cover_the_registry), and every built backend (a package
  gdsl.backends.NAME with `lower`) lowers each sample, and where usable here computes what the interpreter
  computes. Primitives that are not elementwise reach a backend as the scheduler's Op kinds, so the gap
  check is behavioural rather than a table lookup.
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
from gdsl.primitives.registry import FAMILIES  # noqa: E402
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
# Where each backend's elementwise table lives (the C-family table is shared by cuda and hip).
ELEMENTWISE_TABLES = {"cpu": [("gdsl.backends.cpu", "LOWERINGS")],
                      "cuda": [("gdsl.backends.cuda", "LOWERINGS"), ("gdsl.backends.cfamily.elementwise",
                                                                     "ELEMENTWISE")],
                      "hip": [("gdsl.backends.hip", "LOWERINGS"), ("gdsl.backends.cfamily.elementwise",
                                                                   "ELEMENTWISE")]}


def _import_or_skip(module_name):
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        pytest.skip(f"backend module {module_name} does not exist yet ({e})")


def _built_backend_or_skip(backend):
    module_name = f"gdsl.backends.{backend}"
    module = _import_or_skip(module_name)
    if not callable(getattr(module, "lower", None)):
        pytest.skip(f"backend module {module_name} is not built yet (it has no `lower`)")
    return module


def _names(table) -> set[str]:
    return {k.name if isinstance(k, Primitive) else k for k in table}


@pytest.mark.parametrize("backend", BACKENDS)
def test_elementwise_table_covers_the_core_table(backend):
    """One elementwise table per dialect, with a row for every row of the core's table (and select)."""
    found = []
    for module_name, attribute in ELEMENTWISE_TABLES[backend]:
        try:
            table = getattr(importlib.import_module(module_name), attribute, None)
        except ImportError:
            continue
        if table is not None:
            found.append((f"{module_name}.{attribute}", table))
    if not found:
        pytest.skip("no elementwise table yet in " + " or ".join(f"{m}.{a}" for m, a in ELEMENTWISE_TABLES[backend]))
    where, table = found[0]
    required = set(ew.UNARY) | set(ew.BINARY) | {"select"}
    missing = sorted(required - _names(table))
    assert not missing, f"{where} lacks elementwise primitives {missing}"
    unknown = sorted(_names(table) - set(REGISTRY))
    assert not unknown, f"{where} has entries for primitives the registry does not know: {unknown}"


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
    """Each built backend lowers (plan + source, no device needed) a program containing each primitive, and
    where it is usable here, computes what the interpreter computes."""
    _built_backend_or_skip(backend)
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
