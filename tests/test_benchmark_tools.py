"""The benchmark tools that run without a GPU: benchmarks/plan_floors.py (each zoo row's floor from its plan),
benchmarks/switches.py (the bench with module switches set), benchmarks/kernel_ab.py (its orchestration of ncu,
with a stand-in for ncu), benchmarks/cluster_lstm.py and benchmarks/tc_wave.py (their hand-written kernels, on the
emulator and through NVRTC)."""
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from strategies import needs_cxx, needs_nvrtc

from gdsl.schedule import resident

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # (where dataclasses look their module up)
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
    result = json.loads(path.read_text())
    assert result["rows"] and result["complete"] is True


def test_switches_refuses_an_unknown_switch():
    with pytest.raises(SystemExit, match="has no switch NOPE"):
        _tool("switches").main(["gdsl.schedule.resident.NOPE=1", "--", "--models", "rae"])
    with pytest.raises(SystemExit):
        _tool("switches").main(["gdsl.schedule.resident.GEMM_TILES=False"])      # no "--": the usage


def test_ncu_summary_shares_stalls_by_opcode_and_address(tmp_path, capsys):
    """A source-page CSV as ncu writes it (a kernel line, the header, one row per instruction)."""
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
              "stall_barrier", "stall_short_sb", "stall_selected", "stall_short_sb (Not Issued)"]
    rows = [["0x1000", "  @!P2  BRA 0x2000", "60", "10", "60", "0", "0", "0"],
            ["0x1400", "  FFMA R1, R2, R3, R1", "30", "99", "0", "20", "10", "20"],
            ["0x1410", "  LDS.128 R4, [R5]", "10", "50", "0", "0", "10", "0"]]
    path = tmp_path / "sass.csv"
    path.write_text("\n".join(",".join(f'"{c}"' for c in r) for r in [["Kernel Name", "gdsl_main"], header] + rows))
    assert _tool("ncu_summary").main([str(path), "--buckets", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "samples 100: [('barrier', 60), ('short_sb', 20), ('selected', 20)]"
    assert lines[1].startswith("BRA") and "60.0%" in lines[1] and "('barrier', 100)" in lines[1]
    assert lines[2].startswith("FFMA") and "('short_sb', 67)" in lines[2]
    assert [line.split()[0] for line in lines[4:]] == ["0x1000"]         # the one range with half the samples


_NCU_ROW = '"{n}","484","python3.12","127.0.0.1","gdsl_main","1","7","(256, 1, 1)","(132, 1, 1)","0","9.0",' \
    '"Command line profiler metrics","gpu__time_duration.sum","{unit}","{value}"'
NCU_CSV = "==PROF== Connected to process 484 (/usr/bin/python3.12)\n" + \
    _NCU_ROW.format(n=0, unit="ns", value="126,656") + "\n" + _NCU_ROW.format(n=1, unit="us", value="124.704") + "\n"


def test_kernel_ab_reads_ncu_and_alternates_the_variants():
    tool = _tool("kernel_ab")
    assert tool.kernel_us(NCU_CSV) == [pytest.approx(126.656), pytest.approx(124.704)]
    assert tool.parse_variant("lane8:a.B=8,c.D=None") == ("lane8", ["a.B=8", "c.D=None"])
    assert tool.parse_variant("base") == ("base", [])
    assert tool.split_switches(["a.B=8", "grid=132", "owner=True"]) == (["a.B=8"], {"grid": 132, "owner": True})
    assert tool.runs(["m"], ["x", "y"], 3) == [(0, "m", "x"), (0, "m", "y"), (1, "m", "y"), (1, "m", "x"),
                                               (2, "m", "x"), (2, "m", "y")]


def test_kernel_ab_runs_each_variant_under_the_profiler(tmp_path, capsys):
    """With a stand-in for ncu that prints two launches of each process: every (round, variant) runs once, with
    its switches passed to the child, and the summary and JSON hold each variant's launches."""
    log = tmp_path / "calls.txt"
    fake = tmp_path / "ncu"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\nprintf '%s' '{NCU_CSV}'\n")
    fake.chmod(0o755)
    out = tmp_path / "ab.json"
    assert _tool("kernel_ab").main(["--models", "seq2seq", "--variant", "base", "--variant",
                                    "lane8:gdsl.backends.cfamily.reductions.LANE_LOAD_BATCH=8", "--rounds", "2",
                                    "--ncu", str(fake), "--json", str(out)]) == 0
    calls = log.read_text().splitlines()
    assert len(calls) == 4 and calls[1].endswith("gdsl.backends.cfamily.reductions.LANE_LOAD_BATCH=8")
    assert calls[2].endswith("--child seq2seq 1 18 gdsl.backends.cfamily.reductions.LANE_LOAD_BATCH=8")
    result = json.loads(out.read_text())
    assert sorted(result["kernel_us"]) == ["seq2seq/base", "seq2seq/lane8"]
    assert len(result["kernel_us"]["seq2seq/base"]) == 4
    assert "seq2seq    lane8        median    125.68" in capsys.readouterr().out


@needs_cxx
def test_cluster_lstm_kernel_matches_the_reference_on_the_emulator(capsys):
    """The layer-per-cluster LSTM kernel (cluster barriers, stores into the cluster's other blocks, counters between
    layers) on the CPU emulator, every layout (W_hh in shared memory or registers, the input loaded ahead or not, h
    through global memory, atomic barriers), two cluster sizes, against the float64 reference of every h."""
    tool = _tool("cluster_lstm")
    assert tool.main(["--emulate"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 * len(tool.LAYOUTS) and all("0 timeouts" in line for line in lines)


@needs_nvrtc
@pytest.mark.parametrize("cluster", [8, 16])
def test_cluster_lstm_kernel_compiles_for_sm_90(cluster):
    """Every configuration the GPU run times, at the model's full size."""
    from gdsl.backends.cuda import toolchain
    from models import lstm
    tool = _tool("cluster_lstm")
    for input_part in (True, False):
        for layout in tool.LAYOUTS:
            source = tool.source(lstm.Config(), cluster, 256, layout, input_part)
            assert toolchain.compile_cuda(source, "sm_90", options=("-std=c++17",))


@needs_cxx
def test_tc_wave_kernels_match_float64_on_the_emulator(capsys):
    """Every tensor-core tile variant (mma.sync's fragment layouts, the cp.async stages, the 3xTF32 split) on the CPU
    emulator: 3xTF32 within float32's accuracy, TF32 within its own."""
    assert _tool("tc_wave").main(["--emulate"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(_tool("tc_wave").VARIANTS)


@needs_nvrtc
def test_tc_wave_kernels_compile_for_sm_90():
    from gdsl.backends.cuda import toolchain
    assert toolchain.compile_cuda(_tool("tc_wave").instantiated_source(), "sm_90", options=("-std=c++17",))
