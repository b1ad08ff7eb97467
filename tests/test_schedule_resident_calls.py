"""A recursive function's matmul weights kept in shared memory for the whole kernel (the scheduler option
`resident_calls`, resident.keep_resident_in_functions): which ops get them, where their regions lie beside a
loop's, what the plan prints, and that every backend computes the same results as the interpreter.

Checked on the plan simulator (race checks), the C-family CPU emulator (vEUs as threads; the tiles are
staged when the kernel starts and read by every call), the cpu backend (the option has no effect) and NVRTC
(the CUDA source compiles), on unbalanced trees, a tree of depth 1, a lone leaf and RAE's sizes."""
import numpy as np
import pytest
from strategies import needs_cxx, needs_nvrtc
from test_schedule_fork import TREES, wide_args
from test_schedule_recursion import CHAIN, check_rae_overflow, check_rae_trees, encoder, flat_args, height, rae_case

import gdsl
import gdsl.numpy as gnp
from gdsl.backends.cfamily import emulator
from gdsl.backends.cuda import toolchain as cuda_toolchain
from gdsl.interpreter import run_program
from gdsl.schedule import schedule, scheduler
from gdsl.schedule.plan import Fork, Loop, Wave, walk
from gdsl.schedule.resident import RESIDENT, region_bytes, tile_bytes
from gdsl.schedule.simulate import simulate

BUDGET = 1 << 16


def resident_in_functions(plan):
    """The resident tasks of the plan's recursive functions, outside and inside their loops."""
    outside, inside = [], []
    for f in plan.functions:
        loops = [s for s in walk(f.body) if isinstance(s, Loop)]
        in_loops = {id(t) for loop in loops for s in walk(loop.body) if isinstance(s, Wave) for t in s.tasks}
        for s in walk(f.body):
            for t in s.tasks if isinstance(s, Wave) else ():
                if RESIDENT in t.op.params:
                    (inside if id(t) in in_loops else outside).append(t)
    return outside, inside


def encoder_plan(tree, hidden=32, grid=8, **options):
    args = wide_args(tree, hidden)
    program = gdsl.make_ir(encoder(height(tree) + 2, hidden))(*args)
    return program, args, schedule(program, grid=grid, epilogues=CHAIN, resident_bytes=BUDGET, **options)


def looping_encoder(max_depth, hidden):
    """The encoder with a loop after the node's matmul that multiplies by U twice: a matmul resident at the
    loop (staged at each entry) beside the node's, resident for the kernel."""
    def program(x, W, U, b, left, right, is_leaf, root):
        @gdsl.recurse(result=gdsl.ShapeDtype((hidden,), gdsl.float32), max_depth=max_depth)
        def encode(node):
            def inner():
                h = gnp.tanh(gnp.concatenate([encode(left[node]), encode(right[node])]) @ W + b)
                return gdsl.fori_loop(0, 2, lambda i, g: gnp.tanh(g @ U), h)
            return gdsl.cond(is_leaf[node], lambda: x[node], inner)
        return encode(root)
    return program


def looping_args(tree, hidden):
    x, W, b, *rest = wide_args(tree, hidden)
    U = (np.random.default_rng(1).standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
    return (x, W, U, b, *rest)


def weights_computed_first(max_depth, hidden):
    """W scaled before the recursion: a temporary the kernel writes, not there when the kernel starts."""
    base = encoder(max_depth, hidden)

    def program(x, W, b, left, right, is_leaf, root):
        return base(x, W * 0.5, b, left, right, is_leaf, root)
    return program


# ------------------------------------------------------------------------------------------ the plan

def test_the_node_matmul_keeps_its_weights_for_the_kernel():
    _, _, plan = encoder_plan(TREES["unbalanced"], resident_calls=True)
    (task,), inside = resident_in_functions(plan)
    assert not inside and task.op.inputs[1].storage.kind == "input"
    assert task.op.params[RESIDENT][0] == 0
    assert region_bytes(plan) == -(-task.op.n_utasks // task.count) * tile_bytes(task.op)
    assert "B resident in shared memory at +0" in str(plan)


def test_off_by_default_with_forks_host_control_or_too_small_a_budget():
    program, _, plan = encoder_plan(TREES["unbalanced"])
    assert resident_in_functions(plan) == ([], [])
    assert resident_in_functions(schedule(program, grid=8, epilogues=CHAIN, resident_bytes=BUDGET, fork=True,
                                          resident_calls=True)) == ([], [])
    assert resident_in_functions(schedule(program, grid=8, control="host", resident_bytes=BUDGET,
                                          resident_calls=True)) == ([], [])
    (task,), _ = resident_in_functions(schedule(program, grid=8, epilogues=CHAIN, resident_bytes=BUDGET,
                                                resident_calls=True))
    short = tile_bytes(task.op) - 1
    assert resident_in_functions(schedule(program, grid=8, epilogues=CHAIN, resident_bytes=short,
                                          resident_calls=True)) == ([], [])


def test_weights_the_kernel_computes_stay_in_memory():
    tree = TREES["unbalanced"]
    args = wide_args(tree, 32)
    program = gdsl.make_ir(weights_computed_first(height(tree) + 2, 32))(*args)
    plan = schedule(program, grid=8, epilogues=CHAIN, resident_bytes=BUDGET, resident_calls=True)
    assert resident_in_functions(plan) == ([], [])


def test_the_kernel_region_starts_past_the_loops():
    tree = TREES["unbalanced"]
    args = looping_args(tree, 32)
    program = gdsl.make_ir(looping_encoder(height(tree) + 2, 32))(*args)
    plan = schedule(program, grid=4, epilogues=CHAIN, resident_bytes=BUDGET, resident_calls=True)
    (node,), (loop_task,) = resident_in_functions(plan)
    loop_end = -(-loop_task.op.n_utasks // loop_task.count) * tile_bytes(loop_task.op)
    assert loop_task.op.params[RESIDENT][0] == 0 and node.op.params[RESIDENT][0] == loop_end
    assert region_bytes(plan) == loop_end + -(-node.op.n_utasks // node.count) * tile_bytes(node.op)


# ------------------------------------------------------------------------------------------ results

@pytest.mark.parametrize("name", list(TREES))
def test_simulated(name):
    program, args, plan = encoder_plan(TREES[name], resident_calls=True)
    flat = flat_args(args)
    np.testing.assert_allclose(simulate(plan, flat)[0], run_program(program, flat)[0], rtol=1e-4, atol=1e-5)


@needs_cxx
@pytest.mark.parametrize("name", list(TREES))
def test_emulated(name):
    """vEUs as threads: each vEU stages its tiles once, then every call's matmul reads them."""
    tree = TREES[name]
    args = wide_args(tree, 32)
    fn = encoder(height(tree) + 2, 32)
    expected = run_program(gdsl.make_ir(fn)(*args), flat_args(args))[0]
    for grid in (1, 3, 8):
        got = emulator.emulate(fn, *args, grid=grid, block=32, resident_calls=True)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@needs_cxx
def test_emulated_with_a_loop_in_the_body():
    tree = TREES["unbalanced"]
    args = looping_args(tree, 32)
    fn = looping_encoder(height(tree) + 2, 32)
    program = gdsl.make_ir(fn)(*args)
    expected = run_program(program, flat_args(args))[0]
    np.testing.assert_allclose(simulate(schedule(program, grid=4, epilogues=CHAIN, resident_bytes=BUDGET,
                                                 resident_calls=True), flat_args(args))[0],
                               expected, rtol=1e-4, atol=1e-5)
    for grid in (1, 4):
        got = emulator.emulate(fn, *args, grid=grid, block=32, resident_calls=True)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def loop_residents(plan):
    return [t.op.params[RESIDENT] for f in plan.functions for s in walk(f.body) if isinstance(s, Wave)
            for t in s.tasks if RESIDENT in t.op.params]


def test_a_forked_bodys_loop_keeps_no_resident_tiles(monkeypatch):
    """A forked call's vEU may stand for several plan vEUs (a group of one vEU runs all four uTasks of the loop's
    `g @ U`), so their resident tiles would share its one region: with Forks the function's loops read their
    weights from memory (resident.without_resident); without, the loop keeps them."""
    monkeypatch.setattr(scheduler, "FORK_MIN_SHARE", 0.01)
    tree = TREES["unbalanced"]
    program = gdsl.make_ir(looping_encoder(height(tree) + 2, 64))(*looping_args(tree, 64))
    options = dict(grid=8, epilogues=CHAIN, resident_bytes=48 * 1024)
    assert loop_residents(schedule(program, **options)) == [(0, 4, 1)]
    plan = schedule(program, fork=True, **options)
    assert any(isinstance(s, Fork) for f in plan.functions for s in walk(f.body)) and loop_residents(plan) == []


@needs_cxx
def test_emulated_loop_in_a_forked_body(monkeypatch):
    """(Before resident.without_resident: errors of 0.45 on the unbalanced tree.)"""
    monkeypatch.setattr(scheduler, "FORK_MIN_SHARE", 0.01)
    tree = TREES["unbalanced"]
    args = looping_args(tree, 64)
    fn = looping_encoder(height(tree) + 2, 64)
    expected = run_program(gdsl.make_ir(fn)(*args), flat_args(args))[0]
    for grid in (3, 8):
        got = emulator.emulate(fn, *args, grid=grid, block=32, fork=True, resident=True)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@needs_cxx
def test_emulated_overflow():
    args = wide_args((TREES["left chain"], None), 32)
    with pytest.raises(gdsl.RecursionDepthError):
        emulator.emulate(encoder(3, 32), *args, grid=4, block=32, resident_calls=True)


@needs_cxx
def test_emulated_rae_small():
    from models import rae
    cfg = rae.small()
    weights = rae.init_weights(cfg)
    for inputs in [rae.make_inputs(cfg, tree="fixed")] + [rae.make_inputs(cfg, seed=s) for s in range(2)]:
        got = emulator.emulate(lambda w, t: rae.forward(w, t, cfg), weights, inputs, grid=8, block=32,
                               resident_calls=True)
        np.testing.assert_allclose(got, rae.reference(weights, inputs, cfg), rtol=1e-4, atol=1e-5)


def test_rae_bench_size_simulated():
    program, flat, _, _ = rae_case()
    plan = schedule(program, grid=132, epilogues=CHAIN, resident_bytes=192 * 1024, resident_calls=True,
                    thin_gemv=False)
    (task,), _ = resident_in_functions(plan)
    assert task.count == 32 and tile_bytes(task.op) == 1024 * 16 * 4      # W's 64 KiB column tile per vEU
    np.testing.assert_allclose(simulate(plan, flat)[0], run_program(program, flat)[0], rtol=1e-4, atol=1e-5)


def test_cpu_backend_accepts_the_option():
    tree = TREES["unbalanced"]
    args = wide_args(tree, 16)
    fn = encoder(height(tree) + 2, 16)
    got = gdsl.to_numpy(gdsl.jit(fn, backend="cpu", grid=3, resident_calls=True)(*args))
    np.testing.assert_allclose(got, run_program(gdsl.make_ir(fn)(*args), flat_args(args))[0], rtol=1e-4, atol=1e-5)


@needs_nvrtc
def test_cuda_source_compiles():
    from models import rae
    cfg = rae.Config()
    weights, inputs = rae.init_weights(cfg), rae.make_inputs(cfg, tree="fixed")
    lowered = gdsl.jit(lambda w, t: rae.forward(w, t, cfg), backend="cuda", grid=132,
                       resident_calls=True).lower(weights, inputs)
    assert "gdsl_stage_columns(in0" in lowered.source
    assert cuda_toolchain.compile_cuda(lowered.source, "sm_90")[:4] == b"\x7fELF"


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{"resident_calls": True}, {"narrow": True},
                                     {"resident_calls": True, "narrow": True}])
def test_cuda_rae_bench_trees(options):
    """On the GPU: RAE's bench size with W resident, on only the vEUs it uses, or both, on the fixed tree,
    random trees and a lone leaf, against the numpy reference; an overflowing launch raises and the next one
    is right."""
    lowered = rae_lowered("cuda", **options)
    assert ("gdsl_stage_columns(in0" in lowered.source) == bool(options.get("resident_calls"))
    assert (lowered.plan.grid == 65) == bool(options.get("narrow"))   # (the matmul's 64 thin tiles, the leaf aside)
    check_rae_trees(**options)
    check_rae_overflow(**options)



# ------------------------------------------------------------------------ narrow: only the vEUs used

def rae_lowered(backend, tree="fixed", **options):
    from models import rae
    cfg = rae.Config()
    weights, inputs = rae.init_weights(cfg), rae.make_inputs(cfg, tree=tree)
    return gdsl.jit(lambda w, t: rae.forward(w, t, cfg), backend=backend, **options).lower(weights, inputs).lowering


@needs_nvrtc
def test_narrow_launches_only_the_veus_the_waves_use():
    from gdsl.backends.cfamily.lower import used_veus
    # (By default the node GEMV takes 64 thin tiles, utasks.thin_columns, and the leaf runs aside, on vEU 64.)
    assert rae_lowered("cuda", narrow=True).plan.grid == 65
    assert rae_lowered("cuda", narrow=True, thin_gemv=False).plan.grid == 33
    wide = rae_lowered("cuda", aside=False)
    narrow = rae_lowered("cuda", narrow=True, resident_calls=True, aside=False)
    assert used_veus(wide) == 64 < wide.plan.grid
    assert narrow.plan.grid == 64 and used_veus(narrow) == 64
    assert "gdsl_stage_columns(in0" in narrow.source
    assert cuda_toolchain.compile_cuda(narrow.source, "sm_90")[:4] == b"\x7fELF"
    assert rae_lowered("cuda", narrow=True, fork=True).plan.grid == wide.plan.grid     # Forks use the grid
    assert rae_lowered("cuda", narrow=True, grid=64).plan.grid == 64                 # an explicit grid stays
    assert rae_lowered("hip", narrow=True, aside=False).plan.grid == 64


def test_narrow_takes_exactly_the_veus_used():
    """A matmul of 128 column tiles narrows to 128 vEUs; an elementwise op over every vEU keeps the grid."""
    from gdsl.backends.cfamily.lower import used_veus
    rng_args = np.random.default_rng(0)
    args = (rng_args.standard_normal((256, 64)).astype(np.float32),
            rng_args.standard_normal((64, 256)).astype(np.float32))
    plain = gdsl.jit(lambda x, W: gnp.tanh(x @ W), backend="cuda").lower(*args).lowering
    narrow = gdsl.jit(lambda x, W: gnp.tanh(x @ W), backend="cuda", narrow=True).lower(*args).lowering
    assert narrow.plan.grid == used_veus(plain) == used_veus(narrow) < plain.plan.grid
    big = np.ones((1 << 20,), np.float32)
    everywhere = gdsl.jit(gnp.tanh, backend="cuda", narrow=True).lower(big).lowering
    assert used_veus(everywhere) == everywhere.plan.grid == gdsl.jit(gnp.tanh, backend="cuda").lower(
        big).lowering.plan.grid


@needs_cxx
def test_the_narrowed_grid_computes_the_same():
    """The emulator at the grid `narrow` picks (the vEUs the plan at a wider grid uses)."""
    from gdsl.backends.cfamily.emulator import EmulatorDialect
    from gdsl.backends.cfamily.lower import check_options, lower_with_grid, narrowed
    tree = TREES["unbalanced"]
    args = wide_args(tree, 64)
    fn = encoder(height(tree) + 2, 64)
    program = gdsl.make_ir(fn)(*args)
    opts = check_options({"narrow": True, "block": 32}, EmulatorDialect)
    lowering = narrowed(program, opts, lower_with_grid(program, opts, 16, EmulatorDialect()),
                        lambda p, o, g: lower_with_grid(p, o, g, EmulatorDialect()))
    assert 1 <= lowering.plan.grid < 16
    expected = run_program(program, flat_args(args))[0]
    got = emulator.emulate(fn, *args, grid=lowering.plan.grid, block=32, resident_calls=True)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
