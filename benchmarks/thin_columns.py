"""RAE on the GPU with the scheduler option thin_gemv=True at several THIN_GEMV_COLUMNS, each in a bench run of
its own beside the default, to choose the thin widths (docs/schedule.md, "Thin GEMV tiles": RAE's node GEMV
in tiles of 8 columns on 64 vEUs, or of 4 on 128 with half of each 32-byte sector of W unused).

    python benchmarks/thin_columns.py [--columns 8/8,4] [--overhead] [more models.bench arguments]

Each setting (widths joined by ",", settings by "/") prints the bench's table: the rows gdsl-device and
gdsl-device[thin_gemv=True] (with --overhead, the control-flow overhead over the traced tree, Figure 18,
both programs with the option).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: gdsl/, models/

from gdsl.schedule import utasks
from models import bench


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/thin_columns.py", description=__doc__.split("\n")[0])
    p.add_argument("--columns", default="8/8,4")
    args, rest = p.parse_known_args(argv)
    for setting in args.columns.split("/"):
        utasks.THIN_GEMV_COLUMNS = tuple(int(c) for c in setting.split(","))   # read when a plan is made
        print(f"\n===== THIN_GEMV_COLUMNS = {utasks.THIN_GEMV_COLUMNS}", flush=True)
        bench.main(["--models", "rae", "--systems", "gdsl-device", "--ablate", "thin_gemv=True", "--no-floor", *rest])


if __name__ == "__main__":
    main()
