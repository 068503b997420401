"""Layer-wise sparsity by dynamic programming: ``prune.allocate:method=dp``.

Xu et al., "Efficient Joint Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks"
(https://arxiv.org/abs/2308.10438): the output distortion of pruning several layers is close to
the sum of each layer's own, so choosing one sparsity per layer that minimises the summed distortion
under a global count of pruned weights is a multiple-choice knapsack, solved exactly by dynamic
programming over the layers with the budget in ``BUDGET_UNITS`` steps.

A layer's distortion at sparsity ``s``: prune it alone by the criterion's score (Wanda's
``|W|·‖X‖`` within each row; ``|W|`` for magnitude; SparseGPT's choice is approximated by Wanda's
without its weight update) and measure ``Σ_n f_n (ΔW H ΔWᵀ)_nn`` — its output error on the
calibration inputs (``H = XᵀX``), each output channel weighted by the diagonal Fisher ``f_n`` of
the label-free calibration loss, so layers' errors are in one unit (the paper measures the network
output's distortion directly; this is its second-order estimate).
"""
from __future__ import annotations

import numpy as np
import torch

LEVELS = np.round(np.arange(0, 0.951, 0.05), 2)  # candidate sparsities of each layer
BUDGET_UNITS = 2000  # the budget's resolution: pruned weights in 1/2000ths of all targeted weights


def distortions(w: torch.Tensor, score: torch.Tensor, h: torch.Tensor, fisher: torch.Tensor | None,
                per_row: bool) -> np.ndarray:
    """The output distortion of pruning weight ``w`` [N, K] at every level of ``LEVELS``, lowest
    ``score`` first (within each row, or over the layer)."""
    w, h = w.float(), h.float()
    rows = w if per_row else w.reshape(1, -1)
    order = torch.argsort(score.reshape(rows.shape), dim=1)
    f = torch.ones(w.shape[0]) if fisher is None else fisher.float()
    out = []
    for level in LEVELS:
        k = int(round(level * rows.shape[1]))
        delta = torch.zeros_like(rows)
        delta.scatter_(1, order[:, :k], rows.gather(1, order[:, :k]))
        delta = delta.reshape(w.shape)
        out.append(float((f * ((delta @ h) * delta).sum(1)).sum()))
    return np.asarray(out)


def dp_levels(table: np.ndarray, sizes: np.ndarray, sparsity: float) -> np.ndarray:
    """The level index per layer minimising ``Σ table[l, level]`` with at least ``sparsity`` of all
    ``sizes`` weights pruned (costs in ``BUDGET_UNITS``), by dynamic programming over the layers:
    ``best[u]`` is the least distortion of the layers so far pruning exactly ``u`` units."""
    cost = np.rint(np.outer(sizes / sizes.sum(), LEVELS) * BUDGET_UNITS).astype(int)  # [L, S]
    top = int(cost.max(1).sum())
    best = np.full(top + 1, np.inf)
    best[0] = 0.0
    chosen = np.zeros((len(sizes), top + 1), dtype=int)
    for layer, (costs, values) in enumerate(zip(cost, table)):
        new = np.full(top + 1, np.inf)
        for level, (c, d) in enumerate(zip(costs, values)):
            cand = best[:top + 1 - c] + d
            better = cand < new[c:]
            new[c:][better] = cand[better]
            chosen[layer, c:][better] = level
        best = new
    target = int(round(sparsity * BUDGET_UNITS))
    if target > top:
        raise ValueError(f"sparsity {sparsity} is above what the levels reach ({LEVELS[-1]})")
    units = target + int(np.argmin(best[target:]))
    levels = np.zeros(len(sizes), dtype=int)
    for layer in reversed(range(len(sizes))):
        levels[layer] = chosen[layer, units]
        units -= cost[layer, levels[layer]]
    return levels
