"""Repeated statement sequences rendered once (render.ROLL_REPEATS) and identical host-control kernels merged
(render.MERGE_KERNELS): gdsl/backends/cfamily/repeats.py's pieces, then programs whose plans repeat one gated
block (a Python loop unrolled at trace time over several weight sets, a cond in each step) run on the CPU
emulator against the interpreter in both forms, with the source checked for the one copy; NVRTC compiles them.
"""
import re

import numpy as np
import pytest
from strategies import needs_cxx, needs_nvrtc

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import emulator, render, repeats
from gdsl.backends.cfamily.lower import check_options, lower_with_grid
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.backends.cuda.dialect import CUDADialect
from gdsl.jit import make_ir
from gdsl.profiling.sites import trace_sites

LAYERS = 6


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("GDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "gdsl-cache"))


# ------------------------------------------------------------------------------------------ the pieces
def test_template_holes():
    t = repeats.template("  op1(t5, (t5 + 10), u3, in2[7]);\n  u3 = 1.0f; // 2 tasks", {"t5": "float*"},
                         {"u3": "float"})
    kinds = [(h.kind, t.tokens[h.position]) for h in t.holes]
    assert kinds == [("pointer", "t5"), ("pointer", "t5"), ("int", "10"), ("uniform", "u3"), ("int", "7"),
                     ("uniform", "u3")]
    assert [h.writes for h in t.holes if h.kind == "uniform"] == [False, True]
    assert "op1" in t.key and "1.0f" in t.key and "// 2 tasks" in t.key      # not holes: must agree as they are
    case = repeats.template("switch (u3) { case 0: break; }", {}, {"u3": "int"})
    assert [t.kind for t in case.holes] == ["uniform"]                       # a case label stays a constant


def test_find_repeats():
    keys = list("xabcabcabcyz")
    assert repeats.find_repeats(keys, lambda start, period, count: count) == [(1, 3, 3)]
    assert repeats.find_repeats(keys, lambda start, period, count: min(count, 2)) == [(1, 3, 2)]
    assert repeats.find_repeats(list("aaaa"), lambda start, period, count: count) == [(0, 1, 4)]
    assert repeats.find_repeats(keys, lambda start, period, count: 0) == []


def _repetition(texts, own=lambda name, j: repeats.OWN):
    pointers = {f"t{k}": "float*" for k in range(10)}
    uniforms = {f"u{k}": "float" for k in range(10)}
    return repeats.Repetition([repeats.template(text, pointers, uniforms) for text in texts], own)


def test_repetition_picks_what_differs():
    rep = _repetition(["u1 = t1[3]; f(t1, t9, u1, 4);", "u2 = t2[3]; f(t2, t9, u2, 5);"])
    assert rep.count_valid() == 2
    setup, text, copy_out = rep.body("r")
    assert text == "r_0 = r_1[3]; f(r_1, t9, r_0, r_2);"       # t9 and 3 are the same in both: kept
    assert setup[0] == "float* r_1; int r_2; float r_0{};"
    assert setup[1:] == ["switch (r) {", "  case 0: r_1 = t1; r_2 = 4; break;", "  default: r_1 = t2; r_2 = 5; break;",
                         "}"]
    assert copy_out == []


def test_repetition_copies_live_uniforms_out():
    rep = _repetition(["u1 = t1[0];", "u2 = t2[0];"], own=lambda name, j: repeats.LIVE)
    assert rep.body("r")[2] == ["switch (r) {", "  case 0: u1 = r_0; break;", "  default: u2 = r_0; break;", "}"]


def test_repetition_refuses_shared_or_read_first_uniforms():
    assert _repetition(["u1 = t1[0];", "u2 = t2[0];"], own=lambda name, j: None).count_valid() == 0
    assert _repetition(["f(u1); u1 = 1.0f;", "f(u2); u2 = 1.0f;"]).count_valid() == 0     # read before set
    assert _repetition(["u1 = u0;", "u2 = u1;", "u3 = u2;"]).count_valid() == 0          # carried from before
    assert _repetition(["u1 = u1 + u2;", "u3 = u3 + u2;"]).count_valid() == 0           # "u1 = u1 + ..." reads
    assert _repetition(["u1 = 1.0f; f(u1, u1);", "u2 = 1.0f; f(u2, u3);"]).count_valid() == 1   # not one shape


# ------------------------------------------------------------------------------------------ programs
def gated_layers(x, ws, gates):
    """LAYERS gated layers unrolled at trace time: each takes a layer only where its gate (a number from the
    input and the carried state) is positive, else halves the state; the gate values are returned too."""
    taken = []
    for k in range(ws.shape[0]):
        gate = gnp.sum(x) * gates[k]
        x = gdsl.cond(gate > 0, lambda h, w=ws[k]: gnp.tanh(h @ w) + h, lambda h: h * 0.5, x)
        taken.append(gnp.reshape(gnp.astype(gate > 0, np.int32), (1,)))
    return x, gnp.concatenate(taken)


ARGS = (np.linspace(0.1, 1.0, 2 * 64, dtype=np.float32).reshape(2, 64),
        np.linspace(-0.05, 0.05, LAYERS * 64 * 64, dtype=np.float32).reshape(LAYERS, 64, 64),
        np.array([1.0, -1.0, 1.0, 1.0, -1.0, 1.0], np.float32))


def _source(control, **options):
    return gdsl.jit(gated_layers, backend="cuda", control=control, grid=8, **options).lower(*ARGS).source


def test_device_control_renders_the_gated_block_once():
    source = _source("device")
    assert "repetitions of" in source and "#pragma unroll 1" in source
    kernel = source.split('extern "C" __global__')[1]
    # The first layer reads the argument (its own function); the five others are one loop: two GEMV call sites.
    assert len(re.findall(r"\bop\d+_matmul\w*\(", kernel)) == 2      # (the tanh and add are its epilogue)
    lowering = gdsl.jit(gated_layers, backend="cuda", grid=8).lower(*ARGS).lowering
    traced = render.render_plan(lowering.plan, CUDADialect(), trace=trace_sites(lowering.plan, True)).source
    assert "repetitions of" not in traced            # an instrumented build: each repetition its own sites


def test_host_control_merges_the_kernels_of_each_block():
    lowering = gdsl.jit(gated_layers, backend="cuda", control="host", grid=8).lower(*ARGS)
    specs = lowering.lowering.rendered.kernels
    assert len(specs) == len(lowering.lowering.plan.kernels)
    names = {spec.name for spec in specs}
    assert len(names) < len(specs) and lowering.source.count('extern "C" __global__') == len(names)
    assert "int gdsl_variant" in lowering.source
    variants = [obj for spec in specs for kind, obj in spec.params if kind == "variant"]
    assert sorted(variants)[:2] == [0, 0] and max(variants) >= 2


@needs_cxx
@pytest.mark.parametrize("control", ["device", "host"])
@pytest.mark.parametrize("fold", [True, False])
def test_emulated_gated_layers_match_interpreter(control, fold, monkeypatch):
    from strategies import BACKEND_TOLERANCE, assert_trees_close
    monkeypatch.setattr(render, "ROLL_REPEATS", fold)
    monkeypatch.setattr(render, "MERGE_KERNELS", fold)
    expected = gdsl.jit(gated_layers, backend="interpret")(*ARGS)
    assert set(expected[1]) == {0, 1}                  # some layers taken, some skipped
    got = emulator.emulate(gated_layers, *ARGS, control=control, grid=3, block=64)
    assert_trees_close(gdsl.to_numpy(got), expected, tolerance=BACKEND_TOLERANCE)
    dialect = emulator.EmulatorDialect()        # the source the emulator ran: the folded form where asked
    source = lower_with_grid(make_ir(gated_layers)(*ARGS), check_options({"control": control, "block": 64},
                                                                         dialect), 3, dialect).rendered.source
    folded = "repetitions of" in source if control == "device" else "int gdsl_variant" in source
    assert folded == fold


@needs_cxx
def test_emulated_fold_with_every_gate_off_and_on(monkeypatch):
    from strategies import BACKEND_TOLERANCE, assert_trees_close
    for gates in (np.full(LAYERS, -1.0, np.float32), np.full(LAYERS, 1.0, np.float32)):
        args = ARGS[:2] + (gates,)
        expected = gdsl.jit(gated_layers, backend="interpret")(*args)
        got = emulator.emulate(gated_layers, *args, control="device", grid=4, block=32)
        assert_trees_close(gdsl.to_numpy(got), expected, tolerance=BACKEND_TOLERANCE)


@needs_nvrtc
@pytest.mark.parametrize("control", ["device", "host"])
def test_folded_source_compiles(control):
    assert cuda_toolchain.compile_cuda(_source(control), "sm_90")[:4] == b"\x7fELF"


@pytest.mark.gpu
@pytest.mark.parametrize("control", ["device", "host"])
@pytest.mark.parametrize("fold", [True, False])
def test_gpu_gated_layers_match_interpreter(control, fold, monkeypatch):
    from strategies import check_backend
    monkeypatch.setattr(render, "ROLL_REPEATS", fold)
    monkeypatch.setattr(render, "MERGE_KERNELS", fold)
    check_backend(gated_layers, ARGS, "cuda", control=control)


@needs_cxx
@pytest.mark.parametrize("control", ["device", "host"])
def test_emulated_skipnet_folded_matches_reference(control):
    """A small SkipNet with repeated gated blocks in two stages (3 and 4 blocks): the folded form (loops
    over the repeated blocks / merged kernels) gives the reference's logits and gate decisions."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))       # the repo root: models/
    from models import common, load, skipnet
    cfg = skipnet.Config(layers=(1, 3, 4, 1), base=4, image=32, classes=10)
    prob = common.build_problem(load("skipnet"), 1, seed=0, n_inputs=1, cfg=cfg)

    def forward(weights, inputs):
        return skipnet.forward(weights, inputs, cfg)
    dialect = emulator.EmulatorDialect()
    source = lower_with_grid(make_ir(forward)(prob.weights, prob.batches[0]),
                             check_options({"control": control, "block": 32}, dialect), 4, dialect).rendered.source
    assert source.count("repetitions of" if control == "device" else "int gdsl_variant") >= 2
    got = emulator.emulate(forward, prob.weights, prob.batches[0], control=control, grid=4, block=32)
    assert common.compare(gdsl.to_numpy(got), prob.references()[0]) == []
