"""Reading plan views, and the slices and transposes the plan leaves as Ops that the renderer reads in place.

Most views are in the plan (gdsl/schedule/scheduler.py): static contiguous slices (plan.Value.offset, every
backend), and on this backend family, through the "view" lowering rules registered here, windows at a
run-time offset (`x[t]`, an embedding row: plan.Value.terms, `offset_term`) and transposes (plan.Value.perm,
`permuted_reads`), all no ops, no waves and no barriers. Every read of a Value goes through
Renderer.ptr / `view_pointer`.

What is left to the renderer (`find_views`): Ops the scheduler keeps, whose result it still need not copy:
a one-element static `slice` window (the scheduler keeps those as copies: the host reads scalars from their
own buffers), and a `transpose` whose readers lie outside its segment (a loop-invariant weight transposed
before the loop that reads it, say). A `slice` Op whose window is one contiguous run of its source becomes
a *view*: its output buffer is rendered as a pointer into the source instead of a workspace copy, and the
Op does no work. A `transpose` read only by Ops, each reading it whole, becomes a *permuted view*: those Ops
read the source through permuted strides (a window of the transposed array, an Op's or a plan view's at an
offset, is no window of the source: such a transpose stays a copy). Safe when

- the output is a temp written by this Op alone (so nothing else ever stores into the view), and
- the source cannot change while the view is read: an input or const (never written by a kernel), or a
  buffer that no Op writes, and no recursive call runs, between the view's Op and its last reader, all
  readers following the view's Op in the same statement list (and none of them writing the source).
"""
from __future__ import annotations

from dataclasses import dataclass

from gdsl.backends.cfamily import types as c_types
from gdsl.backends.cfamily.ops import coords, offset, strides
from gdsl.primitives.linalg import matmul_p
from gdsl.primitives.registry import register_lowering
from gdsl.primitives.structural import dynamic_slice_p, dynamic_update_slice_p, slice_p, take_p, transpose_p
from gdsl.schedule.plan import K_PARTS, ROW_INDEX, Assign, Branch, Call, Loop, Uniforms, Wave, parts_of_tasks, walk
from gdsl.schedule.resident import RESIDENT
from gdsl.schedule.utasks import contiguous_window, viewable_buffers


@dataclass
class View:
    op: object
    source: object          # the Value viewed
    offset: str             # C expression of the element offset into the source
    read_only: bool         # the source is an input or const
    perm: tuple | None = None   # a permuted view: output element (c_0..c_n) is source[c at perm positions]


@register_lowering((dynamic_slice_p, take_p), backend="cfamily", role="view")
def offset_term(elem, term, plus: int = 0) -> str:
    """C expression of one run-time part of a plan view's offset (plan.OffsetTerm): its uniform (plus `plus`),
    clamped into the source as dynamic_slice and take clamp, times its stride. `elem(value)` renders a scalar.
    Every vEU computes it where a reader's arguments are formed (registers only, no memory traffic)."""
    e = f"((long long)({elem(term.index)}) + {plus})" if plus else f"(long long)({elem(term.index)})"
    clamped = f"({e} < 0 ? 0LL : ({e} > {term.high} ? {term.high}LL : {e}))"
    return clamped if term.stride == 1 else f"{clamped} * {term.stride}"


@register_lowering(transpose_p, backend="cfamily", role="view")
def permuted_reads(value) -> tuple:
    """How an op reads a permuted plan view (plan.Value.perm): (its shape, the source's shape, the
    permutation), the `remap` of its ops.Arg, which indexes the source's storage through permuted strides."""
    return value.aval.shape, value.source_shape, value.perm


@register_lowering(dynamic_update_slice_p, backend="cfamily", role="epilogue")
def window_store_index(window, idx: str) -> str:
    """C expression: where output element `idx` of an op that stores into a window (plan.StoreWindow, a
    dynamic_update_slice folded into the contraction computing its update) lies from the window's first
    element, which the op's output pointer addresses (view_pointer). A window that is one contiguous run
    of its array is indexed as it is."""
    if contiguous_window(window.array_shape, window.shape):
        return idx
    return f"({offset(coords(window.shape, f'({idx})'), strides(window.array_shape))})"


# A matmul whose left operand is a window at a run-time offset of a read-only array (`x[t] @ W` over a loop's
# input) has its uTasks prefetch the next window into L2 (the window whose index is one more, clamped as the
# view's is), their shares of its lines spread over them: a loop that walks the array reads each step's rows from
# L2 instead of DRAM (NASRNN bs64's `x[t] @ W_ih`: its tiles' first stages waited for DRAM). A hint only: a loop
# that walks the array otherwise prefetches lines it may not read, never outside the array.
PREFETCH_NEXT_WINDOW = True


def prefetches_next_window(op) -> bool:
    """Does the uTask of `op` take the next window of its left operand (the parameter `i0_next`) to prefetch:
    a matmul whose input 0, read plainly (not in parts, not as gathered rows), is a view with one run-time term
    of a program input or const (memory the kernel never writes)."""
    if not PREFETCH_NEXT_WINDOW or op.kind != matmul_p.name or K_PARTS in op.params or ROW_INDEX in op.params:
        return False
    a = op.inputs[0]
    return len(a.terms) == 1 and a.buffer is not None and a.buffer.kind in ("input", "const") and a.perm is None


# A matmul whose left operand is rows gathered from a read-only table (`E[idx] @ W`, plan.ROW_INDEX: a take
# folded into the matmul) has its GEMM tiles prefetch the rows they read into L2 as they start: the tile then waits
# for the table's DRAM once, not once a stage (Seq2seq bs64's `x @ W_ih` on embedding rows: 4.77 us a tile against
# 3.58 for `h @ W_hh` beside it in the same wave, session 35's profile). A hint only, inside the table (the indices
# clamped as take clamps them); a GEMV-shaped tile stages its rows at once and gains nothing from it.
PREFETCH_GATHERED_ROWS = True


def prefetches_gathered_rows(op) -> bool:
    """Do the GEMM tiles of `op` prefetch their gathered rows (PREFETCH_GATHERED_ROWS): a matmul whose input 0
    is rows gathered from a program input or const (memory the kernel never writes)."""
    if not PREFETCH_GATHERED_ROWS or op.kind != matmul_p.name or ROW_INDEX not in op.params:
        return False
    a = op.inputs[0]
    return a.buffer is not None and a.buffer.kind in ("input", "const")


def next_window_pointer(base: str, value, elem) -> str:
    """C pointer to the window after `value`'s (its one run-time term's index plus one, clamped into the source
    as the view's is): what prefetches_next_window's uTask prefetches."""
    [term] = value.terms
    parts = [offset_term(elem, term, plus=1)] + ([str(value.offset)] if value.offset else [])
    return f"({base} + {' + '.join(parts)})"


def view_pointer(base: str, value, elem) -> str:
    """C pointer to the first element of `value` in its storage at `base`: at its static offset plus, for
    a view at a run-time offset, its terms (offset_term). An output stored into a window that a start out
    of range drops (plan.StoreWindow.drop) gets a null pointer then: its op stores nothing."""
    parts = [offset_term(elem, term) for term in value.terms] + ([str(value.offset)] if value.offset else [])
    pointer = f"({base} + {' + '.join(parts)})" if parts else base
    if value.window is None or not value.window.drop:
        return pointer
    outside = []
    for term in value.terms:
        e = f"(long long)({elem(term.index)})"
        outside.append(f"{e} < 0 || {e} > {term.high}")
    return f"(({' || '.join(outside)}) ? nullptr : {pointer})"


def _writers(plan) -> dict:
    writers: dict = {}
    for stmt in _statements(plan):
        if isinstance(stmt, Wave):
            for task in stmt.tasks:
                for v in task.op.outputs:
                    if v.buffer is not None:
                        writers.setdefault(v.buffer, []).append(task.op)
    return writers


def _statements(plan):
    for k in plan.kernels:
        yield from walk(k.body)
    for f in plan.functions:
        yield from walk(f.body)


def _reads(stmt) -> list:
    if isinstance(stmt, Wave):
        return [v for t in stmt.tasks for v in t.op.inputs]
    if isinstance(stmt, Uniforms):
        return [v for u in stmt.ops for v in u.inputs]
    if isinstance(stmt, Assign):
        return [stmt.src]
    if isinstance(stmt, Loop):
        return [stmt.pred]
    if isinstance(stmt, Branch):
        return [stmt.index]
    return []


def _static_window(op):
    """(sizes, starts) of a slice Op, or None if its steps skip elements."""
    p = op.params
    sizes = [len(range(b, e, s)) for b, e, s in zip(p["start"], p["limit"], p["step"])]
    if any(s != 1 and z > 1 for s, z in zip(p["step"], sizes)):
        return None
    return sizes, list(p["start"])


# The kinds of Op whose output may be a window of their source (a dynamic_slice's window is a plan view
# where it can be one, Scheduler._dynamic_view; one the scheduler keeps as an Op runs as a copy).
WINDOWS = (slice_p.name, dynamic_slice_p.name)


def find_views(plan) -> dict:
    """Buffer -> View for every slice or transpose Op the renderer may turn into a pointer."""
    writers = _writers(plan)
    views: dict = {}
    positions = _positions(plan)
    stmt_of = {t.op: stmt for stmt in positions if isinstance(stmt, Wave) for t in stmt.tasks}
    readers_of = None
    for stmt in _statements(plan):
        if not isinstance(stmt, Wave):
            continue
        for task in stmt.tasks:
            op = task.op
            if op.kind != slice_p.name and op.kind != transpose_p.name:
                continue
            out, src = op.outputs[0], op.inputs[0]
            # (a plan view as the source: its offset may use uniforms computed later than the kernel's top,
            # and a permuted one is no array)
            if not viewable_buffers(op) or writers.get(out.buffer) != [op] or src.dynamic or src.perm is not None:
                continue
            read_only = src.buffer.kind in ("input", "const")
            if op.kind == transpose_p.name:
                if readers_of is None:      # buffer -> the statements reading it, in plan order (once)
                    readers_of = {}
                    for s in positions:
                        for buf in dict.fromkeys(x.buffer for x in _reads(s)):
                            readers_of.setdefault(buf, []).append(s)
                readers = readers_of.get(out.buffer, [])
                # (a window read from the transposed array is a view of it only if it is an array: a
                # window per loop step of a product laid out step by step, gdsl/schedule/steps.py, taken
                # by an Op or read in place as a plan view at an offset)
                windowed = any(t.op.kind in WINDOWS and t.op.inputs[0].buffer is out.buffer
                               for s in readers if isinstance(s, Wave) for t in s.tasks) or \
                    any(_partial(x, out.buffer) for s in readers for x in _reads(s))
                # (nor where a matmul keeps it resident: its tiles are copied from the array before the loop)
                windowed = windowed or any(RESIDENT in t.op.params and t.op.inputs[1].buffer is out.buffer
                                           for s in readers if isinstance(s, Wave) for t in parts_of_tasks(s.tasks))
                if readers and not windowed and all(isinstance(s, Wave) for s in readers) and \
                        (read_only or _stable(src.buffer, op, out.buffer, positions, stmt_of)):
                    views[out.buffer] = View(op, src, "0", read_only, tuple(op.params["permutation"]))
                continue
            window = _static_window(op)
            if window is None or not contiguous_window(src.aval.shape, window[0]):
                continue
            if not read_only and not _stable(src.buffer, op, out.buffer, positions, stmt_of):
                continue
            terms = [f"{s} * {st}" if st != 1 else str(s) for s, st in zip(window[1], strides(src.aval.shape)) if s]
            views[out.buffer] = View(op, src, " + ".join(terms) or "0", read_only)
    while True:     # a permuted view is no array: nothing can view it in turn (its readers remap instead)
        bad = [b for b, v in views.items() if v.source.buffer in views and views[v.source.buffer].perm is not None]
        if not bad:
            return views
        for b in bad:
            del views[b]


def _partial(value, buffer) -> bool:
    """Does `value` read only a window of `buffer` (a plan view at an offset, or fewer elements)?"""
    return value.buffer is buffer and (value.offset != 0 or value.dynamic or value.aval.size != buffer.aval.size)


def _positions(plan) -> dict:
    """For every statement: (the statement list it sits in, its index there, its nesting path)."""
    where: dict = {}

    def visit(block, path):
        for k, stmt in enumerate(block):
            where[stmt] = (block, k, path)
            inner = path + ((block, k),)
            if isinstance(stmt, Loop):
                visit(stmt.cond, inner)
                visit(stmt.body, inner)
            elif isinstance(stmt, Branch):
                for b in stmt.branches:
                    visit(b, inner)
    for k in plan.kernels:
        visit(k.body, ())
    for f in plan.functions:
        visit(f.body, ())
    return where


def _stable(src_buffer, op, out_buffer, positions, stmt_of) -> bool:
    """Every reader of the view follows its Op in the same statement list, and between the two no Op
    writes the source (readers included) and no recursive call runs."""
    block, k, _ = positions[stmt_of[op]]
    last = k
    for stmt, (blk, j, path) in positions.items():
        if any(x.buffer is out_buffer for x in _reads(stmt)):
            anchor = (blk, j) if blk is block else next(((b, i) for b, i in path if b is block), None)
            if anchor is None or anchor[1] <= k:
                return False
            last = max(last, anchor[1])
    for stmt in walk(block[k + 1:last + 1]):
        if isinstance(stmt, Call):
            return False
        if isinstance(stmt, Wave) and any(v.buffer is src_buffer for t in stmt.tasks for v in t.op.outputs):
            return False
    return True


def view_decl(buf, view, base_ptr: str) -> str:
    """The declaration of a view's pointer at the kernel's top."""
    t = c_types.storage(buf.aval.dtype)
    if view.perm is not None:       # readers get the source pointer and permute their indices
        return f"// {buf.name}: read through {base_ptr} with axes {view.perm}"
    return f"const {t}* {buf.name} = {base_ptr} + {view.offset};"
