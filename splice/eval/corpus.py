"""Calibration sources: text files, directories, JSONL and the built-in mix, each a list of documents.

``--calib`` takes ``PATH[:WEIGHT]`` (repeatable): a UTF-8 text file is one document; a ``.jsonl``
file gives one document per line's ``"text"``; a directory gives every text and ``.jsonl`` file
under it (hidden and binary files skipped); ``builtin`` is a general-domain mix assembled from
text this machine already has (``builtin_sources``: Python's help topics and standard-library
docstrings, licences, man pages, fortune files — whatever is found), never downloaded. Weights
say how many of the calibration samples each source gives (``splice.eval.data.calibration_data``).

Every bad input is a one-line ``SpliceError`` naming the file (and line): an unreadable or empty
file, a JSONL line that is not an object with a string ``text``, a directory without text, a
weight that is not a non-negative number, a mix whose weights sum to zero.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import re
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path

from splice.errors import ConfigError, SpliceError
from splice.eval.data import GPL3_PATH, read_text

BUILTIN = "builtin"
CHUNK_CHARS = 1 << 16  # documents are cut at line breaks into chunks of at most this many characters
BUILTIN_CHARS = 3 << 20  # characters each built-in source keeps, taken evenly from what it finds
LICENCES_DIR = Path(GPL3_PATH).parent
MAN_DIRS = [Path("/usr/share/man") / f"man{s}" for s in "1578"]
FORTUNES_DIR = Path("/usr/share/games/fortunes")


@dataclass(frozen=True)
class Chunk:
    """A piece of a document: the document's name and up to ``CHUNK_CHARS`` of its text."""

    document: str
    text: str


@dataclass(frozen=True)
class Source:
    """One calibration source: its name (a path or ``builtin:KIND``), weight and chunks in order."""

    name: str
    weight: float
    chunks: tuple[Chunk, ...]
    files: int = 1

    @property
    def documents(self) -> int:
        return len({c.document for c in self.chunks})

    @property
    def chars(self) -> int:
        return sum(len(c.text) for c in self.chunks)


def chunks(document: str, text: str) -> list[Chunk]:
    """``text`` cut at line breaks into ``Chunk``s of at most ``CHUNK_CHARS`` characters."""
    out, start = [], 0
    while start < len(text):
        end = len(text) if len(text) - start <= CHUNK_CHARS else text.rfind("\n", start, start + CHUNK_CHARS) + 1
        end = end if end > start else start + CHUNK_CHARS
        if text[start:end].strip():
            out.append(Chunk(document, text[start:end]))
        start = end
    return out


def parse_spec(spec: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` -> (path, weight); a path that exists is taken whole even with a colon."""
    path, sep, weight = spec.rpartition(":")
    if not sep or spec == BUILTIN or Path(spec).exists() or not re.fullmatch(r"[-+.\deE]+|inf|nan", weight):
        return spec, 1.0
    try:
        value = float(weight)
    except ValueError:
        raise ConfigError(f"--calib {spec}: weight '{weight}' is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"--calib {spec}: weight must be a non-negative number, got {weight}")
    return path, value


def jsonl_documents(path: Path) -> list[Chunk]:
    """One document per non-blank line's ``"text"`` (named ``path:LINE``)."""
    out = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpliceError(f"{path}:{lineno}: not JSON ({e.msg}); calibration JSONL lines are "
                              '{"text": "..."}') from None
        if not isinstance(row, dict) or "text" not in row:
            raise SpliceError(f'{path}:{lineno}: no "text" field; calibration JSONL lines are {{"text": "..."}}')
        if not isinstance(row["text"], str):
            raise SpliceError(f'{path}:{lineno}: "text" is {type(row["text"]).__name__}, not a string')
        out += chunks(f"{path}:{lineno}", row["text"])
    if not out:
        raise SpliceError(f"{path}: no text in any line")
    return out


def _text_or_none(path: Path) -> str | None:
    """A directory member's text, or None when it is not UTF-8 text (binary files are skipped)."""
    try:
        return read_text(path)
    except SpliceError:
        return None


def directory_documents(path: Path) -> tuple[list[Chunk], int]:
    """Every text and ``.jsonl`` file under ``path`` (sorted; hidden entries skipped), and the file count."""
    out, files = [], 0
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            member = Path(root) / name
            if not member.is_file():
                continue
            if member.suffix == ".jsonl":
                out += jsonl_documents(member)
                files += 1
            elif (text := _text_or_none(member)) is not None:
                out += chunks(str(member), text)
                files += 1
    if not out:
        raise SpliceError(f"{path}: no text file in the directory (looked for UTF-8 text and .jsonl files)")
    return out, files


def load_source(spec: str) -> list[Source]:
    """The sources ``spec`` (``PATH[:WEIGHT]`` or ``builtin[:WEIGHT]``) names: one, or the built-in mix."""
    name, weight = parse_spec(spec)
    if name == BUILTIN:
        found = builtin_sources()
        return [Source(s.name, weight / len(found), s.chunks, s.files) for s in found]
    path = Path(name)
    if path.is_dir():
        docs, files = directory_documents(path)
        return [Source(name, weight, tuple(docs), files)]
    if path.suffix == ".jsonl":
        return [Source(name, weight, tuple(jsonl_documents(path)))]
    return [Source(name, weight, tuple(chunks(name, read_text(path))))]


def load_sources(specs: list[str]) -> list[Source]:
    """Every ``--calib`` spec's sources; ConfigError when the weights do not sum to a positive number."""
    if not specs:
        raise ConfigError("--calib: no calibration source given")
    sources = [s for spec in specs for s in load_source(spec)]
    if not sum(s.weight for s in sources) > 0:
        raise ConfigError(f"--calib {' '.join(specs)}: the mix's weights sum to 0; give a source a positive weight")
    return sources


# ------------------------------------------------------------------------------ the built-in mix


def _spread(items: list, budget: int, size) -> list:
    """About ``budget``'s worth (by ``size``) of ``items``, taken evenly across them."""
    total = sum(size(x) for x in items)
    if total <= budget:
        return items
    keep = budget / total
    return [x for i, x in enumerate(items) if math.floor((i + 1) * keep) > math.floor(i * keep)]


def _source(name: str, docs: list[tuple[str, str]]) -> Source | None:
    """A built-in source of ``docs`` (name, text), at most ``BUILTIN_CHARS`` taken evenly."""
    docs = [d for d in docs if d[1].strip()]
    if not docs:
        return None
    kept = _spread(docs, BUILTIN_CHARS, lambda d: len(d[1]))
    return Source(f"{BUILTIN}:{name}", 1.0, tuple(c for doc, text in kept for c in chunks(doc, text)), len(kept))


_ROFF_ESCAPES = re.compile(r"\\f(\[[^]]*\]|\(..|.)|\\\((..)|\\\[[^]]*\]|\\[&%|^:]|\\s[-+]?\d")


def roff_text(source: str) -> str:
    """Readable text of a man page's roff: macro lines keep their words, escapes go."""
    lines = []
    for line in source.splitlines():
        if line.startswith((".\\\"", "'\\\"")) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            if len(parts) < 2 or parts[0] in ("TH", "so", "de", "ds", "nr", "if", "ie", "el", "ta", "ft", "ps"):
                continue
            line = parts[1].replace('"', "")
        lines.append(_ROFF_ESCAPES.sub("", line).replace("\\-", "-").replace("\\e", "\\"))
    return "\n".join(lines)


def _man_pages() -> list[tuple[str, str]]:
    pages = sorted(p for d in MAN_DIRS if d.is_dir() for p in d.iterdir() if p.suffix == ".gz" and p.is_file())
    pages = _spread(pages, 300, lambda p: 1)  # decompress only a spread of at most 300 pages
    out = []
    for page in pages:
        try:
            out.append((str(page), roff_text(gzip.decompress(page.read_bytes()).decode("utf-8"))))
        except (OSError, UnicodeDecodeError, EOFError):
            continue
    return out


_DOCSTRING = re.compile(r'(?:^|:\s*\n)[ \t]*[rRuU]?("""|\'\'\')(.*?)\1', re.S)


def _docstrings() -> list[tuple[str, str]]:
    """Each standard-library module's docstrings (module, class, function: the first triple-quoted
    string of the file or after a ``:`` line end), read with a regular expression (parsing is slow)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py")) + sorted(p for p in lib.glob("*/__init__.py")
                                               if p.parent.name not in ("test", "idlelib"))
    out = []
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        docs = [textwrap.dedent(m.group(2)).strip() for m in _DOCSTRING.finditer(source)]
        out.append((str(path), "\n\n".join(d for d in docs if d)))
    return out


def _help_topics() -> list[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions ship Python without its help topics
        return []
    return [(f"pydoc:{k}", topics[k]) for k in sorted(topics)]


def _files(directory: Path, skip=lambda p: False) -> list[tuple[str, str]]:
    if not directory.is_dir():
        return []
    members = sorted(p for p in directory.iterdir() if p.is_file() and not p.is_symlink() and not skip(p))
    return [(str(p), t) for p in members if (t := _text_or_none(p)) is not None]


def builtin_sources() -> list[Source]:
    """The general-domain mix from text this machine has: Python's help topics, standard-library
    docstrings, licences, man pages and fortune files (the ones found), equal weights."""
    found = [
        _source("python-help", _help_topics()),
        _source("python-docstrings", _docstrings()),
        _source("licences", _files(LICENCES_DIR)),
        _source("man-pages", _man_pages()),
        _source("fortunes", [(n, t.replace("\n%\n", "\n\n")) for n, t in
                             _files(FORTUNES_DIR, lambda p: p.suffix in (".dat", ".u8"))]),
    ]
    found = [s for s in found if s is not None]
    if not found:
        raise SpliceError("--calib builtin: no text found on this machine (Python's help topics, licences, "
                          "man pages); give a text file, directory or JSONL")
    return found
