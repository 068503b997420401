"""``merge.nearswap``: take the other model's value where it is within ``t`` of the base's, the
base's elsewhere, blended by ``clamp(t / |a − b|, 0, 1)`` (mergekit's NearSwap,
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)."""
from __future__ import annotations

import torch

from splice.passes.merge._common import Group, MergeMethod, Param, register_merge


def nearswap(group: Group) -> torch.Tensor:
    a, b = group.base, group.tensors[0]
    w = (group.params["t"] / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return w * b + (1 - w) * a


register_merge(MergeMethod("nearswap", "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001", nearswap, (
    Param("t", float, check=lambda x: x >= 0, valid="[0, ∞)", help="distance under which the other model's value is taken"),),
    base="required", min_models=1, max_models=1, summary="NearSwap: swap in the other model's close values"))
