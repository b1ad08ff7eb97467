"""Double-buffered loop temporaries (the scheduler/jit option `double_temps`, scheduler._doubled_temps): where
the flag pass leaves a grid barrier in a loop, the loop unrolled twice (unroll.py) gives the second copy's
temporaries buffers of their own, and the plan is taken when it leaves fewer grid barriers per step. The
LSTM bs1's step-end barrier (the next step's matmuls overwriting gates another layer's cell still reads) then
becomes a flag sync, proven by flags.py; the simulator (race checks on), the g++ emulator and the references
agree; NVRTC compiles it; off (the default), plans are unchanged."""
import numpy as np
import pytest
from strategies import emulated_model_mismatches, needs_nvrtc, zoo_lowered
from test_schedule import check_plan
from test_schedule_flags import LOWERING, _loop, _syncs, rnn

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily.emulator import EmulatorDialect
from gdsl.backends.cfamily.lower import check_options, lower_with_grid
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.jit import make_ir
from gdsl.schedule import schedule
from gdsl.schedule.flags import FLAGS
from gdsl.schedule.scheduler import loop_grid_barriers


@needs_nvrtc
def test_lstm_batch_1_step_end_barrier_becomes_a_flag_sync():
    """LSTM bs1 full size (wavefront): without double_temps 2 grid barriers a step (0 flag syncs); with it
    (the default) the body runs two steps with 2 grid barriers and 2 flag syncs (each step's end), 1 grid
    barrier a step; NVRTC compiles it."""
    default = zoo_lowered("lstm", 1, double_temps=False).lowering.plan
    lowered = zoo_lowered("lstm", 1)
    plan = lowered.lowering.plan
    assert loop_grid_barriers(default) == 2 and "flag_syncs" not in default.stats
    body = _loop(plan).body
    assert plan.stats["steps_per_iteration"] == 2 and loop_grid_barriers(plan) == 1
    assert len(_syncs(body, "grid")) == 2 and len(_syncs(body, FLAGS)) == 2 and plan.stats["flag_syncs"] == 2
    # each flag sync publishes the new `h` of the ten layers (the cells' outputs), at the end of a step
    assert [len(s.published) for s in _syncs(body, FLAGS)] == [10, 10]
    assert cuda_toolchain.compile_cuda(lowered.source, "sm_90")[:4] == b"\x7fELF"


@pytest.mark.parametrize("name,bs,options", [("lstm", 1, {}), ("lstm", 64, {}), ("nasrnn", 1, {}),
                                             ("lstm", 1, {"flags": False})])
def test_default_plans(name, bs, options):
    """double_temps is on by default (None is True); False differs only where the doubled plan converts a
    barrier (the LSTM bs1); with flags off, or where the flag pass leaves no grid barrier (NASRNN bs1's owner
    plan) or the doubled plan would leave as many (the LSTM bs64), every setting gives the same plan."""
    default = str(zoo_lowered(name, bs, **options).lowering.plan)
    assert str(zoo_lowered(name, bs, double_temps=True, **options).lowering.plan) == default
    off = str(zoo_lowered(name, bs, double_temps=False, **options).lowering.plan)
    assert (off != default) == (name == "lstm" and bs == 1 and options.get("flags") is not False)


@pytest.mark.parametrize("bs", [1, 4])
def test_lstm_emulated_matches_the_reference(bs):
    """The small LSTM (grid 4) with double_temps: the plan has the flag syncs (the spinning loaders run on the
    emulator) and one grid barrier a step; the emulator matches the float64 reference."""
    from models import common, load
    prob = common.build_problem(load("lstm"), bs, small=True)

    def forward(weights, inputs):
        return prob.model.forward(weights, inputs, prob.cfg)
    dialect = EmulatorDialect()
    plan = lower_with_grid(make_ir(forward)(prob.weights, prob.batches[0]),
                           check_options({"double_temps": True, "block": 64}, dialect), 4, dialect).plan
    assert plan.stats["flag_syncs"] == 2 and loop_grid_barriers(plan) == 1
    assert emulated_model_mismatches("lstm", bs, double_temps=True) == []


def two_layer(xs, W0, U0, W1, U1):
    """Two stacked recurrences: layer 1 reads layer 0's new state."""
    def step(t, hs):
        h0, h1 = hs
        a = gnp.tanh(xs[t] @ W0 + h0 @ U0)
        return a, gnp.tanh(a @ W1 + h1 @ U1)
    z = gnp.zeros((1, U0.shape[-1]))
    return gdsl.fori_loop(0, xs.shape[0], step, (z, z))[1]


def _fewer_barriers(plan, control):
    if control == "device" and plan.grid > 1:
        assert plan.stats["steps_per_iteration"] == 2 and loop_grid_barriers(plan) < 2


@pytest.mark.parametrize("steps", [4, 5])
def test_small_recurrences_simulate(steps):
    """Two stacked layers and rnn (tanh on other vEUs than the matmul's tiles): with double_temps each leaves
    fewer than the default's 2 grid barriers a step at grid 3 and 132; the simulator (race checks on) matches
    the interpreter (odd step counts: one step peeled)."""
    rng = np.random.default_rng(steps)
    hidden = 64
    xs = rng.standard_normal((steps, 1, hidden)).astype(np.float32)
    ws = [(rng.standard_normal((hidden, hidden)) / 8).astype(np.float32) for _ in range(4)]
    for fn, args in ((two_layer, (xs, *ws)), (rnn, (xs[0], ws[0], xs))):
        assert loop_grid_barriers(schedule(make_ir(fn)(*args), grid=8, flags=True, double_temps=False,
                                           **LOWERING)) == 2
        check_plan(fn, *args, controls=("device",), grids=(3, 132), check=_fewer_barriers, flags=True,
                   double_temps=True, **LOWERING)


def test_bad_value():
    args = (np.zeros((1, 8), np.float32), np.zeros((8, 8), np.float32), np.zeros((2, 1, 8), np.float32))
    with pytest.raises(ValueError, match="double_temps"):
        schedule(make_ir(rnn)(*args), flags=True, double_temps="yes")
