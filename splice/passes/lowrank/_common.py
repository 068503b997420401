"""What the ``lowrank.*`` passes share: the rank options and their checks, the layers a factorizing
pass may rewrite, the rewrite of ``aten.linear`` into a factored op, and the byte report.

Factors are stored beside the layer's weight name: ``<layer>.lowrank.A`` (``[r, in]``) and
``<layer>.lowrank.B`` (``[out, r]``) in the weight's dtype, so the artifact and the ONNX file hold
exactly the factors (bytes reported from what is stored).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.ir.select import module_path, select_nodes, validate_targets
from splice.ir.weights import layer_key
from splice.passes.base import PassConfig

LINEAR = torch.ops.aten.linear.default
LOWRANK_REPORT = {"layers": "layers rewritten", "weight_bytes_before": "weight bytes before",
                  "weight_bytes_after": "weight bytes after"}


@dataclass(frozen=True, kw_only=True)
class RankConfig(PassConfig):
    """Fields of a pass that factors linears at a rank, given directly or by an energy share."""

    rank: int = field(default=0, metadata={"help": "rank r of every layer (0: chosen per layer by energy)"})
    energy: float = field(default=0.95, metadata={
        "help": "with rank=0: the smallest rank keeping this share of the squared singular values"})
    targets: str = field(default="linear|!lm_head", metadata={"help": "layers: kinds, path globs, re:, !exclude, joined by |"})

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"rank must be >= 1 (or 0 to choose by energy), got {self.rank}")
        if self.rank == 0 and not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        validate_targets(self.targets)


def check_rank(who: str, rank: int, node: fx.Node, shape: tuple[int, int]) -> None:
    """One-line ConfigError when ``rank`` exceeds ``min(in, out)`` of the ``[out, in]`` layer ``node``."""
    if rank > min(shape):
        raise ConfigError(f"{who}: rank={rank} exceeds min(in, out) = {min(shape)} of layer "
                          f"'{module_path(node) or node.name}' ({shape[1]} -> {shape[0]})")


def rank_for(w: torch.Tensor, rank: int, energy: float) -> int:
    """``rank``, or the smallest rank whose singular values keep ``energy`` of ``‖w‖²``."""
    if rank:
        return rank
    s2 = torch.linalg.svdvals(w.float()).double() ** 2
    share = s2.cumsum(0) / s2.sum().clamp_min(1e-300)
    return min(int((share < energy - 1e-12).sum()) + 1, s2.numel())


def linears(graph: Graph, targets: str, who: str) -> list[fx.Node]:
    """The selected layers stored as a plain float ``aten.linear`` (what a factorizing pass rewrites);
    a selection with none of them is an error naming the ops it found instead."""
    nodes = select_nodes(graph.gm, targets, ("linear",), who)
    plain = [n for n in nodes if n.target == LINEAR and getattr(n.args[1], "op", None) == "get_attr"]
    pruned = [layer_key(n) for n in plain if layer_key(n) in graph.masks]
    if pruned:
        raise ConfigError(f"{who}: layer '{pruned[0]}' is pruned; its factors would revive the pruned weights "
                          "(factor before pruning, or leave it out of targets)")
    if not plain:
        found = sorted({str(n.target).replace(".default", "") for n in nodes})
        raise ConfigError(f"{who}: targets '{targets}' matched no plain float linear (found {', '.join(found)}); "
                          "factor the float model, before quantization")
    return plain


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def store(graph: Graph, node: fx.Node, key: str, value: torch.Tensor, like: torch.Tensor, trainable: bool = False) -> fx.Node:
    """``value`` (in ``like``'s dtype) stored as ``<layer>.lowrank.<key>``."""
    stem = node.args[1].target.removesuffix(".weight") if node.target == LINEAR else (module_path(node) or node.name)
    return graph.add_tensor(f"{stem}.lowrank.{key}", value.to(like.dtype).contiguous(), trainable=trainable)


def replace_linear(graph: Graph, node: fx.Node, op, stored: list[fx.Node | int]) -> fx.Node:
    """Put ``op(x, *stored, bias)`` in the place of ``aten.linear`` ``node`` (its module path kept)."""
    bias = node.args[2] if len(node.args) > 2 else None
    fxg = graph.gm.graph
    with fxg.inserting_before(node):
        new = fxg.call_function(op, (node.args[0], *stored, bias))
    new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    node.replace_all_uses_with(new)
    fxg.erase_node(node)
    return new
