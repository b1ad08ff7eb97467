"""The benchmark tools that run without a GPU: benchmarks/plan_floors.py (each zoo row's floor from its plan) and
benchmarks/switches.py (the bench with module switches set)."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

from gdsl.schedule import resident

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_floors_counts_the_plan_against_the_given_ceilings(capsys):
    assert _tool("plan_floors").main(["--models", "rae", "--barrier-us", "132=2.0,264=3.0"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    found = re.search(r"grid +(\d+) +dependent barriers +(\d+) +barriers ([\d.]+)", line)
    grid, dependent, term = int(found[1]), int(found[2]), float(found[3])   # the barriers' term in ms
    assert line.startswith("rae") and dependent > 0
    assert term == pytest.approx(dependent * (2.0 if abs(grid - 132) <= abs(grid - 264) else 3.0) * 1e-3, abs=1e-3)


def test_switches_sets_the_switch_then_runs_the_bench(tmp_path, monkeypatch):
    monkeypatch.setattr(resident, "GEMM_TILES", resident.GEMM_TILES)     # restored after the test
    path = tmp_path / "b.json"
    assert _tool("switches").main(["gdsl.schedule.resident.GEMM_TILES=False", "--", "--small", "--models", "rae",
                                   "--systems", "gdsl-device", "--backend", "interpret", "--runs", "2",
                                   "--warmup", "0", "--inputs", "1", "--no-floor", "--json", str(path)]) == 0
    assert resident.GEMM_TILES is False
    assert json.loads(path.read_text())["rows"]


def test_switches_refuses_an_unknown_switch():
    with pytest.raises(SystemExit, match="has no switch NOPE"):
        _tool("switches").main(["gdsl.schedule.resident.NOPE=1", "--", "--models", "rae"])
    with pytest.raises(SystemExit):
        _tool("switches").main(["gdsl.schedule.resident.GEMM_TILES=False"])      # no "--": the usage
