"""``merge.nuslerp``: spherical interpolation of two models — or of their task vectors when a base
is given — at ``t = w₂ / (w₁ + w₂)``, over the whole flattened tensor (``nuslerp_flatten``, the
default), each row (``nuslerp_row_wise``) or each column; collinear vectors interpolate linearly
(mergekit's NuSLERP, https://github.com/arcee-ai/mergekit; Shoemake 1985)."""
from __future__ import annotations

import torch

from splice.passes.merge._common import Group, MergeMethod, Param, register_merge


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int, flatten: bool, eps: float = 1e-8) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0, u1 = (v / torch.norm(v, dim=-1, keepdim=True).clamp(min=1e-7) for v in (v0, v1))
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(collinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(collinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def nuslerp_merge(group: Group) -> torch.Tensor:
    w = group.params["weight"]
    t = 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)
    dim = 0 if group.params["nuslerp_row_wise"] else -1
    flatten = group.params["nuslerp_flatten"]
    a, b = group.tensors
    if group.base is None:
        return nuslerp(t, a, b, dim, flatten)
    return group.base + nuslerp(t, a - group.base, b - group.base, dim, flatten)


register_merge(MergeMethod("nuslerp", "https://github.com/arcee-ai/mergekit", nuslerp_merge, (
    Param("weight", float, per_model=True, help="each model's weight (t = w₂ / (w₁ + w₂))"),
    Param("nuslerp_row_wise", bool, False, help="interpolate each row (else each column) when not flattened"),
    Param("nuslerp_flatten", bool, True, help="interpolate the whole flattened tensor")),
    base="optional", min_models=2, max_models=2, summary="NuSLERP: slerp of two models or task vectors"))
