"""``delta.scale``: change the strength of a graph's weight deltas, ``W = base + factor·Δ`` (task
arithmetic's scaling coefficient, https://arxiv.org/abs/2212.04089): ``factor = 0`` gives the base
model, ``−1`` subtracts the delta (forgetting by negation). Exact for every delta format: each delta op
has one argument its delta scales linearly with (``kernels.delta.ops.STRENGTH``), and only that changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from splice.ir.graph import Graph
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.delta._common import CARRIES_DELTAS, DeltaConfig, require_deltas, strengthen

WHO = "delta.scale"


@dataclass(frozen=True, kw_only=True)
class ScaleConfig(DeltaConfig):
    """Scale the graph's weight deltas by a factor (0: the base model, -1: negated)."""

    factor: float = field(default=0.5, metadata={"help": "the deltas' new strength relative to now"})


@register_pass(WHO, ScaleConfig, reference="https://arxiv.org/abs/2212.04089", requires=("delta",),
               applies=CARRIES_DELTAS, report_fields={"tensors": "deltas scaled"})
def scale(graph: Graph, cfg: ScaleConfig, ctx: PassContext) -> PassResult:
    nodes = require_deltas(graph, WHO)
    for node in nodes:
        strengthen(graph, node, cfg.factor)
    return PassResult(graph, True, {"tensors": len(nodes), "factor": cfg.factor})
