"""Fused dequantize + matmul for ``splice::qlinear`` (int4 / int8, group-wise), in Triton.

``y[M, N] = x[M, K] @ dequant(qweight)[N, K].T + bias`` on splice's packed layout
(``kernels/quant/grid.py``): ``qweight`` uint8 ``[N, K/g, g*bits/8]`` (row-major, so row ``n`` is
``K*bits/8`` contiguous bytes, code ``k`` in bits ``(k % (8/bits))*bits`` of byte ``k*bits/8``,
low nibble first), ``scales`` ``[N, K/g]``, ``zeros`` packed the same way per row
(``[N, ceil(G*bits/8)]``) or None for symmetric grids (zero ``2**(bits-1)``). Each program
computes a ``BLOCK_M x BLOCK_N`` tile of ``y``, walking K in blocks that lie inside one group
(one scale and zero per output row per block): unpack the codes, ``(code - zero) * scale`` in
fp32, cast to the activation dtype, ``tl.dot`` into an fp32 accumulator (as the Marlin /
GPTQ-Triton kernels do, without their weight re-layouts). Matches the reference op
(``kernels/quant/ops.py``) to float rounding; tested on CPU with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def supports(bits: int, group_size: int) -> bool:
    """Formats this kernel runs: 4 or 8 bits, groups of a multiple of 16 weights."""
    return bits in (4, 8) and group_size % 16 == 0


def _block_k(group_size: int) -> int:
    return next(b for b in (128, 64, 32, 16) if group_size % b == 0)


@triton.jit
def _qlinear_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K,
                    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    PER_BYTE: tl.constexpr = 8 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    groups = K // GROUP
    row_bytes = K // PER_BYTE
    zero_bytes = (groups * BITS + 7) // 8
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_ok[:, None], other=0.0)
        packed = tl.load(q_ptr + rn[:, None] * row_bytes + rk[None, :] // PER_BYTE, mask=n_ok[:, None], other=0)
        codes = (packed.to(tl.int32) >> ((rk[None, :] % PER_BYTE) * BITS)) & MAXQ
        g = k0 // GROUP
        scale = tl.load(s_ptr + rn * groups + g, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zb = tl.load(z_ptr + rn * zero_bytes + (g * BITS) // 8, mask=n_ok, other=0).to(tl.int32)
            zero = (zb >> ((g % PER_BYTE) * BITS)) & MAXQ
        else:
            zero = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.int32)
        w = ((codes - zero[:, None]).to(tl.float32) * scale[:, None]).to(x.dtype)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def qlinear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """``splice::qlinear`` by the Triton kernel (``supports(bits, group_size)`` must hold)."""
    n, groups, _ = qweight.shape
    k = groups * group_size
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 64
    block_n = 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _qlinear_kernel[grid](x2, qweight.contiguous(), scales.contiguous(), zeros, bias, y, m, n, k,
                          BITS=bits, GROUP=group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
                          BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_block_k(group_size))
    return y.reshape(*x.shape[:-1], n)
