"""Double-buffered loop carries: counted loops unrolled twice (an IR-to-IR pass, used by owner placement).

With owner-computes placement (owner.py) an iteration of a recurrent loop needs one grid barrier: the
matmuls read the whole state `h_k`, then each vEU computes its columns of the new state. But written in
place, `h_{k+1}` overwrites `h_k` while other vEUs may still be reading it in the same barrier interval (a
write-after-read race: hazards.py keeps the grid barrier). The new state has to go to another buffer.

Two buffers alternating by iteration parity would need storage chosen at run time in the plan, in every
backend and in the simulator. Unrolling the body twice expresses the same thing with what the scheduler
already does: the first copy's results are values of their own (fresh buffers: `h_{k+1}` goes to B while
`h_k` is read from A) and the second copy's results are the carries, written in place into A (its readers,
the first copy's matmuls, are behind the grid barrier between the copies, where the second copy's matmuls
read all of B). Every backend and the simulator run it unchanged; the cost is a longer loop body.

Applied to the top-level `while` equations that are counted loops (loops.counted_loop) of at least two
iterations with no control flow in the body. An odd trip count runs one copy of the body before the loop
(peeled), so the loop's condition `counter < hi` stays as it is and the loop runs (hi - lo) // 2 times.
"""
from __future__ import annotations

from gdsl.core.ir import Eqn, Jaxpr, Program, Var
from gdsl.primitives.control import while_p
from gdsl.primitives.registry import CONTROL
from gdsl.schedule.loops import counted_loop


def unroll_twice(program: Program) -> tuple[Program, int]:
    """`program` with its top-level counted loops unrolled twice, and how many were (0: the same Program)."""
    eqns, unrolled = [], 0
    for eqn in program.jaxpr.eqns:
        replaced = _unrolled(eqn) if eqn.primitive is while_p else None
        if replaced is None:
            eqns.append(eqn)
        else:
            eqns += replaced
            unrolled += 1
    if not unrolled:
        return program, 0
    jaxpr = Jaxpr(program.jaxpr.in_binders, tuple(eqns), program.jaxpr.outs)
    return Program(jaxpr, program.consts, program.in_tree, program.out_tree, program.name, program.meta), unrolled


def _unrolled(eqn: Eqn) -> list[Eqn] | None:
    """The equations replacing the counted loop `eqn` unrolled twice (a peeled copy first when the trip
    count is odd), or None when it is not such a loop."""
    counted = counted_loop(eqn)
    body = eqn.params["body_jaxpr"]
    if counted is None or any(e.primitive.family == CONTROL for e in body.eqns):
        return None
    _, lo, hi = counted
    if hi - lo < 2:
        return None
    nc, nb = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    consts, inits = eqn.inputs[nc:nc + nb], eqn.inputs[nc + nb:]
    before: list[Eqn] = []
    if (hi - lo) % 2:
        peeled, inits = _copy(body, nb, consts, inits)
        before += peeled
    second, outs = _copy(body, nb, body.in_binders[:nb], body.outs)
    twice = Jaxpr(body.in_binders, body.eqns + tuple(second), tuple(outs))
    params = dict(eqn.params, body_jaxpr=twice)
    return before + [Eqn(while_p, eqn.inputs[:nc + nb] + tuple(inits), params, eqn.outs)]


def _copy(body: Jaxpr, nb: int, consts, carries) -> tuple[list[Eqn], list]:
    """The equations of `body` once more, reading `consts` and `carries` for its binders, with results of
    their own; and the atoms it leaves as the new carries."""
    env = dict(zip(body.in_binders, tuple(consts) + tuple(carries)))

    def read(atom):
        return env.get(atom, atom) if isinstance(atom, Var) else atom

    eqns = []
    for e in body.eqns:
        outs = tuple(Var(v.aval) for v in e.outs)
        env.update(zip(e.outs, outs))
        eqns.append(Eqn(e.primitive, tuple(read(a) for a in e.inputs), e.params, outs))
    return eqns, [read(a) for a in body.outs]
