"""Text of a Plan for a person: kernels, waves with each op's vEU range, barriers, control flow.

    kernel main  (grid 132 vEUs x 256 threads)
      wave 0:  op0_matmul [16 uTasks] vEU 0-15 | op1_matmul [16 uTasks] vEU 16-31
      barrier (grid)
      loop while u3:
        ...
"""
from __future__ import annotations

from gdsl.schedule.flags import published_in
from gdsl.schedule.local import local_bytes
from gdsl.schedule.plan import (
    CHAIN_PARTS,
    GEMV_ROWS_GEMV,
    K_PARTS,
    K_SPLITS,
    N_PARTS,
    ROW_BLOCK,
    ROW_INDEX,
    ROWS,
    STEPS,
    Assign,
    Branch,
    Call,
    Fork,
    Launch,
    Loop,
    Sync,
    Uniforms,
    Wave,
    a_parts,
    contraction_operands,
    epilogue_of,
    k_chunk,
    plan_statements,
)
from gdsl.schedule.resident import RESIDENT, RESIDENT_PITCH
from gdsl.schedule.utasks import K_CHUNK, gathers_batch, gemm_dims


def _veus(task) -> str:
    if task.count == 1:
        return f"vEU {task.first}"
    return f"vEU {task.first}-{task.first + task.count - 1}"


def _k_chunk(op) -> int:
    """The depth KC of each range of a GEMM split over its depth (plan.K_SPLITS)."""
    k = gemm_dims(op.kind, [v.aval for v in op.inputs], op.outputs[0].aval, op.params)[3]
    return k_chunk(k, op.params[K_SPLITS])


def describe_op(op) -> str:
    ins = ", ".join(_operands(op))
    outs = ", ".join(map(repr, op.outputs))
    epilogue = epilogue_of(op)
    if CHAIN_PARTS in op.params:   # a GEMV, a row chain, a GEMV as one uTask (plan.GEMV_ROWS_GEMV): its parts
        parts = "; ".join(describe_op(part) for part in op.params[CHAIN_PARTS])
        return f"{outs} = {op.name}({ins}) as one uTask: {parts}"
    if epilogue is not None:       # what each output element becomes as it is stored
        return f"{outs} = {op.name}({ins}) with epilogue {epilogue!r}"
    if op.kind == ROWS.name:       # each row's steps, in order (s<k>: step k of the same row)
        steps = "; ".join(f"s{k} = {s.reduce}({s.expr!r})" if s.reduce else f"s{k} = {s.expr!r}"
                          for k, s in enumerate(op.params[STEPS]))
        return f"{outs} = {op.name}({ins}) with steps {steps}"
    return f"{outs} = {op.name}({ins})"


def _operands(op) -> list[str]:
    """The op's inputs as printed; a left operand read in parts (plan.K_PARTS) as `[t10 | t11]`; gathered rows
    (plan.ROW_INDEX) as `in3[rows clamp(t7[m], 0, 3796)]<f32[64,256]>`, their indices not again; the right
    operands of sibling matmuls (plan.N_PARTS) as `[in2 | in0 | in3]`."""
    names = [repr(v) for v in op.inputs]
    if N_PARTS in op.params:
        return [names[0], f"[{' | '.join(names[1:])}]"]
    if ROW_INDEX in op.params:
        return names[:2] + names[contraction_operands(op.params):]
    if K_PARTS not in op.params:
        return names
    parts = " | ".join(names[number] for number, _, _ in a_parts(op))
    return [f"[{parts}]", names[1]] + names[contraction_operands(op.params):]


def describe_uniform(u) -> str:
    ins = " ".join(map(repr, u.inputs))
    return f"{u.output!r} = {u.primitive} {ins}"


def _scope(sync) -> str:
    if sync.published:
        waits = "".join(f"; {w!r}" for w in sync.waits)
        return f"{sync.scope}: {', '.join(b.name for b in sync.published)}{waits}"
    if sync.sites is None:
        return sync.scope
    sites = ", ".join(str(s) for s in sorted(sync.sites))
    return f"{sync.scope} when returning to site {sites}, else block"


def print_block(block, indent: int, lines: list, device: bool = False, views=frozenset()) -> None:
    pad = "  " * indent
    wave_no = 0
    for stmt in block:
        if isinstance(stmt, Wave):
            lines.append(f"{pad}wave {wave_no}:")
            wave_no += 1
            for t in stmt.tasks:
                rounds = -(-t.op.n_utasks // t.count)
                extra = f", {rounds} rounds" if rounds > 1 else ""
                if gathers_batch(t.op.params):
                    tm = t.op.params["tile_m"]
                    rows = f"{tm} rows by " if tm < t.op.outputs[0].aval.shape[-2] else ""
                    extra += f", each {rows}{t.op.params['tile_n']} columns of every batch element"
                if ROW_BLOCK in t.op.params:        # (a 2-D chunk of a column layout of several rows: owner.py)
                    extra += f", each {t.op.params[ROW_BLOCK]} rows by {t.op.params['chunk']} columns"
                if K_CHUNK in t.op.params:          # (the option thin_gemv: utasks.thin_gemv_params)
                    extra += f", {t.op.params['tile_n']} columns each, k staged at once"
                if K_SPLITS in t.op.params:         # (split-K: splitk.py)
                    extra += f", k in {t.op.params[K_SPLITS]} ranges of {_k_chunk(t.op)}"
                if RESIDENT in t.op.params:
                    offset, count, slots = t.op.params[RESIDENT]
                    shared = " (one tile for all its rounds)" if slots < -(-t.op.n_utasks // count) else ""
                    pitch = t.op.params.get(RESIDENT_PITCH)
                    shared += f" (rows {pitch} apart)" if pitch else ""
                    extra += f", B resident in shared memory at +{offset}{shared}"
                if t.preload:                       # (preload.py: loaded before the wave before this one)
                    extra += ", operands " + ", ".join(map(str, t.preload)) + " loaded a wave early"
                if t.op in views:                   # (a backend's view: cfamily/views.py)
                    extra += "; its readers read the input in place: no code runs"
                lines.append(f"{pad}  {describe_op(t.op)}  [{t.op.n_utasks} uTasks on {_veus(t)}{extra}]")
        elif isinstance(stmt, Sync):
            lines.append(f"{pad}{'sync' if stmt.published else 'barrier'} ({_scope(stmt)})")
        elif isinstance(stmt, Uniforms):
            lines.append(f"{pad}every vEU: " + "; ".join(describe_uniform(u) for u in stmt.ops))
        elif isinstance(stmt, Assign):
            lines.append(f"{pad}every vEU: {stmt.dst!r} = {stmt.src!r}")
        elif isinstance(stmt, Loop):
            parts = f" ({stmt.parts} partitions: uTask p of every op on vEU p mod grid)" if stmt.parts else ""
            lines.append(f"{pad}loop{parts}:")
            if stmt.staged:           # (local.py: copied in here, out at the end; shared memory past the temps')
                lines.append(f"{pad}  in each vEU's shared memory while it runs, its slice of: "
                             + ", ".join(map(repr, stmt.staged)))
            print_block(stmt.cond, indent + 1, lines, device, views)
            lines.append(f"{pad}  exit unless {stmt.pred!r}")
            print_block(stmt.body, indent + 1, lines, device, views)
            lines.append(f"{pad}end loop" + (" (the staged slices copied out)" if stmt.staged else ""))
        elif isinstance(stmt, Branch):
            in_place = ""
            if stmt.in_place:
                names = ", ".join(map(repr, stmt.in_place))
                in_place = f" (results in their operands' storage, updated in place: {names})"
            peeled = f" (a call of {stmt.depth_of}: its depth checked)" if stmt.depth_of else ""
            lines.append(f"{pad}branch on {stmt.index!r}{in_place}{peeled}:")
            for k, b in enumerate(stmt.branches):
                empty = "  (nothing to do: the results are already in place)" if stmt.in_place and not b else ""
                lines.append(f"{pad}  case {k}:{empty}")
                print_block(b, indent + 2, lines, device, views)
            lines.append(f"{pad}end branch")
        elif isinstance(stmt, Call):
            deeper = "one frame deeper" if stmt.step == 1 else f"{stmt.step} frames deeper"
            lines.append(f"{pad}call {stmt.fn} (site {stmt.site}, {deeper})")
        elif isinstance(stmt, Fork):
            lines.append(f"{pad}fork (each half of the vEU group makes one call):")
            for label, part in (("lower half", stmt.first), ("both halves", stmt.between), ("upper half", stmt.second)):
                if part:
                    lines.append(f"{pad}  {label}:")
                    print_block(part, indent + 2, lines, device, views)
            lines.append(f"{pad}end fork")
        elif isinstance(stmt, Launch):
            lines.append(f"{pad}launch kernel k{stmt.kernel}")
        else:
            lines.append(f"{pad}{stmt!r}")


def _epilogues(stats) -> str:
    n = stats.get("epilogues", 0)
    return f", {n} as epilogues of contractions" if n else ""


def _row_chains(stats) -> str:
    n, between = stats.get("row_chains", 0), stats.get(GEMV_ROWS_GEMV.name, 0)
    return (f", {n} row chains" if n else "") + (f" ({between} between two GEMVs, one uTask)" if between else "")


def print_plan(plan, views=frozenset()) -> str:
    """The plan's text; `views`: the Ops a backend reads in place, whose tasks run no code (marked so)."""
    s = plan.stats
    lines = [f"plan: control={plan.control}, {len(plan.kernels)} kernel(s), grid {plan.grid} vEUs x "
             f"{plan.block} threads; {s.get('waves', 0)} waves, {s.get('ops', 0)} ops "
             f"({s.get('fused_eqns', 0)} eqns fused away{_epilogues(s)}{_row_chains(s)}), "
             f"{s.get('uniform_ops', 0)} uniform ops, "
             f"{s.get('grid_syncs', 0)} grid barriers, {s.get('block_syncs', 0)} block syncs"]
    ins = ", ".join(f"{v!r}:{v.aval}" for v in plan.inputs)
    outs = ", ".join(f"{v!r}:{v.aval}" for v in plan.outputs)
    lines.append(f"inputs: {ins}")
    lines.append(f"outputs: {outs}")
    if plan.block_local:                    # (local.py: a copy per vEU, past the resident weights' region)
        slots = {buf: (size, rounds) for buf, size, _, rounds in plan.local_slots}     # (a slot per round)
        placed = ", ".join(f"{buf.name} at +{offset}" + (f" ({slots[buf][1]} slots of {slots[buf][0]})"
                                                          if buf in slots else "") for buf, offset in plan.block_local)
        staged = " with the loops' staged slices" if any(isinstance(s, Loop) and s.staged for s in
                                                          plan_statements(plan)) else ""
        lines.append(f"shared memory: {placed} (block-local, {local_bytes(plan)} bytes per vEU{staged} after the "
                     f"resident weights)")
    if plan.host is not None:
        lines.append("host:")
        print_block(plan.host, 1, lines, views=views)
    for kernel in plan.kernels:
        lines.append(f"kernel {kernel.name}:")
        published = published_in(kernel.body)
        if published:                       # (the renderer's flag prologue, before the flags pass's barrier)
            lines.append(f"  every vEU: zero its share of the flag words of {', '.join(b.name for b in published)}")
        print_block(kernel.body, 1, lines, plan.control == "device", views)
    for fn in plan.functions:
        params = ", ".join(map(repr, fn.params))
        results = ", ".join(map(repr, fn.results))
        spread = f", callees' frames {fn.spread} x step further" if fn.spread else ""
        lines.append(f"function {fn.name}({params}) -> ({results})  [max_depth {fn.max_depth}, "
                     f"{fn.n_sites} call sites; storage one copy per frame{spread}]:")
        print_block(fn.body, 1, lines, plan.control == "device", views)
    return "\n".join(lines)
