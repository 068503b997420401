"""``merge.pcb``: PCB-Merging (parameter competition balancing) — each task vector entry gets a
score from its competition within its own task (``exp(n · normalized |τᵢ|²)``, intra-balancing) and
with the other tasks (``tanh(τᵢ · Σⱼ τⱼ)``, inter-balancing); entries below the top ``ratio`` of
each task's scores are dropped, the rest merged as the score-weighted average of the task vectors
(clipped at their 0.01 % / 99.99 % magnitude quantiles, as the reference code does), scaled by
``lambda`` and added to the base (Du et al., https://arxiv.org/abs/2410.02396; reference
``PCB_merge`` in github.com/duguodong7/pcb-merging). The reference balances over the whole model
flattened; here each tensor is balanced on its own, like every tensor-wise merge. mergekit has
no such method."""
from __future__ import annotations

import torch

from splice.passes.merge._common import Group, MergeMethod, Param, in_unit_open_closed, register_merge

OUTLIERS = 1e-4  # share of the smallest and of the largest magnitudes clipped in each task vector


def _quantile_clamp(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Each row of ``x`` clamped to its ``low`` and ``1 − high`` order statistics (the reference's ``clamp``)."""
    d = x.shape[1]
    lo = x.kthvalue(int(d * low) + 1, dim=1, keepdim=True).values
    hi = x.kthvalue(max(1, int(d * (1 - high))), dim=1, keepdim=True).values
    return torch.minimum(torch.maximum(x, lo), hi)


def _min_max(x: torch.Tensor) -> torch.Tensor:
    """Each row of ``x`` rescaled to [0, 1] (0 where the row is constant)."""
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))


def pcb(group: Group) -> torch.Tensor:
    base, p = group.base, group.params
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    tasks = torch.stack([(t - base).reshape(-1).to(work) for t in group.tensors])
    n = tasks.shape[0]
    magnitude = _quantile_clamp(tasks.abs(), OUTLIERS, OUTLIERS)
    intra = torch.exp(n * _min_max(magnitude).square())
    inter = torch.tanh(tasks * tasks.sum(dim=0))
    scores = _min_max(_quantile_clamp(intra * inter, 1 - p["ratio"], 0))
    merged = (tasks.sign() * magnitude * scores).sum(dim=0) / scores.sum(dim=0).clamp(min=1e-12)
    return (base.to(work) + p["lambda"] * merged.reshape(base.shape)).to(base.dtype)


register_merge(MergeMethod("pcb", "https://arxiv.org/abs/2410.02396", pcb, (
    Param("ratio", float, 0.1, check=in_unit_open_closed, valid="(0, 1]",
          help="share of each task vector's entries kept (by balanced score)"),
    Param("lambda", float, 1.0, help="scale of the merged task vector")),
    base="required", min_models=1, summary="PCB-Merging: intra/inter-task balanced scores, drop, weighted merge"))
