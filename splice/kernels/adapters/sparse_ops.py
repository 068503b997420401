"""Sparse fine-tuning deltas, masks as adapters: ``splice::sparse_delta``, ``row_delta``,
``col_delta`` and ``dsee_delta`` (low-rank plus sparse), with their registry records (ONNX
translations in ``adapters/onnx.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from splice.kernels._sample import Sampler
from splice.kernels.adapters.delta_ops import ONNX, lora_delta
from splice.kernels.registry import register_op

# Only the selected entries of ΔW are stored and trained: ``values`` (float, trainable) plus a
# fixed bool ``mask`` that says where they go. The mask's shape carries the layer's dims, so the
# fake impls know the output shape and ``Method.delta_weight`` rebuilds the dense update exactly.


def scatter_mask(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dense ``[out, in]`` tensor with ``values`` at ``mask``'s True entries (row-major order)."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


@torch.library.custom_op("splice::sparse_delta", mutates_args=())
def sparse_delta(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Unstructured sparse update ``x @ ΔWᵀ · scale``: values ``[nnz]`` scattered into ``ΔW [out, in]``
    at ``mask``'s True entries (bool ``[out, in]``, row-major order, as ``ΔW[mask] = values``)."""
    dw = scatter_mask(values, mask) * scale.to(values.dtype)
    return F.linear(x.to(values.dtype), dw).to(x.dtype)


@sparse_delta.register_fake
def _(x, values, mask, scale):
    torch._check(values.dim() == 1 and mask.dim() == 2 and scale.dim() == 0,
                 lambda: "sparse_delta: values must be 1-D, mask 2-D, scale 0-d")
    torch._check(x.shape[-1] == mask.shape[1], lambda: f"sparse_delta: input features {x.shape[-1]} != mask's {mask.shape[1]}")
    return x.new_empty(*x.shape[:-1], mask.shape[0])


def _sparse_grads(x, values, mask, s, grad, need_x, need_values):
    dx = (grad @ scatter_mask(values, mask) * s).to(x.dtype) if need_x else None
    dv = ((_flat(grad).T @ _flat(x).to(values.dtype)) * s)[mask] if need_values else None
    return dx, dv


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _sparse_backward(ctx, grad):
    x, values, mask, scale = ctx.saved_tensors
    dx, dv = _sparse_grads(x, values, mask, scale.to(values.dtype), grad.to(values.dtype), *ctx.needs_input_grad[:2])
    return dx, dv, None, None


sparse_delta.register_autograd(_sparse_backward, setup_context=_save_inputs)


@torch.library.custom_op("splice::row_delta", mutates_args=())
def row_delta(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Update of the chosen output rows only: values ``[k, in]`` are the rows of ΔW where the
    bool ``mask [out]`` is True; computes ``x @ valuesᵀ · scale`` (k outputs) and places them."""
    h = F.linear(x.to(values.dtype), values) * scale.to(values.dtype)
    out = h.new_zeros(*h.shape[:-1], mask.shape[0])
    return out.index_copy_(-1, mask.nonzero().squeeze(1), h).to(x.dtype)


@row_delta.register_fake
def _(x, values, mask, scale):
    torch._check(values.dim() == 2 and mask.dim() == 1 and scale.dim() == 0,
                 lambda: "row_delta: values must be 2-D, mask 1-D, scale 0-d")
    torch._check(x.shape[-1] == values.shape[1], lambda: f"row_delta: input features {x.shape[-1]} != values' {values.shape[1]}")
    return x.new_empty(*x.shape[:-1], mask.shape[0])


def _row_backward(ctx, grad):
    x, values, mask, scale = ctx.saved_tensors
    g = grad.to(values.dtype).index_select(-1, mask.nonzero().squeeze(1)) * scale.to(values.dtype)
    dx = (g @ values).to(x.dtype) if ctx.needs_input_grad[0] else None
    dv = _flat(g).T @ _flat(x).to(values.dtype) if ctx.needs_input_grad[1] else None
    return dx, dv, None, None


row_delta.register_autograd(_row_backward, setup_context=_save_inputs)


@torch.library.custom_op("splice::col_delta", mutates_args=())
def col_delta(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Update of the chosen input columns only: values ``[out, k]`` are the columns of ΔW where the
    bool ``mask [in]`` is True; computes ``x[..., chosen] @ valuesᵀ · scale``."""
    picked = x.to(values.dtype).index_select(-1, mask.nonzero().squeeze(1))
    return (F.linear(picked, values) * scale.to(values.dtype)).to(x.dtype)


@col_delta.register_fake
def _(x, values, mask, scale):
    torch._check(values.dim() == 2 and mask.dim() == 1 and scale.dim() == 0,
                 lambda: "col_delta: values must be 2-D, mask 1-D, scale 0-d")
    torch._check(x.shape[-1] == mask.shape[0], lambda: f"col_delta: input features {x.shape[-1]} != mask's {mask.shape[0]}")
    return x.new_empty(*x.shape[:-1], values.shape[0])


def _col_backward(ctx, grad):
    x, values, mask, scale = ctx.saved_tensors
    cols = mask.nonzero().squeeze(1)
    g = grad.to(values.dtype) * scale.to(values.dtype)
    dx = None
    if ctx.needs_input_grad[0]:
        dx = x.new_zeros(x.shape).index_copy_(-1, cols, (g @ values).to(x.dtype))
    dv = _flat(g).T @ _flat(x).to(values.dtype).index_select(-1, cols) if ctx.needs_input_grad[1] else None
    return dx, dv, None, None


col_delta.register_autograd(_col_backward, setup_context=_save_inputs)


@torch.library.custom_op("splice::dsee_delta", mutates_args=())
def dsee_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
               scale: torch.Tensor) -> torch.Tensor:
    """DSEE's update (https://arxiv.org/abs/2111.00160): low-rank plus sparse,
    ``x @ (B A + S)ᵀ · scale`` with ``S`` = values at ``mask`` (as ``sparse_delta``)."""
    return lora_delta(x, A, B, scale) + sparse_delta(x, values, mask, scale)


@dsee_delta.register_fake
def _(x, A, B, values, mask, scale):
    torch._check(tuple(mask.shape) == (B.shape[0], A.shape[1]), lambda: "dsee_delta: mask must be [out, in] of B A")
    return lora_delta(x, A, B, scale)


def _dsee_backward(ctx, grad):
    x, A, B, values, mask, scale = ctx.saved_tensors
    s, g = scale.to(A.dtype), grad.to(A.dtype)
    dh = (g @ B) * s
    dx_sparse, dv = _sparse_grads(x, values, mask, s, g, ctx.needs_input_grad[0], ctx.needs_input_grad[3])
    dx = dx_sparse + (dh @ A).to(x.dtype) if ctx.needs_input_grad[0] else None
    dA = _flat(dh).T @ _flat(x).to(A.dtype) if ctx.needs_input_grad[1] else None
    dB = _flat(g).T @ (_flat(x).to(A.dtype) @ A.T * s) if ctx.needs_input_grad[2] else None
    return dx, dA, dB, dv, None, None


dsee_delta.register_autograd(_dsee_backward, setup_context=_save_inputs)


def _sparse_sample():
    s = Sampler()
    mask = s.mask(6, 8)
    return s(2, 3, 8), s(int(mask.sum()), grad=True), mask, s.scalar(0.5)


def _row_sample():
    s = Sampler()
    mask = s.mask(6)
    return s(2, 3, 8), s(int(mask.sum()), 8, grad=True), mask, s.scalar(0.5)


def _col_sample():
    s = Sampler()
    mask = s.mask(8)
    return s(2, 3, 8), s(6, int(mask.sum()), grad=True), mask, s.scalar(0.5)


def _dsee_sample():
    s = Sampler()
    mask = s.mask(6, 8, keep=0.2)
    return s(2, 3, 8), s(2, 8, grad=True), s(6, 2, grad=True), s(int(mask.sum()), grad=True), mask, s.scalar(0.5)


_MASKED = {1: "adapter", 2: "adapter_index", 3: "adapter_scale"}
for _op, _roles, _sample in ((sparse_delta, _MASKED, _sparse_sample), (row_delta, _MASKED, _row_sample),
                             (col_delta, _MASKED, _col_sample),
                             (dsee_delta, {1: "adapter", 2: "adapter", 3: "adapter", 4: "adapter_index",
                                           5: "adapter_scale"}, _dsee_sample)):
    register_op(_op, family="adapters", roles=_roles, trainable=True, sample_inputs=_sample,
                translations={"onnx": f"{ONNX}:{_op._name}"})
