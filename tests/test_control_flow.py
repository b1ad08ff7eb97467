"""while_loop, fori_loop, cond, switch and recurse against plain-Python references, jitted and eager.

Eager calls (outside jit) take numpy arrays; a recursive function is still traced then (its body is
a sub-program), so numpy arrays it closes over are indexed with gnp.take rather than `a[node]`.
"""
import functools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import arrays, assert_close, assert_trees_close, f32

import gdsl
import gdsl.numpy as gnp

MODES = pytest.mark.parametrize("mode", ["eager", "jit"])


def run(mode, fn, *args, **kwargs):
    if mode == "eager":
        return fn(*args, **kwargs)
    return gdsl.jit(fn, backend="interpret")(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# while_loop


def collatz_steps(n):
    def cond(s):
        return s[0] != 1

    def body(s):
        v, k = s
        return gnp.where(v % 2 == 0, v // 2, 3 * v + 1), k + 1
    return gdsl.while_loop(cond, body, (n, gnp.zeros((), gdsl.int32)))[1]


def collatz_ref(n):
    k = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        k += 1
    return k


@MODES
@given(n=st.integers(1, 200))
def test_while_data_dependent_trip_count(mode, n):
    assert_close(run(mode, collatz_steps, np.int32(n)), np.int32(collatz_ref(n)))


def newton_sqrt(a, tol):
    def cond(s):
        x, it = s
        return gnp.logical_and(gnp.abs(x * x - a) > tol, it < 50)

    def body(s):
        x, it = s
        return 0.5 * (x + a / x), it + 1
    return gdsl.while_loop(cond, body, (gnp.maximum(a, 1.0), 0))


@MODES
@given(a=st.floats(0.01, 1e4), tol=st.sampled_from([1e-2, 1e-4]))
def test_while_float_convergence(mode, a, tol):
    x, it = run(mode, newton_sqrt, np.float32(a), tol)
    x_ref, it_ref, a32 = np.float32(max(a, 1.0)), 0, np.float32(a)
    while abs(x_ref * x_ref - a32) > np.float32(tol) and it_ref < 50:
        x_ref, it_ref = np.float32(0.5) * (x_ref + a32 / x_ref), it_ref + 1
    assert_close(x, np.float32(x_ref), rtol=1e-6)
    assert_close(it, np.int32(it_ref))
    assert abs(float(x) ** 2 - a) <= tol * 1.01 + 1e-6 * a or int(it) == 50  # it did converge


@MODES
def test_while_zero_iterations_returns_init(mode):
    init = {"a": np.arange(3, dtype=np.float32), "b": (np.int32(5), None), "c": [np.ones((2, 2), np.float16)]}
    out = run(mode, lambda v: gdsl.while_loop(lambda s: s["b"][0] < 0, lambda s: s, v), init)
    assert_trees_close(out, init, exact=True)


@MODES
@given(limit=st.integers(0, 40), step=st.integers(1, 5))
def test_while_pytree_carry(mode, limit, step):
    """A carry with a dict, a list, a tuple, None and mixed dtypes."""
    def fn(limit, step):
        init = {"count": 0, "hist": [gnp.zeros(4, gdsl.float32), None], "pair": (limit, 0.5)}

        def cond(s):
            return s["count"] < s["pair"][0]

        def body(s):
            c, hist = s["count"], s["hist"][0]
            hist = gnp.where(gnp.arange(4) == c % 4, hist + 1.0, hist)
            return {"count": c + step, "hist": [hist, None], "pair": (s["pair"][0], s["pair"][1] * 0.5)}
        return gdsl.while_loop(cond, body, init)
    out = run(mode, fn, np.int32(limit), np.int32(step))
    count, hist, half = 0, np.zeros(4, np.float32), 0.5
    while count < limit:
        hist[count % 4] += 1
        count, half = count + step, half * 0.5
    expected = {"count": np.int32(count), "hist": [hist, None], "pair": (np.int32(limit), np.float32(half))}
    assert_trees_close(out, expected, exact=True)


# ----------------------------------------------------------------------------------------------------------
# fori_loop


@MODES
@given(lo=st.integers(-5, 8), hi=st.integers(-5, 8), traced=st.sampled_from(["both", "lo", "hi", "none"]),
       dtype=st.sampled_from([np.int32, np.int64]))
def test_fori_loop_bounds(mode, lo, hi, traced, dtype):
    """Traced or static bounds, empty ranges (hi <= lo) included: the body runs for i in range(lo, hi)."""
    x0 = np.arange(3, dtype=np.float32)

    def fn(*bounds):
        b = iter(bounds)
        lower = next(b) if traced in ("both", "lo") else lo
        upper = next(b) if traced in ("both", "hi") else hi

        def body(i, carry):
            total, x = carry
            return total + i * i, x * 0.5 + gnp.astype(i, gdsl.float32)
        return gdsl.fori_loop(lower, upper, body, (gnp.zeros((), index_dtype), x0))
    # the index has the bounds' dtype: a traced bound's, or int32 for Python ints (weakly typed)
    index_dtype = np.dtype(dtype) if traced != "none" else np.dtype(np.int32)
    bounds = [dtype(v) for v, t in ((lo, ("both", "lo")), (hi, ("both", "hi"))) if traced in t]
    total, x = run(mode, fn, *bounds)
    total_ref, x_ref = 0, x0.copy()
    for i in range(lo, hi):
        total_ref, x_ref = total_ref + i * i, x_ref * np.float32(0.5) + np.float32(i)
    assert_close(total, np.asarray(total_ref, index_dtype))
    assert_close(x, x_ref)


@MODES
def test_fori_loop_rejects_float_bounds(mode):
    with pytest.raises(TypeError):
        run(mode, lambda n: gdsl.fori_loop(0, n, lambda i, x: x + 1, 0), np.float32(3))


# ----------------------------------------------------------------------------------------------------------
# cond and switch


@MODES
@given(pred=st.one_of(st.integers(-3, 3).map(np.int32), st.booleans().map(np.bool_),
                      st.sampled_from([0.0, -0.5, 2.0]).map(np.float32)),
       x=st.floats(-4, 4, width=32))
def test_cond_predicates(mode, pred, x):
    """Any nonzero scalar (int, bool or float) takes the true branch."""
    out = run(mode, lambda p, x: gdsl.cond(p, lambda v: v * 2, lambda v: v - 1, x), pred, np.float32(x))
    assert_close(out, np.float32(x * 2 if pred else np.float32(x) - 1))


@MODES
def test_cond_with_python_predicate_and_no_operands(mode):
    x = np.float32(3)
    out = run(mode, lambda x: (gdsl.cond(True, lambda: x + 1, lambda: x - 1),
                               gdsl.cond(0, lambda: x + 1, lambda: x - 1)), x)
    assert_trees_close(out, (np.float32(4), np.float32(2)), exact=True)


@MODES
def test_cond_rejects_non_scalar_predicate(mode):
    with pytest.raises(TypeError):
        run(mode, lambda x: gdsl.cond(x > 0, lambda: x, lambda: -x), np.ones(3, np.float32))


def _scaled_branch(k, x, y):
    return x * (k + 1) + y, k


@MODES
@given(index=st.integers(-6, 9), n_branches=st.integers(1, 4), dtype=st.sampled_from([np.int32, np.int64]))
def test_switch_clamps_index(mode, index, n_branches, dtype):
    branches = [functools.partial(_scaled_branch, k) for k in range(n_branches)]
    out = run(mode, lambda i, x, y: gdsl.switch(i, branches, x, y), dtype(index), np.float32(1.5),
              np.float32(0.25))
    k = min(max(index, 0), n_branches - 1)
    assert_trees_close(out, (np.float32(1.5 * (k + 1) + 0.25), np.int32(k)), exact=True)


@MODES
def test_switch_rejects_float_index(mode):
    with pytest.raises(TypeError):
        run(mode, lambda i: gdsl.switch(i, [lambda: 0, lambda: 1]), np.float32(1))


@MODES
@given(flag=st.booleans())
def test_cond_pytree_operands_and_results(mode, flag):
    ops = {"w": np.ones((2, 2), np.float32), "pair": (np.int32(3), None), "lst": [np.float16(2)]}

    def true_fun(o):
        return [o["pair"][0] + 1, {"w": o["w"] * 2, "none": None}, (o["lst"][0],)]

    def false_fun(o):
        return [o["pair"][0] - 1, {"w": o["w"] @ o["w"], "none": None}, (o["lst"][0] * 3,)]
    out = run(mode, lambda f, o: gdsl.cond(f, true_fun, false_fun, o), np.bool_(flag), ops)
    w = np.ones((2, 2), np.float32)
    expected = ([np.int32(4), {"w": w * 2, "none": None}, (np.float16(2),)] if flag else
                [np.int32(2), {"w": w @ w, "none": None}, (np.float16(6),)])
    assert_trees_close(out, expected, exact=True)


# ----------------------------------------------------------------------------------------------------------
# nesting and closures


def nested_program(x, W, n, m):
    """fori over i < n: if i is odd, a while loop runs m times (switching on j); else h = tanh(h @ W).
    Bodies close over x, W (traced), m (traced) and a numpy constant, at several nesting levels."""
    offset = np.linspace(-1, 1, x.shape[0]).astype(np.float32)

    def outer(i, h):
        scale = gnp.sum(x) * 0.01

        def odd(h):
            def cond(s):
                return s[0] < m

            def body(s):
                j, g = s
                g = gdsl.switch(j, [lambda g: gnp.tanh(g + offset),
                                    lambda g: g * scale + x,
                                    lambda g: gdsl.cond(gnp.max(g) > 0.5, lambda: g * 0.5, lambda: g + 0.1)], g)
                return j + 1, g
            return gdsl.while_loop(cond, body, (0, h))[1]
        return gdsl.cond(i % 2 == 1, odd, lambda h: gnp.tanh(h @ W), h)
    return gdsl.fori_loop(0, n, outer, x)


def nested_ref(x, W, n, m):
    offset = np.linspace(-1, 1, x.shape[0]).astype(np.float32)
    h = x.copy()
    scale = np.sum(x) * np.float32(0.01)
    for i in range(n):
        if i % 2 == 1:
            for j in range(m):
                k = min(max(j, 0), 2)
                if k == 0:
                    h = np.tanh(h + offset)
                elif k == 1:
                    h = h * scale + x
                else:
                    h = h * np.float32(0.5) if h.max() > 0.5 else h + np.float32(0.1)
        else:
            h = np.tanh(h @ W)
    return h


@MODES
@given(data=st.data(), n=st.integers(0, 5), m=st.integers(0, 4))
def test_nested_fori_cond_while_switch_with_closures(mode, data, n, m):
    d = data.draw(st.integers(1, 4))
    x = data.draw(arrays(f32, (d,), min_value=-1, max_value=1))
    W = data.draw(arrays(f32, (d, d), min_value=-1, max_value=1))
    out = run(mode, nested_program, x, W, np.int32(n), np.int32(m))
    assert_close(out, nested_ref(x, W, n, m), rtol=1e-5, atol=1e-5)


@MODES
def test_closure_over_traced_value_from_two_levels_up(mode):
    def fn(a, b):
        def outer_body(i, acc):
            def inner_body(j, acc2):
                return acc2 + a * i + b * j  # a, b: two levels up; i: one level up
            return gdsl.fori_loop(0, 3, inner_body, acc)
        return gdsl.fori_loop(0, 4, outer_body, gnp.zeros((), gdsl.float32))
    out = run(mode, fn, np.float32(2), np.float32(10))
    assert_close(out, np.float32(sum(2 * i + 10 * j for i in range(4) for j in range(3))))


# ----------------------------------------------------------------------------------------------------------
# recursion

D = 4


@st.composite
def random_trees(draw, max_leaves=9, vocab=5):
    """A random binary tree as arrays (left, right, is_leaf, word) and its root; leaves first, internal nodes
    made by merging random pairs of subtrees, so shapes range from chains to balanced trees."""
    n = draw(st.integers(1, max_leaves))
    left, right, is_leaf = [0] * n, [0] * n, [True] * n
    word = [draw(st.integers(0, vocab - 1)) for _ in range(n)]
    roots = list(range(n))
    while len(roots) > 1:
        i = draw(st.integers(0, len(roots) - 1))
        a = roots.pop(i)
        j = draw(st.integers(0, len(roots) - 1))
        b = roots.pop(j)
        left.append(a), right.append(b), is_leaf.append(False), word.append(0)
        roots.append(len(left) - 1)
    tree = (np.array(left, np.int32), np.array(right, np.int32), np.array(is_leaf), np.array(word, np.int32))
    return tree, np.int32(roots[0])


def tree_height(tree, node):
    left, right, is_leaf, _ = tree
    return 0 if is_leaf[node] else 1 + max(tree_height(tree, left[node]), tree_height(tree, right[node]))


def encode_ref(tree, node, emb, W, b):
    left, right, is_leaf, word = tree
    if is_leaf[node]:
        return emb[word[node]]
    return np.tanh(np.concatenate([encode_ref(tree, left[node], emb, W, b),
                                   encode_ref(tree, right[node], emb, W, b)]) @ W + b)


def make_params(seed, vocab=5):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((vocab, D)).astype(np.float32),
            (rng.standard_normal((2 * D, D)) / np.sqrt(2 * D)).astype(np.float32),
            rng.standard_normal(D).astype(np.float32) * 0.1)


def spec_encoder(max_depth):
    """The SPEC §1 example: closes over traced tree arrays and weights; recursion under cond, two call sites."""
    def program(tree, root, emb, W, b):
        left, right, is_leaf, word = tree

        @gdsl.recurse(result=gdsl.ShapeDtype((D,), gdsl.float32), max_depth=max_depth)
        def encode(node):
            return gdsl.cond(is_leaf[node], lambda: emb[word[node]],
                             lambda: gnp.tanh(gnp.concatenate([encode(left[node]), encode(right[node])]) @ W + b))
        return encode(root)
    return program


@given(tree=random_trees(), seed=st.integers(0, 2**16))
def test_tree_recursion_spec_example(tree, seed):
    tree, root = tree
    emb, W, b = make_params(seed)
    height = tree_height(tree, root)
    out = run("jit", spec_encoder(height + 1), tree, root, emb, W, b)
    assert_close(out, encode_ref(tree, root, emb, W, b), rtol=1e-5, atol=1e-5)


@given(tree=random_trees(), seed=st.integers(0, 2**16))
def test_tree_recursion_depth_limit_is_exact(tree, seed):
    """A tree of height h needs h + 1 frames: max_depth = h + 1 runs, max_depth = h raises."""
    tree, root = tree
    emb, W, b = make_params(seed)
    height = tree_height(tree, root)
    if height == 0:
        return  # max_depth must be >= 1
    with pytest.raises(gdsl.RecursionDepthError):
        run("jit", spec_encoder(height), tree, root, emb, W, b)


def numpy_closure_encoder(tree, emb, max_depth):
    """Closes over numpy constants (tree, embeddings) and traced weights; eager-compatible (gnp.take)."""
    left, right, is_leaf, word = tree

    def program(root, W, b):
        @gdsl.recurse(result=(gdsl.ShapeDtype((D,), gdsl.float32), {"leaves": gdsl.ShapeDtype((), gdsl.int32)}),
                      max_depth=max_depth)
        def encode(node):
            def leaf():
                return gnp.take(emb, gnp.take(word, node), axis=0), {"leaves": gnp.ones((), gdsl.int32)}

            def inner():
                hl, cl = encode(gnp.take(left, node))
                hr, cr = encode(gnp.take(right, node))
                h = gnp.tanh(gnp.matmul(gnp.concatenate([hl, hr]), W) + b)
                return h, {"leaves": cl["leaves"] + cr["leaves"]}
            return gdsl.cond(gnp.take(is_leaf, node), leaf, inner)
        return encode(root)
    return program


@MODES
@given(tree=random_trees(), seed=st.integers(0, 2**16))
def test_tree_recursion_numpy_closures_pytree_result(mode, tree, seed):
    tree, root = tree
    emb, W, b = make_params(seed)
    height = tree_height(tree, root)
    h, count = run(mode, numpy_closure_encoder(tree, emb, height + 2), root, W, b)
    assert_close(h, encode_ref(tree, root, emb, W, b), rtol=1e-5, atol=1e-5)
    assert_close(count["leaves"], np.int32(sum(1 for n in _reachable(tree, root) if tree[2][n])))


def _reachable(tree, node):
    yield node
    if not tree[2][node]:
        yield from _reachable(tree, tree[0][node])
        yield from _reachable(tree, tree[1][node])


def countdown(max_depth):
    """countdown(n) recurses n + 1 frames deep and returns n (for n >= 0)."""
    @gdsl.recurse(result=gdsl.ShapeDtype((), gdsl.int32), max_depth=max_depth)
    def count(n):
        return gdsl.cond(n <= 0, lambda: gnp.zeros((), gdsl.int32), lambda: count(n - 1) + 1)
    return count


@MODES
@given(max_depth=st.integers(1, 40))
def test_recursion_depth_error_exactly_past_max_depth(mode, max_depth):
    fn = countdown(max_depth)
    assert int(run(mode, lambda n: fn(n), np.int32(max_depth - 1))) == max_depth - 1  # max_depth frames
    with pytest.raises(gdsl.RecursionDepthError) as info:                            # max_depth + 1 frames
        run(mode, lambda n: fn(n), np.int32(max_depth))
    assert isinstance(info.value, RuntimeError)
    assert "'count'" in str(info.value) and f"max_depth={max_depth}" in str(info.value)


@MODES
def test_recursion_depth_error_deep_default(mode):
    """The default max_depth is 64; deep recursion must not hit Python's own recursion limit first."""
    @gdsl.recurse(result=gdsl.ShapeDtype((), gdsl.int32))
    def count(n):
        return gdsl.cond(n <= 0, lambda: gnp.zeros((), gdsl.int32), lambda: count(n - 1) + 1)
    assert int(run(mode, lambda n: count(n), np.int32(63))) == 63
    with pytest.raises(gdsl.RecursionDepthError):
        run(mode, lambda n: count(n), np.int32(64))


def fib_program(n):
    """Two call sites in the body and two entries from the outer program."""
    @gdsl.recurse(result=gdsl.ShapeDtype((), gdsl.int32), max_depth=20)
    def fib(k):
        return gdsl.cond(k < 2, lambda: k, lambda: fib(k - 1) + fib(k - 2))
    return fib(n), fib(n + 2) - fib(n)


@MODES
@given(n=st.integers(0, 12))
def test_several_call_sites(mode, n):
    fibs = [0, 1]
    while len(fibs) < n + 3:
        fibs.append(fibs[-1] + fibs[-2])
    a, b = run(mode, fib_program, np.int32(n))
    assert int(a) == fibs[n] and int(b) == fibs[n + 2] - fibs[n]


@MODES
@given(tree=random_trees(max_leaves=6), steps=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_loop_inside_recursion(mode, tree, steps, seed):
    """Each internal node runs a fori_loop with a traced trip count (a loop inside the recursion)."""
    tree, root = tree
    emb, W, b = make_params(seed)
    left, right, is_leaf, word = tree
    U = (np.eye(D) * 0.9).astype(np.float32)

    def program(root, W, b, steps):
        @gdsl.recurse(result=gdsl.ShapeDtype((D,), gdsl.float32), max_depth=16)
        def encode(node):
            def inner():
                h = gnp.tanh(gnp.matmul(gnp.concatenate([encode(gnp.take(left, node)),
                                                         encode(gnp.take(right, node))]), W) + b)
                return gdsl.fori_loop(0, steps, lambda i, h: gnp.tanh(gnp.matmul(h, U) + 0.1), h)
            return gdsl.cond(gnp.take(is_leaf, node), lambda: gnp.take(emb, gnp.take(word, node), axis=0), inner)
        return encode(root)

    def ref(node):
        if is_leaf[node]:
            return emb[word[node]]
        h = np.tanh(np.concatenate([ref(left[node]), ref(right[node])]) @ W + b)
        for _ in range(steps):
            h = np.tanh(h @ U + np.float32(0.1))
        return h
    out = run(mode, program, root, W, b, np.int32(steps))
    assert_close(out, ref(root), rtol=1e-5, atol=1e-5)


@MODES
@given(trees=st.lists(random_trees(max_leaves=5), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_recursion_inside_loop(mode, trees, seed):
    """A forest: a while loop over the roots calls the recursive function once per iteration."""
    emb, W, b = make_params(seed)
    # Concatenate the trees into one node table.
    left, right, is_leaf, word, roots = [], [], [], [], []
    for (l_, r_, leaf, w), root in trees:
        base = len(left)
        left += list(l_ + base)
        right += list(r_ + base)
        is_leaf += list(leaf)
        word += list(w)
        roots.append(root + base)
    tree = (np.array(left, np.int32), np.array(right, np.int32), np.array(is_leaf), np.array(word, np.int32))
    roots = np.array(roots, np.int32)

    def program(tree, roots, W, b):
        left, right, is_leaf, word = tree

        @gdsl.recurse(result=gdsl.ShapeDtype((D,), gdsl.float32), max_depth=16)
        def encode(node):
            return gdsl.cond(gnp.take(is_leaf, node), lambda: gnp.take(emb, gnp.take(word, node), axis=0),
                             lambda: gnp.tanh(gnp.matmul(gnp.concatenate(
                                 [encode(gnp.take(left, node)), encode(gnp.take(right, node))]), W) + b))

        def body(s):
            i, acc = s
            return i + 1, acc + encode(gnp.take(roots, i))
        return gdsl.while_loop(lambda s: s[0] < roots.shape[0], body, (0, gnp.zeros(D, gdsl.float32)))[1]
    out = run(mode, program, tree, roots, W, b)
    ref = sum(encode_ref(tree, r, emb, W, b) for r in roots)
    assert_close(out, ref, rtol=1e-5, atol=1e-5)


@MODES
def test_recursion_with_several_arguments_and_weak_scalars(mode):
    """gcd(a, b) by recursion; the entry passes Python ints (weakly typed)."""
    @gdsl.recurse(result=gdsl.ShapeDtype((), gdsl.int32), max_depth=50)
    def gcd(a, b):
        return gdsl.cond(b == 0, lambda: a, lambda: gcd(b, a % b))
    out = run(mode, lambda a, b: (gcd(a, b), gcd(48, 18)), np.int32(1071), np.int32(462))
    assert_trees_close(out, (np.int32(math.gcd(1071, 462)), np.int32(6)), exact=True)


@MODES
def test_recursive_function_closing_over_loop_variable(mode):
    """Recursion inside a fori body that closes over the loop index (a traced value of the loop's
    sub-program) and over the outer argument."""
    def program(x):
        def body(i, acc):
            @gdsl.recurse(result=gdsl.ShapeDtype((), gdsl.float32), max_depth=8)
            def power_sum(k):
                return gdsl.cond(k <= 0, lambda: gnp.zeros((), gdsl.float32),
                                 lambda: power_sum(k - 1) + x * gnp.astype(i, gdsl.float32))
            return acc + power_sum(i)
        return gdsl.fori_loop(0, 5, body, gnp.zeros((), gdsl.float32))
    out = run(mode, program, np.float32(0.5))
    assert_close(out, np.float32(sum(0.5 * i * i for i in range(5))))


@MODES
def test_mutually_nested_recursion(mode):
    """A recursive function whose body enters another recursive function (its own frames, own limit)."""
    def program(n):
        @gdsl.recurse(result=gdsl.ShapeDtype((), gdsl.int32), max_depth=10)
        def outer(k):
            @gdsl.recurse(result=gdsl.ShapeDtype((), gdsl.int32), max_depth=10)
            def inner(j):
                return gdsl.cond(j <= 0, lambda: gnp.zeros((), gdsl.int32), lambda: inner(j - 1) + k)
            return gdsl.cond(k <= 0, lambda: gnp.zeros((), gdsl.int32), lambda: outer(k - 1) + inner(k))
        return outer(n)
    out = run(mode, program, np.int32(6))
    assert int(out) == sum(k * k for k in range(7))
