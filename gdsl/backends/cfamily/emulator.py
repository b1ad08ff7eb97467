"""Run the C-family backends' generated code on the CPU: the emulator dialect's source (CUDA's spelling)
compiled by g++ with `emu.h`, every CUDA thread a std::thread, every barrier a real barrier.

It exists to test the renderer where no GPU is: the same plan, statement tree, op functions, prelude
(GEMM tiles, warp-shuffle reductions, the atomic grid barrier) and executor run, so wrong indexing, a
missing barrier or a broken stack machine gives a wrong answer here as it would on the GPU. Keep grids
small (a few blocks of 32-64 threads): each thread is an OS thread.

    device = EmulatedDevice()
    executable = Executable(lowering, device)      # gdsl.backends.cfamily.executor

The HIP dialect runs here too, with 64- or 32-lane wavefronts: gdsl.backends.hip.emulated.EmulatedHIPDialect
renders the HIP header for emu.h's HIP names (`emulate(..., dialect=EmulatedHIPDialect(64))`).
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from gdsl.backends.cfamily import types as c_types
from gdsl.backends.cfamily.dialect import Dialect
from gdsl.backends.toolchain import cached_compile, compile_error, write_atomically

EMU_HEADER = (Path(__file__).with_name("emu.h")).read_text()
CUDA_TENSOR_CORES = (Path(__file__).parents[1] / "cuda" / "tensor_cores.h").read_text()
# GDSL_EMU_SANITIZE=address builds the kernels with AddressSanitizer (run Python with LD_PRELOAD=libasan.so):
# an out-of-bounds access of generated code then stops the run with a report.
_SANITIZE = tuple(f"-fsanitize={s}" for s in os.environ.get("GDSL_EMU_SANITIZE", "").split(",") if s)


def cxx() -> str | None:
    return shutil.which("g++")


class EmulatorDialect(Dialect):
    """The base dialect (CUDA's spelling, which emu.h defines) with the emulator's header, kernels as plain
    functions, shared memory from the emulated block and a launcher per kernel. Warps of 32 lanes (emu.h
    emulates shuffles over GDSL_WARP lanes: 32 unless a dialect's header defines it first)."""
    name = "emulator"
    lowering_chain = ("emulator", "cfamily")
    warp_size = 32
    header_template = EMU_HEADER
    kernel_prefix = "static void"
    shared_decl = "char* gdsl_smem = gdsl_emu_cur->smem;"
    dynamic_shared_decl = shared_decl
    resident_smem_per_sm = 64 * 1024     # (host memory: so that the tests run the resident-weight code too)
    flag_syncs = True                    # (as CUDA's)
    trace_clock = ("({ struct timespec gdsl_ts; clock_gettime(CLOCK_MONOTONIC, &gdsl_ts); "
                   "(unsigned long long)gdsl_ts.tv_sec * 1000000000ull + gdsl_ts.tv_nsec; })")
    trace_clock_name, trace_ns_per_tick = "CLOCK_MONOTONIC", 1.0

    def host_code(self, kernels, plan) -> str:
        out = []
        for spec in {spec.name: spec for spec in kernels}.values():   # merged kernels: one launcher each
            args = []
            for i, (kind, obj) in enumerate(spec.params):
                if kind == "buffer":
                    args.append(f"({c_types.storage(obj.aval.dtype)}*)args[{i}]")
                elif kind == "ws":
                    args.append(f"(char*)args[{i}]")
                elif kind == "trace":
                    args.append(f"(unsigned long long*)args[{i}]")
                else:
                    args.append(f"*(int*)args[{i}]")
            out.append(f"static void emu_body_{spec.name}(void** args) {{ {spec.name}({', '.join(args)}); }}\n"
                       f'extern "C" void emu_{spec.name}(int grid, int block, void** args) {{\n'
                       f"  gdsl_emu_launch(grid, block, GDSL_SMEM_BYTES, emu_body_{spec.name}, args);\n}}")
        return "\n".join(out)


class EmulatedTensorCores(EmulatorDialect):
    """The emulator running the CUDA dialect's tensor-core tiles (cuda/tensor_cores.h on emu.h's GDSL_EMU_TC
    instructions), float32 tiles chosen as on CUDA: for testing those tiles' indexing without a GPU."""
    header_template = "#define GDSL_EMU_TC\n" + EMU_HEADER
    tensor_cores = True
    device_library = CUDA_TENSOR_CORES


def compile_emulated(source: str) -> str:
    """Compile an emulator-dialect source to a shared library (cached on disk); returns its path."""
    def build() -> bytes:
        with tempfile.TemporaryDirectory(prefix="gdsl-emu-") as tmp:
            src, out = Path(tmp, "gdsl.cpp"), Path(tmp, "gdsl.so")
            src.write_text(source)
            done = subprocess.run([cxx(), "-std=c++20", "-O1", "-w", "-pthread", "-shared", "-fPIC", *_SANITIZE,
                                   str(src), "-o", str(out)], capture_output=True, text=True)
            if done.returncode:
                raise compile_error("g++", done.stdout + done.stderr, source, r"gdsl\.cpp:(\d+):\d+: error")
            return out.read_bytes()
    binary = cached_compile("emu", ("emu", source, _SANITIZE), build, suffix=".so")
    # Loaded from this process's own directory (mode 0o700, removed at exit), never from a predictable name in
    # the shared temp directory that another user could have planted.
    path = Path(_private_dir(), f"{hashlib.sha256(binary).hexdigest()}.so")
    if not path.exists():
        write_atomically(path, binary)   # another thread may be loading the same kernel
    return str(path)


@functools.cache
def _private_dir() -> str:
    folder = tempfile.mkdtemp(prefix="gdsl-emu-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


class EmulatedDevice:
    """The executor's Device on the CPU: numpy arrays as device memory, kernels from compile_emulated."""
    name = "emulator"

    def __init__(self):
        self.lib = None

    def load(self, rendered):
        self.lib = _load(compile_emulated(rendered.source))

    def max_grid(self, spec, block, smem) -> int:
        return 1 << 30

    def to_device(self, x, aval):
        return np.ascontiguousarray(np.asarray(x), dtype=aval.dtype).copy()

    def empty(self, aval):
        return _poisoned(aval)

    def zeros(self, nbytes):
        return np.zeros(max(nbytes, 16), np.uint8)

    def launch(self, spec, grid, block, args, cooperative):
        ptrs = []
        keep = []
        for a in args:
            if isinstance(a, np.ndarray):
                ptrs.append(a.ctypes.data if a.size else 0)
            else:
                c = ctypes.c_int(int(a))
                keep.append(c)
                ptrs.append(ctypes.addressof(c))
        array = (ctypes.c_void_p * len(ptrs))(*ptrs)
        getattr(self.lib, f"emu_{spec.name}")(ctypes.c_int(grid), ctypes.c_int(block), array)

    def fetch(self, array):
        return array

    def read(self, array, byte_offset, dtype):
        raw = array.reshape(-1).view(np.uint8)
        return raw[byte_offset:byte_offset + dtype.itemsize].view(dtype)[0]

    def sync(self):
        pass


def _poisoned(aval):
    """A fresh output with every byte 0x5A, so an element nobody writes shows."""
    raw = np.full(max(aval.size * aval.dtype.itemsize, 1), 0x5A, np.uint8)
    return raw[:aval.size * aval.dtype.itemsize].view(aval.dtype).reshape(aval.shape)


@functools.cache
def _load(path):
    return ctypes.CDLL(path)


def emulate(fun, *args, control="device", grid=4, block=64, barrier="atomic", partition=None, wavefront=None,
            hoist=None, resident=None, owner=None, epilogue=None, balance=None, rows=None, fork=None,
            window_store=None, resident_calls=None, cells=None, spread_frames=None, aside=None,
            uniform_reductions=None, resident_partitioned=None, index_ranges=None, concat_k=None,
            thin_gemv=None, row_views=None, siblings=None, flags=None, double_temps=None, smem_temps=None,
            split_k=None, peel=None, dialect=None):
    """Trace `fun(*args)`, schedule it for `grid` vEUs of `block` threads, and run the generated code on the
    CPU emulator (in `dialect`: the emulator's own by default, or gdsl.backends.hip.emulated's HIP dialect).
    Returns the results in `fun`'s pytree (numpy arrays)."""
    from gdsl.backends.cfamily.executor import Executable
    from gdsl.backends.cfamily.lower import check_options, lower_with_grid
    from gdsl.jit import _as_dtype, leaf_aval, make_ir
    from gdsl.tracing.pytree import tree_flatten, tree_unflatten
    program = make_ir(fun)(*args)
    dialect = dialect or EmulatorDialect()
    opts = check_options({"control": control, "block": block, "barrier": barrier, "partition": partition,
                          "wavefront": wavefront, "hoist": hoist, "resident": resident,
                          "owner": owner, "epilogue": epilogue, "balance": balance, "rows": rows,
                          "cells": cells, "fork": fork, "window_store": window_store,
                          "resident_calls": resident_calls, "spread_frames": spread_frames,
                          "aside": aside, "uniform_reductions": uniform_reductions,
                          "resident_partitioned": resident_partitioned, "index_ranges": index_ranges,
                          "concat_k": concat_k, "thin_gemv": thin_gemv, "row_views": row_views,
                          "siblings": siblings, "flags": flags, "double_temps": double_temps,
                          "smem_temps": smem_temps, "split_k": split_k, "peel": peel}, dialect)
    lowering = lower_with_grid(program, opts, grid, dialect)
    flat, _ = tree_flatten((tuple(args), {}))
    flat = [_as_dtype(x, leaf_aval(x)) for x in flat]
    outs = Executable(lowering.plan, lowering.rendered, EmulatedDevice())(flat)
    return tree_unflatten(program.out_tree, outs)
