"""Best low-rank approximation of a matrix (truncated SVD, Eckart–Young), split LoRA-style: shared by
``adapter.extract`` (a fine-tuned delta as a LoRA) and ``delta.svd`` (a delta stored low rank)."""
from __future__ import annotations

import torch


def low_rank_factors(dw: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``A [r, in]``, ``B [out, r]`` with ``B A`` the best rank-``rank`` approximation of ``dw``
    (√S split between them; ``rank`` capped at ``min(out, in)``), and the relative error
    ``‖dw − B A‖_F / ‖dw‖_F`` (0 where ``dw = 0``)."""
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    root = s[:rank].sqrt()
    a, b = (root[:, None] * vh[:rank]).contiguous(), (u[:, :rank] * root).contiguous()
    norm = float(dw.norm())
    return a, b, float((dw - b @ a).norm()) / norm if norm > 0 else 0.0
