"""Compiling the CPU backend's modules with llvmlite.

One MCJIT engine per compiled module (llvmlite's engine owns its target machine, so each gets its own), host
CPU and features, new-pass-manager O3. Modules are cached by the hash of their text while some executable
uses them: a second `compile_module` of the same IR returns the same machine code without recompiling, and
the code is freed (weakly cached engine) once no executable needs it.
"""
from __future__ import annotations

import hashlib
import re
import threading
import time
import weakref

from gdsl.errors import CompileError

_lock = threading.Lock()
_target_machine = None     # optimises and prints modules; each engine owns a target machine of its own
_cache = weakref.WeakValueDictionary()     # sha256 of the module text -> its live CompiledModule
stats = {"compiles": 0, "cache_hits": 0, "last_compile_s": 0.0}


def _llvm():
    import llvmlite.binding as llvm
    return llvm


def _host_target_machine():
    """A new target machine for the host CPU and its features (O3)."""
    llvm = _llvm()
    target = llvm.Target.from_triple(llvm.get_process_triple())
    return target.create_target_machine(cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(),
                                        opt=3, reloc="default", codemodel="jitdefault")


def _ensure_target():
    global _target_machine
    if _target_machine is None:
        llvm = _llvm()
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        _target_machine = _host_target_machine()
    return _target_machine


def _compile_error(text, message):
    line = None
    m = re.search(r":(\d+):(\d+): error", message)
    if m:
        lines = text.splitlines()
        k = int(m.group(1)) - 1
        line = lines[k] if 0 <= k < len(lines) else None
    return CompileError(f"LLVM rejected the generated module: {message.strip()}" +
                        (f"\n  at: {line.strip()}" if line else ""), log=message, source=text, line=line)


class CompiledModule:
    """One module's machine code: its own MCJIT engine (llvmlite's engine owns its target machine, so each
    gets a new one), freed with the engine when the last Executable that uses it is collected."""
    def __init__(self, engine, addresses: dict):
        self.engine = engine
        self.addresses = addresses      # {symbol: address}

    def __getitem__(self, symbol):
        return self.addresses[symbol]

    def global_address(self, name) -> int:
        return self.engine.get_global_value_address(name)


def compile_module(text: str, symbols) -> CompiledModule:
    """The module's machine code and entry points (`module[symbol]`: an address); compiled once per distinct
    text while some holder of the result is alive (the cache holds it weakly)."""
    key = hashlib.sha256(text.encode()).hexdigest()
    with _lock:
        cached = _cache.get(key)
        if cached is not None:
            stats["cache_hits"] += 1
            return cached
        llvm = _llvm()
        _ensure_target()
        t0 = time.perf_counter()
        try:
            mod = llvm.parse_assembly(text)
            mod.verify()
        except RuntimeError as e:
            raise _compile_error(text, str(e)) from None
        _optimize(mod)
        engine = llvm.create_mcjit_compiler(mod, _host_target_machine())
        engine.finalize_object()
        addresses = {s: engine.get_function_address(s) for s in symbols}
        missing = [s for s, a in addresses.items() if not a]
        if missing:
            raise CompileError(f"LLVM module lacks entry points {missing}", source=text)
        stats["compiles"] += 1
        stats["last_compile_s"] = time.perf_counter() - t0
        module = _cache[key] = CompiledModule(engine, addresses)
        return module


def _optimize(mod) -> None:
    """New-pass-manager O3 for the host CPU (vectorisers on)."""
    llvm = _llvm()
    mod.triple = _target_machine.triple
    mod.data_layout = str(_target_machine.target_data)
    tuning = llvm.create_pipeline_tuning_options(speed_level=3)
    tuning.loop_vectorization = True
    tuning.slp_vectorization = True
    passes = llvm.create_pass_builder(_target_machine, tuning)
    passes.getModulePassManager().run(mod, passes)


def optimized_ir(text: str) -> str:
    """The module after O3, as text (to read what LLVM made of it; adds nothing to the engine)."""
    with _lock:
        _ensure_target()
        mod = _llvm().parse_assembly(text)
        _optimize(mod)
        return str(mod)


def assembly(text: str) -> str:
    """The host assembly of the optimised module."""
    optimized = optimized_ir(text)
    with _lock:
        return _target_machine.emit_assembly(_llvm().parse_assembly(optimized))
