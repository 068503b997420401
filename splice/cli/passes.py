"""``splice passes [NAME]``: list every registered pass, or one pass's options."""
from __future__ import annotations

import dataclasses
from typing import Any

from splice.cli.ui import UI, esc

HELP = "list passes, or show one pass's options"


def add_parser(sub, common) -> None:
    p = sub.add_parser("passes", parents=[common], help=HELP,
                       description="List every registered pass (name, summary, paper), or with NAME its options.")
    p.add_argument("name", nargs="?", help="a pass name, e.g. quantize.rtn")
    p.set_defaults(func=run)


def _fmt_type(t: Any) -> str:
    if isinstance(t, type):
        return t.__name__
    return str(t).replace("typing.", "")


def _spec_value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "(required)"


def run(args, ui: UI) -> int:
    from splice.passes.base import get_pass, list_passes

    if not args.name:
        infos = list_passes()
        width = max((len(i.name) for i in infos), default=0)
        for info in infos:
            calib = {True: "  [needs calibration]", False: ""}.get(info.needs_calibration, "  [calibration: by options]")
            print(f"{info.name:<{width}}  {info.summary}{calib}  {info.reference}".rstrip())
        return 0
    info = get_pass(args.name)
    from rich.table import Table

    ui.print(f"[bold]{esc(info.name)}[/bold]  {esc(info.summary)}")
    ui.print(f"reference: {esc(info.reference)}")
    calib = {True: "yes (--calib FILE)", False: "no"}.get(info.needs_calibration, "with some options (--calib FILE)")
    ui.print(f"version: {info.version}    needs calibration: {calib}")
    if _show_merge_method(info.name, ui):
        return 0
    fields = info.config_cls.options()
    if not fields:
        ui.print("options: none")
        return 0
    types_ = info.config_cls.option_types()
    helps = {f.name: f.metadata.get("help", "") for f in fields}
    table = Table(title=None, show_edge=False)
    for col in ("option", "type", "default") + (("help",) if any(helps.values()) else ()):
        table.add_column(col)
    for f in fields:
        default = _default(f)
        row = [esc(f.name), esc(_fmt_type(types_.get(f.name, f.type))),
               esc(repr(default) if isinstance(default, str) else default)]
        if any(helps.values()):
            row.append(esc(helps[f.name]))
        table.add_row(*row)
    ui.print(table)
    example = ",".join(f"{f.name}={_spec_value(f.default)}" for f in fields[:2]
                       if f.default is not dataclasses.MISSING)
    ui.print(f"example: splice run MODEL -p {esc(info.name)}{':' + esc(example) if example else ''} -o OUT")
    return 0


def _show_merge_method(name: str, ui: UI) -> bool:
    """A merge method's recipe parameters (the pass's own options are the JSON ``splice merge`` fills)."""
    from rich.table import Table

    from splice.passes.merge._common import METHODS, REQUIRED

    method = METHODS.get(name.removeprefix("merge.")) if name.startswith("merge.") else None
    if method is None:
        return False
    ui.print(f"base model: {method.base}    models besides the base: {method.min_models}"
             f"{'+' if method.max_models is None else f'..{method.max_models}'}")
    table = Table(title=None, show_edge=False)
    for col in ("parameter", "type", "default", "scope", "help"):
        table.add_column(col)
    for p in method.params:
        default = "(required)" if p.default is REQUIRED else _spec_value(p.default)
        table.add_row(esc(p.name), p.kind.__name__, esc(default), "per model" if p.per_model else "shared", esc(p.help))
    ui.print(table if method.params else "parameters: none")
    ui.print(f"example: a recipe with merge_method: {esc(method.name)}, then splice merge RECIPE.yaml -o OUT")
    return True

