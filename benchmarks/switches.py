"""Run the bench with module switches set: levers that are module constants rather than jit options.

    python benchmarks/switches.py gdsl.schedule.resident.GEMM_TILES=False [module.NAME=value ...] -- <bench args>

Each `module.NAME=value` (a Python literal) is set before the bench starts, then `models.bench` runs with the
arguments after `--` (e.g. `--models nasrnn --batch 64 --systems gdsl-device --runs 20 --warmup 5 --no-floor`).
The kernels compile with the switches set (a precompiled cache holds only what `benchmarks/precompile_cuda.py`
rendered, so other variants compile on the device). docs/performance.md uses it for same-call ablations.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: gdsl/, models/


def main(argv: list[str]) -> int:
    if "--" not in argv:
        raise SystemExit(__doc__)
    cut = argv.index("--")
    from models.common import set_switches
    set_switches(argv[:cut])
    for spec in argv[:cut]:
        print(f"set {spec.replace('=', ' = ', 1)}", flush=True)
    from models.bench import main as bench
    return bench(argv[cut + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
