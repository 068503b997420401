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
