"""``merge.karcher``: the Karcher (Riemannian) mean of the models' tensors on the unit sphere,
found by fixed-point iteration, scaled by their mean norm
(https://arxiv.org/abs/2603.04972; Karcher 1977)."""
from __future__ import annotations

import torch

from splice.passes.merge._common import Group, MergeMethod, Param, register_merge


def karcher_mean(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [torch.linalg.vector_norm(t.to(dtype)) for t in tensors]
    units = [torch.zeros_like(t) if float(n) == 0 else (t / n).to(t.dtype) for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weighted = [(alphas[i] / total, units[i]) for i in valid]
    mean = torch.zeros_like(units[valid[0]])
    for a, u in weighted:
        mean += a * u
    norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = units[valid[0]].clone() if float(norm) < tol else (mean / norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in weighted:
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) >= tol:
                tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        step = torch.linalg.vector_norm(tangent.to(dtype))
        if float(step) < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        size = torch.linalg.vector_norm(mean.to(dtype))
        if float(size) > tol:
            mean = (mean / size).to(mean.dtype)
    return sum(a * n for a, n in zip(alphas, norms)) * mean


def karcher(group: Group) -> torch.Tensor:
    return karcher_mean(group.tensors, group.params["max_iter"], group.params["tol"])


register_merge(MergeMethod("karcher", "https://arxiv.org/abs/2603.04972", karcher, (
    Param("max_iter", int, 10, check=lambda x: x >= 1, valid="[1, ∞)", help="fixed-point iterations at most"),
    Param("tol", float, 1e-5, check=lambda x: x > 0, valid="(0, ∞)", help="stop when the step is below this")),
    summary="Karcher mean on the sphere"))
