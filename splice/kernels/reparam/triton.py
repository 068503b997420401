"""``splice::bcq_linear`` by lookup tables, in Triton — ShiftAddLLM's kernel
(https://arxiv.org/abs/2406.05981) on splice's layout (``kernels/reparam/bcq.py``): codes uint8
``[bits, N, K/8]``, scales ``[bits, N, K/group_size]``.

Two kernels. ``_tables``: for each token and each group of 8 inputs, the 256 signed partial sums
``T[m, j, b] = Σ_t (bit t of b ? +x : −x)[m, 8j+t]`` (``kernels/reparam/lut.py``'s ``partial_sums``),
written once and shared by every output row. ``_gather``: each program owns a ``BLOCK_M × BLOCK_N``
tile of ``y``; per scale group and bit-plane it gathers ``T[m, j, codes[i, n, j]]`` for the group's
bytes and adds them (no multiply), then multiplies the group's sum by ``α_i[n, g]`` once (a shift for
power-of-two scales) into an fp32 accumulator. Tested on CPU with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tables(x_ptr, t_ptr, K, J, BLOCK_J: tl.constexpr):
    m = tl.program_id(0)
    rj = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    rt = tl.arange(0, 8)
    rb = tl.arange(0, 256)
    ok = rj < J
    x = tl.load(x_ptr + m * K + rj[:, None] * 8 + rt[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    signs = (((rb[None, :] >> rt[:, None]) & 1) * 2 - 1).to(tl.float32)          # [8, 256]
    table = tl.sum(x[:, :, None] * signs[None, :, :], axis=1)                    # [BLOCK_J, 256]
    tl.store(t_ptr + m * J * 256 + rj[:, None] * 256 + rb[None, :], table, mask=ok[:, None])


@triton.jit
def _gather(t_ptr, c_ptr, s_ptr, b_ptr, y_ptr, M, N, J, G,
            BITS: tl.constexpr, PER_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(G):
        for i in tl.static_range(BITS):
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for jj in range(PER_GROUP):
                j = g * PER_GROUP + jj
                code = tl.load(c_ptr + (i * N + rn) * J + j, mask=n_ok, other=0).to(tl.int32)
                part += tl.load(t_ptr + rm[:, None] * J * 256 + j * 256 + code[None, :],
                                mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            alpha = tl.load(s_ptr + (i * N + rn) * G + g, mask=n_ok, other=0.0).to(tl.float32)
            acc += part * alpha[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def bcq_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
               group_size: int) -> torch.Tensor:
    """``splice::bcq_linear`` by the two Triton kernels (``group_size`` a multiple of 8)."""
    bits, n, j = codes.shape
    k = j * 8
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    tables = torch.empty(m, j, 256, dtype=torch.float32, device=x.device)
    block_j = 16
    _tables[(m, triton.cdiv(j, block_j))](x2, tables, k, j, BLOCK_J=block_j)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m, block_n = 16, 32
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _gather[grid](tables, codes.contiguous(), scales.contiguous(), bias, y, m, n, j, k // group_size,
                  BITS=bits, PER_GROUP=group_size // 8, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n)
    return y.reshape(*x.shape[:-1], n)
