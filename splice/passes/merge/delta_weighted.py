"""``merge.delta_weighted``: delta-weighted averaging from CoDiEmb — every parameter is the
average of the models weighted by how far each moved from the shared initialization (the base)
at that parameter, ``wᵢ = |θᵢ − θ₀| / Σⱼ |θⱼ − θ₀|`` (plain average where none moved): the model
that changed a parameter most during its fine-tuning owns it most (CoDiEmb,
https://arxiv.org/abs/2508.11442). mergekit has no such method."""
from __future__ import annotations

import torch

from splice.passes.merge._common import Group, MergeMethod, register_merge


def delta_weighted(group: Group) -> torch.Tensor:
    base = group.base
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    deltas = torch.stack([(t - base).to(work) for t in group.tensors])
    moved = deltas.abs()
    total = moved.sum(dim=0)
    weights = torch.where(total > 0, moved / torch.where(total > 0, total, torch.ones_like(total)),
                          torch.full_like(moved, 1 / len(deltas)))
    return (base.to(work) + (weights * deltas).sum(dim=0)).to(base.dtype)


register_merge(MergeMethod("delta_weighted", "https://arxiv.org/abs/2508.11442", delta_weighted, (),
                           base="required", min_models=2,
                           summary="CoDiEmb: per-parameter weights from each model's deviation from the base"))
