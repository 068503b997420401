"""What calibration data a pass saw, and whether there is enough of it.

``Calibration`` is the list of sample tuples a pass receives (``PassContext.calibration``) with a
``record`` of where they came from (sources, documents, tokens); the pipeline writes the record
into every calibrated pass's history entry, so an artifact's manifest says what it was
calibrated on. A plain list of samples works too: its record says what the tensors show.

Calibrated solvers (GPTQ and its family) invert each layer's input Hessian ``XᵀX``. With fewer
token rows than the layer has input features it is singular; with few rows per feature the
solution fits the calibration text and does not carry to other text (docs/calibration.md has
the measurements). ``check_size`` refuses fewer than ``MIN_TOKENS_PER_FEATURE`` tokens per input
feature of the widest linear layer and warns below ``TOKENS_PER_FEATURE_FLOOR``.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

from splice.errors import ConfigError, SpliceWarning
from splice.ir.select import module_path

MIN_TOKENS_PER_FEATURE = 1
TOKENS_PER_FEATURE_FLOOR = 16


class Calibration(list):
    """Calibration samples (tuples of a graph's positional inputs) and their ``record``."""

    def __init__(self, samples=(), record: dict[str, Any] | None = None):
        super().__init__(samples)
        self.record = dict(record or {})


def count_tokens(calibration) -> int | None:
    """Tokens in ``calibration``: the elements of each sample's first 2-D integer input (token ids),
    or None when the samples hold no token ids (images, features)."""
    total = 0
    for sample in calibration:
        ids = next((t for t in sample if isinstance(t, torch.Tensor) and t.dim() == 2
                    and not t.dtype.is_floating_point and t.dtype != torch.bool), None)
        if ids is None:
            return None
        total += ids.numel()
    return total


def widest_linear(graph) -> tuple[str, int] | None:
    """``(module path, input features)`` of the float linear layer with the most input features."""
    best = None
    for node in graph.gm.graph.nodes:
        if node.target is torch.ops.aten.linear.default and node.args[1].op == "get_attr":
            k = graph.tensor(node.args[1].target).shape[-1]
            if best is None or k > best[1]:
                best = (module_path(node) or node.name, k)
    return best


def calibration_record(graph, calibration) -> dict[str, Any]:
    """``calibration``'s record completed with its sample and token counts and the tokens per
    input feature of ``graph``'s widest linear layer."""
    record = dict(getattr(calibration, "record", None) or {})
    record.setdefault("samples", len(calibration))
    tokens = count_tokens(calibration)
    if tokens is not None:
        record.setdefault("tokens", tokens)
    if "sources" not in record:
        record["sources"] = [{"name": "samples given by the caller"}]
    widest = widest_linear(graph)
    if tokens is not None and widest is not None:
        record["widest_layer"] = {"path": widest[0], "in_features": widest[1]}
        record["tokens_per_feature"] = round(tokens / widest[1], 2)
    return record


def check_size(graph, calibration, pass_name: str) -> None:
    """Refuse ``calibration`` with fewer tokens than ``graph``'s widest linear layer has input
    features (one-line ConfigError naming ``pass_name`` and the layer); warn (``SpliceWarning``)
    below ``TOKENS_PER_FEATURE_FLOOR`` tokens per feature. Samples without token ids pass."""
    tokens, widest = count_tokens(calibration), widest_linear(graph)
    if tokens is None or widest is None:
        return
    path, k = widest
    if tokens < MIN_TOKENS_PER_FEATURE * k:
        raise ConfigError(f"{pass_name}: {tokens:,} calibration tokens, fewer than the {k:,} input features of "
                          f"the widest layer '{path}' (its input Hessian would be singular); give at least "
                          f"{MIN_TOKENS_PER_FEATURE * k:,} tokens (more or longer samples)")
    if tokens < TOKENS_PER_FEATURE_FLOOR * k:
        warnings.warn(SpliceWarning(
            f"{pass_name}: {tokens:,} calibration tokens are {tokens / k:.1f} per input feature of the widest "
            f"layer '{path}' ({k:,}); below {TOKENS_PER_FEATURE_FLOOR} per feature ({TOKENS_PER_FEATURE_FLOOR * k:,} "
            "tokens) the result fits the calibration text and may not hold on other text"), stacklevel=2)
