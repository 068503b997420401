"""mergekit's ``tokenizer_source``: the merged model's vocabulary, and every input's token-indexed
tensors permuted onto it before the merge, so that models whose tokenizers differ (added tokens,
another order) merge token by token.

The output vocabulary is the base's tokenizer (``base``; the first model's without a base), a given
one (a model's, or a tokenizer directory), or ``union``: the base's tokens, then every other model's
tokens the base lacks, then their added (special) tokens, as mergekit's ``build_union_tokenizer``.
Tokens at or beyond a model's embedding rows are not that model's. Each input's embedding tables
and LM head (weight rows and bias: the tensors whose first axis is the vocabulary, found from the
graph, not by name) get one row per output token: the model's own where it has the token, else the
row every model lacking it shares (mergekit's ``PermutedVocabulary``): the one model that has it,
else the base's, else the average of the models that have it; a token no model has gets zeros.
"""
from __future__ import annotations

import tempfile
from collections.abc import Sequence

import torch

from splice.errors import ConfigError
from splice.ir.graph import Graph, set_attr
from splice.ir.select import op_kind
from splice.ir.weights import weight_args

WHO = "merge: tokenizer_source"


def vocabulary_tensors(graph: Graph) -> list[str]:
    """The stored tensors whose first axis is the vocabulary: the token embedding (the largest table
    an embedding reads with a graph input's ids: not position or segment tables) and the weight and
    bias of every linear with as many output rows (the LM head; a tied one once)."""
    tables = {}
    for node in graph.gm.graph.nodes:
        if op_kind(node) == "embedding" and getattr(node.args[1], "op", None) == "placeholder" and \
                getattr(node.args[0], "op", None) == "get_attr":
            tables[node.args[0].target] = graph.tensor(node.args[0].target).shape[0]
    if not tables:
        return []
    table = max(tables, key=tables.get)
    found = [table]
    for node in graph.gm.graph.nodes:
        if op_kind(node) == "linear" and weight_args(node):
            stored = [a.target for a in node.args if getattr(a, "op", None) == "get_attr"]
            if stored and graph.tensor(stored[0]).shape[0] == tables[table]:
                found += stored
    return list(dict.fromkeys(found))


def union_tokenizer(base, others: Sequence, rows: Sequence[int]):
    """mergekit's union: a copy of ``base`` with the other tokenizers' tokens it lacks added, then
    their added tokens (``rows``: each of ``[base, *others]``'s embedding rows)."""
    import transformers

    with tempfile.TemporaryDirectory() as tmp:  # a copy: adding tokens mutates a tokenizer
        base.save_pretrained(tmp)
        out = transformers.AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    have, added = set(base.get_vocab()), {}
    plain = []
    for tok, n in zip([base, *others], rows):
        special = {i: info for i, info in tok.added_tokens_decoder.items() if i < n}
        for token, i in sorted(tok.get_vocab().items(), key=lambda item: item[1]):
            if i < n and token not in have and i not in special:
                have.add(token)
                plain.append(token)
        for info in special.values():
            added.setdefault(info.content, info)
    out.add_tokens(plain)
    out.add_tokens([info for token, info in added.items() if token not in base.get_vocab()])
    return out


def permutation(out_vocab: dict[str, int], vocab: dict[str, int], rows: int) -> torch.Tensor:
    """For each output token id, the model's row of that token (-1: the model lacks it)."""
    perm = torch.full((len(out_vocab),), -1, dtype=torch.long)
    for token, i in out_vocab.items():
        j = vocab.get(token, -1)
        if 0 <= j < rows:
            perm[i] = j
    return perm


def permuted(tensors: Sequence[torch.Tensor], perms: Sequence[torch.Tensor], base: int) -> list[torch.Tensor]:
    """Every model's tensor with one row per output token (module docstring); ``base``: the index of
    the base model among them, -1 without one."""
    present = torch.stack([p >= 0 for p in perms])  # models x tokens
    rows = [t[p.clamp(min=0)] * (p >= 0).view(-1, *[1] * (t.dim() - 1)).to(t.dtype) for t, p in zip(tensors, perms)]
    count = present.sum(0)
    default = sum(rows) / count.clamp(min=1).view(-1, *[1] * (rows[0].dim() - 1)).to(rows[0].dtype)
    if base >= 0:
        use_base = (present[base] & (count > 1)).view(-1, *[1] * (rows[0].dim() - 1))
        default = torch.where(use_base, rows[base], default)
    return [torch.where(p.view(-1, *[1] * (r.dim() - 1)) >= 0, r, default) for r, p in zip(rows, perms)]


def align_vocabularies(graphs: Sequence[Graph], names: Sequence[str], tokenizers: Sequence, base: int, source,
                       given=None) -> tuple[list[Graph], object]:
    """Copies of ``graphs`` with their token-indexed tensors on the output vocabulary, and its
    tokenizer. ``source``: ``"base"``, ``"union"`` or an input's index; ``given``: the tokenizer to
    use instead (a directory's)."""
    targets = [vocabulary_tensors(g) for g in graphs]
    for t, name in zip(targets, names):
        if not t:
            raise ConfigError(f"{WHO}: input '{name}' has no embedding table to align")
    rows = [g.tensor(t[0]).shape[0] for g, t in zip(graphs, targets)]
    first = base if base >= 0 else 0
    if given is not None:
        out = given
    elif source == "union":
        out = union_tokenizer(tokenizers[first], [t for i, t in enumerate(tokenizers) if i != first],
                              [rows[first]] + [r for i, r in enumerate(rows) if i != first])
    else:
        out = tokenizers[first if source == "base" else source]
    vocab = out.get_vocab()
    perms = [permutation(vocab, t.get_vocab(), r) for t, r in zip(tokenizers, rows)]
    if len({len(t) for t in targets}) > 1:
        raise ConfigError(f"{WHO}: the inputs hold {sorted({len(t) for t in targets})} token-indexed tensors; "
                          "they differ in architecture")
    aligned = [g.copy() for g in graphs]
    for k in range(len(targets[0])):
        values = [g.tensor(t[k]).detach() for g, t in zip(graphs, targets)]
        for g, t, value in zip(aligned, targets, permuted(values, perms, base)):
            set_attr(g.gm, t[k], value.contiguous())
    return aligned, out
