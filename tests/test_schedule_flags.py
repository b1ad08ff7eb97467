"""Flag syncs (gdsl/schedule/flags.py, the option `flags`): a loop's grid barrier that only published carries
cross (written by elementwise / cell ops, read by the next step's matmuls as their left operand) becomes a
`Sync("flags")`; everything else keeps its grid barrier. NASRNN's two step-end barriers per unrolled iteration
become flag syncs (full size, batch 1, and batch 64 with owner=True); the LSTM's keep theirs (the next step's
matmuls overwrite gate buffers other layers' cells still read). The plan simulator (race checks on), the g++
emulator and the float64 references agree; NVRTC and hiprtc compile the kernels; a flag sync put where the
pass keeps a grid barrier is a race the simulator reports."""
import dataclasses

import numpy as np
import pytest
from strategies import emulated_model_mismatches, needs_nvrtc, zoo_lowered
from test_schedule import check_emulated, check_plan

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily.emulator import EmulatorDialect
from gdsl.backends.cfamily.lower import check_options, lower_with_grid
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.backends.cuda.dialect import CUDADialect
from gdsl.backends.hip import toolchain as hip_toolchain
from gdsl.interpreter import run_program
from gdsl.jit import make_ir
from gdsl.schedule import flags, schedule
from gdsl.schedule.flags import FLAGS
from gdsl.schedule.plan import ROWS, Loop, Sync, Wave
from gdsl.schedule.scheduler import loop_grid_barriers
from gdsl.schedule.simulate import BarrierError, simulate

CHAIN = EmulatorDialect().lowering_chain
LOWERING = dict(views=CHAIN, rows=CHAIN, epilogues=CHAIN, k_parts=CHAIN, siblings=CHAIN, row_blocks=CHAIN)


def _loop(plan) -> Loop:
    return next(s for s in plan.kernels[0].body if isinstance(s, Loop))


def _syncs(block, scope) -> list:
    return [s for s in block if isinstance(s, Sync) and s.scope == scope]


def _after_loop(plan):
    body = plan.kernels[0].body
    return body[body.index(_loop(plan)) + 1]


def _writers(plan, buf):
    return [t.op for s in _loop(plan).body if isinstance(s, Wave) for t in s.tasks
            if any(v.storage is buf for v in t.op.outputs)]


def _with_loop_body(plan, body):
    """`plan` with its (first kernel's) loop's body replaced by `body`: a plan changed by hand."""
    loop, kernel = _loop(plan), plan.kernels[0]
    new = tuple(dataclasses.replace(loop, body=body) if s is loop else s for s in kernel.body)
    return dataclasses.replace(plan, kernels=(dataclasses.replace(kernel, body=new),))


# ------------------------------------------------------------------------------------------ full size
@needs_nvrtc
def test_nasrnn_batch_1_step_end_barriers_become_flag_syncs():
    """NASRNN bs1 (owner plan, unrolled twice): both step-end grid barriers are flag syncs publishing the new
    `m` of each half-step (a cell chain's output); the block syncs stay; a grid barrier follows the loop; the
    barriers before the loop are the default's; NVRTC compiles it (the flag words, tagged stores, waits)."""
    default = zoo_lowered("nasrnn", 1, flags=False, smem_temps=False).lowering.plan
    lowered = zoo_lowered("nasrnn", 1, smem_temps=False)  # (flags on by default on cuda; no shared-memory line)
    plan = lowered.lowering.plan
    body = _loop(plan).body
    flags = _syncs(body, FLAGS)
    assert len(flags) == 2 and len(_syncs(_loop(default).body, "grid")) == 2
    assert _syncs(body, "grid") == [] and loop_grid_barriers(plan) == 0 and plan.stats["flag_syncs"] == 2
    assert len(_syncs(body, "block")) == len(_syncs(_loop(default).body, "block")) == 2
    for sync in flags:
        (buf,) = sync.published
        assert [op.kind for op in _writers(plan, buf)] == [ROWS.name]
    assert isinstance(_after_loop(plan), Sync) and _after_loop(plan).scope == "grid"
    # before the loop: the default's statements, after the flag words' zeroing and its grid barrier
    before, before_default = (str(p).split("  loop:")[0].splitlines()[2:] for p in (plan, default))
    zeroing = "  every vEU: zero its share of the flag words of " + ", ".join(s.published[0].name for s in flags)
    assert before[:3] == before_default[:2] + [zeroing] and before[3] == "  barrier (grid)"
    assert before[4:] == before_default[2:]
    source = lowered.source
    assert source.count(CUDADialect().grid_sync("atomic")) == plan.stats["grid_syncs"] - 1   # (one is quiet)
    assert "gdsl_flag_get(" in source and "gdsl_flag_put(" in source and "gdsl_it0 += 1u;" in source
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"


@needs_nvrtc
def test_nasrnn_batch_64_owner_publishes_a_part_of_the_stacked_operand(monkeypatch):
    """NASRNN bs64 with owner=True: the carry is the second part of `[x_t | m] @ [W_ih; W_hh]` (read in parts);
    both step-end barriers become flag syncs once its 64 x 256 elements may be published (by default they are
    more than flags.MAX_PUBLISHED: the barriers stay); NVRTC compiles it."""
    assert "flag_syncs" not in zoo_lowered("nasrnn", 64, owner=True, flags=True).lowering.plan.stats
    monkeypatch.setattr(flags, "MAX_PUBLISHED", 64 * 256)
    lowered = zoo_lowered("nasrnn", 64, owner=True, flags=True)
    plan = lowered.lowering.plan
    assert len(_syncs(_loop(plan).body, FLAGS)) == 2 and loop_grid_barriers(plan) == 0
    assert cuda_toolchain.compile_cuda(lowered.source, "sm_90")[:4] == b"\x7fELF"


@pytest.mark.parametrize("name,bs,options", [("lstm", 1, {}), ("nasrnn", 64, {}), ("seq2seq", 64, {})])
def test_other_step_end_barriers_stay(name, bs, options):
    """Where a step-end barrier orders more than the carry, or the carry is too big to publish, it stays and the
    plan is the default's: the LSTM bs1 (its next step's `h_l @ W_ih` overwrites the gates that layer l+1's cell
    reads), NASRNN bs64 (`x_t @ W_ih` waits for nothing and overwrites what the cell reads), Seq2seq bs64 (its
    carry h, read by the logits GEMV, has 64 x 256 elements: more than flags.MAX_PUBLISHED). (Without
    double_temps, which gives the LSTM bs1's gates a second buffer: tests/test_schedule_double_temps.py; the
    LSTM's owner plan: test_skewed_owner_stack_waits_for_the_layer_above.)"""
    plan = zoo_lowered(name, bs, flags=True, double_temps=False, **options).lowering.plan
    assert "flag_syncs" not in plan.stats
    assert str(plan) == str(zoo_lowered(name, bs, flags=False, **options).lowering.plan)


def _layer_of(plan) -> dict:
    """vEU -> the input number k of the loop's matmul it runs in the first wave (the stacked LSTM's owner plan:
    layer k's chain)."""
    wave = next(s for s in _loop(plan).body if isinstance(s, Wave))
    return {v: k for k, t in enumerate(wave.tasks) for v in range(t.first, t.first + t.count)}


def _check_waits(plan):
    """Both step-end syncs of the LSTM's owner loop are flag syncs; each FlagWait makes the vEUs of one layer
    wait, whole, for the state that the layer above published at that sync (or before it, the other half-step's),
    the last layer waiting for nothing."""
    body = _loop(plan).body
    syncs = _syncs(body, FLAGS)
    assert len(syncs) == 2 and _syncs(body, "grid") == []
    layer = _layer_of(plan)
    layers = max(layer.values()) + 1
    for sync in syncs:
        waits = sorted(sync.waits, key=lambda w: w.first)
        assert [layer[w.first] for w in waits] == list(range(layers - 1))
        for w in waits:
            assert {layer[v] for v in range(w.first, w.first + w.count)} == {layer[w.first]}
            (writer,) = _writers(plan, w.buffer)
            assert (w.start, w.stop) == (0, w.buffer.aval.size) and w.buffer in sync.published
            writer_task = next(t for s in body if isinstance(s, Wave) for t in s.tasks if t.op is writer)
            assert layer[writer_task.first] == layer[w.first] + 1


def test_skewed_owner_stack_waits_for_the_layer_above(monkeypatch):
    """The LSTM's owner plan (owner=True: each layer's vEUs run its stacked GEMV and its cell; the stack skewed
    by the wavefront, small config, grid 132): layer l overwrites its state `h_l` two half-steps after writing
    it, while layer l + 1 reads it; no flag wait of layer l orders that, so its step-end barriers need FlagWaits
    (plan.FlagWait: layer l waits for the state that layer l + 1 published after its read). With them both
    barriers are flag syncs; the simulator (race checks on) matches the reference; the waits taken out, it
    reports the race; with flags.WAIT_ROUNDS = 0 the barriers stay and the plan is flags=False's."""
    from models import common, floor, load
    prob = common.build_problem(load("lstm"), 1, small=True)
    forward = prob.model.make_forward(prob.cfg, backend="cuda", owner=True, grid=132)
    plan = forward.lower(prob.weights, prob.batches[0]).lowering.plan
    _check_waits(plan)
    args = floor.flat_arguments(prob.weights, prob.batches[0])
    assert common.compare(tuple(simulate(plan, args)), prob.references()[0]) == []
    body = tuple(dataclasses.replace(s, waits=()) if isinstance(s, Sync) else s for s in _loop(plan).body)
    with pytest.raises(BarrierError):
        simulate(_with_loop_body(plan, body), args)
    monkeypatch.setattr(flags, "WAIT_ROUNDS", 0)
    without = prob.model.make_forward(prob.cfg, backend="cuda", owner=True, grid=132, flags=False)
    plan = prob.model.make_forward(prob.cfg, backend="cuda", owner=True, grid=132).lower(
        prob.weights, prob.batches[0]).lowering.plan
    assert "flag_syncs" not in plan.stats
    assert str(plan) == str(without.lower(prob.weights, prob.batches[0]).lowering.plan)


def test_skewed_owner_stack_emulated():
    """The same plan kind on the g++ emulator (grid 8: the waits' spin loops run) against the float64 reference."""
    plan = _small_plan("lstm", 1, grid=8, owner=True)
    assert any(s.waits for s in _syncs(_loop(plan).body, FLAGS))
    assert emulated_model_mismatches("lstm", 1, flags=True, owner=True, grid=8) == []


@needs_nvrtc
def test_nvrtc_compiles_flag_waits():
    """The LSTM's owner plan at full size (batch 1): its syncs' waits rendered (a batched wait on each waited
    range's flag words, then the block barrier); NVRTC compiles it."""
    lowered = zoo_lowered("lstm", 1, owner=True)
    _check_waits(lowered.lowering.plan)
    assert "gdsl_flag_wait(" in lowered.source
    assert cuda_toolchain.compile_cuda(lowered.source, "sm_90")[:4] == b"\x7fELF"


def test_hip_compiles_flag_syncs():
    if hip_toolchain.hiprtc_available() is not None:
        pytest.skip(str(hip_toolchain.hiprtc_available()))
    from models import common, load
    prob = common.build_problem(load("nasrnn"), 1, small=True)
    source = prob.model.make_forward(prob.cfg, backend="hip", flags=True).lower(prob.weights, prob.batches[0]).source
    assert "gdsl_flag_get(" in source
    assert hip_toolchain.compile_hip(source, "gfx90a")[:4] == b"\x7fELF"


# ------------------------------------------------------------------------------------------ emulated models
def _small_plan(name, bs, grid=4, **options):
    """The plan of a zoo model's small config lowered for the emulator with flags=True (block 64 unless
    `options` say otherwise)."""
    from models import common, load
    prob = common.build_problem(load(name), bs, small=True)

    def forward(weights, inputs):
        return prob.model.forward(weights, inputs, prob.cfg)
    dialect = EmulatorDialect()
    return lower_with_grid(make_ir(forward)(prob.weights, prob.batches[0]),
                           check_options({"flags": True, "block": 64, **options}, dialect), grid, dialect).plan


@pytest.mark.parametrize("name,bs,converted", [("nasrnn", 1, 2), ("nasrnn", 4, 2), ("lstm", 1, 2)])
def test_models_emulated_match_the_reference(name, bs, converted):
    """The small configs on the g++ emulator (grid 4) with flags=True against the float64 references; the
    plans there have the flag syncs (the spinning loaders run): NASRNN's, and the LSTM's through double_temps
    (on by default)."""
    assert _small_plan(name, bs).stats.get("flag_syncs", 0) == converted
    assert emulated_model_mismatches(name, bs, flags=True) == []


@needs_nvrtc
def test_seq2seq_batch_1_cell_barrier_with_uniform_readers(monkeypatch):
    """flags.UNIFORM_READERS (on by default since session 17): Seq2seq bs1's loop, whose every-vEU argmax reads the
    logits, is tried; the barrier after the cell becomes a flag sync publishing h (out1, read by the logits
    GEMV and the next step's h @ W_hh as their left operand); the others stay. Simulated (flag semantics, race
    checks) against the float64 reference at full size; NVRTC compiles it."""
    from models import common, floor, load
    assert flags.UNIFORM_READERS is True
    monkeypatch.setattr(flags, "UNIFORM_READERS", False)
    assert "flag_syncs" not in zoo_lowered("seq2seq", 1).lowering.plan.stats
    monkeypatch.setattr(flags, "UNIFORM_READERS", True)
    lowered = zoo_lowered("seq2seq", 1)
    plan = lowered.lowering.plan
    (sync,) = _syncs(_loop(plan).body, FLAGS)
    assert [b.name for b in sync.published] == ["out1"] and loop_grid_barriers(plan) == 2
    prob = common.build_problem(load("seq2seq"), 1)
    got = simulate(plan, floor.flat_arguments(prob.weights, prob.batches[0]))
    assert common.compare(tuple(got), prob.references()[0]) == []
    assert cuda_toolchain.compile_cuda(lowered.source, "sm_90")[:4] == b"\x7fELF"


def test_seq2seq_small_emulated_with_uniform_readers():
    """The small Seq2seq on the g++ emulator (flags.UNIFORM_READERS on by default): its plan has the flag sync,
    and it matches."""
    assert _small_plan("seq2seq", 1).stats.get("flag_syncs", 0) == 1
    assert emulated_model_mismatches("seq2seq", 1, flags=True) == []


# ------------------------------------------------------------------------------------------ small programs
def cell(xs, W, U):
    """NASRNN's shape: the carry `m` read by `m @ U` (gates stacked), a cell of two carries."""
    def step(t, mc):
        m, c = mc
        g, x = m @ U, xs[t] @ W
        c2 = gnp.tanh(g[0] + x[0]) * gdsl.nn.sigmoid(g[1] + x[1]) + c
        return gnp.tanh(c2) * gdsl.nn.sigmoid(g[2] + x[2]), c2
    z = gnp.zeros((1, U.shape[-1]))
    return gdsl.fori_loop(0, xs.shape[0], step, (z, z))[0]


def rnn(h, W, xs):
    """`tanh(h @ W + x_t)`: the default plan computes tanh on other vEUs than the matmul's tiles, so the step-end
    barrier also orders the cell's reads of `h @ W` before the next step's matmul overwrites it."""
    return gdsl.fori_loop(0, xs.shape[0], lambda t, h: gnp.tanh(h @ W + xs[t]), h)


def _args(hidden, steps, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((steps, 1, hidden)).astype(np.float32),
            (rng.standard_normal((3, hidden, hidden)) / 4).astype(np.float32),
            (rng.standard_normal((3, hidden, hidden)) / 4).astype(np.float32))


def _has_flags(plan, control):
    if control == "device" and plan.grid > 1:
        assert len(_syncs(_loop(plan).body, FLAGS)) == 2


@pytest.mark.parametrize("hidden,steps", [(64, 5), (40, 6)])
def test_cell_flag_syncs_simulate_and_emulate(hidden, steps):
    """A carried `m` read by `m @ U`: both step-end barriers of the owner plan are flag syncs at grid 3 and
    132 (not at grid 1: one vEU needs none); the simulator (race checks on: flags order only the published
    buffers) and the emulator match the interpreter (odd step counts: one step peeled)."""
    args = _args(hidden, steps)
    check_plan(cell, *args, grids=(1, 3, 132), check=_has_flags, owner=True, flags=True, **LOWERING)
    check_emulated(cell, *args, grids=(1, 3, 8), owner=True, flags=True)


def test_something_else_crossing_keeps_the_grid_barrier():
    """rnn's default plan: the step-end barrier also orders `tanh`'s reads of `h @ W` (other vEUs) before the
    next step's matmul overwrites it: it stays a grid barrier; made a flag sync by hand, the simulator
    reports the race."""
    rng = np.random.default_rng(1)
    args = ((rng.standard_normal((1, 64))).astype(np.float32), (rng.standard_normal((64, 64)) / 8).astype(np.float32),
            rng.standard_normal((4, 1, 64)).astype(np.float32))
    program = make_ir(rnn)(*args)
    plan = schedule(program, grid=8, owner=False, flags=True, **LOWERING)
    loop = _loop(plan)
    assert _syncs(loop.body, FLAGS) == [] and len(_syncs(loop.body, "grid")) == 2
    np.testing.assert_allclose(simulate(plan, list(args))[0], run_program(program, list(args))[0], rtol=1e-5)
    _assert_forced_flags_race(plan, args)


def test_carry_read_elementwise_by_other_veus_keeps_the_grid_barrier():
    """The carry `m` also read elementwise after the barrier, reversed (by other vEUs than its writers, not
    waiting): the barrier publishing it stays a grid barrier; forced, the simulator reports the race."""
    def reversed_read(xs, W, U):
        def step(t, mc):
            m, c = mc
            g, x = m @ U, xs[t] @ W
            c2 = gnp.tanh(g[0] + x[0]) * gdsl.nn.sigmoid(g[1] + x[1]) + c + m[:, ::-1]
            return gnp.tanh(c2) * gdsl.nn.sigmoid(g[2] + x[2]), c2
        z = gnp.zeros((1, U.shape[-1]))
        return gdsl.fori_loop(0, xs.shape[0], step, (z, z))[0]
    args = _args(64, 4)
    program = make_ir(reversed_read)(*args)
    plan = schedule(program, grid=8, owner=True, flags=True, **LOWERING)
    assert _syncs(_loop(plan).body, FLAGS) == []
    np.testing.assert_allclose(simulate(plan, list(args))[0], run_program(program, list(args))[0], rtol=1e-4,
                               atol=1e-5)
    _assert_forced_flags_race(plan, args)


def _assert_forced_flags_race(plan, args):
    """Each of the loop's grid barriers made a flag sync publishing what the wave before it writes: a race."""
    loop = _loop(plan)
    body = loop.body
    for i, stmt in enumerate(body):
        if isinstance(stmt, Sync) and stmt.scope == "grid":
            wave = next(s for s in reversed(body[:i]) if isinstance(s, Wave))
            published = tuple(v.storage for t in wave.tasks for v in t.op.outputs)
            wrong = _with_loop_body(plan, body[:i] + (Sync(FLAGS, published=published),) + body[i + 1:])
            with pytest.raises(BarrierError):
                for seed in range(4):
                    simulate(wrong, list(args), seed=seed)


def test_default_plan_has_no_flag_syncs():
    args = _args(64, 5)
    plan = schedule(make_ir(cell)(*args), grid=8, owner=True, **LOWERING)
    assert _syncs(_loop(plan).body, FLAGS) == [] and "flag_syncs" not in plan.stats


# ------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
def test_gpu_nasrnn_flags_many_runs():
    """NASRNN small with flags=True on CUDA against its float64 reference, run many times (a hang or a stale
    read shows up as a timeout or a mismatch), and the full-size bs1 forward against the default's."""
    from models import common, load
    prob = common.build_problem(load("nasrnn"), 1, small=True)
    f = prob.model.make_forward(prob.cfg, backend="cuda", flags=True)
    assert _loop(f.lower(prob.weights, prob.batches[0]).lowering.plan) is not None
    expected = prob.references()[0]
    for _ in range(200):
        assert common.compare(gdsl.to_numpy(f(prob.weights, prob.batches[0])), expected) == []
    full = common.build_problem(load("nasrnn"), 1)
    g = full.model.make_forward(full.cfg, backend="cuda", flags=True)
    base = full.model.make_forward(full.cfg, backend="cuda")
    want = gdsl.to_numpy(base(full.weights, full.batches[0]))
    for _ in range(20):
        np.testing.assert_allclose(gdsl.to_numpy(g(full.weights, full.batches[0])), want, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_gpu_lstm_flag_waits_many_runs():
    """The LSTM's owner plan with FlagWaits on CUDA (owner=True): the small config 200 times against its float64
    reference (a hang shows as a timeout, a stale read as a mismatch), and the full-size bs1 forward against the
    default plan's (flags=False: no flag sync)."""
    from models import common, load
    prob = common.build_problem(load("lstm"), 1, small=True)
    f = prob.model.make_forward(prob.cfg, backend="cuda", owner=True)
    assert any(s.waits for s in _syncs(_loop(f.lower(prob.weights, prob.batches[0]).lowering.plan).body, FLAGS))
    expected = prob.references()[0]
    for _ in range(200):
        assert common.compare(gdsl.to_numpy(f(prob.weights, prob.batches[0])), expected) == []
    full = common.build_problem(load("lstm"), 1)
    g = full.model.make_forward(full.cfg, backend="cuda", owner=True)
    _check_waits(g.lower(full.weights, full.batches[0]).lowering.plan)
    want = gdsl.to_numpy(full.model.make_forward(full.cfg, backend="cuda", flags=False)(full.weights, full.batches[0]))
    assert common.compare(want, full.references()[0]) == []
    for _ in range(20):
        np.testing.assert_allclose(gdsl.to_numpy(g(full.weights, full.batches[0])), want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ CELL_WAITS
def test_cell_waits_make_the_lstm_loop_barrier_free(monkeypatch):
    """flags.CELL_WAITS (off by default: measured slower, docs/schedule.md "Cell waits"): matmul results may be
    published and read, waiting, by the elementwise ops (the cells) that read them. The LSTM's default plan (small
    config, emulator lowering, grid 4) then keeps no grid barrier in its loop: gates -> cells and h -> GEMVs are flag
    syncs (4 an iteration of the doubled body); the cells' own carries stay unpublished. The g++ emulator matches the
    float64 reference at batch 1 and 4; NASRNN bs1's plan is the same with it on and off (its owner layout puts each
    cell on the vEU of the GEMV tiles it reads: a block sync, no barrier to convert)."""
    before = str(_small_plan("nasrnn", 1))
    monkeypatch.setattr(flags, "CELL_WAITS", True)
    plan = _small_plan("lstm", 1)
    loop = _loop(plan)
    syncs = _syncs(loop.body, FLAGS)
    assert len(syncs) == 4 and _syncs(loop.body, "grid") == []
    products = flags.matmul_results([s for s in loop.body if isinstance(s, Wave)])
    assert any(b in products for s in syncs for b in s.published)
    assert all(_writers(plan, b)[0].kind in ("matmul", ROWS.name) for s in syncs for b in s.published)
    for bs in (1, 4):
        assert emulated_model_mismatches("lstm", bs, flags=True) == []
    assert str(_small_plan("nasrnn", 1)) == before


def test_cell_waits_simulate(monkeypatch):
    """With CELL_WAITS on, the small LSTM's CUDA plan (grid 132) is race-free in the plan simulator and matches
    the reference; with the gates no longer published (the cells' reads of them plain loads behind a vEU-local
    sync), the simulator reports the race."""
    from models import common, floor, load
    monkeypatch.setattr(flags, "CELL_WAITS", True)
    prob = common.build_problem(load("lstm"), 1, small=True)
    plan = prob.model.make_forward(prob.cfg, backend="cuda", grid=132).lower(
        prob.weights, prob.batches[0]).lowering.plan
    args = floor.flat_arguments(prob.weights, prob.batches[0])
    assert common.compare(tuple(simulate(plan, args)), prob.references()[0]) == []
    loop = _loop(plan)
    products = flags.matmul_results([s for s in loop.body if isinstance(s, Wave)])
    body = tuple(dataclasses.replace(s, published=tuple(b for b in s.published if b not in products),
                                     waits=tuple(w for w in s.waits if w.buffer not in products))
                 if isinstance(s, Sync) and s.scope == FLAGS else s for s in loop.body)
    with pytest.raises(BarrierError):
        simulate(_with_loop_body(plan, body), args)


@needs_nvrtc
def test_cell_waits_compile(monkeypatch):
    """The full-size LSTM bs1 with CELL_WAITS: no grid barrier in its loop; NVRTC compiles it (the cells' loads
    spin on the gates' flag words at their windows' offsets). A cell loads the flag words of its published
    leaves with its other leaves, before the issue fence, and finishes them (checks their tags) after it: its
    loads in flight together, not one round trip a gate."""
    monkeypatch.setattr(flags, "CELL_WAITS", True)
    lowered = zoo_lowered("lstm", 1)
    assert loop_grid_barriers(lowered.lowering.plan) == 0
    assert "_f + 256, gdsl_it0" in lowered.source
    source = lowered.source
    load = source.index("? gdsl_flag_load(i")          # (the first such load: a cell's, in its fill of leaves)
    start = source.rindex("\nGDSL_", 0, load)
    cell = source[start:source.index("\n}\n", load)]
    assert "_row_chain_" in cell.split("(")[0] and "gdsl_flag_get(i" not in cell
    assert cell.index("? gdsl_flag_load(i") < cell.index("__syncwarp();") < cell.index("gdsl_flag_finish(i")
    assert cuda_toolchain.compile_cuda(lowered.source, "sm_90")[:4] == b"\x7fELF"


@pytest.mark.gpu
def test_gpu_cell_waits_many_runs(monkeypatch):
    """CELL_WAITS on the GPU: the small LSTM 200 times and the full-size bs1 20 times against the references."""
    from models import common, load
    monkeypatch.setattr(flags, "CELL_WAITS", True)
    for small, runs in ((True, 200), (False, 20)):
        prob = common.build_problem(load("lstm"), 1, small=small)
        f = prob.model.make_forward(prob.cfg, backend="cuda")
        assert loop_grid_barriers(f.lower(prob.weights, prob.batches[0]).lowering.plan) == 0
        expected = prob.references()[0]
        for _ in range(runs):
            assert common.compare(gdsl.to_numpy(f(prob.weights, prob.batches[0])), expected) == []
