"""Progress for every phase a user waits for, on stderr: a status line with elapsed time, or a tqdm bar.

    with phase("capture ./llama"):            # 'capture ./llama … 12 s' redrawn live, then 'capture ./llama: 14.2 s'
        ...
    for block in track(blocks, "quantize.gptq", unit="block"):   # a tqdm bar
        ...

Shown when the stream is a terminal; ``configure(enabled=False)`` (the CLI's ``--quiet``) silences
everything, ``configure(enabled=True)`` shows plain lines on a pipe too. Output goes to the stream
given to ``configure`` (the CLI passes the real stderr before it mutes library chatter), else to
``sys.stderr``. A phase that fails or is interrupted clears its line and leaves nothing behind, so
an error stays the last line. A floor utility: it imports nothing from splice.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")
_TICK_S = 0.5
_CLEAR = "\r\x1b[K"
_settings: dict = {"enabled": None, "stream": None}
_lock = threading.Lock()
_active: list["_Status"] = []  # open phases, innermost last; only the innermost is drawn
_bars = [0]  # tqdm bars open (status lines pause while a bar draws)


def configure(*, enabled: bool | None = None, stream: TextIO | None = None) -> None:
    """``enabled``: None = on a terminal only, False = silent (``--quiet``), True = always."""
    _settings.update(enabled=enabled, stream=stream)


def _stream() -> TextIO:
    return _settings["stream"] or sys.stderr


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def enabled() -> bool:
    """Whether progress is shown now (library code may pass this as a ``progress=`` flag)."""
    if _settings["enabled"] is not None:
        return _settings["enabled"]
    return _is_terminal(_stream())


def elapsed(seconds: float) -> str:
    """``4.2 s``, ``3 min 07 s``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


class _Status:
    """One phase's line: redrawn every tick on a terminal, a start line on a pipe."""

    def __init__(self, desc: str, stream: TextIO):
        self.desc, self.stream, self.live = desc, stream, _is_terminal(stream)
        self.start = time.perf_counter()
        self.done = threading.Event()

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(text)
            self.stream.flush()

    def open(self) -> None:
        with _lock:
            _active.append(self)
            if not self.live:
                self._write(f"{self.desc} …\n")
        if self.live:
            threading.Thread(target=self._tick, name="splice-progress", daemon=True).start()

    def _tick(self) -> None:
        while not self.done.wait(_TICK_S):
            with _lock:
                if _active and _active[-1] is self and not _bars[0] and not self.done.is_set():
                    self._write(f"{_CLEAR}{self.desc} … {elapsed(time.perf_counter() - self.start)}")

    def close(self, ok: bool) -> None:
        self.done.set()
        with _lock:
            _active.remove(self)
            clear = _CLEAR if self.live else ""
            self._write(f"{clear}{self.desc}: {elapsed(time.perf_counter() - self.start)}\n" if ok else clear)


@contextlib.contextmanager
def phase(desc: str, *, show: bool = True) -> Iterator[None]:
    """Show ``desc`` with its elapsed time while the block runs, and its duration when it ends.
    ``show=False`` (a caller's own ``progress=False``) shows nothing."""
    if not (show and enabled()):
        yield
        return
    status = _Status(desc, _stream())
    status.open()
    ok = False
    try:
        yield
        ok = True
    finally:
        status.close(ok)


def track(iterable: Iterable[T], desc: str, *, total: int | None = None, unit: str = "it",
          show: bool = True) -> Iterator[T]:
    """Iterate ``iterable`` behind a tqdm bar named ``desc`` (plain iteration when progress is off
    or ``show`` is False)."""
    if not (show and enabled()):
        yield from iterable
        return
    from tqdm import tqdm

    stream = _stream()
    with _lock:
        _bars[0] += 1
        if _is_terminal(stream) and _active:
            stream.write(_CLEAR)
    try:
        yield from tqdm(iterable, desc=desc, total=total, unit=unit, file=stream, dynamic_ncols=True,
                        mininterval=_TICK_S if _is_terminal(stream) else 10.0)
    finally:
        with _lock:
            _bars[0] -= 1
