"""``prune.sparsegpt``: SparseGPT — prune each layer column block by column block, choosing the mask
of a block by ``w² / [H⁻¹]ᵢᵢ²`` and spreading each pruned weight's error over the columns not yet
visited through the inverse Hessian of the layer's inputs (optimal brain surgeon updates, in
GPTQ's Cholesky form). https://arxiv.org/abs/2301.00774

As the reference code: ``block_size`` 128 columns per mask decision, ``damp`` 1 % of the mean
Hessian diagonal, calibration block by block through the blocks already pruned (``sequential``).
For N:M (``prune.nm:criterion=sparsegpt``) the mask is chosen every ``m`` columns instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.ir.graph import Graph
from splice.ir.sparsity import mask_of
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.instrument.hessian import inverse_hessian_cholesky, without_dead_inputs
from splice.passes.prune._common import HIDDEN_LINEAR, PRUNE_REPORT, CalibratedPruneConfig, prunable, prune_calibrated


@dataclass(frozen=True, kw_only=True)
class SparseGPTConfig(CalibratedPruneConfig):
    """SparseGPT: one-shot pruning with Hessian-based weight updates (needs calibration)."""

    block_size: int = field(default=128, metadata={"help": "columns per mask decision and lazy update"})
    damp: float = field(default=0.01, metadata={"help": "dampening, fraction of mean diag(H)"})

    def __post_init__(self):
        super().__post_init__()
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")


def sparsegpt_layer(w: torch.Tensor, h: torch.Tensor, *, sparsity: float = 0.0, nm: tuple[int, int] | None = None,
                    block_size: int = 128, damp: float = 0.01,
                    prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on a weight ``[N, K]`` with input Hessian ``[K, K]``: ``sparsity`` of each column
    block pruned (or ``nm = (n, m)``: ``n`` of every ``m`` kept), weights ``prior`` drops pruned
    too. Returns the keep-mask and the updated weight (zero where pruned)."""
    w, h = without_dead_inputs(w, h)
    n_rows, k = w.shape
    hinv = inverse_hessian_cholesky(h, damp)[0].float()
    dropped = torch.zeros(n_rows, k, dtype=torch.bool) if prior is None else ~prior
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n_rows, i2 - i1), hinv[i1:i2, i1:i2]
        saliency = w1 ** 2 / torch.diagonal(hinv1).reshape(1, -1) ** 2
        saliency[dropped[:, i1:i2]] = -1  # already pruned: counted first
        if nm is None:
            cut = int(saliency.numel() * sparsity)
            if cut:
                drop = torch.zeros(saliency.numel(), dtype=torch.bool)
                drop[torch.topk(saliency.reshape(-1), cut, largest=False).indices] = True
                dropped[:, i1:i2] |= drop.reshape(saliency.shape)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                group = saliency[:, i:i + nm[1]]
                low = torch.topk(group, nm[1] - nm[0], dim=1, largest=False).indices
                dropped[:, i1 + i:i1 + i + nm[1]].scatter_(1, low, True)
            q = torch.where(dropped[:, i1 + i], 0.0, w1[:, i])
            err = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1)
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return ~dropped, w * ~dropped


@register_pass("prune.sparsegpt", SparseGPTConfig, reference="https://arxiv.org/abs/2301.00774",
               needs_calibration=True, report_fields=PRUNE_REPORT,
               applies=HIDDEN_LINEAR)
def sparsegpt(graph: Graph, cfg: SparseGPTConfig, ctx: PassContext) -> PassResult:
    nodes = prunable(graph, cfg, ("linear",), "prune.sparsegpt")

    def solve(node, w, stats):
        h = stats.hessian() if stats.rows else torch.eye(w.shape[1])  # no rows: magnitude, no update
        return sparsegpt_layer(w, h, sparsity=cfg.sparsity, block_size=cfg.block_size,
                               damp=cfg.damp, prior=mask_of(graph, node))

    return PassResult(graph, True, prune_calibrated(graph, nodes, cfg, ctx, solve, "prune.sparsegpt"))
