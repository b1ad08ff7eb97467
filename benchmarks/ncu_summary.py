"""Summarise Nsight Compute's per-instruction warp-stall samples of one kernel: where a persistent kernel waits.

On the GPU machine (one forward of a zoo model profiled, then its source page exported as CSV):

    ncu --clock-control none --section WarpStateStats --section SourceCounters -k regex:gdsl_main \
        --launch-skip 2 --launch-count 1 -o rep python -m models.bench --models nasrnn --batch 64 \
        --systems gdsl-device --runs 1 --warmup 1 --no-floor
    ncu --import rep.ncu-rep --page source --print-source sass --csv > sass.csv
    python benchmarks/ncu_summary.py sass.csv [--buckets 0.01]

Prints the stall reasons over all samples, per opcode (FFMA waiting on shared loads = "short_sb", on global
loads = "long_sb"; a grid barrier's waiters show as "barrier" at the branch after the block sync), and with
--buckets the address ranges of 0x200 bytes holding at least that share of the samples (a uTask body's range).
docs/performance.md (session 11) reads NASRNN's, the LSTM's and SkipNet's kernels this way.
"""
from __future__ import annotations

import argparse
import collections
import csv
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def load(path: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of ncu's source-page CSV (its first line names the kernel)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = rows[1]
    return header, [r for r in rows[2:] if len(r) == len(header)]


def summarise(header: list[str], rows: list[list[str]], buckets: float | None = None) -> list[str]:
    ix = {h: i for i, h in enumerate(header)}
    stalls = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]

    def num(row, key):
        text = row[ix[key]].strip()
        return int(text) if text.lstrip("-").isdigit() else 0

    def opcode(row):
        words = row[ix["Source"]].split()
        word = words[1] if words and words[0].startswith("@") and len(words) > 1 else (words[0] if words else "")
        return word.split(".")[0]

    def shares(counter, total):
        return [(k[len("stall_"):], round(v / max(total, 1) * 100)) for k, v in counter.most_common()
                if k.startswith("stall_")][:4]

    total = sum(num(r, SAMPLES) for r in rows)
    overall = collections.Counter({s: sum(num(r, s) for r in rows) for s in stalls})
    lines = [f"samples {total}: {shares(overall, total)}"]
    by_op = collections.defaultdict(collections.Counter)
    for r in rows:
        c = by_op[opcode(r)]
        c["n"] += num(r, SAMPLES)
        for s in stalls:
            c[s] += num(r, s)
    for op, c in sorted(by_op.items(), key=lambda item: -item[1]["n"])[:10]:
        lines.append(f"{op:8s} {c['n'] / max(total, 1) * 100:5.1f}%  {shares(c, c['n'])}")
    if buckets is not None:
        ranges: dict = {}
        for r in rows:
            start = int(r[ix["Address"]], 16) // 0x200 * 0x200
            c = ranges.setdefault(start, collections.Counter())
            c["n"] += num(r, SAMPLES)
            c["executed"] = max(c["executed"], num(r, EXECUTED))
            c["op:" + opcode(r)] += 1
            for s in stalls:
                c[s] += num(r, s)
        for start, c in ranges.items():
            if c["n"] >= total * buckets:
                ops = [k[3:] for k, _ in c.most_common() if k.startswith("op:")][:4]
                lines.append(f"{start:#x} {c['n'] / total * 100:5.1f}% executed {c['executed']:>10d}  "
                             f"{shares(c, c['n'])} {ops}")
    return lines


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv")
    p.add_argument("--buckets", type=float, default=None, help="also address ranges with this share or more")
    args = p.parse_args(argv)
    print("\n".join(summarise(*load(args.csv), buckets=args.buckets)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
