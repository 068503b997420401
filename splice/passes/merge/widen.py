"""``merge.widen``: WIDEN — weights disentangled into magnitude (each column's norm) and direction
(the unit column); each model's change from the base in both is ranked within the model, turned
into importance scores across models (a softmax, raised to ``score_calibration_value`` where a
rank is above ``above_average_value_ratio`` × the model's mean), and the task vectors are summed
weighted by the mean of the two scores per column; vectors (norms, biases) are scored entry by
entry on ``|θᵢ − θ₀|``. Meant for merging a pre-trained (continually trained) model with
fine-tuned ones, where task arithmetic fails (Yu et al., https://arxiv.org/abs/2408.03092;
reference ``widen_merging`` in github.com/yule-BUAA/MergeLLM). Embedding tables are scored per
token (the reference transposes them), convolutions per flattened input column."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from splice.passes.merge._common import Group, MergeMethod, Param, register_merge


def _within_model_rank(diff: torch.Tensor) -> torch.Tensor:
    """Each row's entries replaced by their rank / length (ascending, ties in order)."""
    order = torch.argsort(diff, dim=1, stable=True)
    ranks = (torch.arange(diff.shape[1], dtype=diff.dtype) / diff.shape[1]).expand_as(diff)
    return torch.zeros_like(diff).scatter(1, order, ranks)


def _importance(significance: torch.Tensor, ratio: float, calibration: float) -> torch.Tensor:
    scores = torch.softmax(significance, dim=0)
    above = significance > significance.mean(dim=1, keepdim=True) * ratio
    return torch.where(above, torch.full_like(scores, calibration), scores)


def _columns(w: torch.Tensor, kind: str | None) -> torch.Tensor:
    """``w`` as a matrix whose columns are WIDEN's units (an embedding's rows are its columns)."""
    return w.T if kind == "embedding" else w.reshape(w.shape[0], -1)


def widen(group: Group) -> torch.Tensor:
    base, p = group.base, group.params
    ratio, calibration = p["above_average_value_ratio"], p["score_calibration_value"]
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    deltas = torch.stack([(t - base).to(work) for t in group.tensors])
    if base.dim() < 2 or group.kind not in ("linear", "conv", "embedding"):
        scores = _importance(deltas.abs().reshape(len(deltas), -1), ratio, calibration).reshape(deltas.shape)
        return (base.to(work) + (deltas * scores).sum(dim=0)).to(base.dtype)
    b = _columns(base.to(work), group.kind)
    models = [_columns(t.to(work), group.kind) for t in group.tensors]
    magnitude = torch.stack([(m.norm(dim=0) - b.norm(dim=0)).abs() for m in models])
    direction = torch.stack([1 - F.cosine_similarity(m, b, dim=0) for m in models])
    scores = 0.5 * (_importance(_within_model_rank(magnitude), ratio, calibration)
                    + _importance(_within_model_rank(direction), ratio, calibration))
    merged = sum(_columns(d, group.kind) * s for d, s in zip(deltas, scores))
    merged = merged.T if group.kind == "embedding" else merged.reshape(base.shape)
    return (base.to(work) + merged).to(base.dtype)


register_merge(MergeMethod("widen", "https://arxiv.org/abs/2408.03092", widen, (
    Param("above_average_value_ratio", float, 1.0, check=lambda x: x >= 0, valid="[0, ∞)",
          help="a rank above this × the model's mean rank gets score_calibration_value"),
    Param("score_calibration_value", float, 1.0, check=lambda x: x >= 0, valid="[0, ∞)",
          help="the score of the above-average entries")),
    base="required", min_models=1, summary="WIDEN: magnitude/direction-disentangled importance-weighted merge"))
