"""``delta.apply``: fold a graph's weight deltas into plain dense weights (``base + decoded delta``,
exactly what the delta ops compute), and give the base tensors their own names back. The result is
an ordinary graph of the fine-tuned (or compressed-delta) model. A delta meets its base here or when a
delta-only artifact is loaded with it (``splice.load(path, base=…)``, which refuses a wrong base).
Task arithmetic: https://arxiv.org/abs/2212.04089.
"""
from __future__ import annotations

from dataclasses import dataclass

from splice.ir.deltas import BASE
from splice.ir.graph import Graph
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.delta._common import CARRIES_DELTAS, DeltaConfig, key, require_deltas, stored

WHO = "delta.apply"


@dataclass(frozen=True, kw_only=True)
class ApplyConfig(DeltaConfig):
    """Fold the graph's weight deltas into dense weights (base + delta)."""


@register_pass(WHO, ApplyConfig, reference="https://arxiv.org/abs/2212.04089", requires=("delta",),
               applies=CARRIES_DELTAS, report_fields={"tensors": "deltas folded"})
def apply(graph: Graph, cfg: ApplyConfig, ctx: PassContext) -> PassResult:
    nodes = require_deltas(graph, WHO)
    for node in nodes:
        dense = node.target(*stored(graph, node))
        node.replace_all_uses_with(graph.add_tensor(key(node), dense))
        graph.gm.graph.erase_node(node)
    for node in [n for n in graph.gm.graph.nodes if n.op == "get_attr" and n.target.startswith(BASE) and n.users]:
        node.replace_all_uses_with(graph.add_tensor(node.target[len(BASE):], graph.tensor(node.target)))
    record = graph.source.pop("delta_base", None)
    graph.source["delta_applied_to"] = record
    return PassResult(graph, True, {"tensors": len(nodes)})
