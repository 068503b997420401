"""The low-rank family's ops: schema, reference, fake impl, autograd, registry record (roles,
weight access, sample inputs, ONNX translation in ``lowrank/onnx.py``).

* ``lowrank_linear(x, A [r, in], B [out, r], bias)``: ``x Aᵀ Bᵀ + bias``, a linear whose weight is
  stored as two factors (``lowrank.svd``, ``lowrank.pela``); its weight reads as ``B A`` and a new
  one is factored again at the same rank (lossy);
* ``dense_sparse_linear(x, D [out, k], values [s, in], index [s, in], bias)``: ``x (D S)ᵀ + bias``
  with ``S [k, in]`` holding ``s`` non-zeros per column (``lowrank.dsformer``); a new weight keeps
  ``D`` and the sparsity pattern and refits the values by least squares (lossy);
* ``lowrank_correction(y, x, A [r, in], B [out, r])``: ``y + x Aᵀ Bᵀ``, a low-rank correction added to
  the output ``y`` of the layer reading ``x`` (``lowrank.eora``): the compressed layer stays as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from splice.kernels._sample import Sampler
from splice.kernels.adapters.factored import autograd_by_recompute
from splice.kernels.lowrank.factors import refit_values, scatter_rows, split_svd
from splice.kernels.registry import WeightAccess, register_op

ONNX = "splice.kernels.lowrank.onnx"


def _lowrank_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x Aᵀ Bᵀ + bias`` (a linear stored as its rank-r factors; https://arxiv.org/abs/2310.04793)."""
    return F.linear(F.linear(x.to(A.dtype), A), B.to(A.dtype), None if bias is None else bias.to(A.dtype)).to(x.dtype)


def _dense_sparse_linear(x: torch.Tensor, D: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """``x (D S)ᵀ + bias``, ``S = scatter_rows(values, index, k)`` (DSFormer, https://arxiv.org/abs/2312.13211)."""
    s = scatter_rows(values.to(D.dtype), index, D.shape[1])
    return F.linear(F.linear(x.to(D.dtype), s), D, None if bias is None else bias.to(D.dtype)).to(x.dtype)


def _lowrank_correction(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``y + x Aᵀ Bᵀ`` (EoRA's compensation beside a compressed layer, https://arxiv.org/abs/2410.21271)."""
    return y + F.linear(F.linear(x.to(A.dtype), A), B.to(A.dtype)).to(y.dtype)


lowrank_linear = torch.library.custom_op("splice::lowrank_linear", _lowrank_linear, mutates_args=())
dense_sparse_linear = torch.library.custom_op("splice::dense_sparse_linear", _dense_sparse_linear, mutates_args=())
lowrank_correction = torch.library.custom_op("splice::lowrank_correction", _lowrank_correction, mutates_args=())


def _out(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], rows)


@lowrank_linear.register_fake
def _(x, A, B, bias):
    torch._check(A.dim() == 2 and B.dim() == 2, lambda: "lowrank_linear: A, B must be 2-D")
    torch._check(x.shape[-1] == A.shape[1], lambda: f"lowrank_linear: input features {x.shape[-1]} != A's {A.shape[1]}")
    torch._check(B.shape[1] == A.shape[0], lambda: f"lowrank_linear: B rank {B.shape[1]} != A rank {A.shape[0]}")
    return _out(x, B.shape[0])


@dense_sparse_linear.register_fake
def _(x, D, values, index, bias):
    torch._check(values.shape == index.shape and values.dim() == 2, lambda: "dense_sparse_linear: values, index [s, in]")
    torch._check(x.shape[-1] == values.shape[1], lambda: f"dense_sparse_linear: input features {x.shape[-1]} != {values.shape[1]}")
    return _out(x, D.shape[0])


@lowrank_correction.register_fake
def _(y, x, A, B):
    torch._check(x.shape[-1] == A.shape[1], lambda: f"lowrank_correction: input features {x.shape[-1]} != A's {A.shape[1]}")
    torch._check(B.shape[0] == y.shape[-1] and B.shape[1] == A.shape[0], lambda: "lowrank_correction: B must be [out, r]")
    return torch.empty_like(y)


for _op, _math in ((lowrank_linear, _lowrank_linear), (dense_sparse_linear, _dense_sparse_linear),
                   (lowrank_correction, _lowrank_correction)):
    autograd_by_recompute(_op, _math)


def _refit_values(args: tuple, w: torch.Tensor) -> dict[int, torch.Tensor]:
    """``dense_sparse_linear``'s new values for weight ``w``, with ``D`` and the pattern kept."""
    return {2: refit_values(args[1], args[3], w).to(args[2].dtype)}


def _sample_linear():
    s = Sampler()
    return s(2, 3, 8), s(2, 8, grad=True), s(6, 2, grad=True), s(6)


def _sample_dense_sparse():
    s = Sampler()
    index = torch.stack([torch.randperm(4, generator=s.gen)[:2] for _ in range(8)], 1).to(torch.uint8)
    return s(2, 3, 8), s(6, 4, grad=True), s(2, 8, grad=True), index, s(6)


def _sample_correction():
    s = Sampler()
    return s(2, 3, 6), s(2, 3, 8), s(2, 8, grad=True), s(6, 2, grad=True)


register_op(lowrank_linear, family="lowrank", kind="linear", trainable=True, roles={1: "weight", 2: "weight", 3: "bias"},
            sample_inputs=_sample_linear, translations={"onnx": f"{ONNX}:lowrank_linear"},
            weight=WeightAccess({1: "A", 2: "B"}, lambda a: a[2].float() @ a[1].float(),
                                lambda a, w: dict(zip((1, 2), (t.to(a[1].dtype) for t in split_svd(w, a[1].shape[0])))),
                                lossy=True))
register_op(dense_sparse_linear, family="lowrank", kind="linear", trainable=True,
            roles={1: "weight", 2: "weight", 3: "index", 4: "bias"}, sample_inputs=_sample_dense_sparse,
            translations={"onnx": f"{ONNX}:dense_sparse_linear"},
            weight=WeightAccess({2: "values"}, lambda a: a[1].float() @ scatter_rows(a[2].float(), a[3], a[1].shape[1]),
                                _refit_values, lossy=True))
register_op(lowrank_correction, family="lowrank", trainable=True, roles={2: "lowrank", 3: "lowrank"},
            sample_inputs=_sample_correction, translations={"onnx": f"{ONNX}:lowrank_correction"})
