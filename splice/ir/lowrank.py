"""Best low-rank approximation of a matrix (truncated SVD, Eckart–Young), split LoRA-style: shared by
``adapter.extract`` (a fine-tuned delta as a LoRA) and ``delta.svd`` (a delta stored low rank); and
of a stack of flattened tensors as coefficients × an orthonormal basis (``fit_basis``: ``merge.rmm``'s
task-vector bases, ``share.dictionary``'s atoms)."""
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


def fit_basis(deltas: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``k`` fit ``deltas ≈ C B`` of ``[rows, n]`` vectors (models' task vectors,
    layers' weights): ``B`` orthonormal
    rows (the top right singular vectors), ``C = U S`` (from the ``models × models`` Gram matrix,
    so the cost is linear in ``n``); directions with a zero singular value are left out."""
    values, vectors = torch.linalg.eigh(deltas @ deltas.T)
    order = torch.argsort(values, descending=True)[:k]
    s = values[order].clamp(min=0).sqrt()
    keep = s > s.max() * 1e-7 if len(s) else s.bool()
    u, s = vectors[:, order][:, keep], s[keep]
    return u * s, (u.T @ deltas) / s.unsqueeze(1)
