"""Graphs that carry weight deltas (``passes/delta``), and delta-only artifacts.

A delta graph computes each fine-tuned weight as ``op(base, payload…)`` with a delta op of
``kernels/delta``; every base tensor is stored under ``delta_base.<its name in the base graph>``
(tensors equal in both models are read from there directly), and ``graph.source["delta_base"]``
records the base graph's ``weights_digest``. A delta-only artifact (``Graph.save(path,
delta_only=True)``) omits the base tensors: ``strip_base`` puts a ``splice::delta_base_stub`` in
place of each, and loading with the base (``splice.load(path, base=…)``) checks the base's digest
and binds its tensors again (``bind_base``).
"""
from __future__ import annotations

import torch
from torch import fx

from splice.errors import ConfigError
from splice.ir.graph import Graph, set_attr, weights_digest
from splice.kernels.delta import ops as delta_ops

BASE = "delta_base."
STUB = torch.ops.splice.delta_base_stub.default
DELTA_OPS = {getattr(torch.ops.splice, fn._name).default: fn for fn in delta_ops.DECODERS}  # OpOverload -> op


def base_record(graph: Graph) -> dict | None:
    """``{"weights_sha256": …, "name": …}`` of the base the graph's deltas are taken against, if any."""
    rec = graph.source.get("delta_base")
    return rec if isinstance(rec, dict) else None


def delta_nodes(graph: Graph) -> list[fx.Node]:
    return [n for n in graph.gm.graph.nodes if n.op == "call_function" and n.target in DELTA_OPS]


def _first_op(graph: Graph) -> fx.Node:
    return next(n for n in graph.gm.graph.nodes if n.op != "placeholder")


def strip_base(graph: Graph, where: str) -> Graph:
    """A copy of ``graph`` with a ``splice::delta_base_stub`` in place of every base tensor."""
    if base_record(graph) is None or not any(n.op == "get_attr" and n.target.startswith(BASE)
                                             for n in graph.gm.graph.nodes):
        raise ConfigError(f"{where}: delta_only needs a graph that carries deltas (run delta.extract first)")
    out = graph.copy()
    for node in list(out.gm.graph.nodes):
        if node.op == "get_attr" and node.target.startswith(BASE):
            t = out.tensor(node.target)
            with out.gm.graph.inserting_before(node):
                stub = out.gm.graph.call_function(STUB, (node.target[len(BASE):], list(t.shape), t.dtype))
            node.replace_all_uses_with(stub)
            out.gm.graph.erase_node(node)
    return out.finalize()


def check_base(recorded: str, base: Graph | None, where: str) -> None:
    """Refuse a missing base, or one whose weights digest is not ``recorded`` (one line, both digests)."""
    if base is None:
        raise ConfigError(f"{where}: holds a delta only; give its base model (base=…, weights sha256 {recorded[:16]}…)")
    got = weights_digest(base)
    if got != recorded:
        raise ConfigError(f"{where}: wrong base: the delta was taken against weights sha256 {recorded[:16]}…, "
                          f"the given base has {got[:16]}…")


def bind_base(graph: Graph, base: Graph) -> Graph:
    """Undo ``strip_base`` in place with the tensors of ``base`` (checked first: ``check_base``)."""
    have = base.tensors()
    for node in list(graph.gm.graph.nodes):
        if node.target != STUB:
            continue
        name = node.args[0]
        set_attr(graph.gm, BASE + name, have[name])
        with graph.gm.graph.inserting_before(_first_op(graph)):
            attr = graph.gm.graph.get_attr(BASE + name)
        node.replace_all_uses_with(attr)
        graph.gm.graph.erase_node(node)
    return graph.finalize()
