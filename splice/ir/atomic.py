"""Atomic writes: every file or directory splice writes appears whole or not at all.

``atomic_dir(path, force, write)`` runs ``write(tmp)`` on an empty temporary sibling directory and
renames it to ``path``; ``atomic_files(path, force, write)`` does the same for a file and the
siblings written with it (an ONNX model and its ``.data``). Both:

* refuse first, through ``check_writable(path, force)`` (which the CLI also calls before a long
  capture): an existing ``path`` without ``force``, a ``path`` that is a symbolic link, a directory
  that cannot be written (read-only, permission denied), a file inside a splice artifact directory;
* hold ``fcntl.flock`` on the sibling ``.NAME.lock`` while they write and rename, so concurrent
  saves to one path run one after another and the last one wins (the lock file is removed again);
* name the temporary ``.NAME.tmp-PID-XXXX``: a save killed by SIGKILL leaves one behind, and the
  next save to that path removes every temporary whose process is gone;
* turn disk full, read-only and permission errors (``OSError``; a failed write inside torch's C++
  zip writer is caught by ``failsafe_file``) into one-line ``OutputError``s naming the path, and
  remove the temporary and any parent directories they created, on errors and on Ctrl-C alike.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator

from splice.errors import OutputError

MANIFEST = "manifest.json"
ARTIFACT_FORMAT = "splice-artifact"
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def is_artifact_dir(path: Path) -> bool:
    """Whether directory ``path`` holds a splice artifact manifest."""
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == ARTIFACT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_writable(path: str | os.PathLike, force: bool) -> Path:
    """Refuse an output ``path`` that cannot be written cleanly, before any work is done."""
    path = Path(path)
    if path.is_symlink():
        raise OutputError(f"{path}: is a symbolic link; refusing to write through it (give the real path)")
    if path.exists() and not force:
        raise OutputError(f"{path}: already exists; use --force (force=True) to overwrite")
    if is_artifact_dir(path.parent):
        raise OutputError(f"{path}: is inside the splice artifact {path.parent}; write it elsewhere")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write in {parent} (read-only or permission denied)")
    return path


class _FailsafeSink(io.RawIOBase):
    """A file that records its first write error instead of raising it: torch's C++ zip writer
    aborts the process when a write fails (its destructor retries the write and throws)."""

    def __init__(self, f) -> None:
        super().__init__()
        self.f, self.error = f, None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.error is None:
            try:
                self.f.write(data)
            except OSError as e:
                self.error = e
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence) if self.error is None else 0

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        if self.error is None:
            with contextlib.suppress(OSError):
                self.f.flush()


@contextlib.contextmanager
def failsafe_file(path: Path) -> Iterator[io.RawIOBase]:
    """Open ``path`` for a writer in C++ (``torch.save``, ``torch.export.save``); a failed write
    is raised as its ``OSError`` once the writer is done, instead of aborting the process."""
    with open(path, "wb") as f:
        sink = _FailsafeSink(f)
        yield sink
        if sink.error is not None:
            raise sink.error
        f.flush()
        os.fsync(f.fileno())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_temps(path: Path) -> None:
    """Remove the temporaries of saves to ``path`` whose process is gone (killed mid-save)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-(\d+)-\w+")
    for entry in path.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if m and not _alive(int(m.group(2))):
            _remove(entry)


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``.NAME.lock`` beside ``path``; the file is removed on release.
    A lock file unlinked by its previous holder while we waited is not the lock any more: retry."""
    lock = path.with_name(f".{path.name}.lock")
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def _make_parents(parent: Path) -> list[Path]:
    """Create ``parent`` and its missing ancestors; return the ones created (outermost first)."""
    created = [p for p in reversed([parent, *parent.parents]) if not p.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    return created


def _write_error(path: Path, e: OSError) -> OutputError:
    reason = e.strerror or type(e).__name__
    return OutputError(f"{path}: cannot write: {reason} (nothing was written)")


@contextlib.contextmanager
def _staged(path: Path, force: bool) -> Iterator[Path]:
    """A fresh temporary directory beside ``path``, under the lock; removed afterwards."""
    check_writable(path, force)
    created: list[Path] = []
    ok = False
    try:
        created = _make_parents(path.parent)
        with _locked(path):
            _remove_dead_temps(path)
            check_writable(path, force)  # another save may have finished while we waited
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
            tmp.mkdir()
            try:
                yield tmp
                ok = True
            finally:
                _remove(tmp)
    except OSError as e:
        if e.errno in _WRITE_ERRNOS:
            raise _write_error(path, e) from None
        raise
    finally:
        for p in reversed(created) if not ok else ():
            with contextlib.suppress(OSError):
                p.rmdir()


def _replace(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest``, replacing whatever is there (a directory is moved aside first)."""
    if dest.is_dir() and not dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(dest, old)
        os.replace(src, dest)
        _remove(old)
    else:
        os.replace(src, dest)


def atomic_dir(path: str | os.PathLike, force: bool, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmpdir)`` and move the directory to ``path`` only if it succeeds."""
    path = Path(path)
    with _staged(path, force) as tmp:
        out = tmp / path.name
        out.mkdir()
        write(out)
        _replace(out, path)
    return path


def atomic_files(path: str | os.PathLike, force: bool, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmpdir)`` (which writes ``tmpdir / path.name`` and any siblings, such as
    ``NAME.data``) and move every file it wrote beside ``path``, ``path`` itself last."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise OutputError(f"{path}: is a directory; give a file name")
    with _staged(path, force) as tmp:
        write(tmp)
        if not (tmp / path.name).is_file():
            raise OutputError(f"{path}: the writer produced no {path.name}")
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name == path.name):
            _replace(entry, path.with_name(entry.name))
    return path
