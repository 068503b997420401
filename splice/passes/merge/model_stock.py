"""``merge.model_stock``: Model Stock — interpolate between the base and the average of the
fine-tuned models by ``t = N cosθ / (1 + (N − 1) cosθ)``, θ the mean angle between their task
vectors (whole tensors, or each output row with ``filter_wise``); the base where the ratio is
singular (Jang et al., https://arxiv.org/abs/2403.19522)."""
from __future__ import annotations

import torch

from splice.passes.merge._common import Group, MergeMethod, Param, register_merge


def model_stock(group: Group) -> torch.Tensor:
    w0, ws = group.base, group.tensors
    if group.params["filter_wise"]:
        w0, ws = (w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]) if w0.dim() == 1 else (w0, ws)
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = [((a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
               for i, a in enumerate(offsets) for b in offsets[i + 1:]]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(cos), denominator))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(group.base.shape)


register_merge(MergeMethod("model_stock", "https://arxiv.org/abs/2403.19522", model_stock, (
    Param("filter_wise", bool, False, help="one ratio per output row instead of per tensor"),),
    base="required", min_models=2, summary="Model Stock: base-to-average ratio from the task vectors' angle"))
