"""``splice inspect MODEL|ARTIFACT``: layers, stored bytes by role, op counts, the pass history and,
with ``--coupling``, the channel groups that shrink together (``ir/coupling.py``); with
``--prunability``, each layer's load (density) and heavy-tail exponent (``ir/prunability.py``)."""
from __future__ import annotations

from splice.cli.tables import history_table
from splice.cli.ui import UI, capture, esc, fmt_bytes, is_artifact, positive_int

HELP = "layers, sizes, op counts and pass history of a model"


def add_parser(sub, common) -> None:
    p = sub.add_parser("inspect", parents=[common], help=HELP,
                       description="Capture MODEL (HF directory, .gguf, .pt2) or load ARTIFACT and print its layers "
                                   "(path, op, kind, weight shape, bytes), stored bytes by role, op counts and, "
                                   "for artifacts, the pass history with fidelity numbers.")
    p.add_argument("model", metavar="MODEL|ARTIFACT")
    p.add_argument("--top-ops", type=positive_int, default=12, metavar="N", help="op types listed (default 12)")
    p.add_argument("--coupling", action="store_true",
                   help="also list the coupling groups: channels, heads and KV groups that shrink together, "
                        "the tensors each slices, and the op that pins a group that cannot shrink")
    p.add_argument("--prunability", action="store_true",
                   help="also list each weight layer's load (kept share of its weights) and heavy-tail exponent "
                        "alpha of its spectrum (smaller: more trained structure, less prunable)")
    p.set_defaults(func=run)


def _input_desc(graph) -> list[str]:
    out = []
    for name, ex in zip(graph.input_names, graph.example_inputs):
        axes = graph.dynamic.get(name, {})
        dims = [axes.get(i, str(d)) for i, d in enumerate(getattr(ex, "shape", ()))]
        out.append(f"{name}[{', '.join(map(str, dims))}]")
    return out


def _layers_table(graph):
    from rich.table import Table

    layers = graph.layers()
    table = Table(title=f"layers ({len(layers)})", title_justify="left")
    for col, just in (("path", "left"), ("op", "left"), ("kind", "left"), ("weight shape", "left"), ("bytes", "right")):
        table.add_column(col, justify=just, overflow="fold")
    for row in layers:
        shape = "×".join(map(str, row["shape"])) if row["shape"] else "—"
        table.add_row(esc(row["path"] or "(top)"), esc(row["op"]), esc(row["kind"]), shape, f"{row['bytes']:,}")
    return table


def _sizes_table(by_role: dict[str, int]):
    from rich.table import Table

    total = sum(by_role.values())
    sizes = Table(title="stored bytes by role", title_justify="left")
    sizes.add_column("role")
    sizes.add_column("bytes", justify="right")
    sizes.add_column("share", justify="right")
    for role, n in sorted(by_role.items(), key=lambda kv: -kv[1]):
        sizes.add_row(esc(role), f"{n:,}", f"{100 * n / total:.1f}%" if total else "—")
    sizes.add_row("[bold]total[/bold]", f"[bold]{total:,}[/bold]", f"({fmt_bytes(total)})")
    return sizes


def _coupling_table(graph):
    """One row per coupling group: id, kind, units × channels, members, modules, why pinned."""
    from rich.table import Table

    from splice.ir.coupling import analyze

    groups = analyze(graph).groups
    free = sum(g.shrinkable for g in groups)
    table = Table(title=f"coupling groups ({len(groups)}, {free} shrinkable)", title_justify="left")
    for col, just in (("#", "right"), ("kind", "left"), ("units", "right"), ("unit", "right"),
                      ("size", "right"), ("tensors", "right")):
        table.add_column(col, justify=just, no_wrap=True)
    for col in ("touches", "can shrink"):
        table.add_column(col, overflow="fold")
    for g in groups:
        kind = g.kind + (f" ({g.per_parent} per #{g.parent})" if g.parent is not None else "")
        state = "yes" if g.shrinkable else f"no: {g.pinned_by}"
        table.add_row(str(g.id), esc(kind), str(g.units), str(g.unit), str(g.size), str(len(g.members)),
                      esc(g.touches()), esc(state))
    return table


def _prunability_table(graph):
    """One row per weight layer: kind, shape, load, alpha; the summary in the title."""
    from rich.table import Table

    from splice.ir.prunability import prunability, summary

    rows = prunability(graph)
    total = summary(rows)
    alpha = "—" if total["alpha"] is None else f"{total['alpha']:.2f}"
    table = Table(title=f"prunability ({total['layers']} layers; load {total['load']:.3f}, mean alpha {alpha}; "
                        "smaller alpha: heavier-tailed spectrum, prune less)", title_justify="left")
    for col, just in (("layer", "left"), ("kind", "left"), ("shape", "right"), ("load", "right"), ("alpha", "right")):
        table.add_column(col, justify=just, overflow="fold")
    for r in rows:
        table.add_row(esc(r.key), r.kind, "×".join(map(str, r.shape)), f"{r.load:.3f}",
                      "—" if r.alpha is None else f"{r.alpha:.2f}")
    return table


def run(args, ui: UI) -> int:
    graph, seconds = capture(args.model, ui)
    artifact = is_artifact(args.model)
    src = graph.source
    kind = "artifact" if artifact else src.get("kind", "?")  # artifacts keep their source
    if artifact and src.get("kind"):
        kind = f"artifact of {src['kind']}"
    ui.print(f"[bold]{esc(src.get('name', args.model))}[/bold]  ({esc(kind)}"
             + (f", {esc(src['model_type'])}" if src.get("model_type") else "") + f"; loaded in {seconds:.1f} s)")
    ui.print(f"inputs: {esc(', '.join(_input_desc(graph)))}    outputs: {esc(', '.join(graph.output_names))}")
    ui.print(_layers_table(graph))
    by_role = graph.bytes_by_role()
    total = sum(by_role.values())
    ui.print(_sizes_table(by_role))

    counts = graph.op_counts()
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = top[:args.top_ops]
    ops = ", ".join(f"{esc(op)} ×{n}" for op, n in shown)
    rest = len(top) - len(shown)
    ui.print(f"ops: {sum(counts.values()):,} calls of {len(counts)} op types: {ops}"
             + (f", … {rest} more types" if rest > 0 else ""))
    ui.print(f"params: {graph.num_params():,}    bytes: {total:,} ({fmt_bytes(total)})")
    if graph.history:
        out = graph.output_names[0] if graph.output_names else None
        ui.print(history_table(graph.history, out, f"pass history (fidelity of '{out}' vs the captured model)"))
    elif artifact:
        ui.print("pass history: none")
    if args.coupling:
        ui.print(_coupling_table(graph))
    if args.prunability:
        ui.print(_prunability_table(graph))
    return 0
