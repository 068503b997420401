"""``splice::basis_weight``: a weight kept as a shared basis from which each of several models'
weights is reconstructed — ``base + Σₖ coefficients[task, k] · basis[k]`` (reversible model
merging, ``merge.rmm``, https://arxiv.org/abs/2510.14163). ``task`` is a stored 0-d index, one per
graph, so switching the model every weight reconstructs is writing one tensor."""
from __future__ import annotations

import torch

from splice.kernels.registry import register_op


@torch.library.custom_op("splice::basis_weight", mutates_args=())
def basis_weight(base: torch.Tensor, basis: torch.Tensor, coefficients: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    """``base + Σₖ coefficients[task, k] · basis[k]``; ``basis`` is ``[k, *base.shape]``,
    ``coefficients`` ``[models, k]``, ``task`` a 0-d int64 index."""
    mix = coefficients[task].to(basis.dtype)
    return base + torch.tensordot(mix, basis, dims=1).to(base.dtype)


@basis_weight.register_fake
def _(base, basis, coefficients, task):
    torch._check(basis.shape[1:] == base.shape, lambda: "basis_weight: basis rows differ from the base's shape")
    torch._check(coefficients.shape[1] == basis.shape[0], lambda: "basis_weight: coefficients and basis differ in k")
    return torch.empty_like(base)


def _sample():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(6, 8, generator=gen), torch.randn(2, 6, 8, generator=gen), torch.randn(3, 2, generator=gen),
            torch.tensor(1))


register_op(basis_weight, family="merge", roles={0: "weight", 1: "basis", 2: "coefficient", 3: "index"},
            sample_inputs=_sample, translations={"onnx": "splice.kernels.merge.onnx:basis_weight"})
