"""Text for calibration and perplexity: reading files, built-in corpora, token windows.

``read_text`` turns every bad file into a one-line ``SpliceError`` naming the path.
``builtin_text`` offers two corpora that need no download: ``"gpl3"`` (the GPL-3
licence shipped by Debian/Ubuntu) and ``"pydoc"`` (Python's own help topics).
``token_batches`` cuts non-overlapping ``seq_len`` windows from the tokenised text.
"""

from __future__ import annotations

import os
import random

import torch

from splice.errors import ConfigError, SpliceError

GPL3_PATH = "/usr/share/common-licenses/GPL-3"
BUILTIN_TEXTS = ("gpl3", "pydoc")


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of ``path``; SpliceError if missing, unreadable, empty or binary."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise SpliceError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SpliceError(f"{path}: is a directory, expected a text file") from None
    except OSError as e:
        raise SpliceError(f"{path}: cannot read ({e.strerror or e})") from None
    if not raw.strip():
        raise SpliceError(f"{path}: file is empty")
    if b"\x00" in raw:
        raise SpliceError(f"{path}: not a text file (contains NUL bytes)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpliceError(f"{path}: not a UTF-8 text file (undecodable byte at offset {e.start})") from None


def builtin_text(name: str) -> str:
    """A built-in corpus: ``"gpl3"`` or ``"pydoc"``."""
    if name == "gpl3":
        return read_text(GPL3_PATH)
    if name == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    raise SpliceError(f"unknown built-in text {name!r}; choose from {', '.join(BUILTIN_TEXTS)}")


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256, matching the zoo's text models)."""

    vocab_size = 256

    def __call__(self, text: str, add_special_tokens: bool = False, **_) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def token_batches(tokenizer, text: str, n_samples: int, seq_len: int, seed: int = 0,
                  batch_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """``n_samples`` non-overlapping ``seq_len``-token windows of ``text``, picked at
    random (by ``seed``) and kept in text order, grouped into dicts of ``input_ids`` and
    ``attention_mask`` of shape [batch_size, seq_len] (the last may be smaller).

    ``tokenizer`` is any HF-style callable: ``tokenizer(text, add_special_tokens=False)
    ["input_ids"]``.
    """
    for opt, v in (("n_samples", n_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if v < 1:
            raise ConfigError(f"{opt} must be >= 1, got {v}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = n_samples * seq_len
    if len(ids) < need:
        raise SpliceError(f"calibration text has {len(ids)} tokens, need {need} "
                          f"({n_samples} samples x {seq_len} tokens)")
    n_windows = len(ids) // seq_len
    starts = sorted(random.Random(seed).sample(range(n_windows), n_samples))
    windows = torch.tensor([ids[s * seq_len:(s + 1) * seq_len] for s in starts], dtype=torch.long)
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)}
            for w in windows.split(batch_size)]


def split_text(text: str, held_out_fraction: float) -> tuple[str, str]:
    """``(train, held_out)``: the last ``held_out_fraction`` of ``text`` is held out, cut
    at the nearest line break within 5% of the split point (else at the exact point)."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ConfigError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    cut = round(len(text) * (1.0 - held_out_fraction))
    before, after = text.rfind("\n", 0, cut), text.find("\n", cut)
    slack = max(64, len(text) // 20)
    candidates = [i + 1 for i in (before, after) if 0 <= i < len(text) - 1 and abs(i + 1 - cut) <= slack]
    if candidates:
        cut = min(candidates, key=lambda i: abs(i - cut))
    train, held = text[:cut], text[cut:]
    if not train.strip() or not held.strip():
        raise SpliceError(f"text of {len(text)} characters is too short to hold out "
                          f"{held_out_fraction:g} of it")
    return train, held


def graph_inputs(graph, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """A tokenized batch as the graph's positional inputs (token types zero, positions 0..S-1)."""
    ids = batch["input_ids"]
    row = []
    for name in graph.input_names:
        if name in batch:
            row.append(batch[name])
        elif name == "token_type_ids":
            row.append(torch.zeros_like(ids))
        elif name == "position_ids":
            row.append(torch.arange(ids.shape[1]).expand_as(ids))
        else:
            raise SpliceError(f"calibration: cannot build model input '{name}' from text")
    return tuple(row)
