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


def _setup(ctx, inputs, output):
    _, basis, coefficients, task = inputs
    ctx.save_for_backward(basis, coefficients, task)


def _backward(ctx, grad):
    """``∂/∂base = g``, ``∂/∂basis[k] = c[task, k]·g``, ``∂/∂c[task, k] = ⟨g, basis[k]⟩`` (other rows 0)."""
    basis, coefficients, task = ctx.saved_tensors
    g = grad.to(basis.dtype)
    d_basis = coefficients[task].to(basis.dtype).view(-1, *[1] * grad.dim()) * g
    d_coefficients = torch.zeros_like(coefficients)
    d_coefficients[task] = (basis * g).reshape(basis.shape[0], -1).sum(1).to(coefficients.dtype)
    return grad, d_basis, d_coefficients, None


basis_weight.register_autograd(_backward, setup_context=_setup)


def _sample():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(6, 8, generator=gen), torch.randn(2, 6, 8, generator=gen), torch.randn(3, 2, generator=gen),
            torch.tensor(1))


register_op(basis_weight, family="merge", roles={0: "weight", 1: "basis", 2: "coefficient", 3: "index"},
            sample_inputs=_sample, translations={"onnx": "splice.kernels.merge.onnx:basis_weight"})
