"""Sums of products over one concatenated depth: `A1 @ B1 + A2 @ B2` as `[A1 | A2] @ [B1 ; B2]` (an IR-to-IR
pass, the scheduler option `concat_k`).

In a loop body, an `add` whose two operands are matmul results that only it reads, of its own type (no
broadcasting), whose right operands are loop invariants (consts of the body) and agree in their batch
dimensions and columns, and whose left operands agree in everything but their last axis, computes

    C = concatenate([A1, A2], axis=-1) @ concatenate([B1, B2], axis=-2)

(a stacked LSTM layer's `x @ W_ih + h @ W_hh` is `[x | h] @ [W_ih ; W_hh]`, K = 2H). The stacked right operand
is built before the loop, once (it reads only invariants), and enters the body as a new const; the left
operand's concatenation stays in the body, where the scheduler folds it into the matmul as a two-source
operand (plan.K_PARTS: the tile loaders read A1 for k < K1 and A2 after, nothing is copied) on backends whose
lowering chain has the "k_parts" rule for matmul, else it runs as a copy. Sums of more products (`+ A3 @ B3`)
concatenate all of them. One GEMV of K1 + K2 stages its operand and reduces its partial sums once, where two
GEMVs did it twice: what owner-computes placement (owner.py) needs, where one vEU runs a layer's products one
after the other. The float32 sums are added in another order (the products' partial sums are no longer
rounded separately).

Outside loops the stacked right operand would be built at every run (a copy of both weights, more bytes than a
GEMV reads): not applied there. A loop nested in another climbs out as far as the stacked operand is invariant
(the scheduler runs loop-invariant code motion after this pass).
"""
from __future__ import annotations

from gdsl.core.ir import Eqn, Jaxpr, ShapedArray, Var
from gdsl.primitives.elementwise import add_p
from gdsl.primitives.linalg import matmul_p
from gdsl.primitives.structural import concatenate_p
from gdsl.schedule.loops import WhileRewriter, without_dead_eqns


def concat_products(program):
    """`program` with every sum of matmuls over loop-invariant right operands in its loops computed as one
    matmul over the concatenated depth (the same Program when there is none)."""
    return _Concatenator().program(program)


class _Concatenator(WhileRewriter):
    def rewrite_while(self, eqn: Eqn) -> list[Eqn]:
        p = eqn.params
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        body = p["body_jaxpr"]
        outer = dict(zip(body.in_binders[:nb], eqn.inputs[nc:nc + nb]))    # const binder -> outer atom
        sums = product_sums(body, set(outer))
        if not sums:
            return [eqn]
        before, new_binders, new_consts, replaced = [], [], [], {}
        for root, terms in sums.items():
            a_parts, b_parts = [a for a, _ in terms], [b for _, b in terms]
            stacked_b = _concatenated([outer[b] for b in b_parts], b_parts[0].aval.ndim - 2)
            before.append(Eqn(concatenate_p, tuple(outer[b] for b in b_parts),
                              {"axis": b_parts[0].aval.ndim - 2}, (stacked_b,)))
            binder = Var(stacked_b.aval)
            new_binders.append(binder)
            new_consts.append(stacked_b)
            stacked_a = _concatenated(a_parts, a_parts[0].aval.ndim - 1)
            replaced[root] = [Eqn(concatenate_p, tuple(a_parts), {"axis": a_parts[0].aval.ndim - 1}, (stacked_a,)),
                              Eqn(matmul_p, (stacked_a, binder), {}, root.outs)]
        eqns = [new for e in body.eqns for new in replaced.get(e, [e])]
        new_body = without_dead_eqns(Jaxpr(body.in_binders[:nb] + tuple(new_binders) + body.in_binders[nb:],
                                           tuple(eqns), body.outs))
        inputs = eqn.inputs[:nc + nb] + tuple(new_consts) + eqn.inputs[nc + nb:]
        return before + [Eqn(eqn.primitive, inputs, dict(p, body_jaxpr=new_body, body_nconsts=nb + len(new_binders)),
                             eqn.outs)]


def product_sums(jaxpr: Jaxpr, invariant: set) -> dict:
    """{add equation: [(A_i, B_i), ...]} for each outermost sum of two or more matmul products `A_i @ B_i` in
    `jaxpr` whose B_i are in `invariant`, every product and partial sum read only by the next add, all of one
    type, the A_i alike but for their last axis, the B_i but for their second to last."""
    uses: dict = {}
    for a in [a for e in jaxpr.eqns for a in e.inputs] + list(jaxpr.outs) * 2:   # (a result: never folded away)
        if isinstance(a, Var):
            uses[a] = uses.get(a, 0) + 1
    terms: dict = {}                           # Var -> its products, for a product or a sum of them
    roots: dict = {}                           # Var -> the add equation computing it (a sum)
    for e in jaxpr.eqns:
        if e.primitive is matmul_p and e.inputs[1] in invariant and isinstance(e.inputs[0], Var) and \
                e.inputs[0].aval.ndim >= 2 and e.inputs[1].aval.ndim >= 2:
            terms[e.outs[0]] = [tuple(e.inputs)]
        elif e.primitive is add_p and e.inputs[0] is not e.inputs[1] and all(
                isinstance(a, Var) and a in terms and uses[a] == 1 and a.aval == e.outs[0].aval for a in e.inputs):
            joined = terms[e.inputs[0]] + terms[e.inputs[1]]
            if _stackable(joined):
                terms[e.outs[0]] = joined
                roots[e.outs[0]] = e
                for a in e.inputs:
                    roots.pop(a, None)
    return {e: terms[v] for v, e in roots.items()}


def _stackable(terms) -> bool:
    """Do the products (A_i, B_i) concatenate: one dtype, A_i alike but for their depth, B_i but for theirs?"""
    (a0, b0), rest = terms[0], terms[1:]
    return all(a.aval.dtype == a0.aval.dtype and b.aval.dtype == b0.aval.dtype and
               a.aval.shape[:-1] == a0.aval.shape[:-1] and b.aval.shape[:-2] == b0.aval.shape[:-2] and
               b.aval.shape[-1] == b0.aval.shape[-1] for a, b in rest)


def _concatenated(parts, axis: int) -> Var:
    shape = list(parts[0].aval.shape)
    shape[axis] = sum(p.aval.shape[axis] for p in parts)
    return Var(ShapedArray(tuple(shape), parts[0].aval.dtype))
