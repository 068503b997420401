"""Plain-torch math of the low-rank family, shared by its ops (reference implementations, weight
access) and its passes (``passes/lowrank/``).

* ``split_svd``: the best rank-``r`` approximation ``B A`` of a matrix (Eckart–Young), √S split
  between ``A [r, in]`` and ``B [out, r]``;
* ``scatter_rows``: the dense ``S [k, in]`` of a column-sparse factor stored as ``values [s, in]`` and
  row ``index [s, in]`` (each column of ``S`` holds ``s`` non-zeros: DSFormer's semi-structured factor);
* ``refit_values``: those values that best reproduce a weight for a given ``D`` and pattern.
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


def refit_values(d: torch.Tensor, index: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``values [s, in]`` minimising ``‖w − D S‖`` for ``D [out, k]`` and the pattern ``index [s, in]``:
    per input column the least-squares combination of the ``s`` columns of ``D`` it may use."""
    picked = d.float().T[index.long()].permute(1, 2, 0)  # [in, out, s]
    return torch.linalg.lstsq(picked, w.float().T.unsqueeze(-1)).solution.squeeze(-1).T.contiguous()
