"""One kernel of a Plan as one LLVM function: the walk of its statement tree (KernelWriter).

The kernel's signature and where its values live: storage.py (KernelStorage, the base class).

    Wave                one call of each task's run function: on each of the task's vEUs v that this
                        thread runs, for t in range(v - first, op.n_utasks, count): the uTask function
                        (one thread: for t in range(op.n_utasks), or band by band); thread k runs the vEUs
                        v with v % nthreads == k; with nthreads = 1 one thread runs them all
    Sync                "grid": a barrier of the threads (spin, then futex sleep), paid lazily: the next
                        work (a wave, or every thread touching a buffer that waves write) waits for it
                        unless the work since the last barrier and this work are all on one vEU (a chain
                        of one-uTask ops: one thread, in order); "block": nothing (a vEU is one thread,
                        its uTasks run in order). With one thread: nothing at all.
    Uniforms / Assign   each uniform op by its kind's "uniform" lowering rule, on every thread, into that
                        thread's own slot (storage.py)
    Loop / Branch       native loops and switches on uniform predicates and indices
    Call(fn, site)      an explicit stack machine, no native recursion: check depth+1 <= max_depth, push the
                        return site on fn's site stack, depth += 1, jump to fn's body; the body's end pops
                        the site and switches back to the block after that call. A function with a Call of
                        step > 1 also adds the step to its frame counter there (storage.frame_slot) and
                        subtracts it at the return site
    interrupts          every Loop's back-edge reads the interrupt word (i32 3 of %barrier, set by the
                        SIGINT handler of interrupts.py) and returns INTERRUPTED when it is set

Instrumented build (`trace`: a gdsl.profiling.sites.TraceSites): %table holds one more slot, after the
buffers and before the packed copies: the trace buffer, one region per thread (gdsl/profiling/sites.py).
Each thread records its task runs, barrier waits, loop iterations, branch cases and recursive calls there
(gdsl_trace_event, CLOCK_MONOTONIC). The normal build has no such slot and no trace code.
"""
from __future__ import annotations

from gdsl.backends.cpu import LOWERING_CHAIN
from gdsl.backends.cpu.ir import compute_type
from gdsl.backends.cpu.storage import REGION, KernelStorage
from gdsl.primitives.registry import lowering_rule
from gdsl.profiling.sites import code
from gdsl.schedule.plan import Assign, Branch, Buffer, Call, Launch, Loop, Sync, Uniforms, Wave
from gdsl.schedule.printer import describe_op, describe_uniform

INTERRUPTED = -1              # the kernel's return code when the interrupt word was set
INTERRUPT_WORD = 3            # i32 index of the interrupt word in the barrier block (runtime.Executable)
NOBODY, MANY = -1, -2      # KernelWriter's record of who worked since the last barrier (else one vEU)


class KernelWriter(KernelStorage):
    """Kernel `kernel` of the plan as the LLVM function `symbol`, in ModuleWriter `module` (which writes
    the ops' functions that the waves call); `host`: host control (the depths come in %depths)."""
    def __init__(self, module, kernel, symbol, host: bool):
        super().__init__(module, symbol, host)
        self.kernel = kernel
        self.threads = module.threads
        self.alone = None      # i1: %nthreads == 1
        self.sense = self.worked = self.owed = None
        self.stacks: dict = {}
        self.entries = {f.name: f"fn{module.fn_index[f.name]}_entry" for f in kernel.functions}
        self.sites: dict = {f.name: {} for f in kernel.functions}
        self.errors: dict = {}
        self.trace = module.trace
        self.trace_region = self.owed_site = None
        self.interruptible = False    # whether some loop checks the interrupt word

    # -------------------------------------------------------------------------------- statements
    def block(self, stmts) -> None:
        for stmt in stmts:
            self.STATEMENT_WRITERS[type(stmt)](self, stmt)

    def _wave(self, wave: Wave) -> None:
        veus = {task.first + j for task in wave.tasks for j in range(min(task.count, task.op.n_utasks))}
        if veus:
            self._work(veus.pop() if len(veus) == 1 else MANY)
        for task in wave.tasks:
            op = task.op
            symbol, args = self.module.op_function(op)
            actual = [self._argument(kind, v) for kind, v in args]
            veus = f"i64 %thread, i64 %nthreads, i64 {task.first}, i64 {min(task.count, op.n_utasks)}"
            self.fn.do(f"; {describe_op(op)}  [{op.n_utasks} uTasks, vEU {task.first}..{task.first + task.count - 1}]")
            self._trace_task(task, end=False)
            self.fn.do(f"call void @{symbol}({', '.join([*actual, veus])})")
            self._trace_task(task, end=True)

    def _argument(self, kind, v) -> str:
        if kind == "ptr":
            return f"ptr {self.pointer(v)}"
        if kind == "packed":
            return f"ptr {self.table_entry(v, 'packed')}"
        return f"{compute_type(v.aval.dtype)} {self.scalar(v)}"

    def _is_alone(self):
        if self.alone is None:
            self.alone = self.fn.name("alone")
            self.prologue(f"  {self.alone} = icmp eq i64 %nthreads, 1")
        return self.alone

    def _sync(self, stmt: Sync) -> None:
        if self.threads == 1 or stmt.scope != "grid":
            self.fn.do(f"; barrier ({stmt.scope}): nothing to wait for here")
            return
        self.fn.do("; barrier (grid): owed, paid by the next work that needs it (_work)")
        self.fn.store("i1", "true", self._barrier_state()[1])
        if self.trace:
            self.fn.store("i64", str(self.trace.barrier(stmt)), self._owed_site())

    def _barrier_state(self):
        """Slots (worked, owed): who worked since the last barrier (NOBODY, a vEU, MANY) and whether a grid
        Sync came since. Every thread keeps the same state: control flow is uniform."""
        if self.sense is None:
            self.sense, self.worked, self.owed = self.fn.name("sense"), self.fn.name("worked"), self.fn.name("owed")
            for slot, ty, start in ((self.sense, "i32", 0), (self.worked, "i32", NOBODY), (self.owed, "i1", "false")):
                self.prologue(f"  {slot} = alloca {ty}")
                self.prologue(f"  store {ty} {start}, ptr {slot}")
        return self.worked, self.owed

    def _work(self, who) -> None:
        """Before work of vEU `who` (MANY: of several vEUs, or of every thread on a buffer that waves write):
        the barrier that an owed grid Sync stands for, unless everything since the last barrier and this
        work run on one vEU, so on one thread, in order (a chain of one-uTask ops needs no barrier)."""
        if self.threads == 1:
            return
        fn = self.fn
        worked_slot, owed_slot = self._barrier_state()
        worked, owed = fn.load("i32", worked_slot), fn.load("i1", owed_slot)
        busy = fn.op(f"icmp ne i32 {worked}, {NOBODY}")
        same = "false" if who == MANY else fn.op(f"icmp eq i32 {worked}, {who}")
        pending = fn.op(f"and i1 {owed}, {busy}")
        need = fn.op(f"and i1 {pending}, {fn.op(f'xor i1 {same}, true')}")

        def wait():
            self._trace_barrier(end=False)
            fn.do(f"call void @gdsl_barrier(ptr %barrier, ptr {self.sense}, i64 %nthreads)")
            self._trace_barrier(end=True)
            fn.store("i32", str(who), worked_slot)
            fn.store("i1", "false", owed_slot)

        def go_on():
            one = fn.op(f"or i1 {fn.op(f'xor i1 {busy}, true')}, {same}")
            fn.store("i32", fn.op(f"select i1 {one}, i32 {who}, i32 {MANY}"), worked_slot)
            fn.store("i1", pending, owed_slot)
        fn.if_(fn.op(f"and i1 {need}, {fn.op(f'xor i1 {self._is_alone()}, true')}"), wait, go_on)

    def _shared(self, values) -> None:
        """Every thread reads or writes `values` next: work of MANY if any is a buffer that waves write."""
        if any(isinstance(v.storage, Buffer) and id(v.storage) in self.module.written for v in values):
            self._work(MANY)

    def _uniforms(self, stmt: Uniforms) -> None:
        self._shared([v for u in stmt.ops for v in (*u.inputs, u.output)])
        for u in stmt.ops:
            self.fn.do(f"; {describe_uniform(u)}")
            rule = lowering_rule(u.primitive, LOWERING_CHAIN, "uniform")
            value = rule(self.fn, self.operands(u.inputs), u.primitive, u.params, u.output.aval)
            self.set_scalar(u.output, value)

    def _assign(self, stmt: Assign) -> None:
        self.fn.do(f"; {stmt.dst!r} = {stmt.src!r}")
        self._shared([stmt.src, stmt.dst])
        self.set_scalar(stmt.dst, self.scalar(stmt.src))

    def _loop(self, stmt: Loop) -> None:
        fn = self.fn
        head, body, done = fn.label("loop"), fn.label("loopbody"), fn.label("loopend")
        self._trace_event(self.trace and self.trace.loop(stmt), end=False)
        fn.goto(head)
        fn.start(head)
        self.block(stmt.cond)
        self._shared([stmt.pred])
        fn.do(f"br i1 {self._truth(stmt.pred)}, label %{body}, label %{done}")
        fn.start(body)
        self._trace_event(self.trace and self.trace.iteration(stmt), end=False)
        self.block(stmt.body)
        self._trace_event(self.trace and self.trace.iteration(stmt), end=True)
        self._check_interrupt()
        fn.goto(head)
        fn.start(done)
        self._trace_event(self.trace and self.trace.loop(stmt), end=True)

    def _truth(self, value) -> str:
        v = self.scalar(value)
        ty = compute_type(value.aval.dtype)
        if ty == "i1":
            return v
        if ty == "float":
            return self.fn.op(f"fcmp une float {v}, 0.0")
        return self.fn.op(f"icmp ne {ty} {v}, 0")

    def _branch(self, stmt: Branch) -> None:
        fn = self.fn
        n = len(stmt.branches)
        if stmt.depth_of:
            self._depth_check(self.module.functions[stmt.depth_of])
        self._shared([stmt.index])
        index = fn.ext_index(self.scalar(stmt.index), compute_type(stmt.index.aval.dtype))
        index = fn.clamp(index, 0, n - 1)
        labels = [fn.label("case") for _ in range(n)]
        done = fn.label("endbranch")
        cases = " ".join(f"i64 {k}, label %{lab}" for k, lab in enumerate(labels[1:], 1))
        fn.do(f"switch i64 {index}, label %{labels[0]} [{cases}]")
        for k, (lab, branch) in enumerate(zip(labels, stmt.branches)):
            fn.start(lab)
            self._trace_event(self.trace and self.trace.case(stmt, k), end=False)
            self.block(branch)
            self._trace_event(self.trace and self.trace.case(stmt, k), end=True)
            fn.goto(done)
        fn.start(done)

    def _call(self, stmt: Call) -> None:
        fn, f = self.fn, self.module.functions[stmt.fn]
        depth_slot = self.depth_slot(f.name)
        stack = self._stack(f)
        d, deeper = self._depth_check(f)
        back = fn.label(f"return{stmt.site}_")
        fn.store("i32", str(stmt.site), fn.gep("i32", stack, d))
        fn.store("i64", deeper, depth_slot)
        if self.steps_frames(f.name):
            self._add_frames(f.name, stmt.step)
        fn.do(f"; call {f.name} (site {stmt.site})")
        self._trace_event(self.trace and self.trace.call(stmt), end=False)
        fn.goto(self.entries[f.name])
        fn.start(back)
        if self.steps_frames(f.name):
            self._add_frames(f.name, -stmt.step)
        self._trace_event(self.trace and self.trace.call(stmt), end=True)
        self.sites[f.name][stmt.site] = back

    def _depth_check(self, f) -> tuple[str, str]:
        """A call's check of `f`'s depth (a Call's, or a Branch's that stands for one): past max_depth, the
        function's error block; (the depth, the depth + 1) for the call to push."""
        fn = self.fn
        d = fn.load("i64", self.depth_slot(f.name))
        deeper = fn.op(f"add nsw i64 {d}, 1")
        too_deep = fn.op(f"icmp sgt i64 {deeper}, {f.max_depth}")
        ok = fn.label("depth_ok")
        fn.do(f"br i1 {too_deep}, label %{self._error_block(f)}, label %{ok}")
        fn.start(ok)
        return d, deeper

    def _add_frames(self, fname, step: int) -> None:
        slot = self.frame_slot(fname)
        self.fn.store("i64", self.fn.op(f"add nsw i64 {self.fn.load('i64', slot)}, {step}"), slot)

    def _launch(self, stmt: Launch) -> None:
        raise AssertionError("Launch statements belong to the host program")

    STATEMENT_WRITERS = {Wave: _wave, Sync: _sync, Uniforms: _uniforms, Assign: _assign, Loop: _loop,
                         Branch: _branch, Call: _call, Launch: _launch}

    def _check_interrupt(self) -> None:
        """At a loop's back-edge: return INTERRUPTED if the SIGINT handler (interrupts.py) set the interrupt word
        (a volatile load: it changes under the loop, from a signal handler)."""
        fn = self.fn
        word = fn.gep("i32", "%barrier", INTERRUPT_WORD)
        flag = fn.op(f"load atomic volatile i32, ptr {word} monotonic, align 4")
        go_on = fn.label("uninterrupted")
        fn.do(f"br i1 {fn.op(f'icmp ne i32 {flag}, 0')}, label %interrupted, label %{go_on}")
        fn.start(go_on)
        self.interruptible = True

    def _stack(self, f):
        """fn's stack of return sites (max_depth + 1 i32), in the recursion workspace."""
        if f.name not in self.stacks:
            self.stacks[f.name] = self.workspace((f.max_depth + 1) * 4, "sites")
        return self.stacks[f.name]

    def _error_block(self, f) -> str:
        if f.name not in self.errors:
            self.errors[f.name] = self.fn.label("too_deep")
        return self.errors[f.name]

    # ------------------------------------------------------------------------------- instrumentation
    def _region(self) -> str:
        """This thread's region of the trace buffer (the %table slot after the buffers)."""
        if self.trace_region is None:
            base = self.table_entry(len(self.module.plan.buffers), "trace")
            offset, self.trace_region = self.fn.name("troff"), self.fn.name("tregion")
            self.prologue(f"  {offset} = mul i64 %thread, {self.trace.region_words}")
            self.prologue(f"  {self.trace_region} = getelementptr inbounds i64, ptr {base}, i64 {offset}")
        return self.trace_region

    def _trace_event(self, site, end: bool) -> None:
        """Record begin/end of event `site` (nothing in a normal build: site is None)."""
        if self.trace:
            self.fn.do(f"call void @gdsl_trace_event(ptr {self._region()}, i64 {code(site, end)})")

    def _trace_task(self, task, end: bool) -> None:
        """Begin/end of a task's run on this thread, recorded only if one of its vEUs is this thread's."""
        if self.trace:
            veus = f"i64 %thread, i64 %nthreads, i64 {task.first}, i64 {min(task.count, task.op.n_utasks)}"
            self.fn.do(f"call void @gdsl_trace_task(ptr {self._region()}, i64 {code(self.trace.op(task), end)}, "
                       f"{veus})")

    def _owed_site(self) -> str:
        """Slot: the site of the grid Sync owed now (the barrier that _work pays stands for it)."""
        if self.owed_site is None:
            self.owed_site = self.fn.name("owedsite")
            self.prologue(f"  {self.owed_site} = alloca i64")
            self.prologue(f"  store i64 0, ptr {self.owed_site}")
        return self.owed_site

    def _trace_barrier(self, end: bool) -> None:
        if self.trace:
            site = self.fn.load("i64", self._owed_site())
            tag = self.fn.op(f"add i64 {self.fn.op(f'shl i64 {site}, 1')}, {int(end)}")
            self.fn.do(f"call void @gdsl_trace_event(ptr {self._region()}, i64 {tag})")

    # ----------------------------------------------------------------------------------- whole
    def render(self) -> str:
        fn = self.fn
        fn.do(f"; kernel {self.kernel.name}")
        self.block(self.kernel.body)
        fn.do("ret i32 0")
        for f in self.kernel.functions:
            fn.start(self.entries[f.name])
            fn.do(f"; function {f.name} (max_depth {f.max_depth})")
            self.block(f.body)
            fn.goto(f"fn{self.module.fn_index[f.name]}_return")
        for f in self.kernel.functions:
            fn.start(f"fn{self.module.fn_index[f.name]}_return")
            slot = self.depth_slot(f.name)
            d = fn.op(f"sub nsw i64 {fn.load('i64', slot)}, 1")
            fn.store("i64", d, slot)
            site = fn.load("i32", fn.gep("i32", self._stack(f), d))
            cases = " ".join(f"i32 {s}, label %{lab}" for s, lab in sorted(self.sites[f.name].items()))
            fn.do(f"switch i32 {site}, label %unreachable [{cases}]")
        for f in self.kernel.functions:
            if f.name in self.errors:
                fn.start(self.errors[f.name])
                fn.do(f"ret i32 {1 + self.module.fn_index[f.name]}")
        if self.interruptible:
            fn.start("interrupted")
            fn.do(f"ret i32 {INTERRUPTED}")
        if self.kernel.functions:
            fn.start("unreachable")
            fn.do("unreachable")
        text = fn.text().replace(REGION, str(self.region_bytes))
        return self.module._number_loops(text, fn.metadata)
