"""The C-family renderer shared by the CUDA and HIP backends (and the CPU emulator that tests them).

    render.py       Plan -> translation unit (kernels walking the statement tree, the recursion stack machine)
    ops.py          one __device__ function per Op (its uTask share, see gdsl/schedule/utasks.py)
    elementwise.py  the elementwise table (one C expression per primitive); dialects override entries
    types.py        dtypes as C storage / compute types, literals, conversions
    prelude.h       the device library: conversions, warp/block reductions, GEMM/GEMV tiles, grid barrier
    executor.py     buffers, launches and host control over a Device (CuPy, or the emulator)
    emulator.py     a CPU emulation of the CUDA dialect (threads as std::threads), for tests without a GPU
"""
from gdsl.backends.cfamily.dialect import Dialect  # noqa: F401
from gdsl.backends.cfamily.elementwise import ELEMENTWISE  # noqa: F401
from gdsl.backends.cfamily.lowerings import LOWERINGS  # noqa: F401
from gdsl.backends.cfamily.render import Rendered, render_plan  # noqa: F401
