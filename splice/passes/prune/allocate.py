"""``prune.allocate``: layer-adaptive sparsity under a global budget, then prune each block (OWL) or
layer (DP) at its own ratio with Wanda, SparseGPT or magnitude.

``method=owl`` — OWL (outlier-weighted layerwise sparsity, https://arxiv.org/abs/2310.05175): a
block's outlier ratio is the share of its weights whose Wanda score ``|W_ij|·‖X_j‖`` exceeds
``outlier_m`` × the block's mean score, measured on the dense model; ratios are rescaled to a
spread of ``2 × max_deviation`` and centred on the target, so blocks with more outliers keep more
weights and the mean sparsity stays the one asked for (the reference code's M = 5, λ = 0.08).

``method=dp`` — one sparsity per layer minimising the summed (Fisher-weighted) output distortion
under the global count of pruned weights, by dynamic programming (``_layer_dp.py``; Xu et al.,
https://arxiv.org/abs/2308.10438).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from splice.ir.graph import Graph
from splice.ir.segments import block_of
from splice.ir.sparsity import mask_of
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.instrument.calibrate import input_stats
from splice.passes.instrument.gradients import output_fisher
from splice.passes.prune._common import (HIDDEN_LINEAR, PRUNE_REPORT, CalibratedPruneConfig, prunable, prune_calibrated,
                                         smallest_dropped, with_prior)
from splice.passes.prune._layer_dp import LEVELS, distortions, dp_levels
from splice.passes.prune.sparsegpt import sparsegpt_layer
from splice.passes.prune.wanda import WANDA_STATS, wanda_score

METHODS = ("owl", "dp")
CRITERIA = ("wanda", "sparsegpt", "magnitude")


@dataclass(frozen=True, kw_only=True)
class AllocateConfig(CalibratedPruneConfig):
    """Layer-adaptive sparsity (OWL) under a global budget, then pruning (needs calibration)."""

    method: str = field(default="owl", metadata={"help": "allocation: owl (per block, from outlier ratios) or dp "
                                                          "(per layer, least summed output distortion)"})
    criterion: str = field(default="wanda", metadata={"help": "the pruner run at each block's ratio: wanda, "
                                                              "sparsegpt or magnitude"})
    outlier_m: float = field(default=5.0, metadata={"help": "owl: an outlier scores above M × its block's mean"})
    max_deviation: float = field(default=0.08, metadata={"help": "owl: most a block's sparsity moves from the target"})
    weighting: str = field(default="fisher", metadata={"help": "dp: output error weighted by the diagonal Fisher "
                                                               "(∂loss/∂y)² (fisher) or not (none)"})

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
        if self.weighting not in ("fisher", "none"):
            raise ValueError(f"weighting must be fisher or none, got {self.weighting!r}")
        if self.method == "dp" and self.sparsity > LEVELS[-1]:
            raise ValueError(f"method=dp: sparsity must be at most {LEVELS[-1]} (the highest layer level)")


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


def dp_ratios(graph: Graph, nodes, ctx: PassContext, cfg: AllocateConfig) -> dict[str, float]:
    """Each layer's sparsity (by weight target) from the dynamic program over their distortions."""
    stats = input_stats(graph, nodes, ctx.calibration, ("hessian",), ctx.cache)
    fisher = output_fisher(graph, nodes, ctx.calibration, "prune.allocate") if cfg.weighting == "fisher" else {}
    by_target = {node.args[1].target: node for node in nodes}  # a tied weight is one decision
    table, sizes = [], []
    for target, node in by_target.items():
        w, seen = graph.tensor(target).detach().float(), stats[node.name]
        score = with_prior(wanda_score(w, seen) if cfg.criterion != "magnitude" else w.abs(), mask_of(graph, node))
        h = seen.xtx if seen.rows else torch.eye(w.shape[1])
        table.append(distortions(w, score, h, fisher.get(target), per_row=cfg.criterion != "magnitude"))
        sizes.append(w.numel())
    levels = dp_levels(np.stack(table), np.asarray(sizes, dtype=np.float64), cfg.sparsity)
    return {target: float(LEVELS[i]) for target, i in zip(by_target, levels)}


@register_pass("prune.allocate", AllocateConfig, reference="https://arxiv.org/abs/2310.05175",
               needs_calibration=True, report_fields={**PRUNE_REPORT, "allocated": "sparsity by block / layer"},
               applies=HIDDEN_LINEAR)
def allocate(graph: Graph, cfg: AllocateConfig, ctx: PassContext) -> PassResult:
    nodes = prunable(graph, cfg, ("linear",), "prune.allocate")
    if cfg.method == "owl":
        outliers = outlier_ratios(graph, nodes, ctx, cfg.outlier_m)
        ratio = owl_ratios(outliers, cfg.sparsity, cfg.max_deviation)
        ratio_of = lambda node: ratio[block_of(node)]  # noqa: E731
    else:
        ratio = dp_ratios(graph, nodes, ctx, cfg)
        ratio_of = lambda node: ratio[node.args[1].target]  # noqa: E731

    def solve(node, w, stats):
        s, prior = ratio_of(node), mask_of(graph, node)
        if cfg.criterion == "sparsegpt":
            h = stats.hessian() if stats.rows else torch.eye(w.shape[1])
            return sparsegpt_layer(w, h, sparsity=s, prior=prior)
        score = wanda_score(w, stats) if cfg.criterion == "wanda" else w.abs()
        return smallest_dropped(with_prior(score, prior), s, per_row=cfg.criterion == "wanda"), None

    report = prune_calibrated(graph, nodes, cfg, ctx, solve, "prune.allocate",
                              ("hessian",) if cfg.criterion == "sparsegpt" else WANDA_STATS)
    report["allocated"] = {b: round(s, 4) for b, s in ratio.items()}
    if cfg.method == "owl":
        report["outlier_ratio"] = {b: round(r, 5) for b, r in outliers.items()}
    return PassResult(graph, True, report)
