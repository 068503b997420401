"""The tokenizer a graph carries: resolved once at capture, loaded once per process.

A frontend that knows where a model's tokenizer lives records it in the graph's source as
``source["tokenizer"] = {"path": DIR, "gguf_file": NAME | None}`` (an HF directory, or the GGUF
file that embeds it); the source survives ``copy`` and save/load, so an artifact keeps it.
``graph_tokenizer`` is the one accessor eval and train use: no layer above ``ir`` finds a
tokenizer through a frontend again. transformers is imported only when a tokenizer is loaded.

A tokenizer no model directory holds (a merge's union vocabulary) is ``embedded``: an artifact
saves its files beside the program and, loaded, records the artifact's own directory.
"""
from __future__ import annotations

import functools

from splice.errors import SpliceError


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja")


def tokenizer_source(path: str, gguf_file: str | None = None, embedded: bool = False) -> dict:
    """What a frontend records under ``source["tokenizer"]`` (``embedded``: module docstring)."""
    return {"path": path, "gguf_file": gguf_file, **({"embedded": True} if embedded else {})}


def tokenizer_files(directory: str) -> dict[str, str]:
    """The tokenizer files (``TOKENIZER_FILES``) present in ``directory``: name -> path."""
    from pathlib import Path

    return {name: str(Path(directory) / name) for name in TOKENIZER_FILES if (Path(directory) / name).is_file()}


def embedded_files(source: dict) -> dict[str, str]:
    """The files of an embedded tokenizer (name -> path) that an artifact of ``source`` stores."""
    spec = source.get("tokenizer") or {}
    return tokenizer_files(spec["path"]) if spec.get("embedded") else {}


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str, gguf_file: str | None = None):
    """The tokenizer saved at ``path`` (an HF directory; with ``gguf_file``, the GGUF file there), cached."""
    import transformers

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, **kw)


def graph_tokenizer(graph, who: str = "tokenizer"):
    """The tokenizer recorded with ``graph`` (cached); a one-line SpliceError naming ``who`` and the
    path when there is none or it does not load."""
    source = graph.source
    spec = source.get("tokenizer")
    if not spec:
        raise SpliceError(f"{who}: model from {source.get('kind', '?')} source has no tokenizer; "
                          "capture an HF directory or GGUF file, or pass a tokenizer")
    try:
        return load_tokenizer(spec["path"], spec.get("gguf_file"))
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SpliceError(f"{who}: cannot load the tokenizer of {spec['path']}: {reason}") from e
