"""Load CUBINs and launch their kernels through CuPy, cooperative launches included.

CuPy is imported inside the functions, so importing this module needs neither CuPy nor a GPU.
The CuPy 14 calls used (all thin wrappers of the CUDA driver API):

    module = cupy.cuda.function.Module(); module.load(cubin)           # cuModuleLoadData
    kernel = module.get_function(name)                                  # cuModuleGetFunction; kernel.ptr
    cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.ptr, block, smem)
    kernel(grid, block, args, shared_mem=, stream=, enable_cooperative_groups=True)
                                                                        # cuLaunchCooperativeKernel
"""
from __future__ import annotations

import numpy as np

# Above 48 KiB of dynamic shared memory a kernel must opt in (cuFuncSetAttribute) before it can launch.
_DEFAULT_DYNAMIC_SMEM_LIMIT = 48 * 1024
_SCALAR_TYPES = (np.int32, np.int64, np.uint32, np.uint64, np.float32, np.float64, np.float16)


def cuda_usable() -> bool:
    """True if CuPy imports, is CuPy for CUDA (not its ROCm build) and sees a CUDA device. Never raises."""
    try:
        import cupy
        return not cupy.cuda.runtime.is_hip and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or CUDARuntimeError when there is no driver
        return False


def load_module(cubin: bytes):
    """Load a CUBIN into the current device's context; `.get_function(name)` gives its kernels.

    A kernel keeps its module loaded, so the module itself may be dropped once its kernels are taken.
    """
    from cupy.cuda import function
    module = function.Module()
    module.load(bytes(cubin))
    return module


def allow_dynamic_smem(kernel, dynamic_smem: int) -> None:
    """Let `kernel` launch with `dynamic_smem` bytes of dynamic shared memory (above the default limit the
    driver needs to be asked once per kernel)."""
    if dynamic_smem > _DEFAULT_DYNAMIC_SMEM_LIMIT:
        from cupy.cuda import driver
        driver.funcSetAttribute(kernel.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, dynamic_smem)


def smem_per_sm() -> int:
    """Bytes of shared memory one SM of the current device has."""
    from cupy.cuda import runtime
    return runtime.deviceGetAttribute(runtime.cudaDevAttrMaxSharedMemoryPerMultiprocessor, runtime.getDevice())


def max_coresident_blocks(kernel, block: int, dynamic_smem: int = 0) -> int:
    """How many blocks of `kernel` fit on the current device at once: the largest cooperative grid.

        max_coresident_blocks = occupancy(blocks per SM at this block size and smem) * number of SMs
    """
    from cupy.cuda import driver, runtime
    allow_dynamic_smem(kernel, dynamic_smem)
    per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.ptr, block, dynamic_smem)
    sms = runtime.deviceGetAttribute(runtime.cudaDevAttrMultiProcessorCount, runtime.getDevice())
    return per_sm * sms


def launch(kernel, grid: int, block: int, args, *, cooperative: bool, shared_mem: int = 0, stream=None) -> None:
    """Launch `kernel<<<grid, block, shared_mem, stream>>>(*args)` (1-D grid and block), asynchronously.

    args are CuPy arrays (passed as device pointers) and numpy scalars (np.int32, np.int64, np.float32, ...,
    passed by value with exactly that width). A cooperative launch (which grid-wide barriers need: all
    blocks resident at once) raises ValueError when grid > max_coresident_blocks(kernel, block, shared_mem);
    the caller chooses a smaller grid. We check ourselves because CuPy would shrink the grid with only a
    warning, and the kernel would then run with a grid its caller did not plan for.
    """
    import cupy
    for i, a in enumerate(args):
        # A Python int or float would go to the kernel as 8 bytes, whatever the C parameter's width is.
        if not isinstance(a, (cupy.ndarray, *_SCALAR_TYPES)):
            raise TypeError(f"kernel argument {i} is a {type(a).__name__}; pass a cupy array or a numpy "
                            f"scalar of the kernel parameter's type (np.int32, np.float32, ...)")
    allow_dynamic_smem(kernel, shared_mem)
    if cooperative:
        limit = max_coresident_blocks(kernel, block, shared_mem)
        if grid > limit:
            raise ValueError(f"a cooperative launch of {grid} blocks of {block} threads ({shared_mem} bytes of "
                             f"dynamic shared memory) exceeds the {limit} blocks that fit on this GPU at once")
    kernel((grid,), (block,), tuple(args), shared_mem=shared_mem, stream=stream,
           enable_cooperative_groups=cooperative)
