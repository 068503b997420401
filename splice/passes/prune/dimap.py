"""``prune.dimap``: DIMAP — data-free, module-aware unstructured pruning (built for hierarchical
vision transformers, whose local-attention weights differ in scale across stages).
https://arxiv.org/abs/2404.13648

Each weight's importance is the information distortion of removing it: with a layer's weights sorted
by magnitude, largest first, ``Imp(w_j) = w_j² / Σ_{i ≤ j} w_i²`` — its square over the energy of
every weight at least as large. Within a layer that keeps the magnitude order; across layers it puts
weights of differently scaled layers on one scale. Weights are then ranked globally within each
module — the paper's QKV (layers writing attention heads), PRJ (layers reading them), MLP (both
sides of the MLP channels) and AUX (every other linear: patch merging, embeddings' projections) —
and each module loses ``sparsity`` of its weights. Modules come from the coupling analysis, not from
layer names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from splice.ir.coupling import analyze
from splice.ir.graph import Graph
from splice.ir.sparsity import mask_of
from splice.ir.weights import dense_weight
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.prune._common import HIDDEN_LINEAR, PRUNE_REPORT, PruneConfig, apply_masks, prunable, with_prior

MODULES = ("qkv", "prj", "mlp", "aux")


@dataclass(frozen=True, kw_only=True)
class DimapConfig(PruneConfig):
    """DIMAP: data-free module-aware pruning by information distortion."""


def distortion_importance(w: torch.Tensor) -> torch.Tensor:
    """``w_j² / Σ_{i ≤ j} w_i²`` over the weights sorted by magnitude, largest first (``w``'s shape)."""
    sq = w.detach().double().reshape(-1).square()
    order = torch.argsort(sq, descending=True)
    ranked = sq[order]
    imp = torch.empty_like(sq)
    imp[order] = ranked / ranked.cumsum(0).clamp_min(1e-300)
    return imp.reshape(w.shape)


def module_of(graph: Graph, nodes: list[fx.Node]) -> dict[str, str]:
    """Each weight target's DIMAP module: qkv / prj / mlp from the coupling group its rows or
    columns belong to, aux otherwise."""
    targets = {n.args[1].target for n in nodes}
    out = {}
    for group in analyze(graph).groups:
        for m in group.members:
            if m.target not in targets or m.target in out:
                continue
            if group.kind == "mlp":
                out[m.target] = "mlp"
            elif group.kind in ("heads", "kv_heads"):
                out[m.target] = "qkv" if m.axis == 0 else "prj"
    return {t: out.get(t, "aux") for t in targets}


@register_pass("prune.dimap", DimapConfig, reference="https://arxiv.org/abs/2404.13648",
               report_fields={**PRUNE_REPORT, "modules": "layers per module"}, applies=HIDDEN_LINEAR)
def dimap(graph: Graph, cfg: DimapConfig, ctx: PassContext) -> PassResult:
    nodes = prunable(graph, cfg, ("linear",), "prune.dimap")
    module = module_of(graph, nodes)
    scores = {n.args[1].target: with_prior(distortion_importance(dense_weight(graph, n)).float(), mask_of(graph, n))
              for n in nodes}
    thresholds = {}
    for name in MODULES:
        parts = [s.reshape(-1) for t, s in scores.items() if module[t] == name]
        if parts:
            flat = torch.cat(parts)
            k = int(cfg.sparsity * flat.numel())
            thresholds[name] = float(torch.kthvalue(flat, k).values) if k else float("-inf")
    report = apply_masks(graph, nodes, lambda node, w: scores[node.args[1].target] > thresholds[module[node.args[1].target]])
    counts = {name: sum(m == name for m in module.values()) for name in MODULES}
    return PassResult(graph, True, {**report, "modules": {k: v for k, v in counts.items() if v}})
