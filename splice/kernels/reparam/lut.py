"""The lookup-table evaluation of ``splice::bcq_linear`` — ShiftAddLLM's kernel idea
(https://arxiv.org/abs/2406.05981, §3.2): no weight is ever dequantized and no activation is
multiplied by a weight.

For each group of 8 input activations ``x[8j .. 8j+7]`` the table ``T_j[b] = Σ_t (±x[8j+t])``
holds all 256 signed partial sums (bit ``t`` of byte ``b`` set = +), built once per token and
shared by every output row and bit-plane. Then per output row ``n`` and bit-plane ``i`` the code
byte ``codes[i, n, j]`` picks its entry (a gather) and

    y[n] = Σ_i Σ_j α_i[n, g(j)] · T_j[codes[i, n, j]]

(one multiply per bit-plane and group after the sums: a shift when α is a power of two).
"""
from __future__ import annotations

import torch


def sign_table() -> torch.Tensor:
    """``S [8, 256]``: ``S[t, b] = +1`` if bit ``t`` of ``b`` is set, else −1."""
    b = torch.arange(256)
    return ((b.unsqueeze(0) >> torch.arange(8).unsqueeze(1)) & 1).float() * 2 - 1


def partial_sums(x: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` -> the tables ``T [M, K/8, 256]`` (float32)."""
    m, k = x.shape
    return x.float().reshape(m, k // 8, 8) @ sign_table()


def bcq_lut_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                   group_size: int, rows: int = 256) -> torch.Tensor:
    """``splice::bcq_linear`` by table lookup; output rows ``rows`` at a time (bounds the gather's
    ``[M, rows, K/8]`` intermediate)."""
    bits, n, width = codes.shape
    x2 = x.reshape(-1, width * 8)
    table = partial_sums(x2)                                          # [M, J, 256]
    m = x2.shape[0]
    per_group = group_size // 8
    out = torch.empty(m, n)
    for n0 in range(0, n, rows):
        n1 = min(n0 + rows, n)
        acc = torch.zeros(m, n1 - n0)
        for i in range(bits):
            idx = codes[i, n0:n1].long().T                            # [J, rows]
            picked = torch.gather(table, 2, idx.unsqueeze(0).expand(m, -1, -1))  # [M, J, rows]
            per_group_sum = picked.reshape(m, -1, per_group, n1 - n0).sum(2)     # [M, G, rows]
            acc += (per_group_sum * scales[i, n0:n1].float().T.unsqueeze(0)).sum(1)
        out[:, n0:n1] = acc
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], n)
