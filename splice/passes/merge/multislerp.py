"""``merge.multislerp``: barycentric interpolation of any number of models (or task vectors, with a
base) on the hypersphere — project onto the tangent space at the weighted mean direction, average
there, map back, scale by the weighted mean norm (mergekit's Multi-SLERP,
https://goddard.blog/posts/multislerp-wow-what-a-cool-idea)."""
from __future__ import annotations

import torch

from splice.passes.merge._common import Group, MergeMethod, Param, register_merge


def multislerp(group: Group) -> torch.Tensor:
    if len(group.tensors) == 1:
        return group.tensors[0]
    eps, base = group.params["eps"], group.base
    vectors = torch.stack(group.tensors)
    if base is not None:
        vectors = vectors - base
    flat = vectors.reshape(vectors.shape[0], -1)
    w = torch.tensor(group.params["weight"], dtype=vectors.dtype)
    if group.params["normalize_weights"]:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    if bool((norms == 0).all()):  # no model moved this tensor (mergekit raises here): it stays
        return group.tensors[0] if base is None else base
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    if torch.norm(mean) < eps:
        if len(group.tensors) != 2:
            raise group.error("the weighted mean direction is zero (antipodal inputs with balancing weights)")
        out = (vectors[0] * w[0] + vectors[1] * w[1])
        return out if base is None else out + base
    mean = mean / torch.norm(mean)
    tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * w.view(-1, 1)).sum(0)
    size = torch.norm(tangent) + eps
    out = ((mean * torch.cos(size) + tangent * (torch.sin(size) / size)) * (norms.squeeze(-1) * w).sum())
    out = out.view(vectors.shape[1:])
    return out if base is None else out + base


register_merge(MergeMethod("multislerp", "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea", multislerp, (
    Param("weight", float, per_model=True, help="each model's weight"),
    Param("normalize_weights", bool, True, help="divide the weights by their sum"),
    Param("eps", float, 1e-8, check=lambda x: x > 0, valid="(0, ∞)", help="numerical floor")),
    base="optional", summary="Multi-SLERP: barycentric interpolation on the hypersphere"))
