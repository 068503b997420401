"""Every splice custom op: schema, reference implementation (plain torch, the ground
truth), fake implementation for torch.export, and autograd where the op can be trained.

Ops are the unit of lowering: each has an ONNX translation in ``kernels/onnx.py``.
Quantized weights are stored packed (see ``kernels/quant.py``), so byte counts are honest.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from splice.ir.graph import register_arg_roles
from splice.ir.select import register_kind
from splice.kernels.quant import dequantize_packed

# --------------------------------------------------------------------------- qlinear


@torch.library.custom_op("splice::qlinear", mutates_args=())
def qlinear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """``y = x @ dequant(qweight).T + bias`` with group-wise packed weights.

    qweight: uint8 ``[N, K/group_size, group_size*bits/8]``; scales: ``[N, K/group_size]``;
    zeros: packed uint8 ``[N, ceil(G*bits/8)]`` or None for symmetric (zero = 2**(bits-1)).
    """
    w = dequantize_packed(qweight, scales, zeros, bits, group_size).to(x.dtype)
    return F.linear(x, w, bias)


def _check_storage(qweight, scales, bits, group_size):
    torch._check(qweight.dtype == torch.uint8 and qweight.dim() == 3, lambda: "qweight must be uint8 [N, G, blob]")
    torch._check(tuple(scales.shape) == tuple(qweight.shape[:2]), lambda: f"scales {tuple(scales.shape)} != {tuple(qweight.shape[:2])}")
    torch._check(qweight.shape[2] == (group_size * bits + 7) // 8, lambda: "qweight blob width does not match bits/group_size")


@qlinear.register_fake
def _(x, qweight, scales, zeros, bias, bits, group_size):
    _check_storage(qweight, scales, bits, group_size)
    torch._check(x.shape[-1] == qweight.shape[1] * group_size, lambda: "qlinear: input features != G * group_size")
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _qlinear_setup(ctx, inputs, output):
    x, qweight, scales, zeros, bias, bits, group_size = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.bits, ctx.group_size = bits, group_size


def _qlinear_backward(ctx, grad):
    qweight, scales, zeros = ctx.saved_tensors
    w = dequantize_packed(qweight, scales, zeros, ctx.bits, ctx.group_size).to(grad.dtype)
    return grad @ w, None, None, None, None, None, None


qlinear.register_autograd(_qlinear_backward, setup_context=_qlinear_setup)
register_kind(torch.ops.splice.qlinear.default, "linear")

# ------------------------------------------------------------------------ qembedding


@torch.library.custom_op("splice::qembedding", mutates_args=())
def qembedding(indices: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """Embedding lookup on a table stored like ``qlinear``'s weight (``[V, D/g, g*bits/8]``):
    gathers the packed rows, then dequantizes only those."""
    q = qweight[indices.reshape(-1)]
    s = scales[indices.reshape(-1)]
    z = None if zeros is None else zeros[indices.reshape(-1)]
    rows = dequantize_packed(q, s, z, bits, group_size)
    return rows.reshape(*indices.shape, rows.shape[-1])


@qembedding.register_fake
def _(indices, qweight, scales, zeros, bits, group_size):
    _check_storage(qweight, scales, bits, group_size)
    return scales.new_empty(*indices.shape, qweight.shape[1] * group_size)


register_kind(torch.ops.splice.qembedding.default, "embedding")

register_arg_roles(torch.ops.splice.qlinear.default, {1: "qweight", 2: "scale", 3: "zero_point", 4: "bias"})
register_arg_roles(torch.ops.splice.qembedding.default, {1: "qweight", 2: "scale", 3: "zero_point"})

# -------------------------------------------------------------------------- observe


@torch.library.custom_op("splice::observe", mutates_args=())
def observe(x: torch.Tensor, key: str) -> torch.Tensor:
    """Identity that feeds ``x`` to the active calibration store (``kernels/observe.py``).
    Inserted by ``instrument.observe``; removed before export."""
    from splice.kernels.observe import record

    record(key, x)
    return x.clone()


@observe.register_fake
def _(x, key):
    return torch.empty_like(x)


observe.register_autograd(lambda ctx, grad: (grad, None))

# ----------------------------------------------------------------------- lora_delta


@torch.library.custom_op("splice::lora_delta", mutates_args=())
def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LoRA's update beside a base layer: ``(x @ Aᵀ · scale) @ Bᵀ`` (https://arxiv.org/abs/2106.09685).

    A: ``[r, in]``, B: ``[out, r]`` (PEFT's ``lora_A``/``lora_B`` weights), scale: a 0-d tensor, so
    an adapter's weight changes (or it is switched off with 0) without changing the graph.
    """
    h = F.linear(x.to(A.dtype), A) * scale.to(A.dtype)  # computed in the adapter's dtype, as PEFT does
    return F.linear(h, B.to(A.dtype)).to(x.dtype)


@lora_delta.register_fake
def _(x, A, B, scale):
    torch._check(A.dim() == 2 and B.dim() == 2 and scale.dim() == 0, lambda: "lora_delta: A, B must be 2-D, scale 0-d")
    torch._check(x.shape[-1] == A.shape[1], lambda: f"lora_delta: input features {x.shape[-1]} != A's {A.shape[1]}")
    torch._check(B.shape[1] == A.shape[0], lambda: f"lora_delta: B rank {B.shape[1]} != A rank {A.shape[0]}")
    return x.new_empty(*x.shape[:-1], B.shape[0])


def _lora_setup(ctx, inputs, output):
    x, A, B, scale = inputs
    ctx.save_for_backward(x, A, B, scale)


def _lora_backward(ctx, grad):
    x, A, B, scale = ctx.saved_tensors
    s = scale.to(A.dtype)
    g = grad.to(A.dtype)
    dh = (g @ B.to(A.dtype)) * s                             # [..., r]
    dx = (dh @ A).to(x.dtype) if ctx.needs_input_grad[0] else None
    flat = x.reshape(-1, x.shape[-1]).to(A.dtype)
    dA = dh.reshape(-1, dh.shape[-1]).T @ flat if ctx.needs_input_grad[1] else None
    dB = None
    if ctx.needs_input_grad[2]:
        h = (flat @ A.T) * s
        dB = (g.reshape(-1, g.shape[-1]).T @ h).to(B.dtype)
    return dx, dA, dB, None


lora_delta.register_autograd(_lora_backward, setup_context=_lora_setup)
register_arg_roles(torch.ops.splice.lora_delta.default, {1: "adapter", 2: "adapter", 3: "adapter_scale"})

# -------------------------------------------------------------------- folded_adapter


@torch.library.custom_op("splice::folded_adapter", mutates_args=())
def folded_adapter(base: torch.Tensor, tensors: list[torch.Tensor], spec: str) -> torch.Tensor:
    """A record, not a computation: ``adapter.fold`` keeps here what ``adapter.unfold`` needs (the
    adapter's tensors, the base tensors re-quantization replaced, ``spec`` as JSON), beside the
    base op whose output is ``base``. Returns a 0-d zero that nothing reads; fx keeps the node
    because it is marked side-effectful, and ONNX export drops it with its tensors."""
    return base.new_zeros(())


@folded_adapter.register_fake
def _(base, tensors, spec):
    return base.new_zeros(())


torch.fx.node.has_side_effect(torch.ops.splice.folded_adapter.default)
