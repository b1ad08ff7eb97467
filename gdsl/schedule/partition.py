"""Partitioned loops: a loop body that is |P| independent pipelines runs without grid barriers.

A while loop is *partitioned* by P (the leading k dims of its carries) when every value its body computes
has the leading dims P and the share of an op for index p in P reads only index p of what the body
computes; weights and other loop invariants are read freely. Attention at batch 1 is the example: every
head is its own pipeline (q = x·W_q[h], K[h] updated, softmax over head h's scores, ·W_o[h]), so head h can
stay on vEU h for all 32 steps.

The scheduler then splits every op of the body by partition (uTask p = partition p), puts uTask p of every
op on vEU p mod grid, and replaces each barrier in the loop by a vEU-local sync; one grid barrier follows
the loop. Whether that beats the ordinary plan (more vEUs per op, grid barriers between waves) is decided
by a rough cost estimate of both (`worth_it`), or forced with the `partition` jit option.
"""
from __future__ import annotations

import math

from gdsl.core.ir import Var
from gdsl.primitives import structural
from gdsl.primitives.linalg import matmul_p
from gdsl.primitives.registry import REDUCE, REGISTRY
from gdsl.schedule import utasks

BARRIER_NS = 1300.0      # one grid barrier (132 vEUs on an H100, measured)
LOCAL_SYNC_NS = 50.0     # one vEU-local sync
UTASK_NS = 100.0         # fixed cost of starting a uTask
LAUNCH_NS = 5000.0       # one kernel launch and wait from the host (an empty CuPy launch on an H200)

INV, UNI, PART = "invariant", "uniform", "partitioned"


def loop_partition(cond_j, body_j, n_body_consts, is_uniform) -> tuple | None:
    """The partition shape P of a while loop (cond and body jaxprs), or None when the body is not
    independent pipelines. `is_uniform(eqn)`: does the scheduler make this equation a uniform op?"""
    carries = body_j.in_binders[n_body_consts:]
    arrays = [v for v in carries if v.aval.size != 1]
    if not arrays:
        return None
    for k in range(min(v.aval.ndim for v in arrays), 0, -1):
        P = arrays[0].aval.shape[:k]
        if math.prod(P) > 1 and _partitions(cond_j, body_j, n_body_consts, k, P, is_uniform):
            return P
    return None


def _partitions(cond_j, body_j, nb, k, P, is_uniform) -> bool:
    classes = {}
    for v in body_j.in_binders[nb:]:
        if v.aval.size == 1:
            classes[v] = UNI
        elif v.aval.shape[:k] == P:
            classes[v] = PART
        else:
            return False
    if not _walk(body_j, classes, k, P, is_uniform):
        return False
    for out, carry in zip(body_j.outs, body_j.in_binders[nb:]):
        new = classes.get(out, INV) if isinstance(out, Var) else INV
        if new not in ((UNI, INV) if classes[carry] == UNI else (PART, INV)):
            return False
    cond_classes = dict(zip(cond_j.in_binders[len(cond_j.in_binders) - len(body_j.outs):],
                            [classes[v] for v in body_j.in_binders[nb:]]))
    return _walk(cond_j, cond_classes, k, P, is_uniform, uniform_only=True) and \
        cond_classes.get(cond_j.outs[0], INV) != PART


def _walk(jaxpr, classes, k, P, is_uniform, uniform_only=False) -> bool:
    """Classify every value of `jaxpr` (in place); False when some equation breaks the partitioning."""
    for eqn in jaxpr.eqns:
        prim = eqn.primitive
        ins = [classes.get(a, INV) if isinstance(a, Var) else INV for a in eqn.inputs]
        out = eqn.outs[0] if eqn.outs else None
        if prim is structural.reshape_p:
            if ins[0] == PART and not (out.aval.shape[:k] == P == eqn.inputs[0].aval.shape[:k]):
                return False
            classes[out] = ins[0]
            continue
        if is_uniform(eqn):
            if PART in ins:
                return False
            classes[out] = UNI
            continue
        if uniform_only or len(eqn.outs) != 1 or out.aval.shape[:k] != P:
            return False
        rule = RULES.get(prim, _no_partitioned_inputs if prim.name in utasks.ELEMENTWISE_KINDS else None)
        if rule is None or not rule(eqn, [c == PART for c in ins], k, P):
            return False
        classes[out] = PART
    return True


# --------------------------------------------------------------------------------------------- rules
# rule(eqn, partitioned?, k, P): does the share of partition p read only partition p of partitioned inputs?

def _aligned(eqn, part, k, P):
    """Elementwise: a partitioned operand has the output's rank, so its leading dims are not broadcast."""
    out = eqn.outs[0].aval
    return all(a.aval.ndim == out.ndim for a, p in zip(eqn.inputs, part) if p)


def _no_partitioned_inputs(eqn, part, k, P):
    return not any(part)


def _reduce(eqn, part, k, P):
    axes = eqn.params["axes"] if "axes" in eqn.params else (eqn.params["axis"],)
    return all(a >= k for a in axes) or not any(part)


def _transpose(eqn, part, k, P):
    return tuple(eqn.params["permutation"][:k]) == tuple(range(k)) or not any(part)


def _slice(eqn, part, k, P):
    p = eqn.params
    return not any(part) or (all(s == 0 for s in p["start"][:k]) and tuple(p["limit"][:k]) == P
                             and all(s == 1 for s in p["step"][:k]))


def _dynamic_slice(eqn, part, k, P):      # full extent on P: the starts clamp to 0 there
    return not any(part) or tuple(eqn.params["sizes"][:k]) == P


def _dynamic_update_slice(eqn, part, k, P):   # the update covers P: its chunk p is partition p
    return eqn.inputs[1].aval.shape[:k] == P


def _concatenate(eqn, part, k, P):
    return eqn.params["axis"] >= k or not any(part)


def _matmul(eqn, part, k, P):              # uTask = one batch element = one partition
    out = eqn.outs[0].aval
    return out.ndim - 2 == k and utasks.partition_tile_ok(*out.shape[-2:]) and _aligned(eqn, part, k, P)


# Keyed by primitive. Primitives with no rule: data movement, gathers and windows may read only
# invariants (_no_partitioned_inputs); anything else ends the partitioning.
RULES = {p: _aligned for p in REGISTRY.values() if p.fusible}    # (iota, with no operands, is aligned)
RULES.update({p: _reduce for p in REGISTRY.values() if p.family == REDUCE})
RULES.update({structural.transpose_p: _transpose, structural.slice_p: _slice,
              structural.dynamic_slice_p: _dynamic_slice, structural.dynamic_update_slice_p: _dynamic_update_slice,
              structural.concatenate_p: _concatenate, matmul_p: _matmul})


# --------------------------------------------------------------------------------------------- costs
def worth_it(body_j, parts: int, grid: int, block: int, is_uniform) -> bool:
    """Is the partitioned body estimated faster than the ordinary plan (ns per iteration)? Never on one
    vEU, which has no grid barriers to save."""
    if grid == 1:
        return False
    ordinary = partitioned = 0.0
    depth: dict = {}
    for eqn in body_j.eqns:
        if eqn.primitive is structural.reshape_p:
            depth[eqn.outs[0]] = depth.get(eqn.inputs[0], 0)
            continue
        if is_uniform(eqn):
            continue
        ins, outs = [a.aval for a in eqn.inputs], [v.aval for v in eqn.outs]
        count, _, cost = utasks.split(eqn.primitive.name, ins, outs, eqn.params, grid, block)
        ordinary += count * cost / min(count, grid)
        _, _, part_cost = utasks.partition_split(eqn.primitive.name, ins, outs, eqn.params, parts)
        partitioned += math.ceil(parts / grid) * (part_cost + UTASK_NS)
        depth[eqn.outs[0]] = 1 + max([depth.get(a, 0) for a in eqn.inputs if isinstance(a, Var)], default=0)
    levels = max(depth.values(), default=0)
    return partitioned + levels * LOCAL_SYNC_NS < ordinary + levels * BARRIER_NS
