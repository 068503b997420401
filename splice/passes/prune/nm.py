"""``prune.nm``: N:M semi-structured sparsity — keep ``n`` of every ``m`` consecutive weights along
each row's input dim (2:4 runs on NVIDIA's sparse tensor cores, https://arxiv.org/abs/2104.08378),
the ``n`` chosen by magnitude, by Wanda's score, or by SparseGPT with its weight updates.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from splice.ir.graph import Graph
from splice.ir.sparsity import mask_of
from splice.ir.weights import dense_weight
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.prune._common import (HIDDEN_LINEAR, PRUNE_REPORT, CalibratedPruneConfig, apply_masks, as_rows, check_nm, nm_kept,
                                         prunable, prune_calibrated, with_prior)
from splice.passes.prune.sparsegpt import sparsegpt_layer
from splice.passes.prune.wanda import WANDA_STATS, wanda_score

CRITERIA = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True, kw_only=True)
class NMConfig(CalibratedPruneConfig):
    """N:M pruning: n of every m weights kept (wanda and sparsegpt need calibration)."""

    n: int = field(default=2, metadata={"help": "weights kept in each group"})
    m: int = field(default=4, metadata={"help": "group size along the input dim"})
    criterion: str = field(default="magnitude", metadata={"help": "magnitude, wanda or sparsegpt"})
    sparsity: float = field(default=0.5, metadata={"help": "ignored: N:M sets it (1 - n/m)"})
    damp: float = field(default=0.01, metadata={"help": "sparsegpt: dampening, fraction of mean diag(H)"})

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.n < self.m:
            raise ValueError(f"n must be in 1..m-1, got n={self.n}, m={self.m}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")


def _needs_calibration(cfg: NMConfig) -> bool:
    return cfg.criterion != "magnitude"


@register_pass("prune.nm", NMConfig, reference="https://arxiv.org/abs/2104.08378", report_fields=PRUNE_REPORT,
               needs_calibration=_needs_calibration,
               applies=HIDDEN_LINEAR)
def nm(graph: Graph, cfg: NMConfig, ctx: PassContext) -> PassResult:
    kinds = ("linear", "conv") if cfg.criterion == "magnitude" else ("linear",)
    nodes = prunable(graph, cfg, kinds, "prune.nm")
    for node in nodes:
        check_nm(node, as_rows(dense_weight(graph, node)).shape[1], cfg.m, "prune.nm")
    if cfg.criterion == "magnitude":
        report = apply_masks(graph, nodes, lambda node, w: nm_kept(with_prior(w.abs(), mask_of(graph, node)),
                                                                   cfg.n, cfg.m))
    else:
        def solve(node, w, stats):
            if cfg.criterion == "wanda":
                return nm_kept(with_prior(wanda_score(w, stats), mask_of(graph, node)), cfg.n, cfg.m), None
            return sparsegpt_layer(w, stats.hessian(), nm=(cfg.n, cfg.m), damp=cfg.damp, prior=mask_of(graph, node))

        report = prune_calibrated(graph, nodes, cfg, ctx, solve, "prune.nm",
                                  WANDA_STATS if cfg.criterion == "wanda" else ("hessian",))
    return PassResult(graph, True, {**report, "pattern": f"{cfg.n}:{cfg.m}"})
