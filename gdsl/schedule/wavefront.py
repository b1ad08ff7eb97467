"""Wavefront: loop skewing of counted loops whose body is a chain of recurrences (an IR-to-IR pass).

A body like a stacked RNN step -- layer 0's cell, whose output feeds layer 1's cell, ... -- is a chain of
recurrences: each cell depends on its own state from the previous iteration and on the cell before it in
the same iteration. Run as written, every iteration waits for the whole chain. Skewed, iteration k runs
cell l for step k - l: the cells of one iteration no longer depend on each other and run side by side,
and T steps of an L-cell chain take T + L - 1 short iterations instead of T long ones (the wavefront of
Rammer / Cocktailer, found here from the loop's dependence structure).

How the body is cut (all from the dependence graph of the body's equations):
- Edges: an equation reading another's result in the same iteration (intra), and one reading a loop
  carry that another equation produced in the previous iteration (carried).
- A recurrence is a strongly connected component with a cycle (through carries). Its stage is one more
  than the largest stage of any recurrence it depends on, so one chain of L recurrences gives L stages.
- Any other equation joins the stage of its earliest consumer (it runs as late as it can, so the value
  it makes needs no delay), or the stage of its producers when nothing in the body reads it.

The skewed loop (trip count T + S - 1 for S stages, counter k) runs stage s for the original step
i = k - s: equations of stage s read `k - s` where they read the counter, and a loop carry produced in
stage s is updated only while lo <= k - s < hi (`select`), so the final carries are the original ones.
A value crossing from stage a to a later stage b is read d = b - a iterations late, through d new loop
carries (registers) -- none when it already is the carry its stage updates, as a layer's `h` is.
Outside its valid range a stage computes on stale or initial values and its result is dropped; indices
clamp (SPEC), so nothing reads out of bounds.

Applied to `while` equations that are counted loops (`fori_loop`: a counter carry starting at a literal,
incremented by 1, the condition `counter < literal`) with at least one iteration, at least two stages, no
loop or recursion inside the body (a stage computing on stale values must not be able to run away). The
counter's final value is restored after the loop. Under the default `wavefront=None` the scheduler plans
the program both ways and keeps the skewed plan only when its loops are estimated faster, the extra
iterations counted (`loop_iteration_ns`): on a wide grid the stages' ops run side by side, but a small
chain that fits one vEU already runs with vEU-local syncs only, and skewing would spread it out.
"""
from __future__ import annotations

import functools
from collections import defaultdict

import numpy as np

from gdsl.core.ir import Eqn, Jaxpr, Lit, Program, ShapedArray, Var, walk_eqns
from gdsl.primitives.control import recurse_call_p, recurse_p, while_p
from gdsl.primitives.elementwise import add_p, and_p, ge_p, lt_p, select_p, sub_p
from gdsl.primitives.structural import broadcast_p
from gdsl.schedule.loops import WhileRewriter, counted_loop
from gdsl.schedule.partition import BARRIER_NS, LAUNCH_NS, LOCAL_SYNC_NS, UTASK_NS
from gdsl.schedule.plan import Branch, Launch, Loop, Sync, Wave

_BOOL = np.dtype(bool)


def skew_program(program: Program) -> tuple[Program, float]:
    """`program` with every chain-of-recurrence loop skewed (the same Program when none is), and the
    largest factor by which skewing stretched a loop's trip count ((T + S - 1) / T; 1.0 when none)."""
    skewer = _Skewer()
    return skewer.program(program), skewer.stretch


def loop_iteration_ns(plan) -> float:
    """Estimated ns of one iteration of every outermost loop of `plan`, summed: per wave the busiest vEU's
    uTasks (the scheduler's cost model), per grid barrier and vEU-local sync their measured costs, a kernel
    launch per Launch (host control). The scheduler compares a program's plans with and without skewing
    by this, the extra iterations of the skewed loops included."""
    return sum(_block_ns(loop.cond + loop.body, plan) for loop in _outer_loops(plan))


def loop_iteration_rounds(plan) -> float:
    """The uTasks one vEU runs one after another in one iteration of every outermost loop of `plan`, summed:
    per wave its busiest vEU's rounds (a branch: its longest case), barriers not counted."""
    return sum(_block_ns(loop.cond + loop.body, plan, wave_rounds, syncs=False) for loop in _outer_loops(plan))


def _outer_loops(plan) -> list:
    return [s for body in [k.body for k in plan.kernels] + [plan.host or ()] for s in body if isinstance(s, Loop)]


def wave_ns(tasks) -> float:
    """Estimated ns of a wave of `tasks`: its busiest vEU's uTasks (the scheduler's cost model)."""
    load: dict[int, float] = defaultdict(float)
    for task in tasks:
        rounds = -(-task.op.n_utasks // task.count)
        for veu in range(task.first, task.first + task.count):
            load[veu] += rounds * (task.op.cost + UTASK_NS)
    return max(load.values(), default=0.0)


def wave_rounds(tasks) -> int:
    """The most uTasks one vEU runs in a wave of `tasks`."""
    load: dict[int, int] = defaultdict(int)
    for task in tasks:
        for veu in range(task.first, task.first + task.count):
            load[veu] += -(-task.op.n_utasks // task.count)
    return max(load.values(), default=0)


def _block_ns(stmts, plan, wave=wave_ns, syncs=True) -> float:
    """The estimate of `stmts`: `wave(tasks)` per wave, with `syncs` the barriers' and launches' costs."""
    total = 0.0
    for stmt in stmts:
        if isinstance(stmt, Wave):
            total += wave(stmt.tasks)
        elif isinstance(stmt, Sync) and syncs:
            total += BARRIER_NS if stmt.scope == "grid" else LOCAL_SYNC_NS
        elif isinstance(stmt, Launch):
            total += LAUNCH_NS * syncs + _block_ns(plan.kernels[stmt.kernel].body, plan, wave, syncs)
        elif isinstance(stmt, Loop):
            total += _block_ns(stmt.cond + stmt.body, plan, wave, syncs)
        elif isinstance(stmt, Branch):
            total += max((_block_ns(b, plan, wave, syncs) for b in stmt.branches), default=0.0)
    return total


class _Skewer(WhileRewriter):
    def __init__(self):
        super().__init__()
        self.stretch = 1.0

    def rewrite_while(self, eqn: Eqn) -> list[Eqn]:
        loop = _CountedLoop.match(eqn)
        if loop is None:
            return [eqn]
        stages = loop.stages()
        if stages is None:
            return [eqn]
        nstages = max(stages.values()) + 1
        if nstages < 2 or not loop.bounds_fit(nstages):
            return [eqn]
        trips = loop.hi - loop.lo
        self.stretch = max(self.stretch, (trips + nstages - 1) / trips)
        return _Skew(loop, stages, nstages).equations()


class _CountedLoop:
    """A `while` equation recognised as `for counter in range(lo, hi)`, with its body's dependence graph."""

    def __init__(self, eqn, counter, lo, hi):
        p = eqn.params
        self.eqn, self.counter, self.lo, self.hi = eqn, counter, lo, hi
        self.nc, self.nb = p["cond_nconsts"], p["body_nconsts"]
        self.cond, self.body = p["cond_jaxpr"], p["body_jaxpr"]
        self.carries = self.body.in_binders[self.nb:]
        self.dtype = self.carries[counter].aval.dtype

    @staticmethod
    def match(eqn: Eqn) -> _CountedLoop | None:
        counted = counted_loop(eqn)
        if counted is None:
            return None
        counter, lo, hi = counted
        body = eqn.params["body_jaxpr"]
        if hi <= lo or any(e.primitive in (while_p, recurse_p, recurse_call_p) for e in walk_eqns(body)):
            return None
        loop = _CountedLoop(eqn, counter, lo, hi)
        # every other carry is either updated by an equation of the body or passed through unchanged
        own = {j for j, (out, b) in enumerate(zip(body.outs, loop.carries)) if out is b}
        produced = {v for e in body.eqns for v in e.outs}
        if any(j != counter and j not in own and out not in produced for j, out in enumerate(body.outs)):
            return None
        return loop

    # -- the dependence graph -------------------------------------------------------------------------
    @functools.cached_property
    def graph(self):
        """(eqns, preds, succs, producer): equation indices with their intra and carried predecessors."""
        eqns = self.body.eqns
        producer = {v: i for i, e in enumerate(eqns) for v in e.outs}
        carry_producer = {b: producer.get(out) for j, (b, out) in enumerate(zip(self.carries, self.body.outs))
                          if j != self.counter}
        preds = [set() for _ in eqns]
        for i, e in enumerate(eqns):
            for a in e.inputs:
                if a in producer:
                    preds[i].add(producer[a])
                elif carry_producer.get(a) is not None:
                    preds[i].add(carry_producer[a])
        succs = [set() for _ in eqns]
        for i, ps in enumerate(preds):
            for p in ps:
                succs[p].add(i)
        return eqns, preds, succs, producer

    def stages(self) -> dict[int, int] | None:
        """The stage of every body equation (by index), or None when the cut would be inconsistent."""
        eqns, preds, succs, _ = self.graph
        components = _strongly_connected(len(eqns), succs)      # in topological order
        component_of = {i: c for c, members in enumerate(components) for i in members}
        cyclic = [len(m) > 1 or m[0] in succs[m[0]] for m in components]
        stage: dict[int, int] = {}
        after = [0] * len(components)     # the least stage a recurrence downstream of the component may take
        lowest = [0] * len(components)    # the largest stage among the component's producers
        for c, members in enumerate(components):
            pred_components = {component_of[p] for i in members for p in preds[i]} - {c}
            after[c] = max((after[q] for q in pred_components), default=0)
            lowest[c] = max((stage[components[q][0]] for q in pred_components if cyclic[q]), default=0)
            lowest[c] = max([lowest[c]] + [lowest[q] for q in pred_components if not cyclic[q]])
            if cyclic[c]:
                for i in members:
                    stage[i] = after[c]
                after[c] += 1
        for c in reversed(range(len(components))):        # the rest: as late as their consumers allow
            if cyclic[c]:
                continue
            (i,) = components[c]
            stage[i] = min((stage[s] for s in succs[i]), default=lowest[c])
        if any(stage[p] > stage[i] for i in range(len(eqns)) for p in preds[i]):
            return None
        return stage

    def bounds_fit(self, nstages: int) -> bool:
        info = np.iinfo(self.dtype)
        return self.hi + nstages - 1 <= info.max


class _Skew:
    """Builds the skewed loop of a _CountedLoop for a given cut into stages."""

    def __init__(self, loop: _CountedLoop, stage: dict[int, int], nstages: int):
        self.loop, self.stage, self.nstages = loop, stage, nstages
        self.prelude: list[Eqn] = []              # counter arithmetic, at the top of the new body
        self.registers: list[tuple[Var, object]] = []     # (binder, the value it takes for the next iteration)
        self.delayed: dict[tuple[object, int], object] = {}
        self.shifted: dict[int, object] = {}     # stage -> the original step it runs (k - s)
        self.valid: dict[int, Var] = {}          # stage -> bool: lo <= k - s < hi
        # a value that is the new value of a carry (masked in its stage) -> that carry's binder, which holds
        # it one iteration late (of carries sharing a new value, any one serves a later stage's read: they
        # differ only before the value's first step, when the reader's step is not valid either)
        body, counter = loop.body, loop.counter
        produced = {v for e in body.eqns for v in e.outs}
        self.carry_of_out = {out: b for j, (b, out) in enumerate(zip(loop.carries, body.outs))
                             if j != counter and out is not b and out in produced}

    def lit(self, value) -> Lit:
        return Lit.of(value, self.loop.dtype)

    def scalar(self, primitive, *inputs, dtype=None) -> Var:
        out = Var(ShapedArray((), dtype or self.loop.dtype))
        self.prelude.append(Eqn(primitive, tuple(inputs), {}, (out,)))
        return out

    def step_of(self, s: int):
        """The original loop index that stage s runs in this iteration: k - s."""
        if s not in self.shifted:
            k = self.loop.carries[self.loop.counter]
            self.shifted[s] = k if s == 0 else self.scalar(sub_p, k, self.lit(s))
        return self.shifted[s]

    def valid_in(self, s: int) -> Var:
        if s not in self.valid:
            k = self.loop.carries[self.loop.counter]
            started = self.scalar(ge_p, k, self.lit(self.loop.lo + s), dtype=_BOOL)
            not_done = self.scalar(lt_p, k, self.lit(self.loop.hi + s), dtype=_BOOL)
            self.valid[s] = self.scalar(and_p, started, not_done, dtype=_BOOL)
        return self.valid[s]

    def late(self, value, d: int):
        """`value` as it was d iterations ago (d >= 0); d loop carries when it is not itself a carry."""
        if d == 0:
            return value
        key = (value, d)
        if key not in self.delayed:
            if d == 1 and value in self.carry_of_out:
                self.delayed[key] = self.carry_of_out[value]
            else:
                source = self.late(value, d - 1)
                binder = Var(value.aval)
                self.registers.append((binder, source))
                self.delayed[key] = binder
        return self.delayed[key]

    def equations(self) -> list[Eqn]:
        loop = self.loop
        body, carries, counter = loop.body, loop.carries, loop.counter
        eqns, _, _, producer = loop.graph
        carry_binders = {b: out for j, (b, out) in enumerate(zip(carries, body.outs))
                         if j != counter and out is not b}
        new_eqns = []
        for i, e in enumerate(eqns):
            if e.outs == (body.outs[counter],) and not self._read_in_body(e.outs[0], eqns, body.outs, counter):
                continue                          # the counter's increment: rebuilt below for k
            s = self.stage[i]
            inputs = []
            for a in e.inputs:
                if a is carries[counter]:
                    inputs.append(self.step_of(s))
                elif a in producer:
                    inputs.append(self.late(a, s - self.stage[producer[a]]))
                elif a in carry_binders:
                    out = carry_binders[a]
                    d = 1 + s - self.stage[producer[out]]
                    # `a` itself is `out` one iteration late; carry_of_out may name another carry with the
                    # same new value, whose first value (its initial one) differs from a's
                    inputs.append(self.late(out, d) if self.carry_of_out[out] is a else self.late(a, d - 1))
                else:
                    inputs.append(a)
            new_eqns.append(Eqn(e.primitive, tuple(inputs), e.params, e.outs))
        # the new carries: the counter k + 1, every updated carry masked to its stage's valid steps
        outs = list(body.outs)
        next_k = Var(carries[counter].aval)
        tail = [Eqn(add_p, (carries[counter], self.lit(1)), {}, (next_k,))]
        outs[counter] = next_k
        for j, (b, out) in enumerate(zip(carries, body.outs)):
            if j == counter or out is b:
                continue
            masked = Var(b.aval)
            tail.append(Eqn(select_p, (self.valid_in(self.stage[producer[out]]), out, b), {}, (masked,)))
            outs[j] = masked
        registers = list(self.registers)
        new_body = Jaxpr(body.in_binders + tuple(r for r, _ in registers),
                         tuple(self.prelude + new_eqns + tail),
                         tuple(outs) + tuple(source for _, source in registers))
        return self._outer(new_body, [r for r, _ in registers])

    @staticmethod
    def _read_in_body(var, eqns, outs, counter) -> bool:
        """Is `var` read by an equation, or the new value of a carry other than the counter?"""
        return any(var in e.inputs for e in eqns) or any(o is var for j, o in enumerate(outs) if j != counter)

    def _outer(self, new_body: Jaxpr, registers: list[Var]) -> list[Eqn]:
        """The equations replacing the original while: register initial values, the skewed while, and the
        counter's final value (hi, as the original loop leaves it)."""
        loop, eqn = self.loop, self.loop.eqn
        before = []
        inits = []
        for r in registers:
            zero = Lit.of(0, r.aval.dtype)
            if r.aval.shape == ():
                inits.append(zero)
            else:
                v = Var(r.aval)
                before.append(Eqn(broadcast_p, (zero,), {"shape": r.aval.shape}, (v,)))
                inits.append(v)
        cond = loop.cond
        cond_binders = cond.in_binders + tuple(Var(r.aval) for r in registers)
        test = cond.eqns[0]
        more = Var(test.outs[0].aval)
        new_cond = Jaxpr(cond_binders,
                         (Eqn(lt_p, (test.inputs[0], self.lit(loop.hi + self.nstages - 1)), {}, (more,)),),
                         (more,))
        params = dict(eqn.params, cond_jaxpr=new_cond, body_jaxpr=new_body)
        outs = list(eqn.outs)
        final_k = Var(outs[loop.counter].aval)
        original_counter = outs[loop.counter]
        outs[loop.counter] = final_k
        outs += [Var(r.aval) for r in registers]
        skewed = Eqn(while_p, eqn.inputs + tuple(inits), params, tuple(outs))
        restore = Eqn(sub_p, (final_k, self.lit(self.nstages - 1)), {}, (original_counter,))
        return before + [skewed, restore]


def _strongly_connected(n: int, succs) -> list[list[int]]:
    """Tarjan's strongly connected components of nodes 0..n-1, iteratively, in topological order."""
    index, low, on_stack = [None] * n, [0] * n, [False] * n
    stack, components, counter = [], [], 0
    for root in range(n):
        if index[root] is not None:
            continue
        work = [(root, iter(sorted(succs[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack[root] = True
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if index[child] is None:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack[child] = True
                    work.append((child, iter(sorted(succs[child]))))
                    advanced = True
                    break
                if on_stack[child]:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                members = []
                while True:
                    member = stack.pop()
                    on_stack[member] = False
                    members.append(member)
                    if member == node:
                        break
                components.append(sorted(members))
    components.reverse()
    return components
