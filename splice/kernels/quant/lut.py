"""Look-up-table (non-uniform) weights: packed b-bit indices into a table of levels.

A weight ``W[N, K]`` is stored as indices ``idx[N, K]`` in ``0..2**bits-1`` packed like
``GroupGrid.pack_codes`` (uint8 ``[N, G, group_size*bits/8]``, ``G = K/group_size``), a table
``lut[N, G_lut, 2**bits]`` of levels per row and per ``G_lut`` equal slices of the row
(``G_lut`` divides ``G``: 1 = one codebook per output channel, ``G`` = one per group), and
optional ``scales[N, G]`` multiplying each group:

    W[n, k] = lut[n, k // (K/G_lut), idx[n, k]] * scales[n, k // group_size]

SqueezeLLM's per-channel k-means codebooks are ``G_lut = 1`` without scales; NUPES-style power
grids are one normalized grid per row (``G_lut = 1``) times a scale per group.
"""
from __future__ import annotations

import torch

from splice.kernels.quant.packing import pack_bits, unpack_bits


def pack_indices(idx: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``[N, K]`` indices -> uint8 ``[N, K/group_size, group_size*bits/8]``."""
    n, k = idx.shape
    return pack_bits(idx.reshape(n, k // group_size, group_size), bits)


def unpack_indices(qweight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    n, groups, _ = qweight.shape
    return unpack_bits(qweight, bits, group_size).reshape(n, groups * group_size)


def lut_lookup(idx: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Levels ``[N, K]`` picked by indices ``idx[N, K]`` from ``lut[N, G_lut, L]``."""
    n, k = idx.shape
    return torch.gather(lut, 2, idx.reshape(n, lut.shape[1], -1).long()).reshape(n, k)


def apply_scales(w: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """``w[N, K]`` times ``scales[N, G]`` broadcast over each group of ``K/G`` columns."""
    if scales is None:
        return w
    n, groups = scales.shape
    return (w.reshape(n, groups, -1) * scales.unsqueeze(-1)).reshape(n, -1)


def lut_dequantize(qweight: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor | None, bits: int,
                   group_size: int) -> torch.Tensor:
    """Packed storage -> float ``[N, K]`` in the table's dtype."""
    return apply_scales(lut_lookup(unpack_indices(qweight, bits, group_size), lut), scales)


def snap_indices(w: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor | None, bits: int,
                 group_size: int) -> torch.Tensor:
    """Packed indices of the table levels nearest to ``w [N, K]`` (divided by ``scales`` first):
    a new dense weight put back on an existing table, levels and scales unchanged."""
    n, k = w.shape
    if scales is not None:
        safe = torch.where(scales == 0, torch.ones_like(scales), scales).float()
        w = (w.float().reshape(n, scales.shape[1], -1) / safe.unsqueeze(-1)).reshape(n, k)
    levels = lut.float().unsqueeze(2)                                   # [N, G_lut, 1, L]
    idx = (w.float().reshape(n, lut.shape[1], -1, 1) - levels).abs().argmin(-1)
    return pack_indices(idx.reshape(n, k).to(torch.uint8), bits, group_size)
