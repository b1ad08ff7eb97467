"""Where a kernel's values live, and the code that reaches them (KernelStorage, the base of KernelWriter).

    kernel K            i32 @<prefix>_<K>(ptr %table, ptr %depths, i64 %thread, i64 %nthreads,
                        ptr %barrier): %table holds the address of every plan buffer (plan.buffers order),
                        %depths the current depth of every recursive function (host control; device
                        control keeps its own counters). Returns 0, or 1 + the index of the recursive
                        function that went deeper than its max_depth, or INTERRUPTED (-1, kernel.py).
                        %nthreads copies (at most the module's `threads`) run at once, thread = 0..nthreads-1.
    %table              the plan's buffers, then (instrumented build only) the trace buffer, then the
                        recursion workspace, then the packed constants (render.py)
    Uniforms / Assign   scalars in stack slots of each thread; frame uniforms (one slot per recursion depth)
                        live in the thread's region of the recursion workspace (below)
    frame storage       buffer/uniform of fn at index depth_fn + value.frame_offset (fn.frames copies; a
                        function with a Call of step > 1 counts frames apart from its depth, frame_slot)
    recursion workspace the site stacks (max_depth + 1 i32 each) and frame uniforms (8 bytes per copy) of the
                        kernel's recursive functions, in one heap block (a %table slot after the buffers and
                        the trace buffer): thread k's region starts at k * ModuleWriter.region_bytes. Never
                        on the native stack, whose few MiB a max_depth in the millions would overflow; the
                        executable allocates it zeroed and untouched, so only the depths used take memory.

Table entries, stack slots and workspace addresses are set up once, in the kernel's entry block
(`prologue`), where they dominate every use.
"""
from __future__ import annotations

from gdsl.backends.cpu.ir import Function, compute_type, const, load_element, mem_type, store_element
from gdsl.backends.cpu.operands import Operands
from gdsl.core.ir import Lit
from gdsl.schedule.plan import Buffer, Uniform

REGION = "GDSLREGIONBYTES"    # placeholder for the bytes of one thread's recursion workspace region


class KernelStorage:
    """The kernel function `symbol` of ModuleWriter `module` being written (`fn`), and the addresses of the
    plan's values in it: table entries, recursion depths, frames, uniform slots, the recursion workspace."""
    def __init__(self, module, symbol, host: bool):
        self.module = module
        self.host = host
        self.fn = Function(f"define i32 @{symbol}(ptr noalias %table, ptr noalias %depths, i64 %thread, "
                           f"i64 %nthreads, ptr %barrier)", attrs="nounwind ", metadata=[])
        self.bases: dict = {}
        self.uniform_slots: dict = {}
        self.depths: dict = {}        # device: fn name -> slot; host: fn name -> SSA value
        self.frames: dict = {}        # device, a function with a Call of step > 1: fn name -> frame slot
        self.region = None            # this thread's region of the recursion workspace
        self.region_bytes = 0         # its size so far (every slot 64-byte aligned)

    def prologue(self, line):
        """Add `line` to the kernel's entry block."""
        self.fn.allocas.append(line)

    def base(self, buf: Buffer) -> str:
        return self.table_entry(self.module.buffer_index[id(buf)], buf.name)

    def table_entry(self, index, name) -> str:
        """The address in slot `index` of %table (loaded once, on entry)."""
        if index not in self.bases:
            slot, value = self.fn.name("tab"), self.fn.name(f"{name}_")
            self.prologue(f"  {slot} = getelementptr inbounds ptr, ptr %table, i64 {index}")
            self.prologue(f"  {value} = load ptr, ptr {slot}, align 8")
            self.bases[index] = value
        return self.bases[index]

    def depth(self, fname) -> str:
        """The current depth of recursive function `fname` (i64)."""
        if self.host:
            if fname not in self.depths:
                slot, name = self.fn.name("dp"), self.fn.name("depth")
                self.prologue(f"  {slot} = getelementptr inbounds i64, ptr %depths, i64 {self.module.fn_index[fname]}")
                self.prologue(f"  {name} = load i64, ptr {slot}, align 8")
                self.depths[fname] = name
            return self.depths[fname]
        return self.fn.load("i64", self.depth_slot(fname))

    def depth_slot(self, fname):
        """The stack slot holding the depth of recursive function `fname` (device control; 0 on entry)."""
        if fname not in self.depths:
            slot = self.fn.name("depth")
            self.prologue(f"  {slot} = alloca i64, align 8")
            self.prologue(f"  store i64 0, ptr {slot}")
            self.depths[fname] = slot
        return self.depths[fname]

    def frame_slot(self, fname):
        """The stack slot counting the frames of `fname` apart from its depth (device control, a function
        with a Call of step > 1: the sum of the active calls' steps; 0 on entry)."""
        if fname not in self.frames:
            slot = self.fn.name("frame")
            self.prologue(f"  {slot} = alloca i64, align 8")
            self.prologue(f"  store i64 0, ptr {slot}")
            self.frames[fname] = slot
        return self.frames[fname]

    def steps_frames(self, fname) -> bool:
        return not self.host and self.module.functions[fname].max_step > 1

    def frame_index(self, fname, offset) -> str:
        d = self.fn.load("i64", self.frame_slot(fname)) if self.steps_frames(fname) else self.depth(fname)
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
                copies = self.module.functions[u.frame_of].frames
                self.uniform_slots[id(u)] = self.workspace(copies * 8, f"{u.name}_")
            else:
                slot = self.fn.name(f"{u.name}_")
                self.prologue(f"  {slot} = alloca {ty}, align 8")
                self.uniform_slots[id(u)] = slot
        slot = self.uniform_slots[id(u)]
        if not u.frame_of:
            return slot
        return self.fn.gep(ty, slot, self.frame_index(u.frame_of, value.frame_offset))

    def workspace(self, nbytes, name) -> str:
        """The address of `nbytes` of this thread's region of the recursion workspace (zeroed at first)."""
        if self.region is None:
            base = self.table_entry(self.module.stack_slot, "stacks")
            offset, self.region = self.fn.name("regoff"), self.fn.name("region")
            self.prologue(f"  {offset} = mul i64 %thread, {REGION}")
            self.prologue(f"  {self.region} = getelementptr inbounds i8, ptr {base}, i64 {offset}")
        slot = self.fn.name(name)
        self.prologue(f"  {slot} = getelementptr inbounds i8, ptr {self.region}, i64 {self.region_bytes}")
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
