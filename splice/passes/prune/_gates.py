"""Trainable relaxed gates on channels: ``prune.channels:mode=gates`` puts them in, training learns
them, ``prune.gates`` removes the channels whose gates closed.

Each targeted coupling group of single channels (MLP intermediate channels, conv channels) gets one
gate vector (``splice::channel_gate``, the deterministic hard-concrete gate of L0 regularization,
https://arxiv.org/abs/1712.01312, initialised open), applied to the input of every layer that reads
the group's channels (down_proj; the next conv). Gated-off channels then contribute nothing, so
removing them is exact. A training hook (registered here) adds the budget to the loss,
``penalty · (d − keep)²`` of the mean gate ``d`` over all gates, ``keep = 1 − amount`` (CoFi's and
Sheared-LLaMA's quadratic term, without their learned Lagrange multipliers), so the open share is
pulled to ``keep`` while the task loss decides which gates stay open.
"""
from __future__ import annotations

import torch
from torch import fx

from splice.errors import ConfigError
from splice.ir.coupling import Group
from splice.ir.graph import Graph, attr_users
from splice.ir.train_hooks import TrainHook, register_train_hook
from splice.kernels.prune.gate_math import gate_values

aten = torch.ops.aten
GATE = torch.ops.splice.channel_gate.default
OPEN = 3.0  # initial log_alpha: gate_values(3.0) = 1 (clamped), gradients still flow through σ


def _reader_axis(node: fx.Node) -> int | None:
    """The activation axis a linear (last) or dense conv (1) reads its input channels on."""
    if node.target == aten.linear.default:
        return -1
    if node.target in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default) and \
            (len(node.args) < 7 or node.args[6] == 1):
        return 1
    return None


def gate_readers(graph: Graph, group: Group) -> list[tuple[fx.Node, torch.Tensor]] | None:
    """``(reader op, channel order [units])`` of each layer reading ``group``'s channels on its
    input axis, when every such reader reads only them and each unit is one channel; else None."""
    if group.unit != 1:
        return None
    readers, users = [], attr_users(graph.gm)
    for m in group.members:
        if m.axis != 1:
            continue
        for node in users[m.target]:
            if len(node.args) > 1 and getattr(node.args[1], "target", None) == m.target:
                if _reader_axis(node) is None or graph.tensor(m.target).shape[1] != group.units:
                    return None
                readers.append((node, m.index[:, 0]))
    return readers or None


def insert_gates(graph: Graph, groups: list[Group], keep: float, penalty: float, pass_name: str) -> int:
    """One open gate vector per group, on every reader's input; returns the channels gated."""
    gated = 0
    for group in groups:
        readers = gate_readers(graph, group)
        if readers is None:
            continue
        log_alpha = graph.add_tensor(f"{group.modules[0]}.channel_gate", torch.full((group.units,), OPEN),
                                     trainable=True)
        for node, order in readers:
            if not torch.equal(order, torch.arange(group.units)):
                raise ConfigError(f"{pass_name}: channels of group #{group.id} are read out of order by "
                                  f"'{node.args[1].target}'")
            with graph.gm.graph.inserting_before(node):
                gate = graph.gm.graph.call_function(GATE, (node.args[0], log_alpha, _reader_axis(node), keep, penalty))
            node.update_arg(0, gate)
        gated += group.units
    if not gated:
        raise ConfigError(f"{pass_name}: mode=gates found no group of single channels read whole by a linear "
                          "or dense conv (MLP or conv channels)")
    return gated


def gate_nodes(graph: Graph) -> list[fx.Node]:
    return [n for n in graph.gm.graph.nodes if n.target == GATE]


class GateBudget(TrainHook):
    """The gates' budget term (module docstring), over every gate of the trained graph."""

    def __init__(self, graph: Graph, nodes: list[fx.Node]):
        self.graph = graph
        self.targets = sorted({n.args[1].target for n in nodes})
        self.keep = float(nodes[0].args[3])
        self.penalty = float(nodes[0].args[4])

    def regularizer(self, step: int, total: int) -> torch.Tensor:
        gates = torch.cat([gate_values(self.graph.tensor(t)) for t in self.targets])
        return self.penalty * (gates.mean() - self.keep) ** 2


@register_train_hook
def _gate_budget(graph: Graph) -> TrainHook | None:
    nodes = gate_nodes(graph)
    return GateBudget(graph, nodes) if nodes else None
