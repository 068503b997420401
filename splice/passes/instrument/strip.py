"""``instrument.strip``: remove every instrument op (observers) before a graph is exported.

Observers (``instrument.observe``) are identity ops that only matter while calibration data
flows; exporters refuse a graph that still has them and name this pass.
"""
from __future__ import annotations

from dataclasses import dataclass

from splice.ir.graph import Graph
from splice.passes.base import PassConfig, PassContext, PassResult, register_pass
from splice.passes.instrument.observe import OBSERVE, strip_observers


@dataclass(frozen=True, kw_only=True)
class StripConfig(PassConfig):
    """Remove the observer ops instrument.observe inserted (do this before export)."""


@register_pass("instrument.strip", StripConfig, reference="https://arxiv.org/abs/2210.17323",
               requires=("instrument.observe",))
def strip(graph: Graph, cfg: StripConfig, ctx: PassContext) -> PassResult:
    count = sum(1 for n in graph.gm.graph.nodes if n.target == OBSERVE)
    return PassResult(strip_observers(graph), count > 0, {"observers_removed": count})
