"""The C-family renderer shared by the CUDA and HIP backends (and the CPU emulator that tests them).

    dialect.py        the base Dialect: what a target spells differently (indices, barriers, warp size, ...)
    lower.py          the options every C-family backend takes, and program -> Lowering in a dialect
    render.py         Plan -> translation unit (kernels walking the statement tree, the recursion stack machine)
    ops.py            one __device__ function per Op (its uTask share, see gdsl/schedule/utasks.py), the body
                      from its kind's lowering rule; the elementwise family's rules
    data_movement.py  lowering rules of the data-movement and gather families (and copies)
    reductions.py     lowering rules of the reduce and window families
    gemm.py           lowering rules of matmul and conv2d (GEMM / GEMV tiles)
    elementwise.py    the elementwise table (one C expression per primitive); dialects override entries
    views.py          the "view" rules (plan views at run-time offsets, permuted ones) and the slices and
                      transposes left as Ops that are read in place
    types.py          dtypes as C storage / compute types, literals, conversions
    prelude.h         the device library: conversions, warp/block reductions, GEMM/GEMV tiles, grid barrier
    executor.py       buffers, launches and host control over a Device (CuPy, or the emulator)
    emulator.py       a CPU emulation of the base dialect (threads as std::threads), for tests without a GPU
"""
from gdsl.backends.cfamily.dialect import Dialect  # noqa: F401
from gdsl.backends.cfamily.elementwise import ELEMENTWISE  # noqa: F401
from gdsl.backends.cfamily.render import Rendered, render_plan  # noqa: F401
