"""Perplexity of a Graph's ``logits`` on a text, and a per-layer fidelity report.

``perplexity`` is the strided ("sliding window") evaluation of the Hugging Face perplexity
guide (https://huggingface.co/docs/transformers/perplexity): windows of ``seq_len`` tokens
start every ``stride`` tokens, and each window scores only the tokens no earlier window
scored, so every token is predicted from up to ``seq_len - stride`` tokens of context.
``stride == seq_len`` gives disjoint windows (the first token of each has no context and
is not scored). The count is exact: the guide's ``num_valid_tokens - batch_size`` shortcut
over-subtracts one token per overlapping window; here every scored token is counted once.

``layer_sqnr`` runs a reference and a test graph on the same inputs and compares the output
of every linear-kind node (``aten.linear``, ``splice::qlinear`` …) matched by module path:
SQNR in dB per layer, errors accumulated from all the layers before it (what the model
actually sees).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx

from splice.errors import ConfigError, SpliceError
from splice.eval.data import graph_inputs
from splice.ir.metrics import sqnr_from_energy
from splice.ir.select import module_path, op_kind
from splice.ir.tokenizer import graph_tokenizer


def _model_name(graph) -> str:
    return str(graph.source.get("name") or graph.source.get("path") or "the model")


def check_logits(graph) -> None:
    """SpliceError unless ``graph`` is a text model with a ``logits`` output."""
    if "logits" not in graph.output_names:
        raise SpliceError(f"{_model_name(graph)} has no 'logits' output (outputs: "
                          f"{', '.join(graph.output_names) or 'none'}); perplexity needs a language model")
    if "input_ids" not in graph.input_names:
        raise SpliceError(f"{_model_name(graph)} takes {', '.join(graph.input_names)}, not token ids; "
                          "perplexity needs a text model")


def tokenize(graph, text: str, tokenizer=None) -> torch.Tensor:
    """``text`` as token ids ``[1, T]`` (no special tokens), by ``tokenizer`` or the model's own."""
    if tokenizer is None:
        tokenizer = graph_tokenizer(graph, "perplexity")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long).reshape(1, -1)


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` per window, as the HF guide's loop: tokens
    ``first_scored..end-1`` are scored in window ``begin..end-1``; windows scoring nothing
    are dropped."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


def perplexity(graph, data: torch.Tensor | Sequence[int] | str, *, tokenizer=None, seq_len: int = 512,
               stride: int | None = None, batch_size: int = 1, max_tokens: int | None = None,
               progress: bool = False) -> dict[str, Any]:
    """Strided perplexity of ``graph``'s ``logits`` on ``data``: token ids (``[1, T]``,
    ``[T]`` or a list) or a text (tokenized by ``tokenizer``, default the model's own via
    ``splice.ir.tokenizer.graph_tokenizer(graph)``). ``stride`` defaults to ``seq_len``
    (disjoint windows); ``max_tokens`` keeps the first tokens only. Returns ``ppl``,
    ``nll`` (mean nats per scored token), ``tokens`` (scored), ``windows``, ``seq_len``,
    ``stride`` and ``text_tokens``."""
    stride = seq_len if stride is None else stride
    for opt, v in (("seq_len", seq_len), ("stride", stride), ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"perplexity: {opt} must be a positive integer, got {v}")
    if stride > seq_len:
        raise ConfigError(f"perplexity: stride {stride} is larger than seq_len {seq_len} (tokens would be skipped)")
    if max_tokens is not None and max_tokens < 2:
        raise ConfigError(f"perplexity: max_tokens must be >= 2, got {max_tokens}")
    check_logits(graph)
    if isinstance(data, str):
        ids = tokenize(graph, data, tokenizer)
    else:
        ids = torch.as_tensor(data, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ConfigError(f"perplexity: token ids must be [1, T] or [T], got shape {tuple(ids.shape)}")
    if max_tokens is not None:
        ids = ids[:, :max_tokens]
    n = ids.shape[1]
    if n < seq_len or n < 2:
        raise SpliceError(f"text too short: {n} tokens, need at least {max(seq_len, 2)} for one window "
                          f"of seq_len {seq_len}; use a longer text or a smaller seq_len")

    spans = windows(n, seq_len, stride)
    groups: list[list[tuple[int, int, int]]] = []  # consecutive windows of equal length, batch_size at most
    for span in spans:
        if groups and len(groups[-1]) < batch_size and groups[-1][0][1] - groups[-1][0][0] == span[1] - span[0]:
            groups[-1].append(span)
        else:
            groups.append([span])

    from tqdm import tqdm

    nll_sum, scored = 0.0, 0
    with torch.no_grad(), tqdm(total=len(spans), desc="perplexity", unit="window", disable=not progress) as bar:
        for group in groups:
            x = torch.cat([ids[:, b:e] for b, e, _ in group])
            logits = graph.run(*graph_inputs(graph, {"input_ids": x, "attention_mask": torch.ones_like(x)}))["logits"]
            for row, (b, e, first) in enumerate(group):
                # logits at position p predict token p+1: tokens first..e-1 use positions first-1..e-2
                pred = logits[row, first - 1 - b:e - 1 - b].float()
                nll = F.cross_entropy(pred, ids[0, first:e], reduction="none")
                nll_sum += float(nll.double().sum())
                scored += e - first
            bar.update(len(group))
    mean = nll_sum / scored
    return {"ppl": math.exp(mean), "nll": mean, "tokens": scored, "windows": len(spans),
            "seq_len": seq_len, "stride": stride, "text_tokens": n}


def geometric_mean(values: Sequence[float]) -> float:
    """``exp(mean(log v))`` of positive ``values`` (e.g. perplexities over several texts)."""
    if not values:
        raise ValueError("geometric_mean of no values")
    return math.exp(math.fsum(math.log(v) for v in values) / len(values))


# ------------------------------------------------------------------------ per-layer SQNR


class _Recorder(fx.Interpreter):
    """Runs a GraphModule and hands the output of each chosen node to ``sink(key, value)``."""

    def __init__(self, gm: fx.GraphModule, keys: dict[fx.Node, tuple[str, int]], sink):
        super().__init__(gm)
        self.keys, self.sink = keys, sink

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        key = self.keys.get(n)
        if key is not None and isinstance(out, torch.Tensor):
            self.sink(key, out)
        return out


def _layer_keys(graph, kinds: tuple[str, ...]) -> dict[fx.Node, tuple[str, int]]:
    """``(module path, occurrence)`` for every node of ``kinds`` (a module called twice has two)."""
    seen: dict[str, int] = defaultdict(int)
    keys = {}
    for node in graph.gm.graph.nodes:
        if op_kind(node) in kinds:
            path = module_path(node) or node.name
            keys[node] = (path, seen[path])
            seen[path] += 1
    return keys


def _as_inputs(graph, sample) -> tuple[torch.Tensor, ...]:
    if isinstance(sample, dict):
        sample = dict(sample)
        if "attention_mask" not in sample and "input_ids" in sample:
            sample["attention_mask"] = torch.ones_like(sample["input_ids"])
        return graph_inputs(graph, sample)
    if isinstance(sample, torch.Tensor):
        return (sample,)
    return tuple(sample)


def layer_sqnr(graph_ref, graph_test, samples: Iterable, *, kinds: tuple[str, ...] = ("linear",)) -> list[dict[str, Any]]:
    """Per-layer fidelity of ``graph_test`` against ``graph_ref``: both run on every sample
    (tuples of positional inputs, or dicts of ``input_ids``/``attention_mask``); outputs of
    the nodes of ``kinds`` (``linear`` also matches quantized/custom linear ops) are matched
    by module path. Returns one row per matched layer in the reference's order: ``path``,
    ``op_ref``, ``op_test``, ``sqnr_db`` (summed signal over summed noise across samples;
    ``inf`` when identical), ``max_abs`` and ``cosine`` (of the flattened outputs)."""
    ref_keys, test_keys = _layer_keys(graph_ref, kinds), _layer_keys(graph_test, kinds)
    ref_nodes = {k: n for n, k in ref_keys.items()}
    test_nodes = {k: n for n, k in test_keys.items()}
    common = [k for k in ref_nodes if k in test_nodes]
    if not common:
        raise SpliceError(f"layer_sqnr: no {'/'.join(kinds)} layer of {_model_name(graph_ref)} matches one of "
                          f"{_model_name(graph_test)} by module path")
    wanted = set(common)
    acc = {k: {"signal": 0.0, "noise": 0.0, "dot": 0.0, "test2": 0.0, "max_abs": 0.0} for k in common}
    n_samples = 0
    for sample in samples:
        ref_out: dict[tuple[str, int], torch.Tensor] = {}

        def keep(key, value):
            if key in wanted:
                ref_out[key] = value.detach()

        def compare(key, value):
            if key not in wanted:
                return
            r, t = ref_out.pop(key).double(), value.detach().double()
            if r.shape != t.shape:
                raise SpliceError(f"layer_sqnr: '{key[0]}' has output shape {tuple(t.shape)} in the test "
                                  f"model but {tuple(r.shape)} in the reference")
            a = acc[key]
            a["signal"] += float((r * r).sum())
            a["noise"] += float(((r - t) ** 2).sum())
            a["dot"] += float((r * t).sum())
            a["test2"] += float((t * t).sum())
            a["max_abs"] = max(a["max_abs"], float((r - t).abs().max()) if r.numel() else 0.0)

        with torch.no_grad():
            _Recorder(graph_ref.gm, ref_keys, keep).run(*_as_inputs(graph_ref, sample))
            _Recorder(graph_test.gm, test_keys, compare).run(*_as_inputs(graph_test, sample))
        n_samples += 1
    if n_samples == 0:
        raise SpliceError("layer_sqnr: no samples given")
    rows = []
    for key in common:
        a = acc[key]
        sqnr = sqnr_from_energy(a["signal"], a["noise"])
        denom = math.sqrt(a["signal"] * a["test2"])
        cos = a["dot"] / denom if denom > 0 else (1.0 if a["signal"] == a["test2"] == 0.0 else 0.0)
        path, i = key
        rows.append({"path": path if i == 0 else f"{path}#{i}", "op_ref": _op_name(ref_nodes[key]),
                     "op_test": _op_name(test_nodes[key]), "sqnr_db": sqnr, "max_abs": a["max_abs"],
                     "cosine": cos})
    return rows


def _op_name(node: fx.Node) -> str:
    return str(node.target).replace(".default", "")
