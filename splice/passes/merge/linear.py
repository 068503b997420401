"""``merge.linear``: a weighted average of the models (model soups, Wortsman et al.,
https://arxiv.org/abs/2203.05482); ``normalize`` divides by the sum of the weights."""
from __future__ import annotations

import torch

from splice.passes.merge._common import Group, MergeMethod, Param, register_merge


def linear(group: Group) -> torch.Tensor:
    first = group.tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = group.params["weight"]
    out = torch.zeros_like(first, dtype=dtype)
    for tensor, w in zip(group.tensors, weights):
        out += tensor.to(dtype) * w
    if group.params["normalize"]:
        total = sum(weights)
        if total == 0:
            raise group.error("the weights sum to 0 and normalize=true")
        out /= total
    return out.to(first.dtype)


register_merge(MergeMethod("linear", "https://arxiv.org/abs/2203.05482", linear, (
    Param("weight", float, per_model=True, help="each model's weight"),
    Param("normalize", bool, True, help="divide by the sum of the weights")), summary="Weighted average"))
