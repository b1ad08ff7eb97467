"""gdsl.plot_plan(lowered_or_plan, path): a timeline picture of a plan.

The x axis is estimated time (the cost model's ns), the y axis the vEUs; each uTask is a box on its vEU,
coloured by op; barriers are vertical lines (solid: grid, dotted: block). Loops show one iteration of
their body, branches their first case, recursive functions one call; labels say so. Needs matplotlib.
"""
from __future__ import annotations

from gdsl.schedule.plan import Branch, Call, Launch, Loop, Sync, Wave


def _timeline(plan, block, events, t, notes, seen):
    for stmt in block:
        if isinstance(stmt, Wave):
            end = t
            for task in stmt.tasks:
                for k in range(task.op.n_utasks):
                    veu = task.first + k % task.count
                    start = t + (k // task.count) * task.op.cost
                    events.append((veu, start, task.op.cost, task.op))
                    end = max(end, start + task.op.cost)
            t = end
        elif isinstance(stmt, Sync):
            events.append((None, t, 0, stmt.scope))
            t += 1300.0 if stmt.scope == "grid" else 50.0   # ~1.3 µs per grid barrier on an H100
        elif isinstance(stmt, Loop):
            notes.append((t, "loop: one iteration"))
            t = _timeline(plan, stmt.cond, events, t, notes, seen)
            t = _timeline(plan, stmt.body, events, t, notes, seen)
        elif isinstance(stmt, Branch):
            notes.append((t, "branch: case 0"))
            t = _timeline(plan, stmt.branches[0], events, t, notes, seen)
        elif isinstance(stmt, Call) and stmt.fn not in seen:
            notes.append((t, f"call {stmt.fn}"))
            fn = next(f for f in plan.functions if f.name == stmt.fn)
            t = _timeline(plan, fn.body, events, t, notes, seen | {stmt.fn})
        elif isinstance(stmt, Launch):
            notes.append((t, f"launch k{stmt.kernel}"))
            t = _timeline(plan, plan.kernels[stmt.kernel].body, events, t, notes, seen)
    return t


def plot_plan(lowered, path: str, *, max_veus: int | None = None) -> str:
    """Draw the plan of `lowered` (a gdsl Lowered, or a Plan) to `path` (PNG/SVG/PDF); returns the path."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("gdsl.plot_plan needs matplotlib: pip install 'gdsl[plot]'") from e
    plan = getattr(getattr(lowered, "lowering", None), "plan", lowered)
    if not hasattr(plan, "kernels"):
        raise TypeError("plot_plan needs the Lowered of a backend that schedules (cpu, cuda, hip) or a Plan")
    events, notes = [], []
    block = plan.host if plan.host is not None else plan.kernels[0].body
    end = _timeline(plan, block, events, 0.0, notes, frozenset())
    used = max([e[0] for e in events if e[0] is not None], default=0) + 1
    veus = min(used, max_veus or used)
    fig, ax = plt.subplots(figsize=(12, 2.5 + 0.04 * veus))
    colours = {}
    palette = plt.get_cmap("tab20")
    for veu, start, width, what in events:
        if veu is None:
            ax.axvline(start, color="black", lw=1.0 if what == "grid" else 0.6,
                       ls="-" if what == "grid" else ":")
        elif veu < veus:
            c = colours.setdefault(what.name, palette(len(colours) % 20))
            ax.broken_barh([(start, width)], (veu - 0.4, 0.8), facecolors=c, edgecolors="none")
    for x, text in notes:
        ax.annotate(text, (x, veus - 0.5), fontsize=7, rotation=90, va="top")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles, list(colours), fontsize=6, ncol=4, loc="upper right", framealpha=0.8)
    ax.set_xlabel("estimated time (ns; one loop iteration / branch case / call shown)")
    ax.set_ylabel("vEU")
    ax.set_xlim(0, max(end, 1.0))
    ax.set_ylim(-0.5, veus - 0.5)
    ax.invert_yaxis()
    ax.set_title(f"gdsl plan: control={plan.control}, {plan.grid} vEUs; "
                 f"{plan.stats.get('grid_syncs', 0)} grid barriers, {plan.stats.get('waves', 0)} waves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
