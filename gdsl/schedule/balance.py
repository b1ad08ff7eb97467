"""Wave balancing: the splits and the vEU shares of one wave chosen together.

`utasks.split` picks an op's split for the whole grid, and the scheduler then shares the grid among the
wave's ops by estimated work (`Scheduler._shares`). Each choice is made without the other, and a wave can
come out in rounds: the ten-layer LSTM's skewed step has twenty GEMVs sharing 264 vEUs, each split into 64
tiles of 16 columns for the grid but given 13 vEUs, so every vEU runs five tiles one after another, each a
memory round trip long; NASRNN's batch-64 step has a 256-tile GEMM beside a window copy, 2 rounds on the
vEUs the copy leaves it. The other way round, an elementwise op alone in its wave takes 1024 elements per
uTask (four per thread, one after another) while most of the grid idles.

Here each op of a wave offers its possible splits (`utasks.split_options`: GEMM tiles, GEMV widths,
elementwise chunks), each with a uTask time that counts memory round trips, and the wave takes the
smallest time T for which some choice of one split per op fits the grid: op i at T needs
ceil(n / floor(T / cost)) vEUs for a split of n uTasks of `cost` ns, the fewest over its splits, and the
sum is at most the grid. The need falls as T grows, so T is found by bisection. A wave is rebalanced only
when that beats its current time (under the same model) by BALANCE_GAIN.

An option may be limited to one round (each uTask on a vEU of its own): the scheduler offers an
elementwise op's finer chunks only so, as two rounds of quarter-size uTasks take as long as one of the
natural chunk (both are round-trip bound), and extra uTasks make the grid look busier than it is (the
CUDA backend doubles the grid for waves of more uTasks than SMs).
"""
from __future__ import annotations

import math

# Rebalance a wave only when its estimated time falls by at least this fraction.
BALANCE_GAIN = 0.1


def need(options, t: float) -> tuple[int, int] | None:
    """(vEUs, index of the split) with which one op's `options` [(n_utasks, cost, most rounds or None)]
    finish within `t` ns on the fewest vEUs (among equals the faster one, then the earlier option), None if
    none can."""
    best = None
    for index, (n, cost, most_rounds) in enumerate(options):
        if cost > t:
            continue
        rounds = max(1, min(n, int(t // cost), most_rounds or n))
        veus = max(1, math.ceil(n / rounds))
        key = (veus, math.ceil(n / veus) * cost)
        if best is None or key < best[0]:
            best = (key, index)
    return None if best is None else (best[0][0], best[1])


def wave_time(options, choice) -> float:
    """The time of a wave whose op i runs its split choice[i] = (index, vEUs): its slowest op's rounds."""
    return max((math.ceil(opts[i][0] / veus) * opts[i][1] for opts, (i, veus) in zip(options, choice)
                if opts[i][0]), default=0.0)


def balance(options, grid: int, current) -> list[tuple[int, int]] | None:
    """One (index of the split, vEUs) per op for a wave of ops offering `options` (per op a list of
    (n_utasks, cost, most rounds or None)), on at most `grid` vEUs in all, with the smallest wave time;
    None when it is not at least BALANCE_GAIN below the time of the `current` choice [(index, vEUs)]."""
    if not options or len(options) > grid:
        return None
    now = wave_time(options, current)
    lo = max(min(cost for _, cost, _ in opts) for opts in options)
    hi = now

    def fits(t):
        needs = [need(opts, t) for opts in options]
        return None if any(n is None for n in needs) or sum(n[0] for n in needs) > grid else needs

    if fits(hi) is None:
        return None
    if fits(lo) is not None:
        hi = lo
    else:
        for _ in range(40):
            mid = (lo + hi) / 2
            if fits(mid) is None:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1.0:
                break
    choice = [(index, veus) for veus, index in fits(hi)]
    if wave_time(options, choice) > (1 - BALANCE_GAIN) * now:
        return None
    return choice
