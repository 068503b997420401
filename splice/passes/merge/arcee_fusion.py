"""``merge.arcee_fusion``: take the other model's change only where it matters — importance
``|Δ| · KL(softmax(θ) ‖ softmax(base))`` per row, kept where above ``median + 1.5 · IQR`` of the
importances (quantiles from a sample of 10⁶ entries in large tensors, drawn from the merge's
seeded generator) (Arcee Fusion, https://arcee.ai; mergekit's ``arcee_fusion``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from splice.passes.merge._common import Group, MergeMethod, register_merge

SAMPLE = 1_000_000


def importance(theta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    p, q = F.softmax(theta, dim=-1) + 1e-8, F.softmax(base, dim=-1) + 1e-8
    return (theta - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def threshold(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flat = scores.reshape(-1)
    if flat.numel() > SAMPLE:
        flat = flat[torch.randint(flat.numel(), (SAMPLE,), generator=generator)]
    ordered = torch.sort(flat).values
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]
    return median + 1.5 * (q3 - q1)


def arcee_fusion(group: Group) -> torch.Tensor:
    base, other = group.base, group.tensors[0]
    scores = importance(other, base)
    return base + (other - base) * (scores >= threshold(scores, group.generator)).float()


register_merge(MergeMethod("arcee_fusion", "https://arcee.ai", arcee_fusion, base="required", min_models=1,
                           max_models=1, summary="Arcee Fusion: the other model's important changes only"))
