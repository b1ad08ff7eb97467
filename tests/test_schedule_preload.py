"""Step preloads (gdsl/schedule/preload.py): an elementwise op's inputs that a loop step does not change by the
wave before it are loaded into registers one wave early; the simulator checks that what was loaded early is what
the op would have read."""
from __future__ import annotations

import dataclasses

import pytest
from strategies import emulated_model_mismatches, needs_nvrtc, zoo_lowered

from gdsl.backends.cfamily.emulator import EmulatorDialect
from gdsl.backends.cfamily.lower import check_options, lower_with_grid
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.jit import make_ir
from gdsl.schedule import preload
from gdsl.schedule.plan import Loop, Wave
from gdsl.schedule.simulate import BarrierError, simulate


def _preloads(plan) -> dict:
    return {t.op.name: t.preload for k in plan.kernels for s in k.body if isinstance(s, Loop)
            for w in s.body if isinstance(w, Wave) for t in w.tasks if t.preload}


@needs_nvrtc
def test_nasrnn_batch_1_cells_load_their_step_inputs_a_wave_early(monkeypatch):
    """NASRNN bs1 (two steps an iteration): each cell loads its eight rows of the hoisted input projection
    (inputs 0, 2, 5, ...) before the GEMV it waits for, the first also the carry `c` that the second cell of the
    previous iteration wrote on the same vEU (input 4, in memory); not the GEMV's gates (written by the wave
    before: inputs 1, 3, ...) nor the second cell's carry (a block-local temp in shared memory). The registers
    are loaded before the GEMV's call; NVRTC compiles it. With PRELOAD_STEP_READS off the plan has none."""
    lowered = zoo_lowered("nasrnn", 1)
    plan = lowered.lowering.plan
    assert _preloads(plan) == {"op6_row_chain_mul_tanh_add": (0, 2, 4, 5, 7, 9, 11, 13, 15),
                               "op8_row_chain_mul_tanh_add": (0, 2, 5, 7, 9, 11, 13, 15)}
    assert plan.stats["preloaded_inputs"] == 17 and "operands 0, 2, 4, 5" in str(plan)
    source = lowered.source
    assert source.index("float gdsl_pre_op6_row_chain_mul_tanh_add_4 = 0.0f;") < \
        source.index("op5_matmul(t11, t4,") < source.index("op6_row_chain_mul_tanh_add(t12, t13,")
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"
    monkeypatch.setattr(preload, "PRELOAD_STEP_READS", False)
    off = zoo_lowered("nasrnn", 1).lowering.plan
    assert _preloads(off) == {} and "preloaded_inputs" not in off.stats


def test_a_wave_with_too_many_preloads_gets_none(monkeypatch):
    """The LSTM bs1's cells of one wave (ten layers' cells on their own vEUs) would preload 128 inputs, all live
    across the wave before: past MAX_PRELOADS_PER_WAVE (16) none (measured slower on the H200, 0.367 -> 0.393
    ms, without spills); with the bound raised, they are marked."""
    assert "preloaded_inputs" not in zoo_lowered("lstm", 1).lowering.plan.stats
    monkeypatch.setattr(preload, "MAX_PRELOADS_PER_WAVE", 1000)
    assert zoo_lowered("lstm", 1).lowering.plan.stats["preloaded_inputs"] == 128


def test_seq2seq_batch_1_simulated_with_preloads():
    """Seq2seq bs1's cell loads its biases a wave early; simulated at full size against the reference (the
    simulator checks each preloaded input unchanged between the preload and the op)."""
    from models import common, floor, load
    plan = zoo_lowered("seq2seq", 1).lowering.plan
    assert _preloads(plan)
    prob = common.build_problem(load("seq2seq"), 1)
    got = simulate(plan, floor.flat_arguments(prob.weights, prob.batches[0]))
    assert common.compare(tuple(got), prob.references()[0]) == []


def _small_plan(name, bs):
    from models import common, load
    prob = common.build_problem(load(name), bs, small=True)

    def forward(weights, inputs):
        return prob.model.forward(weights, inputs, prob.cfg)
    dialect = EmulatorDialect()
    return lower_with_grid(make_ir(forward)(prob.weights, prob.batches[0]), check_options({}, dialect), 4,
                           dialect).plan, prob


@pytest.mark.parametrize("name", ["nasrnn", "seq2seq"])
def test_small_models_emulated_with_preloads(name):
    """The small configs' plans have preloads; the g++ emulator runs them and matches the references."""
    plan, _ = _small_plan(name, 1)
    assert plan.stats.get("preloaded_inputs", 0) > 0
    assert emulated_model_mismatches(name, 1) == []


def test_the_simulator_catches_an_input_loaded_too_early():
    """A preload of what the wave before writes (NASRNN's GEMV output, the cell's input 1) is wrong: the
    simulator reports that the input changed between the preload and the op."""
    from models import floor
    plan, prob = _small_plan("nasrnn", 1)
    kernel = plan.kernels[0]
    index, loop = next((i, s) for i, s in enumerate(kernel.body) if isinstance(s, Loop))
    body = list(loop.body)
    i, wave = next((i, s) for i, s in enumerate(body) if isinstance(s, Wave) and any(t.preload for t in s.tasks))
    tasks = tuple(dataclasses.replace(t, preload=tuple(sorted(set(t.preload) | {1}))) if t.preload else t
                  for t in wave.tasks)
    body[i] = dataclasses.replace(wave, tasks=tasks)
    kernel_body = list(kernel.body)
    kernel_body[index] = dataclasses.replace(loop, body=tuple(body))
    wrong = dataclasses.replace(plan, kernels=(dataclasses.replace(kernel, body=tuple(kernel_body)),))
    args = floor.flat_arguments(prob.weights, prob.batches[0])
    simulate(plan, args)
    with pytest.raises(BarrierError, match="loaded a wave early"):
        simulate(wrong, args)
