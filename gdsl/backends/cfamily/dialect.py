"""The base C-family dialect: what differs between the targets of the C-family renderer, as class attributes
a dialect overrides (tinygrad's CStyleLanguage). The defaults are CUDA's spelling, which HIP and the CPU
emulator (emu.h) also accept.

    kernel_prefix                what precedes a kernel's name ({block}: threads per vEU; {veus_per_sm}: the
                                 plan's vEUs one SM holds at once, for a launch bound on registers)
    block_index, thread_index    the vEU's index in the grid and the thread's index in the vEU (C expressions)
    block_barrier                the statement all threads of one vEU wait at
    shared_decl                  the declaration of the vEU's shared memory (`{nbytes}`: its size)
    dynamic_shared_decl          the same, sized at launch (kernels with resident weights need more than the
                                 static limit)
    static_smem_limit            the most shared memory a kernel may declare statically: a kernel that needs
                                 more declares it dynamically
    resident_smem_per_sm         bytes of shared memory per SM for loop-invariant matmul weights kept on chip
                                 across a loop (gdsl/schedule/resident.py); 0: the dialect keeps none
    warp_size                    lanes that run in lockstep: the group of the shuffle reductions and of the
                                 GEMV lane split; `header_template` defines GDSL_WARP from it ($warp_size)
    tensor_cores                 float32 GEMM tiles run gdsl_gemm_tile_tc (device_library) at float32 accuracy
    pipelined_tiles              set per lowering (lower.py, gemm.pipelined_program): this program's GEMM tiles
                                 may take the pipelined tensor-core tile (gemm.TC_PIPELINE)
    flag_syncs                   the default of the jit option `flags` (gdsl/schedule/flags.py): a loop's grid
                                 barrier that orders only published carries becomes a flag sync
    issue_fence                  a statement after which the loads before it are issued, not later (the
                                 compiler may otherwise move a load down to its first use): "" none
    device_library               the dialect's own device code, after the prelude
    lowering_chain               where uTask and uniform lowering rules are looked up, first hit wins
                                 (gdsl/primitives/registry.py): a dialect overrides a "cfamily" rule by
                                 registering one under its own name
"""
from __future__ import annotations

import string

from gdsl.backends.cfamily import types as c_types
from gdsl.backends.cfamily.elementwise import ELEMENTWISE


class Dialect:
    """What differs between C-family targets. Subclasses override class attributes (tinygrad-style)."""
    name = "cfamily"
    warp_size = 32
    header_template = ""                 # defines the GDSL_* macros the prelude needs ($warp_size: warp_size)
    elementwise_overrides: dict = {}
    barriers = ("atomic",)
    kernel_prefix = 'extern "C" __global__ void __launch_bounds__({block})'
    shared_decl = "__shared__ __align__(16) char gdsl_smem[{nbytes}];"
    dynamic_shared_decl = "extern __shared__ __align__(16) char gdsl_smem[];"   # sized at launch
    static_smem_limit = 48 * 1024        # CUDA's (and the C family's default)
    resident_smem_per_sm = 0             # shared memory per SM that loop-invariant weights may fill (resident.py)
    tensor_cores = False                 # float32 GEMM tiles on the tensor cores (gdsl_gemm_tile_tc, 3xTF32)
    pipelined_tiles = False              # (per lowering: gemm.pipelined_program)
    flag_syncs = False                   # flag syncs unless flags=False (else only with flags=True)
    device_library = ""                  # device code of this dialect after the prelude (the tensor-core tile)
    block_index = "blockIdx.x"
    thread_index = "threadIdx.x"
    block_barrier = "__syncthreads();"
    issue_fence = ""
    ldg_template = "{ptr}[0]"            # a read-only load ("__ldg({ptr})" on CUDA)
    prefetch_template = "(void)({ptr})"  # a hint: bring the line at ptr into the L2 (or nothing)
    ldg_types = frozenset()              # storage types the read-only load exists for
    lowering_chain = ("cfamily",)        # a dialect with rules of its own: (its name, "cfamily")
    trace_clock = "0ull"                 # a device clock (unsigned long long ns or ticks), instrumented builds only
    trace_clock_code = ""                # what trace_clock needs defined (instrumented builds only)

    @property
    def header(self) -> str:
        return string.Template(self.header_template).substitute(warp_size=self.warp_size)

    @property
    def elementwise(self) -> dict:
        return {**ELEMENTWISE, **self.elementwise_overrides}

    def ldg(self, dtype, ptr: str) -> str:
        if c_types.storage(dtype) in self.ldg_types:
            return self.ldg_template.format(ptr=ptr)
        return f"(*({ptr}))"

    def grid_sync(self, barrier: str) -> str:
        return "gdsl_grid_sync_atomic(gdsl_bar);"

    def includes(self, barrier: str) -> str:
        return ""

    def host_code(self, kernels, plan) -> str:
        """Extra host-side code after the kernels (the CPU emulator's launchers)."""
        return ""
