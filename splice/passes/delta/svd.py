"""``delta.svd``: each weight delta as its best rank-``rank`` approximation (truncated SVD,
Eckart–Young), stored LoRA-shaped as ``splice::delta_lowrank``: ``A = √S Vᵀ [r, cols]``,
``B = U √S [rows, r]`` (https://arxiv.org/abs/2106.09685). ``rank`` is capped at each matrix's
``min(rows, cols)`` (full rank reproduces the delta); the report gives the relative error
``‖Δ − B A‖ / ‖Δ‖`` of every tensor. Norms and biases (1-D) stay dense.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.ir.graph import Graph
from splice.ir.lowrank import low_rank_factors
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.delta._common import CARRIES_DELTAS, COMPRESS_REPORT, LOWRANK, DeltaConfig, compress, key

WHO = "delta.svd"


@dataclass(frozen=True, kw_only=True)
class SvdConfig(DeltaConfig):
    """Each delta as its best rank-r approximation (a LoRA-shaped delta); error per tensor reported."""

    rank: int = field(default=8, metadata={"help": "rank r of each delta, capped at min(rows, cols)"})

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")


@register_pass(WHO, SvdConfig, reference="https://arxiv.org/abs/2106.09685", requires=("delta",),
               applies=CARRIES_DELTAS, report_fields=COMPRESS_REPORT)
def svd(graph: Graph, cfg: SvdConfig, ctx: PassContext) -> PassResult:
    errors = {}

    def encode(delta, node):
        a, b, errors[key(node)] = low_rank_factors(delta, cfg.rank)
        return LOWRANK, [a, b, torch.ones(())]

    tally = compress(graph, WHO, encode)
    return PassResult(graph, True, {**tally.report(graph), "rank": cfg.rank,
                                    "rel_error_per_tensor": {k: round(e, 6) for k, e in errors.items()}})
