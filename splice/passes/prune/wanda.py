"""``prune.wanda``: Wanda — drop the weights of smallest ``|W_ij| · ‖X_j‖₂`` (weight magnitude times
the norm of its input feature over the calibration tokens), compared within each output row; no
weight update. https://arxiv.org/abs/2306.11695

As the reference code, calibration runs block by block through the blocks already pruned
(``sequential``); ``‖X_j‖²`` is gathered per feature (observer kind ``sqnorm``: no ``K × K`` Hessian
is formed; shared through the pipeline's analysis cache when not sequential).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.ir.graph import Graph
from splice.ir.sparsity import mask_of
from splice.kernels.instrument.store import LayerStats
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.prune._common import (HIDDEN_LINEAR, PRUNE_REPORT, CalibratedPruneConfig, prunable, prune_calibrated,
                                         smallest_dropped, with_prior)


@dataclass(frozen=True, kw_only=True)
class WandaConfig(CalibratedPruneConfig):
    """Wanda: pruning by weights and activations (needs calibration)."""

    per_row: bool = field(default=True, metadata={"help": "compare scores within each output row (the paper's "
                                                           "choice for LLMs), else over the whole layer"})


WANDA_STATS = ("sqnorm",)  # what Wanda's score reads of each layer's inputs


def wanda_score(w: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """``|W_ij| · ‖X_j‖₂`` for a linear weight ``[N, K]`` (``|W_ij|`` where the layer saw no rows)."""
    if not stats.rows:
        return w.abs()
    return w.abs() * stats.feature_sq().float().clamp(min=0).sqrt()


@register_pass("prune.wanda", WandaConfig, reference="https://arxiv.org/abs/2306.11695", needs_calibration=True,
               report_fields=PRUNE_REPORT, applies=HIDDEN_LINEAR)
def wanda(graph: Graph, cfg: WandaConfig, ctx: PassContext) -> PassResult:
    nodes = prunable(graph, cfg, ("linear",), "prune.wanda")

    def solve(node, w, stats):
        score = with_prior(wanda_score(w, stats), mask_of(graph, node))
        return smallest_dropped(score, cfg.sparsity, per_row=cfg.per_row), None

    return PassResult(graph, True, prune_calibrated(graph, nodes, cfg, ctx, solve, "prune.wanda", WANDA_STATS))
