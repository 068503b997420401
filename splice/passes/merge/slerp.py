"""``merge.slerp``: spherical interpolation from the base (``t = 0``) to the other model (``t = 1``),
each tensor flattened to one vector on its great circle; nearly collinear or antipodal tensors
(|cos| > 0.9995) interpolate linearly, as mergekit does (https://en.wikipedia.org/wiki/Slerp;
Shoemake 1985)."""
from __future__ import annotations

import torch

from splice.passes.merge._common import Group, MergeMethod, Param, in_unit_closed, register_merge

DOT_THRESHOLD, EPS = 0.9995, 1e-8


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(-1).to(dtype), v1.reshape(-1).to(dtype)
    if not a.numel():
        return v0.clone()
    na, nb = (torch.linalg.vector_norm(x) for x in (a, b))
    na, nb = torch.where(na > EPS, na, 1), torch.where(nb > EPS, nb, 1)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    near = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(near, 0, dot))
    sin = torch.sin(theta)
    ca = torch.where(near, 1 - t, torch.sin((1 - t) * theta) / sin)
    cb = torch.where(near, t, torch.sin(t * theta) / sin)
    return (ca * a + cb * b).reshape(v0.shape)


def slerp(group: Group) -> torch.Tensor:
    return slerp_tensors(group.params["t"], group.base, group.tensors[0])


register_merge(MergeMethod("slerp", "https://en.wikipedia.org/wiki/Slerp", slerp, (
    Param("t", float, check=in_unit_closed, valid="[0, 1]", help="0: the base, 1: the other model"),),
    base="required", min_models=1, max_models=1, summary="Spherical interpolation of two models"))
