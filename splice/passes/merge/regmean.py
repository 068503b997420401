"""``merge.regmean``: RegMean — each linear layer merged in closed form as the weights that best
reproduce every model's outputs on its own inputs, ``W* = (Σᵢ Wᵢ Gᵢ)(Σᵢ Gᵢ)⁻¹`` with ``Gᵢ = XᵢᵀXᵢ``
the Gram matrix of the layer's inputs in model ``i`` on the calibration data (off-diagonal entries
scaled by ``alpha``, the paper's regularizer); every other tensor is the weighted average
(Jin et al., "Dataless knowledge fusion by merging weights of language models",
https://arxiv.org/abs/2212.09849). mergekit has no data-aware method."""
from __future__ import annotations

import torch

from splice.ir.graph import Graph
from splice.ir.select import op_kind
from splice.passes.instrument.calibrate import input_hessians
from splice.passes.merge._common import Group, MergeMethod, Param, in_unit_closed, register_merge


def gram_matrices(graph: Graph, calibration: list, who: str) -> dict[str, torch.Tensor]:
    """The input Gram matrix (up to the common factor 2/n) of every linear, by weight target."""
    nodes = [n for n in graph.gm.graph.nodes if op_kind(n) == "linear" and getattr(n.args[1], "op", None) == "get_attr"]
    return input_hessians(graph, nodes, calibration)


def weighted_average(group: Group) -> torch.Tensor:
    w = group.params["weight"]
    return sum(wi * t for wi, t in zip(w, group.tensors)) / sum(w)


def regmean(group: Group) -> torch.Tensor:
    grams = group.stats
    if group.tensors[0].dim() != 2 or any(g is None for g in grams):
        return weighted_average(group)
    a, w = group.params["alpha"], group.params["weight"]
    grams = [wi * (a * g + (1 - a) * torch.diag(torch.diagonal(g))) for wi, g in zip(w, grams)]
    total = sum(grams)
    ridge = 1e-8 * float(torch.diagonal(total).mean()) * torch.eye(total.shape[0], dtype=total.dtype)
    numerator = sum(t.to(g.dtype) @ g for t, g in zip(group.tensors, grams))
    return torch.linalg.solve(total + ridge, numerator.T).T  # Gram matrices are symmetric


register_merge(MergeMethod("regmean", "https://arxiv.org/abs/2212.09849", regmean, (
    Param("weight", float, 1.0, per_model=True, help="each model's weight (scales its Gram matrix)"),
    Param("alpha", float, 0.9, check=in_unit_closed, valid="[0, 1]",
          help="scale of the Gram matrices' off-diagonal entries (1: exact least squares)")),
    min_models=2, statistic=gram_matrices, summary="RegMean: closed-form least-squares merge per linear layer"))
