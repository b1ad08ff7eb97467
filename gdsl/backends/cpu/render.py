"""A Plan as one LLVM module.

    kernel K            i32 @<prefix>_<K>(ptr %table, ptr %depths, i64 %thread, i64 %nthreads,
                        ptr %barrier): %table holds the address of every plan buffer (plan.buffers order),
                        %depths the current depth of every recursive function (host control; device
                        control keeps its own counters). Returns 0, or 1 + the index of the recursive
                        function that went deeper than its max_depth, or INTERRUPTED (-1). %nthreads copies (at most the
                        module's `threads`) run at once, thread = 0..nthreads-1: thread k runs the vEUs
                        v with v % nthreads == k; with nthreads = 1 one thread runs them all.
    Op                  three internal functions: the uTask function, void @<prefix>_<op>(one noalias
                        pointer per distinct storage it touches, one scalar per uniform it reads, i64 %t)
                        computing uTask t (the op kind's "utask" lowering rule); for a matmul whose row
                        bands fit L1, a row-band function computing every tile of a band at once
                        (gemm.emit_matmul_band); and the
                        run function that the kernel calls once per Task, which loops over this thread's
                        uTasks (keeping the loops out of the kernel keeps its compile time linear).
                        Ops whose functions come out identical (same kind, shapes, params) share them.
    Wave                one call of each task's run function: on each of the task's vEUs v that this
                        thread runs, for t in range(v - first, op.n_utasks, count): the uTask function
                        (one thread: for t in range(op.n_utasks), or band by band)
    Sync                "grid": a barrier of the threads (spin, then futex sleep), paid lazily: the next
                        work (a wave, or every thread touching a buffer that waves write) waits for it
                        unless the work since the last barrier and this work are all on one vEU (a chain
                        of one-uTask ops: one thread, in order); "block": nothing (a vEU is one thread,
                        its uTasks run in order). With one thread: nothing at all.
    packed constants    the right operand of a matmul that is a constant of several column tiles is read
                        from a copy packed tile by tile (gemm.packed_tile), in %table after the buffers
    Uniforms / Assign   scalars in stack slots of each thread; frame uniforms (one slot per recursion depth)
                        live in the thread's region of the recursion workspace (below)
    Loop / Branch       native loops and switches on uniform predicates and indices
    Call(fn, site)      an explicit stack machine, no native recursion: check depth+1 <= max_depth, push the
                        return site on fn's site stack, depth += 1, jump to fn's body; the body's end pops
                        the site and switches back to the block after that call
    frame storage       buffer/uniform of fn at index depth_fn + value.frame_offset (max_depth + 2 copies)
    recursion workspace the site stacks (max_depth + 1 i32 each) and frame uniforms (8 bytes per copy) of the
                        kernel's recursive functions, in one heap block (a %table slot after the buffers and
                        the trace buffer): thread k's region starts at k * ModuleWriter.region_bytes. Never
                        on the native stack, whose few MiB a max_depth in the millions would overflow; the
                        executable allocates it zeroed and untouched, so only the depths used take memory.
    interrupts          every Loop's back-edge reads the interrupt word (i32 3 of %barrier, set by the
                        runtime's SIGINT handler) and returns INTERRUPTED when it is set

Instrumented build (`trace`: a gdsl.profiling.sites.TraceSites): %table holds one more slot, after the
buffers and before the packed copies: the trace buffer, one region per thread (gdsl/profiling/sites.py).
Each thread records its task runs, barrier waits, loop iterations, branch cases and recursive calls there
(gdsl_trace_event, CLOCK_MONOTONIC). The normal build has no such slot and no trace code.

Symbols carry a placeholder prefix that `render` replaces by a hash of the text, so that modules of
different plans never clash inside the one process-wide JIT engine.
"""
from __future__ import annotations

import hashlib
import re

from gdsl.backends.cpu import LOWERING_CHAIN
from gdsl.backends.cpu.gemm import emit_matmul_band, matmul_bands, packed_tile
from gdsl.backends.cpu.ir import (
    UNROLL_OFF,
    Function,
    compute_type,
    const,
    load_element,
    mem_type,
    store_element,
)
from gdsl.backends.cpu.lowerings import support_code
from gdsl.backends.cpu.operands import Operands
from gdsl.core.ir import Lit
from gdsl.primitives.registry import lowering_rule
from gdsl.profiling.llvm import trace_support
from gdsl.profiling.sites import code
from gdsl.schedule.plan import (
    Assign,
    Branch,
    Buffer,
    Call,
    Launch,
    Loop,
    Sync,
    Uniform,
    Uniforms,
    Wave,
    plan_statements,
)
from gdsl.schedule.printer import describe_op, describe_uniform

PREFIX = "GDSLPREFIX"
REGION = "GDSLREGIONBYTES"    # placeholder for the bytes of one thread's recursion workspace region
INTERRUPTED = -1              # the kernel's return code when the interrupt word was set
INTERRUPT_WORD = 3            # i32 index of the interrupt word in the barrier block (runtime.Executable)
NOBODY, MANY = -1, -2      # KernelWriter's record of who worked since the last barrier (else one vEU)
SELF = "GDSLSELF"


def _storage_key(value):
    return id(value.storage), value.frame_offset, value.offset


def _written(plan):
    """Every value that a statement of the plan writes."""
    for stmt in plan_statements(plan):
        if isinstance(stmt, Wave):
            yield from (v for task in stmt.tasks for v in task.op.outputs)
        elif isinstance(stmt, Uniforms):
            yield from (u.output for u in stmt.ops)
        elif isinstance(stmt, Assign):
            yield stmt.dst


class ModuleWriter:
    def __init__(self, plan, threads=1, trace=None):
        self.plan = plan
        self.threads = threads
        self.trace = trace            # TraceSites of an instrumented build, else None
        self.stack_slot = len(plan.buffers) + (1 if trace else 0)    # the recursion workspace's slot
        self.first_packed = self.stack_slot + 1
        self.region_bytes = 0         # one thread's recursion workspace (the largest of the kernels')
        self.op_functions: list[str] = []
        self.run_functions: dict = {}
        self.buffer_index = {id(b): i for i, b in enumerate(plan.buffers)}
        self.fn_index = {f.name: i for i, f in enumerate(plan.functions)}
        self.functions = {f.name: f for f in plan.functions}
        self.metadata: list = []
        self.function_symbols: dict = {}      # uTask function text -> its symbol
        self.packed: dict = {}        # (id(const buffer), shape, tile) -> (table slot, buffer, shape, tile)
        self.written = {id(v.storage) for v in _written(plan)}   # buffers that ops and uniform ops write

    def op_function(self, op):
        """(symbol, [("ptr" | "scalar", Value) or ("packed", table slot)...]) of op's run function, written
        on first use:
        run(pointers..., scalars..., i64 thread, i64 nthreads, i64 first, i64 count) runs the uTasks of
        the vEUs first..first+count-1 that belong to `thread` (all of them when nthreads = 1), calling
        the uTask function (or, alone, the matmul row-band function: gemm.matmul_bands)."""
        if id(op) in self.run_functions:
            return self.run_functions[id(op)]
        params, args, slot_of = [], [], {}

        def access(value, tile=0):
            if isinstance(value.storage, Lit):
                return ("lit", value.storage.val)
            if isinstance(value.storage, Uniform):
                name = f"%s{len(params)}"
                params.append(f"{compute_type(value.aval.dtype)} {name}")
                args.append(("scalar", value))
                return ("scalar", name)
            key = (_storage_key(value), tile)
            if key not in slot_of:
                slot_of[key] = f"%p{len(params)}"
                params.append(f"ptr noalias {slot_of[key]}")
                args.append(("packed", self.packed_slot(value, tile)) if tile else ("ptr", value))
            return ("ptr", slot_of[key])
        ins = [access(v, packed_tile(op) if k == 1 else 0) for k, v in enumerate(op.inputs)]
        outs = [access(v) for v in op.outputs]
        forward = ", ".join(p.replace(" noalias", "") for p in params)

        def body(band):
            fn = Function(f"define internal void @{SELF}({', '.join(params + ['i64 %t'])})",
                          attrs="nounwind noinline ", metadata=[])
            ops = Operands(fn, op.inputs, ins, op.outputs, outs)
            if band:
                emit_matmul_band(fn, ops, op, "%t")
            else:
                lowering_rule(op.kind, LOWERING_CHAIN, "utask")(fn, ops, op, "%t")
            fn.do("ret void")
            return fn
        utask = self._add(body(False), op, "")
        bands = matmul_bands(op)
        band = self._add(body(True), op, "_band") if bands else None
        fn = Function(f"define internal void @{SELF}({', '.join(params)}, i64 %thread, i64 %nthreads, "
                      f"i64 %first, i64 %count)", attrs="nounwind noinline ", metadata=[])

        def call(symbol):
            return lambda t: fn.do(f"call void @{symbol}({forward}{', ' if forward else ''}i64 {t})")
        n = op.n_utasks

        def alone():
            fn.loop(0, bands or n, call(band or utask))

        def shared():     # vEU first + j runs uTasks j, j + count, ...; it is ours when (first + j) % nthreads
            shift = fn.op("mul i64 %first, " + fn.op("sub i64 %nthreads, 1"))     # == thread
            start = fn.op(f"urem i64 {fn.op(f'add i64 %thread, {shift}')}, %nthreads")
            fn.loop(start, "%count", lambda j: fn.loop(j, n, call(utask), step="%count"), step="%nthreads")
        fn.if_(fn.op("icmp eq i64 %nthreads, 1"), alone, shared)
        fn.do("ret void")
        symbol = self._add(fn, op, "_run")
        self.run_functions[id(op)] = (symbol, args)
        return symbol, args

    def packed_slot(self, value, tile) -> int:
        """The table slot of constant `value` packed in column panels of `tile` (gemm.pack_columns), after
        the plan's buffers."""
        key = (id(value.storage), value.aval.shape, tile)
        if key not in self.packed:
            self.packed[key] = (self.first_packed + len(self.packed), value.storage, value.aval.shape, tile)
        return self.packed[key][0]

    def packed_operands(self) -> list:
        """(const buffer, shape, tile) of each packed copy, in table slot order."""
        return [entry[1:] for entry in self.packed.values()]

    def _add(self, fn, op, suffix) -> str:
        """The symbol of function `fn` (its name is SELF), added to the module unless an identical function
        is there already: ops of the same kind, shapes and params share their functions."""
        text = fn.text()
        symbol = self.function_symbols.get(text)
        if symbol is None:
            symbol = self.function_symbols[text] = f"{PREFIX}_{op.name}{suffix}"
            self.op_functions.append(f"; {describe_op(op)}   [{op.n_utasks} uTasks]\n" +
                                     self._number_loops(text, fn.metadata).replace(f"@{SELF}(", f"@{symbol}("))
        return symbol

    def _number_loops(self, text, local):
        """A function's text with its loop metadata (!1.. of `local`) renumbered into the module's."""
        base = len(self.metadata)
        self.metadata += [re.sub(r"!(\d+)", lambda m: f"!{int(m.group(1)) + base}" if m.group(1) != "0" else "!0", d)
                          for d in local]
        return re.sub(r"!llvm\.loop !(\d+)", lambda m: f"!llvm.loop !{int(m.group(1)) + base}", text)

    def render(self):
        """(module text, kernel symbols)."""
        plan = self.plan
        kernels, symbols = [], []
        for kernel in plan.kernels:
            symbol = f"{PREFIX}_{kernel.name}"
            writer = KernelWriter(self, kernel, symbol, host=plan.control == "host")
            kernels.append(writer.render())
            symbols.append(symbol)
            self.region_bytes = max(self.region_bytes, writer.region_bytes)
        body = "\n".join(self.op_functions + kernels)
        header = (f"; gdsl plan: control={plan.control}, {len(plan.kernels)} kernel(s), grid {plan.grid} vEU(s) "
                  f"on {self.threads} thread(s), {len(plan.buffers)} buffers, {len(self.run_functions)} ops in "
                  f"{len(self.op_functions)} uTask functions\n")
        if self.trace:
            body += "\n" + trace_support(self.trace.capacity)
        text = header + body + "\n" + support_code(body) + "\n".join([UNROLL_OFF] + self.metadata) + "\n"
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        name = f"gdsl_{digest}"
        return text.replace(PREFIX, name), [s.replace(PREFIX, name) for s in symbols]


class KernelWriter:
    def __init__(self, module: ModuleWriter, kernel, symbol, host: bool):
        self.module = module
        self.kernel = kernel
        self.host = host
        self.threads = module.threads
        self.fn = Function(f"define i32 @{symbol}(ptr noalias %table, ptr noalias %depths, i64 %thread, "
                           f"i64 %nthreads, ptr %barrier)", attrs="nounwind ", metadata=[])
        self.alone = None      # i1: %nthreads == 1
        self.sense = self.worked = self.owed = None
        self.bases: dict = {}
        self.uniform_slots: dict = {}
        self.depths: dict = {}        # device: fn name -> slot; host: fn name -> SSA value
        self.stacks: dict = {}
        self.entries = {f.name: f"fn{module.fn_index[f.name]}_entry" for f in kernel.functions}
        self.sites: dict = {f.name: {} for f in kernel.functions}
        self.errors: dict = {}
        self.trace = module.trace
        self.trace_region = self.owed_site = None
        self.region = None            # this thread's region of the recursion workspace
        self.region_bytes = 0         # its size so far (every slot 64-byte aligned)
        self.interruptible = False    # whether some loop checks the interrupt word

    # ----------------------------------------------------------------------------------- storage
    def _prologue(self, line):
        self.fn.allocas.append(line)

    def base(self, buf: Buffer) -> str:
        return self.table_entry(self.module.buffer_index[id(buf)], buf.name)

    def table_entry(self, index, name) -> str:
        """The address in slot `index` of %table (loaded once, on entry)."""
        if index not in self.bases:
            slot, value = self.fn.name("tab"), self.fn.name(f"{name}_")
            self._prologue(f"  {slot} = getelementptr inbounds ptr, ptr %table, i64 {index}")
            self._prologue(f"  {value} = load ptr, ptr {slot}, align 8")
            self.bases[index] = value
        return self.bases[index]

    def depth(self, fname) -> str:
        """The current depth of recursive function `fname` (i64)."""
        if self.host:
            if fname not in self.depths:
                slot, name = self.fn.name("dp"), self.fn.name("depth")
                self._prologue(f"  {slot} = getelementptr inbounds i64, ptr %depths, i64 {self.module.fn_index[fname]}")
                self._prologue(f"  {name} = load i64, ptr {slot}, align 8")
                self.depths[fname] = name
            return self.depths[fname]
        return self.fn.load("i64", self._depth_slot(fname))

    def _depth_slot(self, fname):
        if fname not in self.depths:
            slot = self.fn.name("depth")
            self._prologue(f"  {slot} = alloca i64, align 8")
            self._prologue(f"  store i64 0, ptr {slot}")
            self.depths[fname] = slot
        return self.depths[fname]

    def frame_index(self, fname, offset) -> str:
        d = self.depth(fname)
        return self.fn.op(f"add nsw i64 {d}, {offset}") if offset else d

    def pointer(self, value) -> str:
        buf = value.storage
        base = self.base(buf)
        ty = mem_type(buf.aval.dtype)
        if buf.frame_of is not None:
            index = self.frame_index(buf.frame_of, value.frame_offset)
            base = self.fn.gep(ty, base, self.fn.op(f"mul nsw i64 {index}, {buf.aval.size}"))
        return self.fn.gep(ty, base, value.offset) if value.offset else base    # a view: a window of it

    def uniform_pointer(self, value) -> str:
        u = value.storage
        ty = compute_type(u.aval.dtype)
        if id(u) not in self.uniform_slots:
            if u.frame_of:
                copies = self.module.functions[u.frame_of].max_depth + 2
                self.uniform_slots[id(u)] = self._workspace(copies * 8, f"{u.name}_")
            else:
                slot = self.fn.name(f"{u.name}_")
                self._prologue(f"  {slot} = alloca {ty}, align 8")
                self.uniform_slots[id(u)] = slot
        slot = self.uniform_slots[id(u)]
        if not u.frame_of:
            return slot
        return self.fn.gep(ty, slot, self.frame_index(u.frame_of, value.frame_offset))

    def _workspace(self, nbytes, name) -> str:
        """The address of `nbytes` of this thread's region of the recursion workspace (zeroed at first)."""
        if self.region is None:
            base = self.table_entry(self.module.stack_slot, "stacks")
            offset, self.region = self.fn.name("regoff"), self.fn.name("region")
            self._prologue(f"  {offset} = mul i64 %thread, {REGION}")
            self._prologue(f"  {self.region} = getelementptr inbounds i8, ptr {base}, i64 {offset}")
        slot = self.fn.name(name)
        self._prologue(f"  {slot} = getelementptr inbounds i8, ptr {self.region}, i64 {self.region_bytes}")
        self.region_bytes += -(-nbytes // 64) * 64
        return slot

    def scalar(self, value) -> str:
        """Element 0 of any value, in its compute type."""
        if isinstance(value.storage, Lit):
            return const(value.aval.dtype, value.storage.val)
        if isinstance(value.storage, Uniform):
            return self.fn.load(compute_type(value.aval.dtype), self.uniform_pointer(value))
        return load_element(self.fn, value.aval.dtype, self.pointer(value), 0)

    def set_scalar(self, value, v) -> None:
        if isinstance(value.storage, Uniform):
            self.fn.store(compute_type(value.aval.dtype), v, self.uniform_pointer(value))
        else:
            store_element(self.fn, value.aval.dtype, self.pointer(value), 0, v)

    def operands(self, values):
        access = []
        for v in values:
            if isinstance(v.storage, Lit):
                access.append(("lit", v.storage.val))
            elif isinstance(v.storage, Uniform):
                access.append(("scalar", self.scalar(v)))
            else:
                access.append(("ptr", self.pointer(v)))
        return Operands(self.fn, values, access)

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
            self._prologue(f"  {self.alone} = icmp eq i64 %nthreads, 1")
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
                self._prologue(f"  {slot} = alloca {ty}")
                self._prologue(f"  store {ty} {start}, ptr {slot}")
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
        depth_slot = self._depth_slot(f.name)
        stack = self._stack(f)
        d = fn.load("i64", depth_slot)
        deeper = fn.op(f"add nsw i64 {d}, 1")
        too_deep = fn.op(f"icmp sgt i64 {deeper}, {f.max_depth}")
        push, back = fn.label("push"), fn.label(f"return{stmt.site}_")
        fn.do(f"br i1 {too_deep}, label %{self._error_block(f)}, label %{push}")
        fn.start(push)
        fn.store("i32", str(stmt.site), fn.gep("i32", stack, d))
        fn.store("i64", deeper, depth_slot)
        fn.do(f"; call {f.name} (site {stmt.site})")
        self._trace_event(self.trace and self.trace.call(stmt), end=False)
        fn.goto(self.entries[f.name])
        fn.start(back)
        self._trace_event(self.trace and self.trace.call(stmt), end=True)
        self.sites[f.name][stmt.site] = back

    def _launch(self, stmt: Launch) -> None:
        raise AssertionError("Launch statements belong to the host program")

    STATEMENT_WRITERS = {Wave: _wave, Sync: _sync, Uniforms: _uniforms, Assign: _assign, Loop: _loop,
                         Branch: _branch, Call: _call, Launch: _launch}

    def _check_interrupt(self) -> None:
        """At a loop's back-edge: return INTERRUPTED if the runtime's SIGINT handler set the interrupt word
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
            self.stacks[f.name] = self._workspace((f.max_depth + 1) * 4, "sites")
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
            self._prologue(f"  {offset} = mul i64 %thread, {self.trace.region_words}")
            self._prologue(f"  {self.trace_region} = getelementptr inbounds i64, ptr {base}, i64 {offset}")
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
            self._prologue(f"  {self.owed_site} = alloca i64")
            self._prologue(f"  store i64 0, ptr {self.owed_site}")
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
            slot = self._depth_slot(f.name)
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
