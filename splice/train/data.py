"""Training data: what each loss reads, tokenized once, served as deterministic micro-batches.

Formats (``data`` is a path or the records themselves):

* ``causal_lm``: a UTF-8 text file or a list of strings (joined by blank lines). The text is
  tokenized by the model's tokenizer (no special tokens) and cut into non-overlapping
  ``seq_len``-token windows; the tail shorter than a window is dropped.
* ``masked_lm``: text as for ``causal_lm``; every batch is masked BERT's way (``ir/loss.py``'s
  ``mask_tokens``, the tokenizer's mask token): micro-batch ``k`` by a seed of ``(seed, k)``,
  evaluation batches by their position alone, so every model is judged on the same masked tokens.
* ``embedding``: a JSONL file (or a list of dicts), one ``{"anchor": str, "positive": str}`` per
  line: pairs of texts that should embed close (sentence-transformers' (anchor, positive) pairs).
* ``classification``: a JSONL file (or a list of dicts), one ``{"text": str, "label": int}`` per line.

Texts of the JSONL formats are tokenized with special tokens, truncated to ``seq_len`` and padded
per batch. Micro-batch ``k`` is a pure function of ``(k, batch_size, seed)``: examples are drawn
from a fresh permutation per epoch (seeded by ``seed + epoch``), so a resumed run sees exactly
the batches an uninterrupted one would. Every bad file gives a one-line ``SpliceError`` naming it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass

import torch

from splice.errors import SpliceError
from splice.eval.data import read_text
from splice.ir.loss import mask_tokens, masking_spec

_JSONL_FIELDS = {"embedding": {"anchor": str, "positive": str}, "classification": {"text": str, "label": int}}


@dataclass
class Examples:
    """Tokenized examples: ``rows[i]`` is a list of token-id lists (one per text of example i)."""

    source: str
    rows: list[list[list[int]]]
    labels: list[int] | None
    pad_id: int
    masking: dict | None = None  # masked_lm: ``masking_spec`` of the tokenizer

    def masked(self, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """``batch`` with its tokens masked (``labels``: the masked tokens' ids) when the examples are masked_lm's."""
        if self.masking is None:
            return batch
        ids, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], self.masking,
                                  torch.Generator().manual_seed(seed))
        return {**batch, "input_ids": ids, "labels": labels}

    def __len__(self) -> int:
        return len(self.rows)

    def digest(self) -> str:
        """A fingerprint of the tokens and labels (a resumed run must train on the same data)."""
        return hashlib.sha256(json.dumps([self.rows, self.labels]).encode()).hexdigest()[:16]

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """``input_ids``/``attention_mask`` [n_texts * len(indices), L] (text j of every example
        after text j-1 of all of them: anchors then positives), right-padded; ``labels`` if any."""
        seqs = [self.rows[i][j] for j in range(len(self.rows[indices[0]])) for i in indices]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, :len(s)] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if self.labels is not None:
            out["labels"] = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)
        return out

    def micro_batch(self, k: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``k`` of an endless stream of per-epoch permutations."""
        indices: list[int] = []
        n = len(self)
        while len(indices) < batch_size:
            epoch, pos = divmod(k * batch_size + len(indices), n)
            take = min(batch_size - len(indices), n - pos)
            indices += _permutation(n, seed + epoch)[pos:pos + take]
        return self.masked(self.batch(indices), seed * 1_000_003 + k)

    def in_order(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Every example once, in order (for evaluation)."""
        return [self.masked(self.batch(list(range(i, min(i + batch_size, len(self))))), i)
                for i in range(0, len(self), batch_size)]


@functools.lru_cache(maxsize=8)
def _permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()



def _name(data) -> str:
    return os.fspath(data) if isinstance(data, (str, os.PathLike)) else "<data list>"


def _pad_id(tokenizer) -> int:
    return int(getattr(tokenizer, "pad_token_id", None) or 0)


def text_windows(data, tokenizer, seq_len: int) -> Examples:
    """``causal_lm`` data: non-overlapping ``seq_len``-token windows of a text file / list of strings."""
    name = _name(data)
    if isinstance(data, (str, os.PathLike)):
        text = read_text(data)
    elif isinstance(data, (list, tuple)) and data and all(isinstance(t, str) for t in data):
        text = "\n\n".join(data)
    else:
        raise SpliceError("train: causal_lm and masked_lm data must be a text file path or a non-empty list of strings")
    if not text.strip():
        raise SpliceError(f"{name}: no text")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n < 1:
        raise SpliceError(f"{name}: text too short: {len(ids)} tokens, need at least seq_len = {seq_len} "
                          "for one window")
    return Examples(name, [[ids[i * seq_len:(i + 1) * seq_len]] for i in range(n)], None, _pad_id(tokenizer))


def _records(data, loss: str) -> list[tuple[str, dict]]:
    """(where, record) of a JSONL file or a list of dicts, each checked against the loss's fields."""
    if isinstance(data, (str, os.PathLike)):
        lines = read_text(data).splitlines()
        items = []
        for i, line in enumerate(lines, 1):
            if line.strip():
                try:
                    items.append((f"{os.fspath(data)}:{i}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise SpliceError(f"{os.fspath(data)}:{i}: not a JSON line ({e.msg})") from None
    elif isinstance(data, (list, tuple)):
        items = [(f"record {i}", r) for i, r in enumerate(data)]
    else:
        raise SpliceError(f"train: {loss} data must be a JSONL file path or a list of dicts")
    if not items:
        raise SpliceError(f"{_name(data)}: no records")
    fields = _JSONL_FIELDS[loss]
    for where, rec in items:
        ok = isinstance(rec, dict) and all(isinstance(rec.get(k), t) and not isinstance(rec.get(k), bool)
                                           for k, t in fields.items())
        if not ok:
            want = ", ".join(f'"{k}": {t.__name__}' for k, t in fields.items())
            raise SpliceError(f"{where}: expected a JSON object {{{want}}} for loss={loss}")
    return items


def jsonl_examples(data, tokenizer, seq_len: int, loss: str) -> Examples:
    """``embedding`` / ``classification`` data (see the module docstring)."""
    items = _records(data, loss)
    text_keys = [k for k, t in _JSONL_FIELDS[loss].items() if t is str]

    def encode(text: str) -> list[int]:
        ids = tokenizer(text, truncation=True, max_length=seq_len)["input_ids"]
        return list(ids[:seq_len]) or [_pad_id(tokenizer)]

    rows = [[encode(rec[k]) for k in text_keys] for _, rec in items]
    labels = [rec["label"] for _, rec in items] if loss == "classification" else None
    if labels is not None and min(labels) < 0:
        where = next(w for w, r in items if r["label"] < 0)
        raise SpliceError(f"{where}: label must be >= 0")
    return Examples(_name(data), rows, labels, _pad_id(tokenizer))


def load_examples(data, loss: str, tokenizer, seq_len: int) -> Examples:
    if loss == "causal_lm":
        return text_windows(data, tokenizer, seq_len)
    if loss == "masked_lm":
        examples = text_windows(data, tokenizer, seq_len)
        examples.masking = masking_spec(tokenizer)
        return examples
    return jsonl_examples(data, tokenizer, seq_len, loss)
