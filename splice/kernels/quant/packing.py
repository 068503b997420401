"""Dense little-endian bit packing of low-bit integer codes into uint8.

Code ``i`` of a row occupies bits ``[i*bits, (i+1)*bits)`` of the row's bit stream, least
significant bit first. For 4 bits this is "low nibble first", the layout of ONNX INT4/UINT4
tensors and of ORT's ``MatMulNBits`` blocks; for 8 bits it is the identity. Rows are padded
to whole bytes.
"""
from __future__ import annotations

import torch


def packed_width(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last dim into uint8."""
    if bits == 8:
        return codes.to(torch.uint8)
    *lead, n = codes.shape
    width = packed_width(n, bits)
    c = codes.to(torch.int32).reshape(-1, n)
    if bits in (1, 2, 4):  # whole codes per byte: shift and add, no bit stream
        per = 8 // bits
        c = torch.nn.functional.pad(c, (0, width * per - n)).reshape(-1, width, per)
        packed = (c << torch.arange(0, 8, bits, dtype=torch.int32)).sum(-1)
        return packed.to(torch.uint8).reshape(*lead, width)
    shifts = torch.arange(bits, dtype=torch.int32)
    stream = ((c.unsqueeze(-1) >> shifts) & 1).reshape(c.shape[0], n * bits)
    pad = width * 8 - n * bits
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    weights = (1 << torch.arange(8, dtype=torch.int32))
    packed = (stream.reshape(c.shape[0], width, 8) * weights).sum(-1)
    return packed.to(torch.uint8).reshape(*lead, width)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., width]`` -> int32 codes ``[..., n]``."""
    if bits == 8:
        return packed[..., :n].to(torch.int32)
    *lead, width = packed.shape
    p = packed.reshape(-1, width).to(torch.int32)
    if bits in (1, 2, 4):
        per = 8 // bits
        shifts = torch.arange(0, 8, bits, dtype=torch.int32)
        codes = ((p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(p.shape[0], width * per)
        return codes[:, :n].reshape(*lead, n)
    stream = ((p.unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1).reshape(p.shape[0], width * 8)
    stream = stream[:, : n * bits].reshape(p.shape[0], n, bits)
    codes = (stream << torch.arange(bits, dtype=torch.int32)).sum(-1)
    return codes.reshape(*lead, n)
