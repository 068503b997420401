"""``prune.allocate``: layer-adaptive sparsity under a global budget, then prune each block at its
own ratio with Wanda, SparseGPT or magnitude.

``method=owl`` — OWL (outlier-weighted layerwise sparsity, https://arxiv.org/abs/2310.05175): a
block's outlier ratio is the share of its weights whose Wanda score ``|W_ij|·‖X_j‖`` exceeds
``outlier_m`` × the block's mean score, measured on the dense model; ratios are rescaled to a
spread of ``2 × max_deviation`` and centred on the target, so blocks with more outliers keep more
weights and the mean sparsity stays the one asked for (the reference code's M = 5, λ = 0.08).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.ir.graph import Graph
from splice.ir.segments import block_of
from splice.ir.sparsity import mask_of
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.instrument.calibrate import input_stats
from splice.passes.prune._common import (HIDDEN_LINEAR, PRUNE_REPORT, CalibratedPruneConfig, prunable, prune_calibrated,
                                         smallest_dropped, with_prior)
from splice.passes.prune.sparsegpt import sparsegpt_layer
from splice.passes.prune.wanda import WANDA_STATS, wanda_score

METHODS = ("owl",)
CRITERIA = ("wanda", "sparsegpt", "magnitude")


@dataclass(frozen=True, kw_only=True)
class AllocateConfig(CalibratedPruneConfig):
    """Layer-adaptive sparsity (OWL) under a global budget, then pruning (needs calibration)."""

    method: str = field(default="owl", metadata={"help": "allocation: owl"})
    criterion: str = field(default="wanda", metadata={"help": "the pruner run at each block's ratio: wanda, "
                                                              "sparsegpt or magnitude"})
    outlier_m: float = field(default=5.0, metadata={"help": "owl: an outlier scores above M × its block's mean"})
    max_deviation: float = field(default=0.08, metadata={"help": "owl: most a block's sparsity moves from the target"})

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.outlier_m <= 0:
            raise ValueError(f"outlier_m must be > 0, got {self.outlier_m}")
        if not 0 <= self.max_deviation < 0.5:
            raise ValueError(f"max_deviation must be in [0, 0.5), got {self.max_deviation}")


def owl_ratios(outliers: dict[str, float], sparsity: float, max_deviation: float) -> dict[str, float]:
    """Per block sparsity from its outlier ratio: spread ``2·max_deviation`` wide, mean ``sparsity``,
    more outliers -> less pruning; clipped to [0, 0.99]."""
    blocks = list(outliers)
    r = torch.tensor([outliers[b] for b in blocks], dtype=torch.float64)
    spread = r.max() - r.min()
    density = (r - r.min()) / spread * 2 * max_deviation if spread > 0 else torch.zeros_like(r)
    density = density - density.mean() + (1 - sparsity)
    return {b: float((1 - d).clamp(0, 0.99)) for b, d in zip(blocks, density)}


def outlier_ratios(graph: Graph, nodes, ctx: PassContext, m: float) -> dict[str, float]:
    """Each block's share of weights whose Wanda score exceeds ``m`` × the block's mean score."""
    stats = input_stats(graph, nodes, ctx.calibration, WANDA_STATS, ctx.cache)
    scores: dict[str, list[torch.Tensor]] = {}
    for node in nodes:
        w = graph.tensor(node.args[1].target).detach().float()
        scores.setdefault(block_of(node), []).append(wanda_score(w, stats[node.name]).reshape(-1))
    out = {}
    for block, parts in scores.items():
        s = torch.cat(parts)
        out[block] = float((s > m * s.mean()).float().mean())
    return out


@register_pass("prune.allocate", AllocateConfig, reference="https://arxiv.org/abs/2310.05175",
               needs_calibration=True, report_fields={**PRUNE_REPORT, "block_sparsity": "sparsity by block"},
               applies=HIDDEN_LINEAR)
def allocate(graph: Graph, cfg: AllocateConfig, ctx: PassContext) -> PassResult:
    nodes = prunable(graph, cfg, ("linear",), "prune.allocate")
    outliers = outlier_ratios(graph, nodes, ctx, cfg.outlier_m)
    ratio = owl_ratios(outliers, cfg.sparsity, cfg.max_deviation)

    def solve(node, w, stats):
        s, prior = ratio[block_of(node)], mask_of(graph, node)
        if cfg.criterion == "sparsegpt":
            h = stats.hessian() if stats.rows else torch.eye(w.shape[1])
            return sparsegpt_layer(w, h, sparsity=s, prior=prior)
        score = wanda_score(w, stats) if cfg.criterion == "wanda" else w.abs()
        return smallest_dropped(with_prior(score, prior), s, per_row=cfg.criterion == "wanda"), None

    report = prune_calibrated(graph, nodes, cfg, ctx, solve, "prune.allocate",
                              ("hessian",) if cfg.criterion == "sparsegpt" else WANDA_STATS)
    report["block_sparsity"] = {b: round(s, 4) for b, s in ratio.items()}
    report["outlier_ratio"] = {b: round(r, 5) for b, r in outliers.items()}
    return PassResult(graph, True, report)
