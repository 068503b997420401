"""Group-wise integer grids shared by every weight quantizer and by the quantized ops.

Weights ``W[N, K]`` are split along K into groups of ``group_size``; each (row, group) has a
float scale and an integer zero point; codes are unsigned ``0..2**bits-1`` and
``W ~= (code - zero) * scale``. Symmetric grids fix ``zero = 2**(bits-1)`` (as GPTQ does) and
store no zero points; their scale is signed so the group's largest-magnitude weight lands
exactly on the grid's end (ORT's MatMulNBitsQuantizer does the same).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from splice.kernels.quant.packing import pack_bits, packed_width, unpack_bits

MSE_SHRINKS = tuple(1 - i / 100 for i in range(20))  # llm-compressor's MSE observer: grid 100, maxshrink 0.2


@dataclass(frozen=True)
class GroupGrid:
    bits: int
    group_size: int  # resolved: K for per-channel
    symmetric: bool

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def params(self, w: torch.Tensor, shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Min/max scales and zero points, each ``[N, K // group_size]`` (zeros as int32); ``shrink``
        scales each group's range (clipping its extremes)."""
        return self._shrunk(self._extremes(self._groups(w)), shrink)

    def _groups(self, w: torch.Tensor) -> torch.Tensor:
        n, k = w.shape
        return w.float().reshape(n, k // self.group_size, self.group_size)

    def _extremes(self, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per group: the largest-magnitude weight (symmetric), or the range's ends clamped to include 0."""
        if self.symmetric:
            return (g.gather(-1, g.abs().argmax(-1, keepdim=True)).squeeze(-1),)
        return g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)

    def _shrunk(self, extremes: tuple[torch.Tensor, ...], shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.symmetric:  # the largest-magnitude weight maps exactly to code 0 (as ORT's quantizer):
            half = (self.maxq + 1) // 2  # signed scale, so the full range -2^(b-1)..2^(b-1)-1 is used
            scale = shrink * extremes[0] / -half
            zero = torch.full_like(scale, half, dtype=torch.int32)
        else:
            lo, hi = shrink * extremes[0], shrink * extremes[1]
            scale = (hi - lo) / self.maxq
            zero = torch.round(-lo / torch.where(scale > 0, scale, 1)).clamp(0, self.maxq).to(torch.int32)
        scale = torch.where(scale != 0, scale, torch.ones_like(scale))
        return scale, zero

    def mse_params(self, w: torch.Tensor, shrinks=MSE_SHRINKS, norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group, the ``params(w, shrink)`` of the ``shrinks`` that minimize ``Σ|w − q(w)|^norm``
        (the MSE observer of llm-compressor and AutoGPTQ: ranges clipped by up to 20 %)."""
        g = self._groups(w)
        extremes = self._extremes(g)
        best = None
        for shrink in shrinks:
            scale, zero = self._shrunk(extremes, shrink)
            codes = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, self.maxq)
            err = (g - (codes - zero[..., None]) * scale[..., None]).abs_().pow_(norm).sum(-1)
            if best is None:
                best = [err, scale, zero]
                continue
            better = err < best[0]
            best = [torch.where(better, err, best[0]), torch.where(better, scale, best[1]),
                    torch.where(better, zero, best[2])]
        return best[1], best[2]

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Codes ``[N, K]`` (int32) of ``w`` on the grid."""
        s = scale.repeat_interleave(self.group_size, dim=1)
        z = zero.repeat_interleave(self.group_size, dim=1)
        return torch.clamp(torch.round(w.float() / s) + z, 0, self.maxq).to(torch.int32)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        s = scale.repeat_interleave(self.group_size, dim=-1)
        z = zero.repeat_interleave(self.group_size, dim=-1)
        return (codes - z).to(s.dtype) * s

    # storage ---------------------------------------------------------------
    def pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """``[N, K]`` codes -> uint8 ``[N, K/group, group*bits/8]`` (MatMulNBits' B layout)."""
        n, k = codes.shape
        return pack_bits(codes.reshape(n, k // self.group_size, self.group_size), self.bits)

    def unpack_codes(self, qweight: torch.Tensor) -> torch.Tensor:
        n, groups, _ = qweight.shape
        return unpack_bits(qweight, self.bits, self.group_size).reshape(n, groups * self.group_size)

    def pack_zeros(self, zero: torch.Tensor) -> torch.Tensor | None:
        """Zero points packed per row ``[N, ceil(G*bits/8)]``; None for symmetric grids."""
        return None if self.symmetric else pack_bits(zero, self.bits)

    def unpack_zeros(self, zeros: torch.Tensor | None, groups: int, like: torch.Tensor) -> torch.Tensor:
        if zeros is None:
            return torch.full((like.shape[0], groups), (self.maxq + 1) // 2, dtype=torch.int32)
        return unpack_bits(zeros, self.bits, groups)

    def packed_group_width(self) -> int:
        return packed_width(self.group_size, self.bits)


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      bits: int, group_size: int) -> torch.Tensor:
    """Packed ``[N, G, blob]`` storage -> float ``[N, G*group_size]`` in the scales' dtype."""
    grid = GroupGrid(bits, group_size, zeros is None)
    codes = grid.unpack_codes(qweight)
    zero = grid.unpack_zeros(zeros, qweight.shape[1], qweight)
    return grid.dequantize(codes, scales, zero)


def quantize_packed(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                    scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Float ``w [N, K]`` on a fresh min/max grid of this format, packed as ``dequantize_packed``
    reads it: ``(qweight, scales, zeros or None)``."""
    grid = GroupGrid(bits, group_size, symmetric)
    scale, zero = grid.params(w)
    packed_zero = grid.pack_zeros(zero)
    return (grid.pack_codes(grid.quantize(w, scale, zero)).contiguous(), scale.to(scale_dtype).contiguous(),
            None if packed_zero is None else packed_zero.contiguous())
