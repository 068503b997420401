"""``merge.sce``: SCE — Select the ``select_topk`` share of entries where the task vectors vary
most, Calculate each model's weight from its task vector's mean square, Erase entries against the
elected sign, then average (FuseChat, Wan et al., https://arxiv.org/abs/2408.07990)."""
from __future__ import annotations

import torch

from splice.passes.merge._common import Group, MergeMethod, Param, in_unit_closed, register_merge
from splice.passes.merge._gta import agreeing


def _selected(tvs: torch.Tensor, share: float) -> torch.Tensor:
    """1 on the ``share`` of entries with the largest variance across the task vectors."""
    if share <= 0:
        return torch.zeros_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * share)
    keep = torch.zeros_like(var)
    if k:
        keep.view(-1)[torch.topk(var.abs().view(-1), k=k).indices] = 1
    return keep


def sce(group: Group) -> torch.Tensor:
    base = group.base
    if not group.tensors:
        return base
    tvs = torch.stack([t - base for t in group.tensors])
    if group.params["select_topk"] < 1:
        tvs = tvs * _selected(tvs, group.params["select_topk"]).unsqueeze(0)
    erase = agreeing(tvs)
    energy = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    weights = torch.ones_like(energy) / len(energy) if abs(total) < 1e-6 else energy / total
    weights = (weights.reshape([-1] + [1] * base.dim()) * erase)
    return base + (tvs * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-6)


register_merge(MergeMethod("sce", "https://arxiv.org/abs/2408.07990", sce, (
    Param("select_topk", float, 1.0, check=in_unit_closed, valid="[0, 1]",
          help="share of entries (largest variance across models) kept"),
    Param("int8_mask", bool, False, help="accepted for mergekit recipes; no effect on the values")),
    base="required", summary="SCE: select, calculate, erase"))
