"""Rich tables that more than one command prints: the pass history and a mixed-precision plan."""
from __future__ import annotations

from splice.cli.ui import esc, fmt_bytes, fmt_num


def _first_fidelity(entry: dict, output: str | None) -> dict:
    fid = entry.get("fidelity") or {}
    if not fid:
        return {}
    if output in fid:
        return fid[output]
    return next(iter(fid.values()))


def _report_cell(entry: dict) -> str:
    """The pass's declared report fields (``register_pass(report_fields=...)``) that hold a scalar,
    so any family's numbers (sparsity, ranks, bits) show without a CLI edit."""
    from splice.passes.base import report_summary

    spec = {float: ".4g", int: ","}
    cells = [f"{desc} {fmt_num(value, spec.get(type(value), ''))}"
             for desc, value in report_summary(entry).items() if type(value) in (int, float, str, bool)]
    return esc("; ".join(cells)) or "—"


def history_table(history: list[dict], output: str | None, title: str):
    """One row per pass: spec, seconds, fidelity of ``output`` (SQNR, cosine, KL), weight bytes,
    and the pass's declared report fields."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, just in (("#", "right"), ("pass", "left"), ("seconds", "right"), ("sqnr dB", "right"),
                      ("cosine", "right"), ("kl", "right"), ("weights before → after", "right"),
                      ("report", "left")):
        table.add_column(col, justify=just, overflow="fold")
    for i, entry in enumerate(history, 1):
        fid = _first_fidelity(entry, output)
        rep = entry.get("report") or {}
        before = rep.get("weight_bytes_before", rep.get("bytes_before"))
        after = rep.get("weight_bytes_after", rep.get("bytes_after"))
        sizes = f"{fmt_bytes(before)} → {fmt_bytes(after)}" if before is not None and after is not None else "—"
        table.add_row(str(i), esc(entry.get("spec", entry.get("pass", "?"))),
                      fmt_num(entry.get("seconds"), ".2f"), fmt_num(fid.get("sqnr_db"), ".2f"),
                      fmt_num(fid.get("cosine"), ".5f"), fmt_num(fid.get("kl"), ".2e"), sizes,
                      _report_cell(entry))
    return table


def plan_table(entry: dict):
    """Per-layer bit widths chosen by a mixed-precision pass (its report's ``plan``)."""
    from rich.table import Table

    rep = entry["report"]
    table = Table(title=f"{entry.get('pass')} plan: mean {rep.get('avg_bits', '?')} bits", title_justify="left")
    table.add_column("layer", overflow="fold")
    table.add_column("bits", justify="right")
    for path, bits in rep["plan"].items():
        table.add_row(esc(path), str(bits))
    return table
