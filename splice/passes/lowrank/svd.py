"""``lowrank.svd``: replace each selected linear's weight by its best rank-r factorization (truncated
SVD, Eckart–Young; the classic low-rank compression, e.g. https://arxiv.org/abs/1404.0736), stored as
two factors ``A = √S Vᵀ [r, in]``, ``B = U √S [out, r]`` read by ``splice::lowrank_linear``. ``rank``
fixes r; ``rank=0`` picks per layer the smallest r keeping ``energy`` of the squared singular values.
Full rank reproduces the layer (to float rounding). The report gives each layer's rank and relative
weight error, and bytes before/after as stored (factors are larger than the weight when
``r > in·out / (in + out)``: the report says which layers grew).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from splice.ir.graph import Graph
from splice.ir.select import module_path
from splice.kernels.lowrank.factors import split_svd
from splice.passes.base import Applies, PassContext, PassResult, register_pass
from splice.passes.lowrank._common import LOWRANK_REPORT, RankConfig, check_rank, linears, nbytes, rank_for, \
    replace_linear, store

WHO = "lowrank.svd"
LOWRANK_LINEAR = torch.ops.splice.lowrank_linear.default


@dataclass(frozen=True, kw_only=True)
class SvdConfig(RankConfig):
    """Each linear as its best rank-r factors (truncated SVD), by rank or energy."""


@register_pass(WHO, SvdConfig, reference="https://arxiv.org/abs/1404.0736", report_fields=LOWRANK_REPORT,
               applies=Applies("a linear layer", kinds=("linear",)))
def svd(graph: Graph, cfg: SvdConfig, ctx: PassContext) -> PassResult:
    ranks, errors, grew = {}, {}, []
    before = after = 0
    for node in linears(graph, cfg.targets, WHO):
        w = graph.tensor(node.args[1].target).detach()
        check_rank(WHO, cfg.rank, node, tuple(w.shape))
        r = rank_for(w, cfg.rank, cfg.energy)
        a, b = split_svd(w, r)
        path = module_path(node) or node.name
        ranks[path], errors[path] = r, round(float((w.float() - b @ a).norm() / w.float().norm().clamp_min(1e-30)), 6)
        stored = [store(graph, node, "A", a, w), store(graph, node, "B", b, w)]
        before, grown = before + nbytes(w), sum(nbytes(graph.tensor(n.target)) for n in stored)
        after += grown
        if grown > nbytes(w):
            grew.append(path)
        replace_linear(graph, node, LOWRANK_LINEAR, stored)
    return PassResult(graph, True, {"layers": len(ranks), "weight_bytes_before": before, "weight_bytes_after": after,
                                    "rank": ranks, "rel_error": errors, "grew": grew})
