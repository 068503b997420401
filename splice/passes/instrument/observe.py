"""``instrument.observe``: put a ``splice::observe`` op on the input of every targeted layer.

Data then flows through the instrumented graph (``splice.passes.instrument.calibrate`` runs it,
whole or block by block) and a later pass consumes the statistics gathered under each
layer's key (its module path). ``strip_observers`` removes them (the pass ``instrument.strip``);
export refuses them.
Instrumenting for GPTQ-style Hessians: https://arxiv.org/abs/2210.17323
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from splice.ir.graph import Graph
from splice.ir.select import module_path, select_nodes, validate_targets
from splice.passes.base import PassConfig, PassContext, PassResult, register_pass

OBSERVE = torch.ops.splice.observe.default


@dataclass(frozen=True, kw_only=True)
class ObserveConfig(PassConfig):
    """Insert observer ops on the inputs of the targeted layers."""

    targets: str = field(default="linear", metadata={"help": "layers whose inputs are observed"})

    def __post_init__(self):
        validate_targets(self.targets)


def insert_observers(graph: Graph, nodes: list[fx.Node]) -> dict[fx.Node, str]:
    """Observe the input of each node (in place on ``graph``); returns node -> key. Layers
    reading the same tensor (q/k/v, gate/up) share one observer, keyed by the first."""
    keys: dict[fx.Node, str] = {}
    shared: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        x = node.args[0]
        if x not in shared:
            with graph.gm.graph.inserting_before(node):
                shared[x] = graph.gm.graph.call_function(OBSERVE, (x, module_path(node) or node.name))
            shared[x].meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        node.replace_input_with(x, shared[x])
        keys[node] = shared[x].args[1]
    graph.gm.recompile()
    return keys


def strip_observers(graph: Graph) -> Graph:
    """Remove every observer (in place); returns ``graph``."""
    for node in list(graph.gm.graph.nodes):
        if node.target == OBSERVE:
            node.replace_all_uses_with(node.args[0])
            graph.gm.graph.erase_node(node)
    return graph


@register_pass("instrument.observe", ObserveConfig, reference="https://arxiv.org/abs/2210.17323",
               report_fields={"observers": "observers"})
def observe(graph: Graph, cfg: ObserveConfig, ctx: PassContext) -> PassResult:
    nodes = select_nodes(graph.gm, cfg.targets, ("linear", "conv"), "instrument.observe")
    keys = insert_observers(graph, nodes)
    return PassResult(graph, True, {"observers": len(keys)})
