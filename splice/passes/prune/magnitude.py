"""``prune.magnitude``: zero the weights of smallest magnitude — per layer, per output row, or with
one threshold over every targeted layer (global). The data-free baseline of the pruning papers
(Han et al., https://arxiv.org/abs/1506.02626; Wanda's and SparseGPT's "magnitude" rows).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.ir.graph import Graph
from splice.ir.weights import dense_weight
from splice.passes.base import Applies, PassContext, PassResult, register_pass
from splice.passes.prune._common import PRUNE_REPORT, PruneConfig, apply_masks, prunable, smallest_dropped, with_prior
from splice.ir.sparsity import mask_of

SCOPES = ("layer", "row", "global")


@dataclass(frozen=True, kw_only=True)
class MagnitudeConfig(PruneConfig):
    """Magnitude pruning (data-free)."""

    targets: str = field(default="linear|conv", metadata={"help": "layers: kinds, path globs, re:, !exclude, joined by |"})
    scope: str = field(default="layer", metadata={
        "help": "where the smallest weights are counted: layer, row (each output row), global (all targeted layers)"})

    def __post_init__(self):
        super().__post_init__()
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")


def global_threshold(graph: Graph, nodes, sparsity: float) -> float:
    """The magnitude below which ``sparsity`` of all the nodes' weights lie."""
    scores = torch.cat([with_prior(dense_weight(graph, n).abs(), mask_of(graph, n)).reshape(-1) for n in nodes])
    k = int(sparsity * scores.numel())
    return float(torch.kthvalue(scores, k).values) if k else -1.0


@register_pass("prune.magnitude", MagnitudeConfig, reference="https://arxiv.org/abs/1506.02626",
               report_fields=PRUNE_REPORT, applies=Applies("a linear or conv layer", kinds=("linear", "conv")))
def magnitude(graph: Graph, cfg: MagnitudeConfig, ctx: PassContext) -> PassResult:
    nodes = prunable(graph, cfg, ("linear", "conv"), "prune.magnitude")
    threshold = global_threshold(graph, nodes, cfg.sparsity) if cfg.scope == "global" else None

    def decide(node, w):
        score = with_prior(w.abs(), mask_of(graph, node))
        if threshold is not None:
            return score > threshold
        return smallest_dropped(score, cfg.sparsity, per_row=cfg.scope == "row")

    return PassResult(graph, True, apply_masks(graph, nodes, decide))
