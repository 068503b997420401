"""The quantized ops: ``splice::qlinear``, ``qembedding``, ``fake_quant_linear``, ``lut_linear``,
``w8a8_linear``. Each has its schema, reference implementation (plain torch, the ground truth),
fake implementation for torch.export (with the shape checks the verifier relies on), autograd
where it can be trained, and its registry record (kind, roles, sample inputs, weight access,
translations: ``quant/onnx.py``, and ``quant/triton.py`` for qlinear).

Quantized weights are stored packed (``quant/grid.py``), so byte counts are honest.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from splice.kernels.quant.fake_quant import fake_quantize, fake_quantize_for_backward
from splice.kernels.quant.grid import GroupGrid, dequantize_packed, quantize_packed
from splice.kernels.quant.lut import lut_dequantize, pack_indices, snap_indices
from splice.kernels.quant.w8a8 import dequantize_weight, quantize_weight, w8a8_matmul
from splice.kernels.registry import WeightAccess, register_op

ONNX = "splice.kernels.quant.onnx"


def _sample_layer(bits: int = 4, group_size: int = 32, symmetric: bool = False, n: int = 24, k: int = 64):
    """A small packed layer ``(qweight, scales, zeros, bias)`` for the op tests."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen)
    q, s, z = quantize_packed(w, bits, group_size, symmetric, torch.float32)
    return q, s, z, torch.randn(n, generator=gen)


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


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


@torch.library.register_kernel("splice::qlinear", "cuda")
def _qlinear_cuda(x, qweight, scales, zeros, bias, bits, group_size):
    """On CUDA tensors: the Triton kernel (``quant/triton.py``) when Triton is installed and covers
    the format, else the reference. Triton is imported on the first CUDA call only."""
    if importlib.util.find_spec("triton") is not None:
        from splice.kernels.quant import triton as kernel

        if kernel.supports(bits, group_size):
            return kernel.qlinear(x, qweight, scales, zeros, bias, bits, group_size)
    return F.linear(x, dequantize_packed(qweight, scales, zeros, bits, group_size).to(x.dtype), bias)


def frozen_weight_autograd(op, weight) -> None:
    """Autograd for ``op(x, a, b, c, bias, bits, group_size) = x @ W(a, b, c)ᵀ + bias`` whose stored
    tensors do not train (packed low-bit weights): the gradient reaches ``x`` only, through
    ``W = weight(a, b, c, bits, group_size)`` rebuilt in the backward pass."""

    def setup(ctx, inputs, output):
        x, a, b, c, bias, bits, group_size = inputs
        ctx.save_for_backward(a, b, c)
        ctx.bits, ctx.group_size = bits, group_size

    def backward(ctx, grad):
        w = weight(*ctx.saved_tensors, ctx.bits, ctx.group_size).to(grad.dtype)
        return grad @ w, None, None, None, None, None, None

    op.register_autograd(backward, setup_context=setup)


frozen_weight_autograd(qlinear, dequantize_packed)


def _packed_access(bits_at: int) -> WeightAccess:
    """Weight access of packed storage at arguments 1-3 (qweight, scales, zeros) with bits and group
    size at ``bits_at``, ``bits_at + 1``: dequantize; re-quantize on the same format (fresh scales)."""

    def read(a):
        return dequantize_packed(a[1], a[2], a[3], a[bits_at], a[bits_at + 1]).float()

    def write(a, w):
        q, s, z = quantize_packed(w, a[bits_at], a[bits_at + 1], a[3] is None, a[2].dtype)
        return {1: q, 2: s, 3: z}

    return WeightAccess({1: "qweight", 2: "scales", 3: "qzeros"}, read, write, lossy=True)


def _qlinear_sample():
    q, s, z, b = _sample_layer()
    return _x(2, 3, 64), q, s, z, b, 4, 32


register_op(qlinear, family="quant", kind="linear", roles={1: "qweight", 2: "scale", 3: "zero_point", 4: "bias"},
            sample_inputs=_qlinear_sample, weight=_packed_access(5),
            translations={"onnx": f"{ONNX}:qlinear", "triton": "splice.kernels.quant.triton:qlinear"})

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


def _qembedding_sample():
    q, s, z, _ = _sample_layer(symmetric=True)
    return torch.tensor([[0, 5, 23], [7, 7, 1]]), q, s, z, 4, 32


register_op(qembedding, family="quant", kind="embedding", roles={1: "qweight", 2: "scale", 3: "zero_point"},
            sample_inputs=_qembedding_sample, weight=_packed_access(4), translations={"onnx": f"{ONNX}:qembedding"})

# ---------------------------------------------------------------- fake_quant_linear


@torch.library.custom_op("splice::fake_quant_linear", mutates_args=())
def fake_quant_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """QAT's linear (``quantize.qat``): ``y = x @ fq(weight).T + bias``, the latent float weight
    ``[N, K]`` rounded onto its group grid (scales ``[N, K/group_size]``, zeros packed as
    ``qlinear``'s or None) and dequantized (``quant/fake_quant.py``); equals ``splice::qlinear``
    on the codes ``quantize.convert`` stores. Trainable: STE for the weight, LSQ for the scales."""
    return F.linear(x, fake_quantize(weight, scales, zeros, bits, group_size).to(x.dtype), bias)


@fake_quant_linear.register_fake
def _(x, weight, scales, zeros, bias, bits, group_size):
    torch._check(weight.dim() == 2 and weight.shape[1] % group_size == 0,
                 lambda: "fake_quant_linear: weight must be [N, K] with K divisible by group_size")
    torch._check(tuple(scales.shape) == (weight.shape[0], weight.shape[1] // group_size),
                 lambda: f"fake_quant_linear: scales {tuple(scales.shape)} != [N, K/group_size]")
    torch._check(x.shape[-1] == weight.shape[1], lambda: "fake_quant_linear: input features != K")
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _fql_setup(ctx, inputs, output):
    x, weight, scales, zeros, bias, bits, group_size = inputs
    ctx.save_for_backward(x, weight, scales, zeros)
    ctx.bits, ctx.group_size = bits, group_size


def _fql_backward(ctx, grad):
    x, weight, scales, zeros = ctx.saved_tensors
    wq, inside, d_scale = fake_quantize_for_backward(weight, scales, zeros, ctx.bits, ctx.group_size)
    g2 = grad.reshape(-1, grad.shape[-1])
    dx = (grad @ wq.to(grad.dtype)) if ctx.needs_input_grad[0] else None
    dw = ds = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        grad_wq = (g2.T.float() @ x.reshape(-1, x.shape[-1]).float()).reshape(d_scale.shape)
        dw = torch.where(inside, grad_wq, 0.0).reshape(weight.shape).to(weight.dtype)  # straight-through
        ds = (grad_wq * d_scale).sum(-1).to(scales.dtype)  # LSQ
    db = g2.sum(0) if ctx.needs_input_grad[4] else None
    return dx, dw, ds, None, db, None, None


fake_quant_linear.register_autograd(_fql_backward, setup_context=_fql_setup)


def _fql_sample():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=gen)
    scale, zero = GroupGrid(4, 32, False).params(w)
    return (_x(2, 3, 64), w.requires_grad_(), scale.requires_grad_(), GroupGrid(4, 32, False).pack_zeros(zero),
            torch.randn(24, generator=gen), 4, 32)


register_op(fake_quant_linear, family="quant", kind="linear", trainable=True,
            roles={1: "weight", 2: "scale", 3: "zero_point", 4: "bias"}, sample_inputs=_fql_sample,
            # the dense weight is the one the layer computes with; a new one becomes the latent
            # weight, so the layer rounds it onto its grid (same scales)
            weight=WeightAccess({1: "weight"}, lambda a: fake_quantize(a[1], a[2], a[3], a[5], a[6]).float(),
                                lambda a, w: {1: w.to(a[1].dtype)}, lossy=True),
            translations={"onnx": f"{ONNX}:fake_quant_linear"})

# ------------------------------------------------------------------------ lut_linear


@torch.library.custom_op("splice::lut_linear", mutates_args=())
def lut_linear(x: torch.Tensor, qweight: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor | None,
               bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """``y = x @ W.T + bias`` with a non-uniform (look-up-table) weight (``quantize.nonuniform``):
    ``W[n, k] = lut[n, k // (K/G_lut), idx[n, k]] · scales[n, k // group_size]``.

    qweight: packed indices, uint8 ``[N, G, group_size*bits/8]`` (``qlinear``'s layout);
    lut: ``[N, G_lut, 2**bits]`` levels, ``G_lut`` dividing ``G``; scales: ``[N, G]`` or None.
    """
    return F.linear(x, lut_dequantize(qweight, lut, scales, bits, group_size).to(x.dtype), bias)


@lut_linear.register_fake
def _(x, qweight, lut, scales, bias, bits, group_size):
    torch._check(qweight.dtype == torch.uint8 and qweight.dim() == 3, lambda: "lut_linear: qweight must be uint8 [N, G, blob]")
    torch._check(qweight.shape[2] == (group_size * bits + 7) // 8, lambda: "lut_linear: qweight blob width does not match bits/group_size")
    torch._check(lut.dim() == 3 and lut.shape[0] == qweight.shape[0] and lut.shape[2] == 2 ** bits,
                 lambda: f"lut_linear: lut {tuple(lut.shape)} must be [N, G_lut, 2**bits]")
    torch._check(qweight.shape[1] % lut.shape[1] == 0, lambda: "lut_linear: lut groups must divide qweight groups")
    torch._check(scales is None or tuple(scales.shape) == tuple(qweight.shape[:2]),
                 lambda: "lut_linear: scales must be [N, G]")
    torch._check(x.shape[-1] == qweight.shape[1] * group_size, lambda: "lut_linear: input features != G * group_size")
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


frozen_weight_autograd(lut_linear, lut_dequantize)


def _lut_sample():
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 8, (24, 64), generator=gen, dtype=torch.uint8)
    lut = torch.randn(24, 1, 8, generator=gen).sort(-1).values
    return _x(2, 3, 64), pack_indices(idx, 3, 16), lut, torch.rand(24, 4, generator=gen) + 0.5, None, 3, 16


register_op(lut_linear, family="quant", kind="linear", roles={1: "qweight", 2: "lut", 3: "scale", 4: "bias"},
            sample_inputs=_lut_sample, translations={"onnx": f"{ONNX}:lut_linear"},
            # a new weight snaps to the nearest levels of the layer's own tables (levels, scales kept)
            weight=WeightAccess({1: "qweight"}, lambda a: lut_dequantize(a[1], a[2], a[3], a[5], a[6]).float(),
                                lambda a, w: {1: snap_indices(w, a[2], a[3], a[5], a[6])}, lossy=True))

# ---------------------------------------------------------------------- w8a8_linear


@torch.library.custom_op("splice::w8a8_linear", mutates_args=())
def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """``quantize.w8a8``'s linear: int8 weights ``[N, K]`` with a scale per output channel
    ``w_scale [N]``, activations quantized to int8 per token at run time; the exact arithmetic
    (which ONNX Runtime's ``MatMulIntegerToFloat`` reproduces) is in ``quant/w8a8.py``."""
    return w8a8_matmul(x, qweight, w_scale, bias)


@w8a8_linear.register_fake
def _(x, qweight, w_scale, bias):
    torch._check(qweight.dtype == torch.int8 and qweight.dim() == 2, lambda: "w8a8_linear: qweight must be int8 [N, K]")
    torch._check(tuple(w_scale.shape) == (qweight.shape[0],), lambda: f"w8a8_linear: w_scale {tuple(w_scale.shape)} != [N]")
    torch._check(x.shape[-1] == qweight.shape[1], lambda: f"w8a8_linear: input features {x.shape[-1]} != K {qweight.shape[1]}")
    torch._check(bias is None or tuple(bias.shape) == (qweight.shape[0],), lambda: "w8a8_linear: bias must be [N]")
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _w8a8_sample():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (24, 64), generator=gen, dtype=torch.int8)
    return _x(2, 3, 64), codes, torch.rand(24, generator=gen) * 0.02 + 0.01, torch.randn(24, generator=gen)


def _w8a8_write(a, w):
    codes, scale = quantize_weight(w)
    return {1: codes, 2: scale.to(a[2].dtype)}


register_op(w8a8_linear, family="quant", kind="linear", roles={1: "qweight", 2: "scale", 3: "bias"},
            sample_inputs=_w8a8_sample, translations={"onnx": f"{ONNX}:w8a8_linear"},
            weight=WeightAccess({1: "qweight", 2: "scales"}, lambda a: dequantize_weight(a[1], a[2]), _w8a8_write, lossy=True))
