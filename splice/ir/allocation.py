"""Choosing one option per layer under budgets by integer programming (HAWQ-V3's ILP,
https://arxiv.org/abs/2011.10680): the solver that mixed-precision passes share
(``quantize.allocate``, ``reparam.shiftadd_allocate``). A pass measures a cost (sensitivity) per
layer and candidate and the budget rows; this picks the candidates."""
from __future__ import annotations

import numpy as np

from splice.errors import ConfigError


def choose_bits(sensitivity: np.ndarray, budgets: list[tuple[str, np.ndarray, float]], pass_name: str) -> np.ndarray:
    """The candidate index per layer minimizing ``Σ sensitivity[l, b_l]`` subject to
    ``Σ cost[l, b_l] <= limit`` for every ``(name, cost [L, B], limit)`` in ``budgets``, by
    ``scipy.optimize.milp`` over one binary per (layer, candidate). ConfigError (naming
    ``pass_name``, the budget and the least achievable value) when no choice meets a budget."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # scipy.optimize: 0.4 s, kept off the registry load

    layers, cands = sensitivity.shape
    for name, cost, limit in budgets:
        least = cost.min(1).sum()
        if least > limit * (1 + 1e-12):
            raise ConfigError(f"{pass_name}: budget {name} cannot be met: the minimum achievable is {least:,.6g} "
                              f"(every layer at its cheapest candidate)")
    scale = max(float(np.abs(sensitivity).max()), 1e-30)  # HiGHS prefers objective coefficients near 1
    constraints = [LinearConstraint(np.kron(np.eye(layers), np.ones(cands)), 1, 1)]
    constraints += [LinearConstraint(cost.reshape(1, -1), -np.inf, limit) for _, cost, limit in budgets]
    res = milp(sensitivity.ravel() / scale, constraints=constraints, integrality=np.ones(layers * cands),
               bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
    if not res.success:
        raise ConfigError(f"{pass_name}: no bit allocation meets the budget ({res.message})")
    return res.x.reshape(layers, cands).argmax(1)
