"""Shared by the unstructured and semi-structured pruners: the config fields, which layers are
pruned, masks from scores (per layer, per output row, N:M), the calibrated driver, and the report.

A pruner only scores weights (or, SparseGPT, prunes and updates them); ``ir/sparsity.py`` zeroes
what a mask drops and records the mask, which every later pass keeps.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.ir.select import module_path, op_kind, select_nodes, validate_targets
from splice.ir.sparsity import mask_of, packed_bytes, prune_layer, sparsity
from splice.ir.weights import dense_weight, layer_key, stored_weight
from splice.kernels.instrument.store import LayerStats
from splice.passes.base import Applies, PassConfig, PassContext
from splice.passes.instrument.calibrate import solve_groups

PRUNE_REPORT = {"layers": "layers pruned", "sparsity": "pruned fraction of their weights",
                "weight_bytes_before": "their weight bytes, dense", "weight_bytes_after": "stored packed"}


@dataclass(frozen=True, kw_only=True)
class PruneConfig(PassConfig):
    """Fields every unstructured pruner takes."""

    sparsity: float = field(default=0.5, metadata={"help": "fraction of each layer's weights set to zero, in [0, 1)"})
    targets: str = field(default="linear", metadata={"help": "layers: kinds, path globs, re:, !exclude, joined by |"})
    include_head: bool = field(default=False, metadata={
        "help": "also prune layers whose output is a model output (LM head, classifier)"})

    def __post_init__(self):
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        validate_targets(self.targets)


@dataclass(frozen=True, kw_only=True)
class CalibratedPruneConfig(PruneConfig):
    """Fields of the pruners that read calibration statistics (Wanda, SparseGPT)."""

    sequential: bool = field(default=True, metadata={
        "help": "calibrate block by block on the outputs of blocks already pruned (as the reference code)"})


def output_layers(graph: Graph) -> set[fx.Node]:
    """Weight ops whose output reaches a graph output through no other weight op (the LM head,
    a classifier, a pooler)."""
    found, seen = set(), set()
    todo = [a for a in next(n for n in graph.gm.graph.nodes if n.op == "output").all_input_nodes]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if op_kind(node) is not None:
            found.add(node)
        else:
            todo.extend(node.all_input_nodes)
    return found


def _has_hidden_linear(graph: Graph) -> bool:
    heads = output_layers(graph)
    return any(op_kind(n) == "linear" and n not in heads for n in graph.gm.graph.nodes)


# where the linear-only pruners apply: a linear layer that is not an output layer
HIDDEN_LINEAR = Applies("a linear layer besides the output layer", kinds=("linear",), check=_has_hidden_linear)


def prunable(graph: Graph, cfg: PruneConfig, kinds: tuple[str, ...], pass_name: str) -> list[fx.Node]:
    """The selected layers of ``kinds``, without the output layers unless ``cfg.include_head``."""
    nodes = select_nodes(graph.gm, cfg.targets, kinds, pass_name)
    if not cfg.include_head:
        heads = output_layers(graph)
        nodes = [n for n in nodes if n not in heads]
        if not nodes:
            raise ConfigError(f"{pass_name}: targets '{cfg.targets}' select only output layers "
                              f"(LM head / classifier); pass include_head=true to prune them")
    return nodes


def as_rows(w: torch.Tensor) -> torch.Tensor:
    """A weight as ``[out, fan_in]`` (a conv's kernel flattened with its input channels)."""
    return w.reshape(w.shape[0], -1)


def smallest_dropped(score: torch.Tensor, fraction: float, per_row: bool) -> torch.Tensor:
    """Keep-mask (``score``'s shape) dropping the ``fraction`` lowest scores of each row of
    ``as_rows(score)`` (``per_row``) or of the whole tensor."""
    flat = as_rows(score) if per_row else score.reshape(1, -1)
    k = int(fraction * flat.shape[1])
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        keep.scatter_(1, torch.topk(flat, k, dim=1, largest=False).indices, False)
    return keep.reshape(score.shape)


def check_nm(node: fx.Node, fan_in: int, m: int, pass_name: str) -> None:
    if fan_in % m:
        raise ConfigError(f"{pass_name}: m={m} does not divide the input dim {fan_in} of '{module_path(node)}'")


def nm_kept(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask keeping the ``n`` highest scores of every ``m`` consecutive weights along the
    input dim (N:M semi-structured sparsity; 2:4 runs on sparse tensor cores)."""
    rows = as_rows(score)
    groups = rows.reshape(rows.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.reshape(score.shape)


def with_prior(score: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
    """``score`` with weights an earlier pass pruned ranked lowest, so they count toward the budget."""
    return score if prior is None else torch.where(prior, score, torch.full_like(score, -1.0))


def apply_masks(graph: Graph, nodes: list[fx.Node], decide: Callable[[fx.Node, torch.Tensor], torch.Tensor]) -> dict:
    """Prune each node by ``decide(node, dense weight) -> keep``; a tied weight is decided once.
    Returns the report."""
    decided: dict[str, torch.Tensor] = {}
    for node in nodes:
        w = dense_weight(graph, node)
        key = stored_weight(node).target
        if key not in decided:
            decided[key] = decide(node, w)
        prune_layer(graph, node, decided[key])
    return report(graph, nodes)


# (node of the working copy, float weight [N, K], its input statistics) -> (keep mask, new weight or None)
LayerPruneFn = Callable[[fx.Node, torch.Tensor, LayerStats], tuple[torch.Tensor, torch.Tensor | None]]


def prune_calibrated(graph: Graph, nodes: list[fx.Node], cfg: CalibratedPruneConfig, ctx: PassContext,
                     solve: LayerPruneFn, pass_name: str, kinds: tuple[str, ...] = ("hessian",)) -> dict:
    """Prune the linear ``nodes`` one at a time from their input statistics of ``kinds`` (the
    Hessian; Wanda's per-feature norms) on ``ctx.calibration`` (block by block with
    ``cfg.sequential``, each block's statistics from the pruned blocks before it); returns the report."""
    solved: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def solve_group(members, weights, stats):
        out = []
        for node, w in zip(members, weights):
            target = node.args[1].target
            if target not in solved:  # a weight several layers read is pruned once
                solved[target] = solve(node, w, stats)
            keep, new = solved[target]
            out.append((w if new is None else new) * keep)
        return out

    solve_groups(graph, nodes, ctx.calibration, kinds, solve_group, sequential=cfg.sequential,
                 pass_name=pass_name, progress=ctx.progress, cache=ctx.cache)
    for node in nodes:
        keep, new = solved[node.args[1].target]
        prune_layer(graph, node, keep, new)
    return report(graph, nodes)


def report(graph: Graph, nodes: list[fx.Node]) -> dict:
    """Layers pruned, overall sparsity, their weight bytes dense and packed, sparsity by layer."""
    by_layer = sparsity(graph)
    keys = {layer_key(n) for n in nodes}
    before = after = total = pruned = 0
    for node in nodes:
        keep = mask_of(graph, node)
        size = graph.tensor(stored_weight(node).target).element_size()
        before += keep.numel() * size
        after += packed_bytes(keep, size)
        total, pruned = total + keep.numel(), pruned + int((~keep).sum())
    return {"layers": len(nodes), "sparsity": round(pruned / max(total, 1), 4), "weight_bytes_before": before,
            "weight_bytes_after": after, "layer_sparsity": {k: v for k, v in by_layer.items() if k in keys}}
