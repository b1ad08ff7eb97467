"""gdsl: a Python DSL and compiler for deep-learning programs with dynamic control flow.

    import gdsl, gdsl.numpy as gnp, gdsl.nn
    @gdsl.jit
    def f(x, n): return gdsl.fori_loop(0, n, lambda i, x: gnp.tanh(x @ x), x)
"""
from gdsl import (
    backends,  # noqa: F401  (callable: gdsl.backends() lists the usable backends)
    nn,  # noqa: F401
    numpy,  # noqa: F401
)
from gdsl import primitives as _primitives  # noqa: F401  (registers every primitive)
from gdsl.array_methods import install_array_methods
from gdsl.backends import default_backend  # noqa: F401
from gdsl.control_flow import ShapeDtype, cond, fori_loop, recurse, switch, while_loop  # noqa: F401
from gdsl.dtypes import bfloat16, bool_, float16, float32, int32, int64  # noqa: F401
from gdsl.errors import (  # noqa: F401
    BackendUnavailableError,
    CompileError,
    ConcretizationError,
    RecursionDepthError,
)
from gdsl.host import to_numpy  # noqa: F401
from gdsl.jit import Lowered, jit, make_ir  # noqa: F401
from gdsl.profiling import Profile, profile  # noqa: F401
from gdsl.tracing.pytree import tree_flatten, tree_map, tree_unflatten  # noqa: F401

install_array_methods()
del install_array_methods


__all__ = ["jit", "make_ir", "backends", "default_backend", "to_numpy", "while_loop", "fori_loop", "cond",
           "switch", "recurse", "ShapeDtype", "float32", "float16", "bfloat16", "int32", "int64", "bool_",
           "ConcretizationError", "RecursionDepthError", "CompileError", "BackendUnavailableError", "Lowered",
           "profile", "Profile"]


def plot_plan(lowered, path):
    """Draw a timeline of the plan's uTasks on vEUs per wave to `path` (needs matplotlib)."""
    from gdsl.schedule.plot import plot_plan as _plot
    return _plot(lowered, path)
