"""Run a loop, a branch, a recursion program, a partitioned loop (and the scaled-down LSTM/NASRNN/Attention)
on the cuda backend, both placements, both barriers: the program compute-sanitizer watches on a GPU machine,

    compute-sanitizer --tool memcheck python3 tests/gpu_sanitize.py
    compute-sanitizer --tool racecheck python3 tests/gpu_sanitize.py

and a check that the results still match the interpreter there. Not collected by pytest (needs a GPU)."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))

from backend_programs import PROGRAMS  # noqa: E402

import gdsl  # noqa: E402
from models import attention, common, lstm, nasrnn  # noqa: E402

bad = 0
for name in ("loop", "branch", "recursion", "while_data_exit", "heads"):       # heads: a partitioned loop
    fn, args = PROGRAMS[name]
    expected = gdsl.jit(fn, backend="interpret")(*args)
    for control in ("device", "host"):
        for barrier in ("atomic", "coop"):
            got = gdsl.jit(fn, backend="cuda", control=control, barrier=barrier)(*args)
            ok = all(np.allclose(g, e, rtol=2e-4, atol=2e-5) for g, e in
                     zip(gdsl.tree_flatten(gdsl.to_numpy(got))[0], gdsl.tree_flatten(expected)[0]))
            bad += not ok
            print(name, control, barrier, "ok" if ok else "WRONG", flush=True)
for mod in (lstm, nasrnn, attention):
    cfg = mod.small()
    w, x = mod.init_weights(cfg), mod.make_inputs(cfg, 2)
    for control in ("device", "host"):
        out = mod.make_forward(cfg, backend="cuda", control=control)(w, x)
        problems = common.compare(out, mod.reference(w, x, cfg))
        bad += bool(problems)
        print(mod.__name__, control, problems or "ok", flush=True)
sys.exit(1 if bad else 0)
