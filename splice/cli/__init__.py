"""The ``splice`` command (also ``python -m splice``).

    splice passes [NAME]                          list passes, or one pass's options
    splice inspect MODEL|ARTIFACT                 layers, sizes, op counts, pass history
    splice run MODEL -p SPEC [-p SPEC ...] [--recipe FILE] [--calib SOURCE[:WEIGHT] ...] -o OUT [--force]
    splice merge RECIPE.yaml -o OUT [--hf DIR]    merge models by a mergekit YAML recipe
    splice export ARTIFACT --onnx FILE [--check] [--force]      (one flag per export target)
    splice eval MODEL|ARTIFACT --ppl FILE [FILE ...] [--seq-len N] [--stride N] [--max-tokens N]
                [--ref MODEL [--layers]]          per file, then the geometric mean over files
    splice eval lmc A B --data FILE [--points N] [--align] [--json]   loss path A -> B and its barrier
    splice train MODEL|ARTIFACT --data FILE [--eval FILE] [-p SPEC ...] --steps N --lr LR -o OUT [--resume]
    splice demo ...                               the end-to-end demo (splice/demo.py)

One module per command (``splice/cli/<command>.py``: ``add_parser`` beside ``run``); shared
output helpers in ``splice/cli/ui.py``. Building the parser imports nothing heavy: each command
imports torch and the rest only when it runs, so ``--help`` is fast.

Bad input (a :class:`~splice.errors.SpliceError`) prints one line ``splice: error: ...`` (at
most a few hundred characters) on stderr and exits 1 (argparse usage errors exit 2);
``--debug`` re-raises with the traceback. Ctrl-C prints ``splice: interrupted`` and exits 130.
Every check that needs no model runs before the model is captured, and outputs are only
written once everything succeeded. Progress lines go to stderr on a terminal (``--quiet``:
none); library chatter is silenced unless ``--debug``.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from typing import Sequence

from splice import progress
from splice.cli import demo, export, inspect, merge, passes, run, train
from splice.cli import eval as evaluate
from splice.cli.ui import PROG, UI, UsageError, error, one_line
from splice.errors import SpliceError, SpliceWarning

COMMANDS = (passes, inspect, run, merge, export, evaluate, train, demo)  # `splice --help` lists them in this order
INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """argparse with the echo cap: a usage error repeats at most ``one_line``'s share of a bad value."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show library output and full tracebacks")
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress lines on stderr")
    parser = Parser(
        prog=PROG, description="splice: capture a model once, rewrite it with passes, export it to ONNX Runtime.",
        epilog="Run `splice COMMAND --help` for a command's options.")
    parser.add_argument("--debug", action="store_true", default=False, help="show library output and full tracebacks")
    parser.add_argument("--quiet", action="store_true", default=False, help="no progress lines on stderr")
    from splice import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub, common)
    return parser


def _exit_code(e: SystemExit, default: int) -> int:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else default)


def _exit_at_once(signum, frame) -> None:
    """A second Ctrl-C while the first one's clean-up runs."""
    os.write(2, f"{PROG}: interrupted\n".encode())
    os._exit(INTERRUPTED)


_INTERRUPTED: list[bool] = []  # set once Ctrl-C arrived: a library may turn its KeyboardInterrupt into an error


def _on_interrupt(signum, frame) -> None:
    signal.signal(signal.SIGINT, _exit_at_once)
    _INTERRUPTED.append(True)
    raise KeyboardInterrupt


def _catch_interrupts():
    """Turn Ctrl-C into KeyboardInterrupt handled by ``main`` (before any heavy import); the previous
    handler, to restore. ``None`` where SIGINT is ignored (``nohup``) or not the main thread."""
    try:
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            return None
        return signal.signal(signal.SIGINT, _on_interrupt)
    except ValueError:  # not the main thread
        return None


def _warning_printer(stream, debug: bool):
    """``warnings.showwarning`` for a command: a SpliceWarning as one line on ``stream`` (the
    command's stderr, even while library output is muted); other warnings only with ``--debug``."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SpliceWarning):
            print(f"{PROG}: warning: {one_line(message)}", file=stream, flush=True)
        elif debug:
            default(message, category, filename, lineno, file, line)

    return show


def _failed(e: Exception) -> int:
    """Report a command's error in one line; its exit code (2 usage, 1 otherwise)."""
    if isinstance(e, UsageError):
        error(e)
        return 2
    if isinstance(e, SpliceError):
        error(e)
        return 1
    if isinstance(e, OSError):  # FileNotFoundError, PermissionError, disk full …
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        error(f"{where}{e.strerror or e}")
        return 1
    print(f"{PROG}: internal error: {type(e).__name__}: {one_line(e)} (rerun with --debug for the traceback)",
          file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    _INTERRUPTED.clear()
    previous = _catch_interrupts()
    debug = False
    try:
        parser = build_parser()
        try:
            args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
            if extra and args.command != "demo":
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
        except SystemExit as e:  # --help / --version (0) or a usage error (2)
            return _exit_code(e, 2)
        args.extra = extra
        debug = args.debug
        progress.configure(enabled=False if args.quiet else None, stream=sys.stderr)
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(sys.stderr, debug)
            return args.func(args, UI(debug))
    except SystemExit as e:  # a nested parser (demo) exiting
        return _exit_code(e, 1)
    except (Exception, KeyboardInterrupt) as e:
        if debug:
            raise
        if isinstance(e, KeyboardInterrupt) or _INTERRUPTED:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return INTERRUPTED
        return _failed(e)
    finally:
        progress.configure()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def entry() -> None:
    """The console script (and ``python -m splice``): ``main``'s exit code. After Ctrl-C the process
    ends at once, with nothing run at interpreter shutdown: a library's SIGINT state left armed
    (or its own handler restored) must not turn the clean ``interrupted`` exit into a death by SIGINT."""
    code = main()
    if code == INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

