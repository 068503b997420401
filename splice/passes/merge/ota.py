"""``merge.ota``: OTA (optimization-trajectory-aware) merging — each parameter is the average of the
models weighted by a curvature estimate, ``θ = Σᵢ Pᵢ θ̃ᵢ / Σᵢ Pᵢ`` with ``Pᵢ = vᵢ^power``: ``vᵢ`` is
Adam's second moment (``exp_avg_sq``) where the model's checkpoint provides it — a safetensors file
of it by parameter name, the model's ``preconditioner`` parameter — else the diagonal empirical
Fisher of the model on the calibration data (the quantity ``v`` tracks). Fast Fisher Grafting first
reverts each task vector to the base outside its top ``density`` share by saliency ``v ⊙ Δ²``
(the loss increase a diagonal quadratic model predicts for dropping that entry): ``θ̃ᵢ = θ₀ + mᵢ ⊙ Δᵢ``
(Mahdavinia et al., "Harnessing Optimization Dynamics for Curvature-Informed Model Merging",
https://arxiv.org/abs/2509.11167)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.ir.loss import has_label_free_loss
from splice.passes.base import Applies
from splice.passes.instrument.gradients import weight_fisher
from splice.passes.merge import _sparsify
from splice.passes.merge._common import (Group, MergeMethod, Param, in_unit_open_closed, register_merge,
                                         unset_for_some_model)


def calibration_fisher(graph: Graph, calibration: list, who: str) -> dict[str, torch.Tensor]:
    """Each float tensor's diagonal empirical Fisher on ``calibration`` (none without data)."""
    if not calibration:
        return {}
    targets = [t for t, v in graph.tensors().items() if v.is_floating_point()]
    return weight_fisher(graph, targets, calibration, who)[1]


def second_moment(group: Group, path: str) -> torch.Tensor:
    """Tensor ``group.name``'s ``exp_avg_sq`` from the safetensors file ``path``."""
    if not Path(path).is_file():
        raise ConfigError(f"{group.who}: preconditioner '{path}': no such file")
    try:
        with safe_open(path, "pt") as f:
            if group.name not in f.keys():
                raise group.error(f"preconditioner '{path}' has no entry for it")
            value = f.get_tensor(group.name)
    except SafetensorError as e:
        raise ConfigError(f"{group.who}: preconditioner '{path}' is not a safetensors file ({e})") from None
    if value.shape != group.base.shape:
        raise group.error(f"preconditioner '{path}' holds shape {tuple(value.shape)}, the tensor "
                          f"{tuple(group.base.shape)}")
    return value


def ota(group: Group) -> torch.Tensor:
    base, p = group.base, group.params
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    numerator, denominator = torch.zeros_like(base, dtype=work), torch.zeros_like(base, dtype=work)
    for i, tensor in enumerate(group.tensors):
        path = p["preconditioner"][i]
        v = second_moment(group, path) if path else group.stats[i]
        if v is None:  # no gradient reaches it (a running statistic): plain average
            v = torch.ones_like(base)
        v, delta = v.to(work), (tensor - base).to(work)
        if p["density"][i] < 1:
            delta = delta * _sparsify.top_share(v * delta.square(), p["density"][i])
        weight = (v + p["epsilon"]) ** p["power"]
        numerator += weight * delta
        denominator += weight
    return (base.to(work) + numerator / denominator).to(base.dtype)


register_merge(MergeMethod("ota", "https://arxiv.org/abs/2509.11167", ota, (
    Param("preconditioner", str, "", per_model=True,
          help="safetensors file of the model's Adam exp_avg_sq by parameter name (empty: Fisher on --calib)"),
    Param("density", float, 1.0, per_model=True, check=in_unit_open_closed, valid="(0, 1]",
          help="Fast Fisher Grafting: share of each task vector kept by saliency v·Δ² (1: all)"),
    Param("power", float, 0.5, check=lambda x: x >= 0, valid="[0, ∞)", help="P = v^power (0.5: Adam's preconditioner)"),
    Param("epsilon", float, 1e-12, check=lambda x: x > 0, valid="(0, ∞)", help="floor added to v")),
    base="required", min_models=1, statistic=calibration_fisher,
    needs_data=lambda cfg: unset_for_some_model(cfg, "preconditioner"),
    applies=Applies("a model with a label-free loss (the Fisher fallback; any model given preconditioners)",
                    kinds=("linear", "conv"), check=has_label_free_loss),
    summary="OTA: curvature-weighted merge (Adam second moments or Fisher) with Fast Fisher Grafting"))
