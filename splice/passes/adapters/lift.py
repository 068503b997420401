"""``adapter.lift``: train only the principal weights (LIFT, https://arxiv.org/abs/2506.00772).

LIFT ("Low-rank Informed sparse Fine-Tuning") ranks a layer's entries by the magnitude of its
best rank-``rank`` approximation ``W_r`` (truncated SVD) and fine-tunes only the top ``density``
fraction of them: ``mask = top-k(|W_r|)``, ``ΔW[mask] = values`` (``splice::sparse_delta``,
values start at zero). The reference code masks the gradient of the full weight; storing only the
selected entries is the same update with an honest parameter count (``k`` per layer). The paper
recomputes the mask every few hundred steps; here it is fixed at injection (re-run the pass on
the folded model to refresh it).
"""
from __future__ import annotations

from dataclasses import dataclass

from splice.ir.graph import Graph
from splice.passes.adapters._common import ADAPTER_REPORT, check_rank
from splice.passes.adapters._sparse import SPARSE, RankDensityConfig, attach_per_layer, count, low_rank, \
    sparse_update, top_k_mask
from splice.passes.base import PassContext, PassResult, register_pass


@dataclass(frozen=True, kw_only=True)
class LiftConfig(RankDensityConfig):
    """LIFT: train the top entries of a low-rank approximation of each weight (rank, density)."""


def principal_mask(w, rank: int, k: int):
    """The ``k`` entries of largest ``|W_r|``, ``W_r`` the best rank-``rank`` approximation of ``w``."""
    return top_k_mask(low_rank(w, rank).abs(), k)


@register_pass("adapter.lift", LiftConfig, reference="https://arxiv.org/abs/2506.00772", provides=("adapter",),
               report_fields=ADAPTER_REPORT)
def lift(graph: Graph, cfg: LiftConfig, ctx: PassContext) -> PassResult:
    def build(path, w):
        check_rank("adapter.lift", cfg.rank, path, *w.shape)
        mask = principal_mask(w, cfg.rank, count(cfg.density, w.numel()))
        return SPARSE, sparse_update(mask), {"trainable": int(mask.sum())}

    meta = {"approx_rank": cfg.rank, "density": cfg.density}
    return PassResult(graph, True, attach_per_layer(graph, cfg, "adapter.lift", build, meta))
