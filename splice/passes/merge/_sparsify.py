"""Sparsification of task vectors (fine-tuned − base) before they are combined, as mergekit's
``sparsify.py`` defines each: keep the largest magnitudes (TIES), drop at random (DARE), drop the
smallest and the top ``gamma`` outliers (Model Breadcrumbs), drop at random with a keep probability
rising with magnitude rank (DELLA's MagPrune); optionally rescale the kept entries so the L1 norm is
unchanged (``rescale``: mergekit's choice for DARE and DELLA, instead of the papers' 1/density)."""
from __future__ import annotations

import torch


def rescaled(delta: torch.Tensor, keep: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    """``delta ⊙ keep``, scaled back to ``delta``'s L1 norm when ``rescale`` (unless either is ~0)."""
    kept = delta * keep
    if not rescale:
        return kept
    before, after = delta.abs().sum(), kept.abs().sum()
    return kept if before < eps or after < eps else kept * (before / after)


def top_share(scores: torch.Tensor, density: float) -> torch.Tensor:
    """The 0/1 mask (``scores``' dtype) of the ``density`` share of largest ``scores`` (at least one entry)."""
    keep = torch.zeros(scores.numel(), dtype=scores.dtype)
    keep[torch.argsort(scores.reshape(-1).float(), descending=True)[:max(1, int(density * scores.numel()))]] = 1
    return keep.reshape_as(scores)


def magnitude(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep the ``density`` share of largest magnitudes (at least one entry)."""
    if density >= 1:
        return delta
    if delta.numel() == 0:
        return torch.zeros_like(delta)
    return rescaled(delta, top_share(delta.abs(), density), rescale)


def magnitude_outliers(delta: torch.Tensor, density: float, rescale: bool, gamma: float) -> torch.Tensor:
    """Drop the ``gamma`` share of largest magnitudes, then the smallest, keeping ``density``."""
    if density >= 1:
        return delta
    n = delta.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    order = torch.sort(delta.abs().reshape(-1).float()).indices
    keep = torch.zeros(n, dtype=delta.dtype)
    keep[order[bottom:bottom + target]] = 1
    return rescaled(delta, keep.reshape_as(delta), rescale)


def bernoulli(delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE)."""
    if density >= 1:
        return delta
    work = delta.float() if delta.dtype != torch.bfloat16 else delta
    keep = torch.bernoulli(torch.full_like(work, density), generator=generator)
    return rescaled(work, keep, rescale).to(delta.dtype)


def della_magprune(delta: torch.Tensor, density: float, rescale: bool, epsilon: float,
                   generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability ``density − ε … density + ε`` by its magnitude rank in its
    row (DELLA's MagPrune)."""
    if density >= 1:
        return delta
    work = (delta.float() if delta.dtype != torch.bfloat16 else delta)
    rows = work.unsqueeze(0) if work.dim() < 2 else work
    ranks = torch.argsort(rows.abs(), dim=1).argsort(dim=1).to(work.dtype) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 2 * epsilon
    keep = torch.bernoulli(probs, generator=generator)
    return rescaled(rows, keep, rescale).to(delta.dtype).reshape(delta.shape)
