"""``prune.gates``: finish gate training (``prune.channels:mode=gates``, then ``splice train``) — fold
each gate's values into the weights that read its channels, drop the gate ops, and physically remove
the channels whose gates closed (gate exactly 0: removing them changes nothing). ``amount`` also
removes the lowest open gates until that share of each group is gone (lossy). Gates are the
deterministic hard-concrete gates of L0 regularization, https://arxiv.org/abs/1712.01312.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.errors import ConfigError
from splice.ir.coupling import analyze
from splice.ir.graph import Graph
from splice.ir.weights import dense_weight, replace_weight
from splice.kernels.prune.gate_math import gate_values
from splice.passes.base import Applies, PassConfig, PassContext, PassResult, register_pass
from splice.passes.prune._gates import gate_nodes
from splice.passes.prune._structured import STRUCTURED_REPORT, shrink_groups, units_removed


@dataclass(frozen=True, kw_only=True)
class GatesConfig(PassConfig):
    """Remove the channels trained gates closed."""

    amount: float = field(default=0.0, metadata={"help": "also remove the lowest open gates until this share of "
                                                          "each gated group is gone, in [0, 1); 0: only closed ones"})

    def __post_init__(self):
        if not 0 <= self.amount < 1:
            raise ValueError(f"amount must be in [0, 1), got {self.amount}")


def fold_gates(graph: Graph) -> dict[str, torch.Tensor]:
    """Scale each gated reader's input channels by its gate values, drop the gate ops (in place);
    returns the gate values by reader weight target."""
    values = {}
    for node in gate_nodes(graph):
        x, log_alpha, dim = node.args[:3]
        g = gate_values(graph.tensor(log_alpha.target).detach().float())
        for reader in list(node.users):
            w = dense_weight(graph, reader)
            replace_weight(graph, reader, w * g.reshape([1, -1] + [1] * (w.dim() - 2)).to(w.dtype), "_gated")
            values[reader.args[1].target] = g
        node.replace_all_uses_with(x)
        graph.gm.graph.erase_node(node)
    graph.gm.graph.eliminate_dead_code()
    return values


@register_pass("prune.gates", GatesConfig, reference="https://arxiv.org/abs/1712.01312",
               report_fields={**STRUCTURED_REPORT, "closed": "gates closed"},
               applies=Applies("a linear or conv layer (gated by prune.channels:mode=gates)", kinds=("linear", "conv")))
def gates(graph: Graph, cfg: GatesConfig, ctx: PassContext) -> PassResult:
    values = fold_gates(graph)
    if not values:
        raise ConfigError("prune.gates: the graph has no channel gates (insert them with prune.channels:mode=gates "
                          "and train)")
    graph = graph.finalize()
    coupling = analyze(graph)
    keep, closed = {}, 0
    for group in coupling.groups:
        readers = [m for m in group.members if m.axis == 1 and m.target in values]
        if not readers:
            continue
        g = values[readers[0].target][readers[0].index[:, 0]]
        closed += int((g == 0).sum())
        extra = max(units_removed(cfg.amount, group.units) - int((g == 0).sum()), 0) if cfg.amount else 0
        order = torch.argsort(g, stable=True)
        drop = set((g == 0).nonzero().flatten().tolist()) | set(order[(g == 0).sum():][:extra].tolist())
        if len(drop) >= group.units:
            raise ConfigError(f"prune.gates: every gate of group #{group.id} ({group.touches()}) is closed; "
                              "train with a smaller amount or penalty")
        keep[group.id] = torch.tensor(sorted(set(range(group.units)) - drop), dtype=torch.long)
    out, report = shrink_groups(graph, keep, coupling, {})
    return PassResult(out, True, {**report, "closed": closed})
