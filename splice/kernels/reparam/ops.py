"""The reparameterization family's ops: ``splice::bcq_linear`` (ShiftAddLLM's binary-coded linear,
https://arxiv.org/abs/2406.05981). Schema, reference (unpack -> dense matmul, the ground truth),
fake implementation for torch.export, autograd to the input, and its registry record: kind
``linear``, roles (codes ``qweight``, scales ``scale``, ``bias``), weight access (reads as the dense
``Σ α_i B_i``, writes by refitting on the same bits and groups), translations (``reparam/onnx.py``,
``reparam/triton.py``: the lookup-table form). The format and its fitting: ``reparam/bcq.py``;
the lookup-table evaluation in torch: ``reparam/lut.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from splice.kernels.reparam.bcq import dequantize, fit, round_pow2
from splice.kernels.registry import WeightAccess, register_op


@torch.library.custom_op("splice::bcq_linear", mutates_args=())
def bcq_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
               group_size: int) -> torch.Tensor:
    """``y = x @ W.T + bias`` with ``W[n, k] = Σ_i scales[i, n, k // group_size] · (±1)``, the signs
    packed 1 bit each in ``codes`` uint8 ``[bits, N, K/8]``; ``scales [bits, N, K/group_size]``."""
    return F.linear(x, dequantize(codes, scales, group_size).to(x.dtype), bias)


@bcq_linear.register_fake
def _(x, codes, scales, bias, group_size):
    torch._check(codes.dtype == torch.uint8 and codes.dim() == 3, lambda: "bcq_linear: codes must be uint8 [bits, N, K/8]")
    torch._check(group_size % 8 == 0, lambda: f"bcq_linear: group_size {group_size} is not a multiple of 8")
    torch._check(tuple(scales.shape) == (codes.shape[0], codes.shape[1], codes.shape[2] * 8 // group_size),
                 lambda: f"bcq_linear: scales {tuple(scales.shape)} != [bits, N, K/group_size]")
    torch._check(x.shape[-1] == codes.shape[2] * 8, lambda: "bcq_linear: input features != 8 * code bytes per row")
    torch._check(bias is None or tuple(bias.shape) == (codes.shape[1],), lambda: "bcq_linear: bias must be [N]")
    return x.new_empty(*x.shape[:-1], codes.shape[1])


def _setup(ctx, inputs, output):
    x, codes, scales, bias, group_size = inputs
    ctx.save_for_backward(codes, scales)
    ctx.group_size = group_size


def _backward(ctx, grad):
    codes, scales = ctx.saved_tensors
    return grad @ dequantize(codes, scales, ctx.group_size).to(grad.dtype), None, None, None, None


bcq_linear.register_autograd(_backward, setup_context=_setup)


def _read(a):
    return dequantize(a[1], a[2], a[4])


def _write(a, w):
    """Refit ``w`` on the layer's bits and groups, its current codes one of the starts (power-of-two
    scales stay powers of two)."""
    pow2 = bool(torch.equal(round_pow2(a[2].float()), a[2].float()))
    codes, scales = fit(w, a[1].shape[0], a[4], pow2=pow2, codes=a[1])
    return {1: codes, 2: scales.to(a[2].dtype)}


def _sample():
    gen = torch.Generator().manual_seed(0)
    codes, scales = fit(torch.randn(24, 64, generator=gen), 3, 16, iters=2)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1))
    return x, codes, scales, torch.randn(24, generator=gen), 16


register_op(bcq_linear, family="reparam", kind="linear", roles={1: "qweight", 2: "scale", 3: "bias"},
            sample_inputs=_sample, weight=WeightAccess({1: "codes", 2: "scales"}, _read, _write, lossy=True),
            translations={"onnx": "splice.kernels.reparam.onnx:bcq_linear",
                          "triton": "splice.kernels.reparam.triton:bcq_linear"})
