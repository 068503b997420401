"""``merge.fisher``: Fisher-weighted averaging — each parameter averaged with the weights
``λᵢ Fᵢ``, ``Fᵢ`` model ``i``'s diagonal empirical Fisher (mean squared per-sample gradient of the
label-free calibration loss), each model's Fisher normalized by its global norm and floored at
``epsilon`` as the reference code does (Matena and Raffel, https://arxiv.org/abs/2111.09832).
mergekit has no data-aware method."""
from __future__ import annotations

import torch

from splice.ir.graph import Graph
from splice.ir.loss import has_label_free_loss
from splice.passes.base import Applies
from splice.passes.instrument.gradients import weight_fisher
from splice.passes.merge._common import Group, MergeMethod, Param, register_merge


def normalized_fisher(graph: Graph, calibration: list, who: str) -> dict[str, torch.Tensor]:
    targets = [t for t, v in graph.tensors().items() if v.is_floating_point()]
    _, fisher = weight_fisher(graph, targets, calibration, who)
    norm = float(torch.sqrt(sum(f.double().square().sum() for f in fisher.values())))
    return {t: f / norm for t, f in fisher.items()} if norm > 0 else fisher


def fisher_merge(group: Group) -> torch.Tensor:
    eps, w = group.params["epsilon"], group.params["weight"]
    if any(f is None for f in group.stats):  # a tensor without a gradient (a running statistic)
        return sum(wi * t for wi, t in zip(w, group.tensors)) / sum(w)
    scales = [wi * (f.to(t.dtype) + eps) for wi, f, t in zip(w, group.stats, group.tensors)]
    return sum(s * t for s, t in zip(scales, group.tensors)) / sum(scales)


register_merge(MergeMethod("fisher", "https://arxiv.org/abs/2111.09832", fisher_merge, (
    Param("weight", float, 1.0, per_model=True, help="each model's weight λ"),
    Param("epsilon", float, 1e-6, check=lambda x: x > 0, valid="(0, ∞)", help="floor added to each Fisher")),
    min_models=2, statistic=normalized_fisher, summary="Fisher-weighted averaging",
    applies=Applies("a model with a label-free loss (LM logits or class scores)", kinds=("linear", "conv"),
                    check=has_label_free_loss)))
