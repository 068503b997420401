"""Fake quantization with learnable step sizes: the math of ``splice::fake_quant_linear``.

LSQ (Esser et al., https://arxiv.org/abs/1902.08153): a latent float weight ``w[N, K]`` is
rounded onto its group grid (``kernels/quant/grid.py``: scales ``[N, G]``, integer zero points, packed
like ``splice::qlinear``'s or ``None`` for symmetric grids) and dequantized,
``fq(w) = (clamp(round(w/s) + z, 0, maxq) - z) * s``: elementwise the same float operations as
``GroupGrid.quantize`` / ``dequantize`` (which ``splice::qlinear`` runs after ``quantize.convert``),
so QAT's forward and the converted model's agree exactly. Computed on ``[N, G, group_size]``
views with broadcast scales (no ``[N, K]`` copies of scales or zeros): QAT touches every weight
several times per step.

Gradients (LSQ): the weight gets the straight-through estimate, passed where the code is not
clamped and zero where it is; the scale gets ``round(w/s) - w/s`` per unclamped weight and
``code - z`` per clamped one, summed over its group. LSQ's gradient scale
``1/sqrt(group_size * maxq)`` is left out: Adam-type optimizers are invariant to a constant
factor on a tensor's gradient. Zero points stay fixed integers (not LSQ+'s learned offsets),
so the converted layer stores exactly what was trained.
"""
from __future__ import annotations

import torch

from splice.kernels.quant.grid import GroupGrid


def _rounded(weight, scales, zeros, bits: int, group_size: int):
    """Per group (``[N, G, group_size]`` views, scales and zeros broadcast): ``w/s``, its rounding,
    the codes before clamping, the scales and the zeros (as floats: small integers are exact)."""
    n, k = weight.shape
    grid = GroupGrid(bits, group_size, zeros is None)
    zero = grid.unpack_zeros(zeros, scales.shape[1], weight).unsqueeze(-1).float()
    s = scales.unsqueeze(-1)
    ratio = weight.float().reshape(n, k // group_size, group_size) / s
    rounded = torch.round(ratio)
    return ratio, rounded, rounded + zero, s, zero, grid.maxq


def quantize_codes(weight, scales, zeros, bits: int, group_size: int) -> torch.Tensor:
    """Integer codes ``[N, K]`` of ``weight`` on its grid (what ``quantize.convert`` packs;
    equal to ``GroupGrid.quantize``)."""
    _, _, unclamped, _, _, maxq = _rounded(weight, scales, zeros, bits, group_size)
    return unclamped.clamp(0, maxq).to(torch.int32).reshape(weight.shape)


def fake_quantize(weight, scales, zeros, bits: int, group_size: int) -> torch.Tensor:
    """``fq(weight)``: the dequantized weight ``[N, K]`` in the scales' dtype (equal to
    ``GroupGrid.dequantize`` of ``quantize_codes``)."""
    _, _, unclamped, s, zero, maxq = _rounded(weight, scales, zeros, bits, group_size)
    return ((unclamped.clamp(0, maxq) - zero).to(scales.dtype) * s).reshape(weight.shape)


def fake_quantize_for_backward(weight, scales, zeros, bits: int, group_size: int):
    """``fq(weight)`` ``[N, K]`` plus what its gradients need, per group ``[N, G, group_size]``:
    the STE mask (code not clamped) and ``d fq / d s`` (LSQ: ``round(w/s) - w/s`` inside,
    ``code - z`` where clamped)."""
    ratio, rounded, unclamped, s, zero, maxq = _rounded(weight, scales, zeros, bits, group_size)
    inside = (unclamped >= 0) & (unclamped <= maxq)
    centred = unclamped.clamp(0, maxq) - zero
    d_scale = torch.where(inside, rounded - ratio, centred)
    return (centred.to(scales.dtype) * s).reshape(weight.shape), inside, d_scale
