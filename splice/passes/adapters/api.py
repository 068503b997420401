"""Adapters on a Graph, for users: list them, weight / switch them, their trainable tensors.

Every function that changes something returns a new Graph (the input is untouched): an adapter's
weight and on/off state live in its 0-d ``scale`` tensor, so only that tensor is replaced.

>>> g = g.apply("adapter.lora:name=a,init=random", "adapter.lora:name=b,init=random")
>>> g = splice.deactivate_adapter(g, "b"); g = splice.set_adapter_weight(g, "a", 0.5)
>>> [(a.name, a.layer, a.weight, a.active) for a in splice.list_adapters(g)]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from splice.errors import ConfigError
from splice.ir.graph import Graph, get_attr, set_attr
from splice.passes.adapters._common import (
    Site,
    records,
    sites,
    unknown_adapter,
    write_meta,
)


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    layer: str
    method: str
    rank: int | None
    weight: float
    active: bool
    folded: bool
    params: int  # trainable elements on this layer (0 when folded)


def list_adapters(graph: Graph) -> list[AdapterInfo]:
    """Every adapter, unfolded then folded, one row per (layer, name)."""
    out = []
    for s in sites(graph):
        meta = s.meta
        params = sum(t.numel() for k, t in s.tensors(graph).items() if k in s.method.trainable)
        out.append(AdapterInfo(s.name, s.path, s.method.name, meta.get("rank"), meta.get("weight", 1.0),
                               meta.get("active", True), False, params))
    for rec in records(graph):
        for a in rec.spec["adapters"]:
            meta = a["meta"]
            out.append(AdapterInfo(a["name"], rec.spec["path"], a["method"], meta.get("rank"),
                                   meta.get("weight", 1.0), meta.get("active", True), True, 0))
    return out


def _named(graph: Graph, name: str, who: str) -> list[Site]:
    found = [s for s in sites(graph) if s.name == name]
    if not found:
        if any(a.name == name and a.folded for a in list_adapters(graph)):
            raise ConfigError(f"{who}: adapter '{name}' is folded into the base weights; run adapter.unfold first")
        raise unknown_adapter(who, name, graph)
    return found


def _rescale(graph: Graph, name: str, who: str, **change) -> Graph:
    out = graph.copy()
    for s in _named(out, name, who):
        meta = {**s.meta, **change}
        write_meta(s.delta, meta)
        value = meta["scaling"] * meta["weight"] if meta["active"] else 0.0
        set_attr(out.gm, s.nodes()["scale"].target, torch.tensor(float(value), dtype=torch.float32))
    return out


def set_adapter_weight(graph: Graph, name: str, weight: float) -> Graph:
    """Scale adapter ``name``'s update by ``weight`` (1 = as trained; 0 = no effect)."""
    return _rescale(graph, name, "set_adapter_weight", weight=float(weight))


def activate_adapter(graph: Graph, name: str) -> Graph:
    return _rescale(graph, name, "activate_adapter", active=True)


def deactivate_adapter(graph: Graph, name: str) -> Graph:
    """Switch adapter ``name`` off (its scale becomes 0); ``activate_adapter`` switches it back."""
    return _rescale(graph, name, "deactivate_adapter", active=False)


def adapter_parameters(graph: Graph, name: str | None = None) -> dict[str, torch.nn.Parameter]:
    """The trainable tensors of the (unfolded) adapters, by stored name: only these should train."""
    out = {}
    for s in sites(graph) if name is None else _named(graph, name, "adapter_parameters"):
        for key, node in s.nodes().items():
            if key in s.method.trainable:
                out[node.target] = get_attr(graph.gm, node.target)
    return out


__all__ = [
    "AdapterInfo",
    "activate_adapter",
    "adapter_parameters",
    "deactivate_adapter",
    "list_adapters",
    "set_adapter_weight",
]
