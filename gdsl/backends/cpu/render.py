"""A Plan as one LLVM module: the functions of its ops (ModuleWriter, here), one function per kernel
(kernel.py: the statement tree; storage.py: the kernel's signature and where its values live) and the
support code (lowerings.support_code: barrier, math helpers; the trace support of an instrumented build).

    Op                  three internal functions: the uTask function, void @<prefix>_<op>(one noalias
                        pointer per distinct storage it touches, one scalar per uniform it reads, i64 %t)
                        computing uTask t (the op kind's "utask" lowering rule); for a matmul whose row
                        bands fit L1, a row-band function computing every tile of a band at once
                        (gemm.emit_matmul_band); and the
                        run function that the kernel calls once per Task, which loops over this thread's
                        uTasks (keeping the loops out of the kernel keeps its compile time linear).
                        Ops whose functions come out identical (same kind, shapes, params) share them.
    packed constants    the right operand of a matmul that is a constant of several column tiles is read
                        from a copy packed tile by tile (gemm.packed_tile), in %table after the buffers

Symbols carry a placeholder prefix that `render` replaces by a hash of the text, so that modules of
different plans never clash inside the one process-wide JIT engine.
"""
from __future__ import annotations

import hashlib
import re

from gdsl.backends.cpu import LOWERING_CHAIN
from gdsl.backends.cpu.gemm import emit_matmul_band, matmul_bands, packed_tile
from gdsl.backends.cpu.ir import UNROLL_OFF, Function, compute_type
from gdsl.backends.cpu.kernel import KernelWriter
from gdsl.backends.cpu.lowerings import support_code
from gdsl.backends.cpu.operands import Operands
from gdsl.core.ir import Lit
from gdsl.primitives.registry import lowering_rule
from gdsl.profiling.llvm import trace_support
from gdsl.schedule.plan import Assign, Uniform, Uniforms, Wave, plan_statements
from gdsl.schedule.printer import describe_op

PREFIX = "GDSLPREFIX"     # placeholder for the module's symbol prefix (a hash of its text: render)
SELF = "GDSLSELF"         # placeholder for the name of a function being written (its symbol: _add)


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
    """The LLVM module of `plan` on up to `threads` threads (`trace`: an instrumented build): `render()`."""
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
