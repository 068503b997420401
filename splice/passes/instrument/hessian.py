"""The inverse-Hessian factor that optimal-brain-surgeon updates share (GPTQ's column loop,
SparseGPT's prune-and-update): the upper Cholesky factor of ``H⁻¹`` for a layer's input Hessian
``H = 2XᵀX/n``, damped until it factors. https://arxiv.org/abs/2210.17323 (§4, "Cholesky reformulation")
"""
from __future__ import annotations

import torch


def inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, int]:
    """Upper Cholesky factor of ``H⁻¹`` after adding ``damp`` × mean diagonal; retries with ×10
    more damping up to 6 times. Returns the factor and the number of retries."""
    mean_diag = torch.diag(h).mean().clamp(min=1e-8)
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for tries in range(7):
        try:
            lower = torch.linalg.cholesky(h + damp * (10 ** tries) * mean_diag * eye)
            inv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inv, upper=True), tries
        except torch.linalg.LinAlgError:
            continue
    raise RuntimeError("Hessian stays singular after damping")


def without_dead_inputs(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of a weight ``[N, K]`` (float32) and its Hessian (float64) where input features that
    never fired (zero diagonal) have weight 0 and a unit diagonal, so ``H`` factors."""
    w, h = w.clone().float(), h.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    return w, h
