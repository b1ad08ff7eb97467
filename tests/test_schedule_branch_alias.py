"""Branches that forward an operand (plan.Branch.in_place, Scheduler.schedule_cond): a cond result that a branch
returns unchanged lives in that operand's storage when the operand is dead after the cond, so the forwarding
branch runs nothing (no copy, no wave, no barrier) and the other branches write the result in place, or copy
into it when writing in place would race with a reader.

Every program runs on the plan simulator (race checks, both placements, several grids), the CPU backend and
the CUDA emulator against the interpreter, and its CUDA source compiles with NVRTC; the plans are checked
for where aliasing must happen and where it must not (an operand returned, read after the cond, a program
input, a loop invariant, an in-place update, two results forwarding one operand)."""
import functools

import numpy as np
import pytest
from strategies import BACKEND_TOLERANCE, assert_trees_close, needs_cxx, needs_nvrtc
from test_schedule import check_plan

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import emulator
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.schedule import schedule
from gdsl.schedule.plan import COPY, Assign, Branch, Loop, Sync, Uniforms, Wave, plan_statements, walk
from gdsl.schedule.simulate import Simulator
from gdsl.tracing.pytree import tree_flatten

rng = np.random.default_rng(12)


def _f32(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ------------------------------------------------------------------------------------------- programs
# Forwarding branches whose result may take the operand's storage.

def skip_block(p, x):
    """A block that runs or is skipped: the skip branch returns its operand."""
    s = x * 2.0
    y = gdsl.cond(p > 0, lambda s: gnp.tanh(s) * 0.5 + s, lambda s: s, s)
    return y * 3.0


def residual_chain(gate, x, W):
    """BlockDrop's pattern: blocks called with (x, shortcut=x, mask), the same variable twice; the block
    reads x through a matmul (other elements) and the shortcut at the element it writes."""
    x = gnp.tanh(x)
    for t in range(3):
        def run(x, shortcut, m, W=W):
            return m * gdsl.nn.relu(shortcut + x @ W) + (1 - m) * shortcut
        x = gdsl.cond(gate[t] > 0, run, lambda x, shortcut, m: shortcut, x, x, gate[t])
    return x.sum(axis=0)


def loop_carry(gate, h, W):
    """A carry that a branch leaves unchanged: the cond's result is the carry's new value, in place."""
    def body(i, h):
        return gdsl.cond(gate[i] > 0, lambda h: gnp.tanh(h @ W), lambda h: h, h)
    return gdsl.fori_loop(0, 4, body, h)


def nested(p, q, x):
    """A cond inside a branch that forwards the outer branch's operand (itself forwarded outside)."""
    s = x + 1.0

    def inner(s):
        return gdsl.cond(q > 0, lambda s: s * 3.0, lambda s: s, s)
    return gdsl.cond(p > 0, inner, lambda s: s, s) - 1.0


def switch_forwards(i, a, b):
    """Several branches forward an operand: the result lives in `a`'s storage; the branch that forwards
    `b` copies it there, the one that adds writes in place."""
    a, b = a * 2.0, b + 1.0
    out = gdsl.switch(i, [lambda a, b: a, lambda a, b: b, lambda a, b: a + b, lambda a, b: b - a], a, b)
    return out * 0.5


def matmul_in_branch(p, x, W):
    """The taken branch's result reads the operand at other elements (a matmul): it must not write the
    operand's storage while reading it, so it computes elsewhere and copies."""
    s = gnp.tanh(x)
    return gdsl.cond(p > 0, lambda s: s @ W, lambda s: s, s) + 1.0


# Forwarding branches whose result must NOT take the operand's storage.

def operand_returned(p, x):
    """The operand is a program result (its own output buffer): the cond must not write it."""
    s = x * 2.0
    return gdsl.cond(p > 0, lambda s: s + 1.0, lambda s: s, s) * 2.0, s


def operand_read_after(p, x):
    s = x * 2.0
    y = gdsl.cond(p > 0, lambda s: s + 1.0, lambda s: s, s)
    return y * s[0]


def program_input(p, x):
    return gdsl.cond(p > 0, lambda x: x + 1.0, lambda x: x, x)


def loop_invariant(gate, x):
    """The forwarded operand is computed outside the loop: every iteration reads it again."""
    s = x * 2.0

    def body(i, acc):
        return acc + gdsl.cond(gate[i] > 0, lambda s: s * 3.0, lambda s: s, s)
    return gdsl.fori_loop(0, 4, body, gnp.zeros_like(x))


def carry_read_after(gate, h):
    """The carry is read after the cond in the body: its storage must keep the old value."""
    def body(i, h):
        y = gdsl.cond(gate[i] > 0, lambda h: h * 0.5 + 1.0, lambda h: h, h)
        return y + h * 0.25
    return gdsl.fori_loop(0, 3, body, h)


def carry_swapped(gate, h, c):
    """The forwarded carry is also passed on to the other carry."""
    def body(i, hc):
        h, c = hc
        return gdsl.cond(gate[i] > 0, lambda h: h + c, lambda h: h, h), h
    return gdsl.fori_loop(0, 3, body, (h, c))


def updated_after(p, x, u):
    """The operand is updated (dynamic_update_slice) after the cond: the cond must not have written it."""
    s = x * 2.0
    y = gdsl.cond(p > 0, lambda s: s + 1.0, lambda s: s, s)
    return y * 2.0, s.at[1:3].set(u)


def carry_updated_in_place(gate, buf, u):
    """A carry forwarded by a cond, then updated by dynamic_update_slice: the update, not the cond, gives
    the carry's new value, so the cond's result gets storage of its own (the carry is not overwritten
    before the update reads it)."""
    def body(i, buf):
        y = gdsl.cond(gate[i] > 0, lambda b: b * 2.0, lambda b: b, buf)
        return y.at[i].set(u[0] * i.astype(gdsl.float32))
    return gdsl.fori_loop(0, 3, body, buf)


def two_results_one_operand(p, x):
    """Both results forward the same operand: only one of them may live in its storage."""
    s = x + 1.0
    a, b = gdsl.cond(p > 0, lambda s: (s * 2.0, s * 3.0), lambda s: (s, s), s)
    return a - b


def scalar_result(p, x):
    """A one-element result is a uniform (a register): forwarding it is an assignment, nothing changes."""
    s = x.sum()
    return gdsl.cond(p > 0, lambda s: s * 2.0, lambda s: s, s) + x


# The predicate's read (a uniform op on a buffer) and the barrier after it.

def gates_computed(gate, x):
    """The gates are computed once, then read per block: no barrier after each predicate read (the last
    result is the program output: it keeps its own buffer)."""
    g = gate * 2.0 - 0.5
    for t in range(3):
        x = gdsl.cond(g[t] > 0, lambda x: gnp.tanh(x) + x, lambda x: x, x * 1.0 if t == 0 else x)
    return x


def predicate_of_the_operand(x):
    """The predicate reads the operand that the taken branch then overwrites in place: the barrier after
    the read stays (a vEU must not overwrite what another is still reading)."""
    s = x * 2.0
    return gdsl.cond(s[0, 0] > 0, lambda s: s * 0.5 + 1.0, lambda s: s, s) * 3.0


def predicate_in_loop(gate, x):
    """A gate buffer rewritten every iteration: its reads keep their barrier."""
    def body(i, carry):
        g, x = carry
        g = g * -1.0
        x = gdsl.cond(g[i] > 0, lambda x: x + 1.0, lambda x: x, x)
        return g, x
    return gdsl.fori_loop(0, 4, body, (gate * 1.0, x))


def token_loop(table, w, h):
    """A decoder's loop (Seq2seq's shape): the next token, an argmax op's result, is read by every vEU at the
    end of a step; the buffer it lives in is written again only after grid barriers of the next step, so
    the read needs no barrier of its own. With a small state everything runs on vEU 0 between block syncs,
    and the next write of what the uniform ops read comes before any grid barrier: the barrier stays."""
    def cond(c):
        tok, h, n = c
        return (tok > 0) & (n < 6)

    def body(c):
        tok, h, n = c
        h = gnp.tanh(gnp.take(table, tok, axis=0) @ w + h)
        return (gnp.argmax(h) % table.shape[0]).astype(gdsl.int32), h, n + 1
    return gdsl.while_loop(cond, body, (np.int32(1), h, np.int32(0)))


def columns_gate_blocks(probs, x):
    """BlockDrop at batch > 16: each block's predicate sums a column of the actions (a strided slice and a
    64-element reduction: ops, not uniforms) and its mask is that column; both feed only the block's cond,
    so they are computed before the first block (_cond_inputs_early)."""
    action = (probs > 0.5).astype(gdsl.float32)
    x = x * 1.0
    for t in range(3):
        mask = action[:, t].reshape((-1, 1))
        x = gdsl.cond(gnp.sum(action[:, t]) > 0, lambda x, m: m * gnp.tanh(x) + (1 - m) * x,
                      lambda x, m: x, x, mask)
    return x * 2.0


def output_gates_blocks(x):
    """SkipNet's pattern: each predicate needs the previous block's output, and one is also returned:
    nothing moves."""
    preds = []
    for _ in range(3):
        p = x.sum() > 0
        preds.append(p)
        x = gdsl.cond(p, lambda x: gnp.tanh(x) - 0.25, lambda x: x, x)
    return x, preds[1]


ON, OFF = np.float32(1.0), np.float32(-1.0)
GATES = np.array([1.0, -1.0, 1.0, -1.0], np.float32)
PROGRAMS = {
    skip_block: [(ON, _f32(4, 8)), (OFF, _f32(4, 8))],
    residual_chain: [(GATES, _f32(4, 8), _f32(8, 8, scale=0.3)), (-GATES, _f32(4, 8), _f32(8, 8, scale=0.3))],
    loop_carry: [(GATES, _f32(2, 8), _f32(8, 8, scale=0.3))],
    nested: [(p, q, _f32(3, 5)) for p in (ON, OFF) for q in (ON, OFF)],
    switch_forwards: [(np.int32(i), _f32(6, 4), _f32(6, 4)) for i in range(4)],
    matmul_in_branch: [(ON, _f32(64, 64), _f32(64, 64, scale=0.1)), (OFF, _f32(64, 64), _f32(64, 64))],
    operand_returned: [(ON, _f32(5, 3)), (OFF, _f32(5, 3))],
    operand_read_after: [(ON, _f32(5, 3)), (OFF, _f32(5, 3))],
    program_input: [(ON, _f32(5, 3)), (OFF, _f32(5, 3))],
    loop_invariant: [(GATES, _f32(5, 3))],
    carry_read_after: [(GATES, _f32(5, 3))],
    carry_swapped: [(GATES, _f32(5, 3), _f32(5, 3))],
    updated_after: [(ON, _f32(4, 3), _f32(2, 3)), (OFF, _f32(4, 3), _f32(2, 3))],
    carry_updated_in_place: [(GATES, _f32(4, 3), _f32(1, 3))],
    two_results_one_operand: [(ON, _f32(5, 3)), (OFF, _f32(5, 3))],
    scalar_result: [(ON, _f32(5, 3)), (OFF, _f32(5, 3))],
    gates_computed: [(GATES[:3], _f32(40, 8)), (-GATES[:3], _f32(40, 8))],
    predicate_of_the_operand: [(_f32(40, 8),), (-np.abs(_f32(40, 8)),)],
    predicate_in_loop: [(GATES, _f32(40, 8))],
    token_loop: [(_f32(10, 64), _f32(64, 2000, scale=0.1), _f32(1, 2000)), (_f32(10, 8), _f32(8, 10), _f32(10))],
    columns_gate_blocks: [((rng.random((64, 3)) * np.array([1.0, 0.4, 1.0])).astype(np.float32), _f32(64, 8))],
    output_gates_blocks: [(_f32(6, 4) + 0.3,), (_f32(6, 4) - 0.3,)],
}
# in-place results in the plan
ALIASED = {skip_block: 1, residual_chain: 3, loop_carry: 1, nested: 2, switch_forwards: 1, matmul_in_branch: 1,
           two_results_one_operand: 1, gates_computed: 2, predicate_of_the_operand: 1, predicate_in_loop: 1,
           columns_gate_blocks: 3, output_gates_blocks: 1}
NAMES = [f.__name__ for f in PROGRAMS]


def _branches(plan):
    return [s for s in plan_statements(plan) if isinstance(s, Branch)]


def _flat(args):
    flat, _ = tree_flatten((tuple(args), {}))
    return [np.asarray(a) for a in flat]


def _expected(fn, args):
    return gdsl.jit(fn, backend="interpret")(*args)


# ------------------------------------------------------------------------------------------- plans

@pytest.mark.parametrize("fn", list(PROGRAMS), ids=NAMES)
def test_plan_simulates_like_the_interpreter(fn):
    for args in PROGRAMS[fn]:
        check_plan(fn, *args)


@pytest.mark.parametrize("fn", list(PROGRAMS), ids=NAMES)
def test_results_alias_exactly_where_safe(fn):
    plan = schedule(gdsl.make_ir(fn)(*PROGRAMS[fn][0]), grid=132)
    in_place = [v for b in _branches(plan) for v in b.in_place]
    assert len(in_place) == ALIASED.get(fn, 0)
    for branch in _branches(plan):
        if branch.in_place:
            assert " (results in their operands' storage, updated in place: " in str(plan)
            assert all(v.buffer is not None and v.buffer.kind not in ("input", "const") for v in branch.in_place)


def test_a_skipped_block_costs_nothing_but_its_predicate():
    plan = schedule(gdsl.make_ir(skip_block)(ON, _f32(4, 8)), grid=132)
    (branch,) = _branches(plan)
    skip, run = branch.branches
    assert skip == ()                                   # no copy, no wave, no barrier
    ops = [t.op for s in walk(run) if isinstance(s, Wave) for t in s.tasks]
    assert [op.outputs[0].storage for op in ops] == [branch.in_place[0].storage]   # written in place
    assert "case 0:  (nothing to do: the results are already in place)" in str(plan)


def _executed(plan, args):
    """(waves, grid barriers, copy uTasks) the simulator executes for `args`."""
    sim = Simulator(plan)
    waves = copies = 0
    run_wave = sim.run_wave

    def counting(stmt):
        nonlocal waves, copies
        waves += 1
        copies += sum(t.op.n_utasks for t in stmt.tasks if t.op.kind == COPY.name)
        run_wave(stmt)
    sim.run_wave = counting
    sim.run(_flat(args))
    return waves, sim.stats["grid_barriers"], copies


def test_skipped_blocks_execute_no_waves_and_no_copies():
    """BlockDrop's pattern with every gate off: the waves and barriers of the prologue and predicates
    only; with every gate on, no copy either (each block writes its result in place)."""
    x, W = _f32(4, 8), _f32(8, 8, scale=0.3)
    plan = schedule(gdsl.make_ir(residual_chain)(GATES, x, W), grid=132)
    off_waves, off_barriers, off_copies = _executed(plan, (-np.abs(GATES), x, W))
    on_waves, on_barriers, on_copies = _executed(plan, (np.abs(GATES), x, W))
    assert off_copies == on_copies == 0
    run = [b.branches[1] for b in _branches(plan)]
    run_waves = sum(sum(isinstance(s, Wave) for s in walk(r)) for r in run)
    run_barriers = sum(sum(isinstance(s, Sync) and s.scope == "grid" for s in walk(r)) for r in run)
    assert on_waves - off_waves == run_waves and on_barriers - off_barriers == run_barriers


def test_loop_carry_forwarded_in_place():
    """The skip branch of a carry's cond runs nothing, the taken one writes the carry in place (h @ W reads
    all of h, but in the wave before tanh overwrites it), and the body copies nothing back."""
    plan = schedule(gdsl.make_ir(loop_carry)(*PROGRAMS[loop_carry][0]), grid=132)
    (loop,) = [s for s in plan_statements(plan) if isinstance(s, Loop)]
    (branch,) = [s for s in loop.body if isinstance(s, Branch)]
    assert branch.branches[0] == ()
    copies = [t.op for s in walk(loop.body) if isinstance(s, Wave) for t in s.tasks if t.op.kind == COPY.name]
    assert copies == []


def test_a_program_input_is_never_written():
    plan = schedule(gdsl.make_ir(program_input)(*PROGRAMS[program_input][0]), grid=132)
    (branch,) = _branches(plan)
    assert not branch.in_place
    writes = {v.storage for s in plan_statements(plan) if isinstance(s, Wave) for t in s.tasks for v in t.op.outputs}
    assert plan.inputs[1].storage not in writes


def test_host_control_prints_and_keeps_the_alias():
    plan = schedule(gdsl.make_ir(skip_block)(ON, _f32(4, 8)), control="host", grid=4)
    (branch,) = _branches(plan)
    assert branch.in_place and branch.branches[0] == ()
    assert "updated in place" in str(plan)


def _barrier_after_predicate(plan) -> list:
    """For each Branch of the kernel body: is there a grid barrier between the predicate's uniform ops
    and the branch?"""
    body = plan.kernels[0].body
    out = []
    for k, stmt in enumerate(body):
        if isinstance(stmt, Branch):
            before = body[k - 1] if k else None
            out.append(isinstance(before, Sync) and before.scope == "grid")
    return out


def test_a_predicate_read_from_a_buffer_written_once_needs_no_barrier():
    plan = schedule(gdsl.make_ir(gates_computed)(*PROGRAMS[gates_computed][0]), grid=132)
    assert _barrier_after_predicate(plan) == [False, False, False]


def test_a_predicate_read_from_a_buffer_written_later_keeps_its_barrier():
    plan = schedule(gdsl.make_ir(predicate_of_the_operand)(*PROGRAMS[predicate_of_the_operand][0]), grid=132)
    assert _barrier_after_predicate(plan) == [True]
    plan = schedule(gdsl.make_ir(predicate_in_loop)(*PROGRAMS[predicate_in_loop][0]), grid=132)
    (loop,) = [s for s in plan_statements(plan) if isinstance(s, Loop)]
    k = next(k for k, s in enumerate(loop.body) if isinstance(s, Branch))
    assert isinstance(loop.body[k - 1], Sync) and loop.body[k - 1].scope == "grid"


def _reads_a_buffer(stmt) -> bool:
    """Does every vEU read a buffer in this statement (a uniform op or assignment of an array value)?"""
    if isinstance(stmt, Uniforms):
        return any(not v.is_uniform for u in stmt.ops for v in u.inputs)
    return isinstance(stmt, Assign) and not stmt.src.is_uniform


@pytest.mark.parametrize("case, barrier", [(0, False), (1, True)])
def test_a_token_read_at_the_end_of_a_step_keeps_a_barrier_only_when_needed(case, barrier):
    plan = schedule(gdsl.make_ir(token_loop)(*PROGRAMS[token_loop][case]), grid=132)
    (loop,) = [s for s in plan_statements(plan) if isinstance(s, Loop)]
    reads = max(k for k, s in enumerate(loop.body) if _reads_a_buffer(s))
    after = [s for s in loop.body[reads + 1:] if isinstance(s, Sync) and s.scope == "grid"]
    before = [s for s in loop.body[:reads] if isinstance(s, Sync) and s.scope == "grid"]
    assert bool(after) == barrier
    if not barrier:
        assert before        # (the grid barrier that guards the token instead, on the way around the loop)


def test_what_only_feeds_conds_runs_before_the_first_one():
    plan = schedule(gdsl.make_ir(columns_gate_blocks)(*PROGRAMS[columns_gate_blocks][0]), grid=132)
    body = plan.kernels[0].body
    first = next(k for k, s in enumerate(body) if isinstance(s, Branch))
    between = [s for s in body[first:] if not isinstance(s, Branch)]
    assert [type(s) for s in between] == [Wave]        # only the final `x * 2.0`: no slice, sum or barrier
    kinds = {t.op.kind for s in body[:first] if isinstance(s, Wave) for t in s.tasks}
    assert {"slice", "reduce_sum"} <= kinds


def test_a_predicate_of_the_previous_block_stays_where_it_is():
    plan = schedule(gdsl.make_ir(output_gates_blocks)(*PROGRAMS[output_gates_blocks][0]), grid=132)
    body = plan.kernels[0].body
    branches = [k for k, s in enumerate(body) if isinstance(s, Branch)]
    assert len(branches) == 3 and all(any(isinstance(s, Wave) for s in body[a:b])
                                      for a, b in zip(branches, branches[1:]))


# ------------------------------------------------------------------------------------------- backends

@pytest.mark.parametrize("fn", list(PROGRAMS), ids=NAMES)
def test_cpu_backend_matches_interpreter(fn):
    jitted = gdsl.jit(fn, backend="cpu")
    for args in PROGRAMS[fn]:
        assert_trees_close(gdsl.to_numpy(jitted(*args)), _expected(fn, args), tolerance=BACKEND_TOLERANCE)


EMULATED = [skip_block, residual_chain, loop_carry, nested, switch_forwards, matmul_in_branch, carry_read_after,
            carry_updated_in_place, two_results_one_operand, updated_after, gates_computed, predicate_of_the_operand,
            columns_gate_blocks]


@needs_cxx
@pytest.mark.parametrize("fn", EMULATED, ids=[f.__name__ for f in EMULATED])
def test_emulator_matches_interpreter(fn):
    for k, args in enumerate(PROGRAMS[fn]):
        control = ("device", "host")[k % 2]
        got = emulator.emulate(fn, *args, control=control, grid=3, block=64)
        assert_trees_close(gdsl.to_numpy(got), _expected(fn, args), tolerance=BACKEND_TOLERANCE)


@needs_nvrtc
@pytest.mark.parametrize("control", ["device", "host"])
@pytest.mark.parametrize("fn", list(PROGRAMS), ids=NAMES)
def test_cuda_source_compiles(fn, control, tmp_path, monkeypatch):
    monkeypatch.setenv("GDSL_CACHE_DIR", str(tmp_path))
    source = gdsl.jit(fn, backend="cuda", control=control, grid=132).lower(*PROGRAMS[fn][0]).source
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"


# ------------------------------------------------------------------------------------------- models

@functools.cache
def _model(name, batch):
    from models import common, load
    return common.build_problem(load(name), batch, small=True)


@pytest.mark.parametrize("name", ["blockdrop", "skipnet"])
def test_models_forward_in_place_and_skip_for_free(name):
    prob = _model(name, 1)
    program = gdsl.make_ir(lambda w, x: prob.model.forward(w, x, prob.cfg))(prob.weights, prob.batches[0])
    branches = _branches(schedule(program, grid=132))
    assert branches and all(b.in_place and b.branches[0] == () for b in branches)


def test_skipnet_batch_two_schedules_and_matches_reference():
    """A gate expression reads a one-element operand through a view's window (_inline_window): it has no
    window of its own and is read as it is (this crashed the scheduler at batch 2 and more)."""
    from models import common
    prob = _model("skipnet", 2)
    out = prob.model.make_forward(prob.cfg, backend="cpu")(prob.weights, prob.batches[0])
    assert common.compare(out, prob.references()[0]) == []
