"""Calibration samples for a text model from ``splice.eval.corpus`` sources, sized to the model.

``calibration_data`` splits the samples between the sources by weight and draws each source's
windows one per equal stretch of its text (they cover all of it, not a prefix); the returned
``Calibration`` carries a record (sources, samples, tokens, documents used) that every calibrated
pass's history entry keeps. ``calibration_size`` gives the defaults: enough tokens per input
feature of the widest linear layer that its Hessian is well conditioned (docs/calibration.md).
"""
from __future__ import annotations

import bisect
import math
import random

import torch

from splice.errors import ConfigError, SpliceError
from splice.eval.corpus import Source, chunks
from splice.eval.data import graph_inputs
from splice.ir.calibration import Calibration, widest_linear
from splice.ir.tokenizer import graph_tokenizer

DEFAULT_SEQ_LEN = 512
DEFAULT_TOKENS_PER_FEATURE = 32  # calibration tokens per input feature of the widest layer (docs/calibration.md)
MIN_SAMPLES, MAX_SAMPLES = 16, 512
CHARS_PER_TOKEN = 16  # text read per needed token from a large source (~4x what the windows need)
MAX_LISTED = 64  # document names listed per source in the record


def text_calibration(graph, text: str, n_samples: int | None = None, seq_len: int | None = None,
                     tokenizer=None, seed: int = 0) -> Calibration:
    """Calibration batches for ``graph`` from one ``text`` (see ``calibration_data``)."""
    return calibration_data(graph, [Source("text", 1.0, tuple(chunks("text", text)))], n_samples, seq_len,
                            tokenizer=tokenizer, seed=seed)


def calibration_size(graph, n_samples: int | None = None, seq_len: int | None = None) -> tuple[int, int]:
    """``(n_samples, seq_len)`` with defaults sized to ``graph``: windows of ``DEFAULT_SEQ_LEN`` tokens
    (fewer when the model has fewer positions) and enough of them for ``DEFAULT_TOKENS_PER_FEATURE``
    tokens per input feature of the widest linear layer, between ``MIN_SAMPLES`` and ``MAX_SAMPLES``."""
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, graph.source.get("max_positions") or DEFAULT_SEQ_LEN)
    if n_samples is None:
        widest = widest_linear(graph)
        want = math.ceil(DEFAULT_TOKENS_PER_FEATURE * (widest[1] if widest else 0) / seq_len)
        n_samples = min(MAX_SAMPLES, max(MIN_SAMPLES, want))
    for opt, v in (("n_samples", n_samples), ("seq_len", seq_len)):
        if v < 1:
            raise ConfigError(f"calibration: {opt} must be >= 1, got {v}")
    return n_samples, seq_len


def calibration_data(graph, sources, n_samples: int | None = None, seq_len: int | None = None, *,
                     tokenizer=None, seed: int = 0) -> Calibration:
    """Calibration samples for ``graph`` from ``sources`` (``splice.eval.corpus.Source``s): each
    source gives a share of the ``n_samples`` windows of ``seq_len`` tokens by its weight, drawn one
    per equal stretch of the source's text (so they cover all of it, not a prefix), tokenized by
    ``tokenizer`` (default the model's own). Sizes default to ``calibration_size``; with the default
    count a source too short for its share gives the windows it has (an explicit ``n_samples`` is
    a demand: too little text is an error). The result's ``record`` lists each source with its
    samples, tokens and documents used."""
    if "input_ids" not in graph.input_names:
        raise SpliceError(f"calibration: {graph.source.get('name', 'the model')} takes "
                          f"{', '.join(graph.input_names)}, not token ids; text calibration needs a text model")
    demanded = n_samples is not None
    n_samples, seq_len = calibration_size(graph, n_samples, seq_len)
    tokenizer = tokenizer or graph_tokenizer(graph, "calibration")
    rng = random.Random(seed)
    samples, listed = [], []
    for source, n in zip(sources, _shares(n_samples, [s.weight for s in sources])):
        windows, used = _source_windows(tokenizer, source, n, seq_len, rng, demanded) if n else ([], [])
        samples += windows
        listed.append({"name": source.name, "weight": source.weight, "samples": len(windows),
                       "tokens": len(windows) * seq_len, "documents_used": len(used), "documents": source.documents,
                       "files": source.files, "used": used[:MAX_LISTED]})
    batches = [graph_inputs(graph, {"input_ids": w, "attention_mask": torch.ones_like(w)})
               for w in torch.tensor(samples, dtype=torch.long).split(1)]
    return Calibration(batches, {"samples": len(samples), "seq_len": seq_len, "tokens": len(samples) * seq_len,
                                 "documents": sum(s["documents_used"] for s in listed), "seed": seed,
                                 "sources": listed})


def _shares(n: int, weights: list[float]) -> list[int]:
    """``n`` split by ``weights`` (largest remainders)."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    out = [math.floor(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: out[i] - exact[i])[:n - sum(out)]:
        out[i] += 1
    return out


def _token_stream(tokenizer, source, n: int, seq_len: int,
                  rng: random.Random) -> tuple[list[int], list[int], list[str]]:
    """Token ids of ``source`` (chunks joined by a blank line), the offset where each chunk starts
    and its document's name, for ``n`` windows of ``seq_len``. Chunks are read in a random order
    until at least ``n`` of them and about ``CHARS_PER_TOKEN`` characters per needed token are read
    (more while that gives too few tokens), then kept in source order: a large source is tokenized
    only in part, and its windows still come from across it."""
    order = list(range(len(source.chunks)))
    rng.shuffle(order)
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    need = n * seq_len
    picked, budget, tokens = [], CHARS_PER_TOKEN * need, {}
    while True:
        chars = sum(len(source.chunks[i].text) for i in picked)
        while len(picked) < len(order) and (chars < budget or len(picked) < n):
            picked.append(order[len(picked)])
            chars += len(source.chunks[picked[-1]].text)
        for i in picked:
            if i not in tokens:
                tokens[i] = tokenizer(source.chunks[i].text, add_special_tokens=False)["input_ids"] + sep
        if sum(map(len, tokens.values())) >= need or len(picked) == len(order):
            break
        budget *= 2
    ids, starts, names = [], [], []
    for i in sorted(picked):
        starts.append(len(ids))
        names.append(source.chunks[i].document)
        ids += tokens[i]
    return ids, starts, names


def _source_windows(tokenizer, source, n: int, seq_len: int, rng: random.Random,
                    demanded: bool) -> tuple[list, list[str]]:
    """``n`` windows of ``seq_len`` tokens from ``source`` (fewer when it is too short and the count
    is not ``demanded``), one per equal stretch of its token stream, and the names of the
    documents they overlap."""
    ids, starts, names = _token_stream(tokenizer, source, n, seq_len, rng)
    if len(ids) < n * seq_len:
        if demanded or len(ids) < seq_len:
            raise SpliceError(f"calibration: {source.name} has {len(ids):,} tokens, need {n * seq_len:,} "
                              f"({n} samples x {seq_len} tokens); give more text or fewer/shorter samples")
        n = len(ids) // seq_len
    stretch = len(ids) // n
    windows, used = [], []
    for k in range(n):
        begin = k * stretch + rng.randrange(stretch - seq_len + 1)
        windows.append(ids[begin:begin + seq_len])
        first, last = bisect.bisect_right(starts, begin) - 1, bisect.bisect_right(starts, begin + seq_len - 1) - 1
        used += [name for name in names[first:last + 1] if name not in used]
    return windows, used
