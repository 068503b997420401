"""What every command shares: where output goes, number/size formatting, the error line, common checks.

Results go to stdout (rich tables); progress goes to stderr through :mod:`splice.progress`
(``--quiet`` silences it); library chatter is muted unless ``--debug``.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any

from splice import progress
from splice.errors import SpliceError
from splice.quiet import quiet

PROG = "splice"
ECHO_LIMIT = 300  # characters of a message the CLI echoes (a hostile input must not print megabytes)


class UsageError(SpliceError):
    """A command line that is well-formed for argparse but still unusable (exit 2)."""


class UI:
    """Where output goes: results on stdout, progress on stderr."""

    def __init__(self, debug: bool):
        from rich.console import Console

        self.debug = debug
        wide = None if sys.stdout.isatty() else 200  # pipes and captures get unwrapped tables
        self.out = Console(file=sys.stdout, width=wide, highlight=False)

    def print(self, *args, **kw) -> None:
        self.out.print(*args, **kw)

    @contextlib.contextmanager
    def quiet(self, redirect: bool = True):
        """Silence library output (and, with ``redirect``, anything printed to stderr)."""
        if self.debug:
            yield
            return
        with quiet(stderr=redirect):
            yield

    @contextlib.contextmanager
    def phase(self, desc: str, *, redirect: bool = True):
        """A progress line for a step the user waits for, with library output muted."""
        with progress.phase(desc), self.quiet(redirect=redirect):
            yield


def one_line(msg: Any, limit: int = ECHO_LIMIT) -> str:
    """``msg`` on one line, at most ``limit`` characters (the rest is counted, not printed)."""
    text = str(msg)
    head = " ".join(part.strip() for part in text[:4 * limit].splitlines() if part.strip()) or "(no message)"
    if len(head) <= limit and len(text) <= 4 * limit:
        return head
    return f"{head[:limit]}… ({len(text):,} characters, cut)"


def error(msg: Any) -> None:
    print(f"{PROG}: error: {one_line(msg)}", file=sys.stderr)


def esc(text: Any) -> str:
    from rich.markup import escape

    return escape(str(text))


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_num(v: Any, spec: str) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def require_exists(*paths: str | None) -> None:
    for path in paths:
        if path is not None and not Path(path).exists():
            raise SpliceError(f"{path}: no such file or directory")


def require_file(path: str, flag: str) -> Path:
    """``path`` given to ``flag`` must be an existing file (a directory is named as such)."""
    p = Path(path)
    if p.is_dir():
        raise SpliceError(f"{flag} {path}: is a directory, expected a file")
    if not p.is_file():
        raise SpliceError(f"{flag} {path}: no such file")
    return p


def check_output(path: str, force: bool) -> Path:
    """Refuse an output path before any model is loaded (exists without ``--force``, a symlink,
    read-only, inside an artifact): ``splice.ir.atomic.check_writable``."""
    from splice.ir.atomic import check_writable

    return check_writable(path, force)


def is_artifact(path: str) -> bool:
    from splice.ir.atomic import is_artifact_dir

    return is_artifact_dir(Path(path))


def capture(path: str, ui: UI):
    """Capture a model (or load an artifact / .pt2) behind a progress line; (graph, seconds)."""
    import splice

    what = "load" if is_artifact(path) else "capture"
    start = time.perf_counter()
    with ui.phase(f"{what} {path}"):
        graph = splice.capture(path)
    return graph, time.perf_counter() - start
