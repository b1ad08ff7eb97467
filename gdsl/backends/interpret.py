"""The `interpret` backend: the reference interpreter run on the traced program (numpy arrays)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gdsl.interpreter import run_program

KNOWN_OPTIONS = frozenset({"control", "grid", "block", "unroll", "partition", "wavefront", "hoist",
                           "resident", "tensor_cores", "owner", "epilogue", "balance", "fork", "window_store",
                           "resident_calls", "narrow", "spread_frames", "aside", "autotune",
                           "uniform_reductions", "resident_partitioned", "index_ranges",
                           "concat_k", "thin_gemv", "row_views", "siblings", "flags",
                           "double_temps", "smem_temps", "split_k", "place_workspace",
                           "peel"})  # accepted, no effect here


def unavailable_reason():
    return None


@dataclass
class Lowering:
    program: object
    plan: str
    source: str


def lower(program, options) -> Lowering:
    plan = "interpret: no schedule; the IR is evaluated equation by equation with numpy"
    return Lowering(program, plan, str(program))


def to_device(x):
    if hasattr(x, "__array__"):
        return np.asarray(x)
    if hasattr(x, "get"):  # CuPy
        return x.get()
    return np.from_dlpack(x)


def load(lowering: Lowering):
    program = lowering.program

    def run(flat_args):
        return run_program(program, [to_device(a) for a in flat_args])
    return run
