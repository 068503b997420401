"""Plain-torch math of the low-rank family, shared by its ops (reference implementations, weight
access) and its passes (``passes/lowrank/``).

* ``split_svd``: the best rank-``r`` approximation ``B A`` of a matrix (Eckart–Young), √S split
  between ``A [r, in]`` and ``B [out, r]``;
* ``scatter_rows``: the dense ``S [k, in]`` of a column-sparse factor stored as ``values [s, in]`` and
  row ``index [s, in]`` (each column of ``S`` holds ``s`` non-zeros: DSFormer's semi-structured factor).
"""
from __future__ import annotations

import torch


def split_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A [r, in]``, ``B [out, r]`` with ``B A`` the best rank-``rank`` approximation of ``w``
    (float32, ``rank`` capped at ``min(out, in)``)."""
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).contiguous(), (u[:, :rank] * root).contiguous()


def scatter_rows(values: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """``S [k, in]`` with ``S[index[j, c], c] = values[j, c]``, zero elsewhere."""
    return values.new_zeros(k, values.shape[1]).scatter(0, index.long(), values)
