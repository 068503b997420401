"""``splice demo …``: the end-to-end demo; its options and code live in :mod:`splice.demo`."""
from __future__ import annotations

import argparse
import importlib

from splice.cli.ui import PROG, UI
from splice.errors import SpliceError

HELP = "the end-to-end demo (`splice demo --help`)"


def add_parser(sub, common) -> None:
    p = sub.add_parser("demo", parents=[common], add_help=False, help=HELP,
                       description="The end-to-end demo; its options come from splice/demo.py.")
    p.set_defaults(func=run)


def run(args, ui: UI) -> int:
    try:
        demo = importlib.import_module("splice.demo")
    except ModuleNotFoundError as e:
        if e.name == "splice.demo":
            raise SpliceError("demo: not available in this build (splice/demo.py is missing)") from e
        raise
    parser = argparse.ArgumentParser(prog=f"{PROG} demo", description=(demo.__doc__ or "").strip() or None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(parser)
    dargs = parser.parse_args(args.extra)
    if not hasattr(dargs, "debug"):
        dargs.debug = args.debug
    return int(demo.main(dargs) or 0)
