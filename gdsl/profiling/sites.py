"""The trace that an instrumented build writes, as both backends render it.

Event sites. Every place of the plan that records an event gets a number, assigned in one walk of the
plan (kernels, then recursive functions, statements in order) so that the renderer and the decoder agree:

    op        a Task of a Wave: one begin/end pair per uTask the vEU runs (GPU), or per run of the
              task's uTasks on one thread (CPU: a thread runs the uTasks of its vEUs in one call)
    barrier   a grid Sync that a vEU waits at: begin at arrival, end at release
    loop      a Loop as a whole (begin before its first condition, end after the exit)
    iteration one pass through a Loop's body (begin after the predicate said go on, end at the back edge)
    case      case k of a Branch, while it runs
    call      a recursive Call, from the push to the return to its site

Record format (unsigned 64-bit words). Each vEU owns one region of `region_words` words:

    word 0          records written (at most `capacity`)
    word 1          events dropped because the region was full (the profile is then `truncated`)
    word 2 + 2r     record r: the clock stamp (ns)
    word 3 + 2r     record r: code = (site << 1 | end) + (arg << 32), arg the uTask index on GPUs

A vEU writes a record only while word 0 < capacity and otherwise counts the event in word 1: the buffer
never overflows and a full buffer is reported, never hidden.

Bounds. `capacity` comes from the plan: the records of one pass through it, with each loop body counted
`iterations` times (nested loops multiply) and each recursive function's body `iterations` times,
limited to BUDGET_RECORDS over all vEUs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from gdsl.schedule.plan import Branch, Call, Loop, Sync, Wave

HEADER_WORDS = 2
DEFAULT_ITERATIONS = 4096       # loop iterations (and recursive calls) a profile has room for by default
BUDGET_RECORDS = 1 << 24        # records over all vEUs (256 MiB of trace) at most
MIN_CAPACITY = 64


@dataclass(frozen=True)
class Site:
    kind: str          # "op", "barrier", "loop", "iteration", "case", "call"
    name: str          # what the trace shows (op names as in `.plan`)
    args: dict = field(default_factory=dict)


def trace_sites(plan, profile):
    """The TraceSites of an instrumented build, from the backend option `profile`: True (buffer bounds
    from the plan) or a capacity in records per vEU; None/False (or host control): a normal build."""
    if not profile or plan.control != "device":
        return None
    return TraceSites(plan, capacity=None if profile is True else int(profile))


def code(site: int, end: bool) -> int:
    """The low word of a record's code: which site, begin (0) or end (1)."""
    return site * 2 + int(end)


class TraceSites:
    """The event sites of `plan` and its per-vEU buffer bounds. `capacity` (records per vEU) overrides the
    bound computed from the plan (tests use a tiny one to reach the full-buffer path)."""

    def __init__(self, plan, capacity: int | None = None, iterations: int = DEFAULT_ITERATIONS):
        self.plan = plan
        self.sites: list[Site] = []
        self._ids: dict = {}
        self._barriers = 0
        for kernel in plan.kernels:
            self._number(kernel.body)
        for fn in plan.functions:
            self._number(fn.body)
        if capacity is None:
            capacity = self.plan_capacity(iterations)
        self.capacity = int(capacity)
        self.region_words = HEADER_WORDS + 2 * self.capacity

    # ------------------------------------------------------------------------------------ numbering
    def _add(self, key, site: Site) -> None:
        self._ids[key] = len(self.sites)
        self.sites.append(site)

    def _number(self, block) -> None:
        previous_ops: list = []
        for stmt in block:
            if isinstance(stmt, Wave):
                previous_ops = [task.op.name for task in stmt.tasks]
                for task in stmt.tasks:
                    last = task.first + task.count - 1
                    self._add(("op", id(task)), Site("op", task.op.name, {
                        "uTasks": task.op.n_utasks, "vEUs": f"{task.first}-{last}"}))
            elif isinstance(stmt, Sync) and stmt.scope == "grid":
                self._add(("barrier", id(stmt)), Site("barrier", f"barrier {self._barriers} (grid)",
                                                      {"after": ", ".join(previous_ops)}))
                self._barriers += 1
            elif isinstance(stmt, Loop):
                number = sum(1 for s in self.sites if s.kind == "loop")
                self._add(("loop", id(stmt)), Site("loop", f"loop {number}"))
                self._add(("iteration", id(stmt)), Site("iteration", f"loop {number} iteration"))
                self._number(stmt.cond)
                self._number(stmt.body)
            elif isinstance(stmt, Branch):
                number = sum(1 for s in self.sites if s.kind == "case" and s.args.get("case") == 0)
                for k, branch in enumerate(stmt.branches):
                    self._add(("case", id(stmt), k), Site("case", f"branch {number} case {k}", {"case": k}))
                    self._number(branch)
            elif isinstance(stmt, Call):
                self._add(("call", id(stmt)), Site("call", f"call {stmt.fn}", {"site": stmt.site}))

    def op(self, task) -> int:
        return self._ids["op", id(task)]

    def barrier(self, sync) -> int:
        return self._ids["barrier", id(sync)]

    def loop(self, loop) -> int:
        return self._ids["loop", id(loop)]

    def iteration(self, loop) -> int:
        return self._ids["iteration", id(loop)]

    def case(self, branch, k: int) -> int:
        return self._ids["case", id(branch), k]

    def call(self, call) -> int:
        return self._ids["call", id(call)]

    # ------------------------------------------------------------------------------------ bounds
    def plan_capacity(self, iterations: int) -> int:
        """Records per vEU for one run of the plan with loops and recursion bounded by `iterations`."""
        total = sum(self._records(k.body, iterations) for k in self.plan.kernels)
        total += sum(iterations * self._records(f.body, iterations) for f in self.plan.functions)
        limit = max(MIN_CAPACITY, BUDGET_RECORDS // max(self.plan.grid, 1))
        return max(MIN_CAPACITY, min(total, limit))

    def _records(self, block, iterations: int) -> int:
        """Records one vEU writes at most in one pass through `block` (loops run `iterations` times)."""
        n = 0
        for stmt in block:
            if isinstance(stmt, Wave):
                n += sum(2 * -(-task.op.n_utasks // task.count) for task in stmt.tasks)
            elif isinstance(stmt, Sync):
                n += 2 if stmt.scope == "grid" else 0
            elif isinstance(stmt, Loop):
                per_pass = self._records(stmt.cond, iterations) + self._records(stmt.body, iterations) + 2
                n += 2 + iterations * per_pass + self._records(stmt.cond, iterations)
            elif isinstance(stmt, Branch):
                n += 2 + max(self._records(b, iterations) for b in stmt.branches)
            elif isinstance(stmt, Call):
                n += 2
        return n
