"""``merge.ram`` and ``merge.ramplus_tl``: Reinforced Agent Merging — entries only one model changed
(|Δ| > ``epsilon``) keep that change whole, entries several changed are averaged over those; RAM+
(tensor-local) scales each model's unique entries by ``1 + r · min(ρ, alpha)``, ρ its shared /
unique count ratio (https://arxiv.org/abs/2601.13572)."""
from __future__ import annotations

import torch

from splice.passes.merge._common import Group, MergeMethod, Param, register_merge

REFERENCE = "https://arxiv.org/abs/2601.13572"
EPSILON = Param("epsilon", float, 1e-5, check=lambda x: x >= 0, valid="[0, ∞)",
                help="a change at most this large counts as none")


def ram_merge(group: Group, boost: bool) -> torch.Tensor:
    base = group.base
    if not group.tensors:
        return base
    eps = group.params["epsilon"]
    tvs = torch.stack([t - base for t in group.tensors]).view(len(group.tensors), -1)
    changed = tvs.abs() > eps
    counts = changed.sum(dim=0, keepdim=True)
    shared, unique = counts > 1, counts == 1
    scale = torch.ones(len(group.tensors), 1, dtype=tvs.dtype)
    if boost:
        rho = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=eps)
        scale = (1 + group.params["r"] * rho.clamp(min=0, max=group.params["alpha"])).unsqueeze(-1)
    tvs = tvs * changed
    merged = (tvs * unique * scale + tvs * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


register_merge(MergeMethod("ram", REFERENCE, lambda g: ram_merge(g, False), (EPSILON,), base="required",
                           summary="RAM: unique changes kept whole, shared ones averaged"))
register_merge(MergeMethod("ramplus_tl", REFERENCE, lambda g: ram_merge(g, True), (
    Param("r", float, 0.1, check=lambda x: x >= 0, valid="[0, ∞)", help="strength of the unique-entry boost"),
    Param("alpha", float, 0.2, check=lambda x: x >= 0, valid="[0, ∞)", help="cap of the shared/unique ratio"),
    EPSILON), base="required", summary="RAM+ (tensor-local): RAM with a boost of unique entries"))
