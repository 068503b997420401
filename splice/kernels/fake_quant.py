"""Fake quantization with learnable step sizes: the math of ``splice::fake_quant_linear``.

LSQ (Esser et al., https://arxiv.org/abs/1902.08153): a latent float weight ``w[N, K]`` is
rounded onto its group grid (``kernels/quant.py``: scales ``[N, G]``, integer zero points, packed
like ``splice::qlinear``'s or ``None`` for symmetric grids) and dequantized,
``fq(w) = (clamp(round(w/s) + z, 0, maxq) - z) * s``, with the very ``GroupGrid.quantize`` /
``dequantize`` calls ``quantize.convert`` and ``splice::qlinear`` use, so QAT's forward and the
converted model's agree exactly.

Gradients (LSQ): the weight gets the straight-through estimate, passed where the code is not
clamped and zero where it is; the scale gets ``round(w/s) - w/s`` per unclamped weight and
``code - z`` per clamped one, summed over its group. LSQ's gradient scale
``1/sqrt(group_size * maxq)`` is left out: Adam-type optimizers are invariant to a constant
factor on a tensor's gradient. Zero points stay fixed integers (not LSQ+'s learned offsets),
so the converted layer stores exactly what was trained.
"""
from __future__ import annotations

import torch

from splice.kernels.quant import GroupGrid


def _grid_codes(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                group_size: int) -> tuple[GroupGrid, torch.Tensor]:
    grid = GroupGrid(bits, group_size, zeros is None)
    return grid, grid.unpack_zeros(zeros, scales.shape[1], weight)


def quantize_codes(weight, scales, zeros, bits: int, group_size: int) -> torch.Tensor:
    """Integer codes ``[N, K]`` of ``weight`` on its grid (what ``quantize.convert`` packs)."""
    grid, zero = _grid_codes(weight, scales, zeros, bits, group_size)
    return grid.quantize(weight, scales, zero)


def fake_quantize(weight, scales, zeros, bits: int, group_size: int) -> torch.Tensor:
    """``fq(weight)``: the dequantized weight ``[N, K]`` in the scales' dtype."""
    grid, zero = _grid_codes(weight, scales, zeros, bits, group_size)
    return grid.dequantize(grid.quantize(weight, scales, zero), scales, zero)


def lsq_grads(grad_wq: torch.Tensor, weight, scales, zeros, bits: int,
              group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the weight (STE) and of the scales (LSQ) from ``dL/dfq(w)`` ``[N, K]``."""
    grid, zero = _grid_codes(weight, scales, zeros, bits, group_size)
    n, k = weight.shape
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zero.repeat_interleave(group_size, dim=1)
    ratio = weight.float() / s
    unclamped = torch.round(ratio) + z
    inside = (unclamped >= 0) & (unclamped <= grid.maxq)
    g = grad_wq.float()
    grad_w = torch.where(inside, g, 0.0)
    d_scale = torch.where(inside, torch.round(ratio) - ratio, unclamped.clamp(0, grid.maxq) - z)
    grad_s = (g * d_scale).reshape(n, k // group_size, group_size).sum(-1)
    return grad_w.to(weight.dtype), grad_s.to(scales.dtype)
