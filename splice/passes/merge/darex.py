"""``merge.darex``: DAREx-q — DARE (drop each task-vector entry with probability ``1 − density``)
with the rescaling corrected for extreme drop rates: the kept entries are divided by ``q`` instead
of DARE's ``1 − p``, ``1 − p ≤ q ≤ 1``, which keeps a layer's outputs from blowing up when ``p``
is large (Deng et al., "DARE the Extreme", https://arxiv.org/abs/2410.09344). ``q = 0`` (the
default) chooses ``q`` per linear layer in closed form from calibration data, as the reference's
``analytical_resolve_new``: with ``c = Δ ⊙ x̄`` (the delta times the layer's mean input), each
output row's ``q`` minimizes ``|η(1 − (1−p)/q) Σc + η² φ(p) Σc² / (4q²) + log(2/(1−γ))|`` over a grid
from ``1 − p`` up, stopping once 80 % of the rows are past their minimum (outlier features), and
the layer takes the rows' mean; tensors that are not a linear's weight keep their whole delta, as
the reference keeps everything outside the attention and MLP weights. A fixed ``q`` needs no
data and rescales every tensor. The merged model is ``base + Σᵢ weightᵢ Δ̂ᵢ``."""
from __future__ import annotations

import math

import torch

from splice.ir.graph import Graph
from splice.ir.select import op_kind
from splice.passes.instrument.calibrate import input_stats
from splice.passes.merge import _sparsify
from splice.passes.merge._common import (Group, MergeMethod, Param, in_unit_open_closed, register_merge,
                                         unset_for_some_model)

GRID = 0.001  # step of the search over q
STOP = 0.8  # share of rows past their minimum at which the search stops


def mean_inputs(graph: Graph, calibration: list, who: str) -> dict[str, torch.Tensor]:
    """The mean input (per feature) of every linear, by weight target."""
    if not calibration:
        return {}
    nodes = [n for n in graph.gm.graph.nodes if op_kind(n) == "linear" and getattr(n.args[1], "op", None) == "get_attr"]
    stats = input_stats(graph, nodes, calibration, ("mean",))
    return {n.args[1].target: stats[n.name].mean() for n in nodes}


def _phi(p: float) -> float:
    return 0.5 if abs(p - 0.5) < 1e-9 else (1 - 2 * p) / math.log((1 - p) / p)


def analytical_q(delta: torch.Tensor, mean_input: torch.Tensor, drop: float, eta: float, gamma: float) -> float:
    """DAREx's per-layer ``q`` (module docstring)."""
    start = int((1 - drop) / GRID)
    if drop <= 0 or start >= 999:
        return 1.0 - drop
    c = delta.double() * mean_input.double()
    s1, s2 = c.sum(dim=1), c.square().sum(dim=1)
    q = torch.arange(start, 999, dtype=torch.float64).unsqueeze(1) * GRID
    res = (eta * (1 - (1 - drop) / q) * s1 + eta ** 2 * _phi(drop) * s2 / (4 * q ** 2) + math.log(2 / (1 - gamma))).abs()
    best_before = torch.cat([torch.full_like(res[:1], math.inf), res.cummin(dim=0).values[:-1]])
    past = (res >= best_before).int().cummax(dim=0).values.double().mean(dim=1)
    hits = torch.nonzero(past >= STOP)
    end = int(hits[0]) if len(hits) else len(q) - 1
    window = res[:end + 1]
    index = end - torch.argmin(window.flip(0), dim=0)  # ties: the larger q, as the reference's <=
    return float(q[index, 0].mean())


def darex(group: Group) -> torch.Tensor:
    base, p = group.base, group.params
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    out = base.to(work).clone()
    for i, tensor in enumerate(group.tensors):
        delta, density, q = (tensor - base).to(work), p["density"][i], p["q"][i]
        if q and not density <= q <= 1:
            raise group.error(f"q must be in [density, 1] = [{density}, 1], got {q}")
        if not q:
            if group.stats[i] is None or delta.dim() != 2:
                out += p["weight"][i] * delta  # not a linear's weight: its delta whole
                continue
            q = analytical_q(delta, group.stats[i], 1 - density, p["eta"], p["gamma"])
        kept = _sparsify.bernoulli(delta, density, False, group.generator)
        out += p["weight"][i] * kept / q
    return out.to(base.dtype)


register_merge(MergeMethod("darex", "https://arxiv.org/abs/2410.09344", darex, (
    Param("weight", float, 1.0, per_model=True, help="each model's weight"),
    Param("density", float, per_model=True, check=in_unit_open_closed, valid="(0, 1]",
          help="share of each task vector kept (1 − drop rate)"),
    Param("q", float, 0.0, per_model=True, check=lambda x: 0 <= x <= 1, valid="[0, 1]",
          help="rescale divisor in [density, 1]; 0: per layer from calibration data"),
    Param("eta", float, 0.45, check=lambda x: x > 0, valid="(0, ∞)", help="balance of the analytical objective's terms"),
    Param("gamma", float, 0.95, check=lambda x: 0 < x < 1, valid="(0, 1)", help="the bound's probability")),
    base="required", min_models=1, statistic=mean_inputs, needs_data=lambda cfg: unset_for_some_model(cfg, "q"),
    summary="DAREx-q: DARE with the rescaling corrected for extreme drop rates"))
