"""shares.read_share of matmul operands (what a uTask's output tile reads of A and B) against the definition
computed element by element: every output element's row of A and column of B, in its batch element, once each,
sorted. The share is built from the tile's distinct rows and columns (an output tile reads each many times)."""
import numpy as np
import pytest

import gdsl
import gdsl.numpy as gnp
from gdsl.primitives.linalg import matmul_p
from gdsl.schedule import schedule
from gdsl.schedule.plan import Wave, a_parts, walk
from gdsl.schedule.shares import read_share, write_share

rng = np.random.default_rng(3)


def _f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def _by_element(op, k, flat) -> np.ndarray:
    """Operand k's elements that the output elements `flat` read, one output element at a time."""
    out, x = op.outputs[0].aval, op.inputs[k].aval
    m, n = out.shape[-2:]
    depth = {number: d for number, _, d in a_parts(op)}.get(k, op.inputs[1].aval.shape[-2])
    is_a = k in {number for number, _, _ in a_parts(op)}
    bshape, xshape = out.shape[:-2], x.shape[:-2]
    read = set()
    for e in flat.tolist():
        b, rest = divmod(e, m * n)
        i, j = divmod(rest, n)
        bidx = np.unravel_index(b, bshape) if bshape else ()
        offset = len(bshape) - len(xshape)
        xb = int(np.ravel_multi_index(tuple(0 if d == 1 else bidx[offset + a] for a, d in enumerate(xshape)),
                                      xshape)) if xshape else 0
        read.update((xb * m + i) * depth + kk if is_a else xb * depth * n + kk * n + j for kk in range(depth))
    return np.array(sorted(read), np.int64)


CASES = {
    "plain": (lambda a, b: gnp.tanh(a @ b), (_f32(70, 40), _f32(40, 90))),
    "batched": (lambda a, b: gnp.matmul(a, b), (_f32(3, 20, 17), _f32(3, 17, 50))),
    "broadcast": (lambda a, b: gnp.matmul(a, b), (_f32(2, 1, 9, 12), _f32(3, 12, 40))),
    "vector": (lambda a, b: a @ b, (_f32(1, 64), _f32(64, 100))),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("grid", [3, 16])
def test_matmul_read_shares_match_the_definition(case, grid):
    fn, args = CASES[case]
    plan = schedule(gdsl.make_ir(fn)(*args), grid=grid)
    ops = [t.op for s in walk(plan.kernels[0].body) if isinstance(s, Wave) for t in s.tasks
           if t.op.kind == matmul_p.name]
    assert ops
    for op in ops:
        for t in range(op.n_utasks):
            for k in (0, 1):
                got = read_share(op, k, t)
                assert got.dtype == np.int64
                np.testing.assert_array_equal(got, _by_element(op, k, write_share(op, t)))
