"""Generalized task arithmetic — the family mergekit builds task arithmetic, TIES, DARE, Model
Breadcrumbs and DELLA from (its ``generalized_task_arithmetic.py``): each model's task vector
(model − base) is sparsified (``_sparsify``), weighted, optionally kept only where its sign agrees
with the elected sign (TIES's consensus: the sign of the weighted sum), summed, divided by the
weights that contributed (``normalize``), scaled by ``lambda`` and added to the base."""
from __future__ import annotations

from collections.abc import Callable

import torch

from splice.passes.merge import _sparsify
from splice.passes.merge._common import Group, MergeMethod, Param, in_unit_open_closed, register_merge

Sparsify = Callable[[torch.Tensor, Group, int], torch.Tensor]  # (task vector, group, its model index)


def _no_sparsify(delta, group, i):
    return delta


def magnitude(delta, group, i):
    return _sparsify.magnitude(delta, group.params["density"][i], group.params["rescale"])


def random(delta, group, i):
    return _sparsify.bernoulli(delta, group.params["density"][i], group.params["rescale"], group.generator)


def outliers(delta, group, i):
    return _sparsify.magnitude_outliers(delta, group.params["density"][i], group.params["rescale"],
                                        group.params["gamma"][i])


def magprune(delta, group, i):
    density, epsilon = group.params["density"][i], group.params["epsilon"][i]
    if density < 1 and not (0 < density - epsilon and density + epsilon < 1):
        raise group.error(f"density ± epsilon ({density} ± {epsilon}) must stay inside (0, 1)")
    return _sparsify.della_magprune(delta, density, group.params["rescale"], epsilon, group.generator)


def agreeing(deltas: torch.Tensor) -> torch.Tensor:
    """1 where a (weighted) task vector's sign agrees with the sign elected by their sum (TIES)."""
    elected = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return (deltas.sign() == elected).to(deltas.dtype)


def task_arithmetic(group: Group, sparsify: Sparsify, consensus: bool) -> torch.Tensor:
    base, p = group.base, group.params
    if not group.tensors:
        return base
    deltas = torch.stack([sparsify(t - base, group, i) for i, t in enumerate(group.tensors)])
    weights = torch.tensor(p["weight"], dtype=deltas.dtype).reshape([-1] + [1] * base.dim())
    deltas = deltas * weights
    if consensus:
        agree = agreeing(deltas)
        mixed, divisor = (deltas * agree).sum(dim=0), (weights * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = deltas.sum(dim=0), weights.sum(dim=0).expand(base.shape).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if p["normalize"]:
        mixed = mixed / divisor
    if p["lambda"] != 1:
        mixed = mixed * p["lambda"]
    return (base + mixed).to(base.dtype)


def register_gta(name: str, reference: str, summary: str, *, sparsify: Sparsify = _no_sparsify,
                 consensus: bool = False, normalize: bool = False, rescale: bool = False,
                 extra: tuple[Param, ...] = ()) -> MergeMethod:
    """Register one member of the family with mergekit's defaults for it."""
    params = (Param("weight", float, per_model=True, help="each model's weight"),
              Param("density", float, 1.0, per_model=True, check=in_unit_open_closed, valid="(0, 1]",
                    help="share of each task vector kept"),
              Param("normalize", bool, normalize, help="divide by the sum of the weights that contributed"),
              Param("rescale", bool, rescale, help="rescale the kept entries to the task vector's L1 norm"),
              Param("lambda", float, 1.0, help="scale of the combined task vector"),
              Param("int8_mask", bool, False, help="accepted for mergekit recipes; no effect on the values"),
              *extra)
    return register_merge(MergeMethod(name, reference, lambda g: task_arithmetic(g, sparsify, consensus), params,
                                      base="required", summary=summary))
