"""``merge.mwa``: Metrics-Weighted Averaging of checkpoints — the weighted average of the models
with weights from one metric per checkpoint and one penalty factor ``p``: by training loss
``wᵢ ∝ lossᵢ^(−p)`` (lower loss, more weight), by training step ``wᵢ ∝ stepᵢ^p`` (later, more
weight); ``p = 0`` is the uniform average and a larger ``p`` concentrates the weight on the best
checkpoint (Choi and Yu, "Parameter-Efficient Checkpoint Merging via Metrics-Weighted Averaging",
https://arxiv.org/abs/2504.18580). ``metric`` is each model's own parameter; mergekit has no such
method."""
from __future__ import annotations

import torch

from splice.passes.merge._common import Group, MergeMethod, Param, register_merge

BY = ("loss", "step")


def mwa_weights(metrics: list[float], by: str, penalty: float) -> list[float]:
    exponent = -penalty if by == "loss" else penalty
    raw = [m ** exponent for m in metrics]
    return [r / sum(raw) for r in raw]


def mwa(group: Group) -> torch.Tensor:
    p = group.params
    first = group.tensors[0]
    work = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = mwa_weights(p["metric"], p["by"], p["penalty"])
    return sum(w * t.to(work) for w, t in zip(weights, group.tensors)).to(first.dtype)


register_merge(MergeMethod("mwa", "https://arxiv.org/abs/2504.18580", mwa, (
    Param("metric", float, per_model=True, check=lambda x: x > 0, valid="(0, ∞)",
          help="each checkpoint's training loss, or its step (see by)"),
    Param("by", str, "loss", check=lambda x: x in BY, valid="{loss, step}", help="what metric holds"),
    Param("penalty", float, 1.0, check=lambda x: x >= 0, valid="[0, ∞)",
          help="penalty factor p (0: uniform average)")),
    min_models=2, summary="Metrics-Weighted Averaging of checkpoints by loss or step"))
