"""What the ``delta.*`` passes share: finding the graph's delta ops, decoding a delta, rewriting one
delta op into another format (its payload stored as ``delta.<base tensor>.<field>``), the byte and
error report of a compressing pass, and the plain view a delta graph is matched through.

A delta graph (``ir/deltas.py``) computes every fine-tuned weight as ``op(base, payload…)``; each op
is keyed by its base tensor's name in the base graph (``key``). A compressing pass decodes each
delta, encodes it in its own format and reports the delta's bytes before and after, the compression
ratio against the dense delta (the weights' own dtype) and the relative error ``‖Δ − Δ̂‖ / ‖Δ‖``.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from splice.errors import ConfigError
from splice.ir.deltas import BASE, DELTA_OPS, base_record, delta_nodes
from splice.ir.graph import Graph, set_attr, weights_digest
from splice.kernels.delta.ops import DECODERS, STRENGTH, as_matrix
from splice.passes.base import Applies, PassConfig

DENSE = torch.ops.splice.delta_dense.default
TERNARY = torch.ops.splice.delta_ternary.default
SIGNS = torch.ops.splice.delta_signs.default
LOWRANK = torch.ops.splice.delta_lowrank.default
QUANT = torch.ops.splice.delta_quant.default

CARRIES_DELTAS = Applies("any model, once delta.extract (or delta.signature) gave it weight deltas")
COMPRESS_REPORT = {"tensors": "delta tensors", "delta_bytes_before": "delta bytes before",
                   "delta_bytes_after": "delta bytes after", "compression": "dense delta bytes / stored",
                   "rel_error": "‖Δ − Δ̂‖ / ‖Δ‖"}
# an encoder: (float delta as the base's [rows, rest] matrix, delta node) -> (op, payload args) or None (unchanged)
Encoder = Callable[[torch.Tensor, fx.Node], "tuple[object, list] | None"]


@dataclass(frozen=True, kw_only=True)
class DeltaConfig(PassConfig):
    """Base of the configs of passes that rewrite a graph's deltas."""


def check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")


def require_deltas(graph: Graph, who: str) -> list[fx.Node]:
    nodes = delta_nodes(graph)
    if not nodes:
        raise ConfigError(f"{who}: the graph carries no weight delta (run delta.extract first)")
    return nodes


def key(node: fx.Node) -> str:
    """The name of the delta op's base tensor in the base graph."""
    base = node.args[0]
    return base.target.removeprefix(BASE) if base.op == "get_attr" else base.name


def stored(graph: Graph, node: fx.Node) -> tuple:
    """The op's arguments with stored tensors in place of their ``get_attr`` nodes."""
    return tuple(graph.tensor(a.target) if isinstance(a, fx.Node) and a.op == "get_attr" else a for a in node.args)


def base_of(graph: Graph, node: fx.Node) -> torch.Tensor:
    return stored(graph, node)[0]


def decode(graph: Graph, node: fx.Node) -> torch.Tensor:
    """The float delta of ``node`` as its base's ``[rows, rest]`` matrix."""
    args = stored(graph, node)
    return as_matrix(DECODERS[DELTA_OPS[node.target]](*args).reshape(args[0].shape))


def payload_bytes(graph: Graph, node: fx.Node) -> int:
    return sum(t.numel() * t.element_size() for t in stored(graph, node)[1:] if isinstance(t, torch.Tensor))


def seed_for(seed: int, name: str) -> torch.Generator:
    """A generator for tensor ``name``, the same in every process."""
    return torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))


def put(graph: Graph, name: str, value: torch.Tensor) -> fx.Node:
    """Store ``value`` as ``name`` (replacing what was there) and return a new ``get_attr`` of it."""
    set_attr(graph.gm, name, value.detach().contiguous())
    first = next(n for n in graph.gm.graph.nodes if n.op != "placeholder")
    with graph.gm.graph.inserting_before(first):
        return graph.gm.graph.get_attr(name)


def rewrite(graph: Graph, node: fx.Node, op, payload: list) -> fx.Node:
    """Replace delta ``node`` by ``op(base, *payload)``, its tensors stored as ``delta.<key>.<i>``."""
    name = key(node)
    args = [put(graph, f"delta.{name}.{i}", v) if isinstance(v, torch.Tensor) else v for i, v in enumerate(payload)]
    with graph.gm.graph.inserting_before(node):
        new = graph.gm.graph.call_function(op, (node.args[0], *args))
    node.replace_all_uses_with(new)
    graph.gm.graph.erase_node(node)
    return new


def attach(graph: Graph, weight: fx.Node, op, payload: list) -> fx.Node:
    """Give the stored weight ``weight`` (a ``get_attr``) a delta: ``op(weight, *payload)`` replaces it
    for every reader."""
    name = weight.target.removeprefix(BASE)
    args = [put(graph, f"delta.{name}.{i}", v) if isinstance(v, torch.Tensor) else v for i, v in enumerate(payload)]
    readers = list(weight.users)
    with graph.gm.graph.inserting_before(readers[0]):
        new = graph.gm.graph.call_function(op, (weight, *args))
    for reader in readers:
        reader.replace_input_with(weight, new)
    return new


def rebase(graph: Graph) -> None:
    """Make ``graph`` (carrying no delta) its own base: every stored tensor moves to ``delta_base.<name>``
    and its weights digest is recorded, so deltas added to it save without it (``delta_only``)."""
    record_base(graph, graph)
    for node in [n for n in graph.gm.graph.nodes if n.op == "get_attr"]:
        node.replace_all_uses_with(put(graph, BASE + node.target, graph.tensor(node.target)))


def drop(graph: Graph, node: fx.Node) -> None:
    """Remove delta ``node``: its readers read the base weight."""
    node.replace_all_uses_with(node.args[0])
    graph.gm.graph.erase_node(node)


def strengthen(graph: Graph, node: fx.Node, factor: float) -> None:
    """Scale ``node``'s delta by ``factor`` (its strength argument, ``kernels.delta.ops.STRENGTH``)."""
    i = STRENGTH[DELTA_OPS[node.target]]
    t = graph.tensor(node.args[i].target)
    node.update_arg(i, put(graph, f"delta.{key(node)}.{i - 1}", t * factor))


@dataclass
class Tally:
    """Bytes and errors of a compressing pass, summed over the deltas it rewrote."""

    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> delta before
    dense: int = 0
    before: int = 0

    def add(self, graph: Graph, node: fx.Node, delta: torch.Tensor) -> None:
        base = base_of(graph, node)
        self.originals[key(node)] = delta
        self.dense += base.numel() * base.element_size()
        self.before += payload_bytes(graph, node)

    def report(self, graph: Graph) -> dict:
        """The report of the deltas now in ``graph`` against the originals (module docstring)."""
        now = {key(n): n for n in delta_nodes(graph)}
        after, err2, ref2, worst = 0, 0.0, 0.0, 0.0
        for name, delta in self.originals.items():
            node = now.get(name)
            new = decode(graph, node) if node is not None else torch.zeros_like(delta)
            after += payload_bytes(graph, node) if node is not None else 0
            e, r = float((delta - new).norm()) ** 2, float(delta.norm()) ** 2
            err2, ref2 = err2 + e, ref2 + r
            worst = max(worst, (e / r) ** 0.5 if r > 0 else 0.0)
        return {"tensors": len(self.originals), "delta_bytes_dense": self.dense, "delta_bytes_before": self.before,
                "delta_bytes_after": after, "compression": round(self.dense / max(after, 1), 2),
                "rel_error": round((err2 / ref2) ** 0.5 if ref2 > 0 else 0.0, 6), "rel_error_max": round(worst, 6)}


def compress(graph: Graph, who: str, encode: Encoder, matrices_only: bool = True) -> Tally:
    """Rewrite every delta of ``graph`` with ``encode`` (1-D deltas, norms and biases, stay as they are
    unless ``matrices_only`` is False); an encoder returning ``(None, [])`` drops the delta."""
    tally = Tally()
    for node in require_deltas(graph, who):
        if matrices_only and base_of(graph, node).dim() < 2:
            continue
        delta = decode(graph, node)
        tally.add(graph, node, delta)
        op, payload = encode(delta, node)
        if op is None:
            drop(graph, node)
        else:
            rewrite(graph, node, op, payload)
    return tally


def plain_view(graph: Graph) -> tuple[Graph, dict[str, fx.Node]]:
    """A copy of ``graph`` whose delta ops are plain stored tensors (their base's, which have the
    fine-tuned weight's shape and dtype), for matching by structure with plain graphs; and for each of
    its stored tensors the node of ``graph`` it stands for (a delta op, or a ``get_attr``)."""
    ops = {key(n): n for n in delta_nodes(graph)}
    view = graph.copy()
    index = {n.target: n for n in graph.gm.graph.nodes if n.op == "get_attr"}
    for node in delta_nodes(view):
        name = f"delta_view.{key(node)}"
        node.replace_all_uses_with(put(view, name, base_of(view, node)))
        index[name] = ops[key(node)]
        view.gm.graph.erase_node(node)
    return view.finalize(), index


def record_base(graph: Graph, base: Graph, path: str | None = None) -> str:
    """Record ``base`` as the base of ``graph``'s deltas (``graph.source['delta_base']``); its digest.
    ``path`` (else the base's source path): where a delta-only artifact looks for the base first."""
    digest = weights_digest(base)
    graph.source["delta_base"] = {"weights_sha256": digest, "name": base.source.get("name"),
                                  "path": path or base.source.get("path")}
    return digest


def refuse_deltas(graph: Graph, who: str) -> None:
    if base_record(graph) is not None or delta_nodes(graph):
        raise ConfigError(f"{who}: the graph already carries weight deltas (delta.apply them first)")
