"""Shared by the structured pruners (``prune.channels``, ``prune.heads``): the config, which
coupling groups a pass removes units from (``ir/coupling.py``), unit scores — data-free from the
norms of every tensor slice a unit owns, or from calibration as structured Wanda (each unit's input
feature norm times the weights that read it: Wanda-sp, https://arxiv.org/abs/2312.11983) or as
first-order Taylor importance (``Σ |W ⊙ ∂L/∂W|`` over every slice the unit owns, gradients from an
instrumented backward pass over the calibration data: LLM-Pruner's element-wise first order,
https://arxiv.org/abs/2305.11627, Torch-Pruning's TaylorImportance) — and the physical shrink
(``ir/shrink.py``) with its report.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.errors import ConfigError
from splice.ir.coupling import Coupling, Group
from splice.ir.graph import Graph
from splice.ir.select import parse_targets, validate_targets
from splice.ir.shrink import shrink
from splice.passes.base import PassConfig, PassContext
from splice.passes.instrument.calibrate import input_stats
from splice.passes.instrument.gradients import weight_gradients
from splice.passes.prune.wanda import WANDA_STATS

aten = torch.ops.aten

SCORES = ("l2", "l1", "wanda", "taylor")
CALIBRATED_SCORES = ("wanda", "taylor")
STRUCTURED_REPORT = {"groups": "groups shrunk", "units_removed": "units removed",
                     "params_before": "parameters before", "params_after": "parameters after"}


@dataclass(frozen=True, kw_only=True)
class StructuredConfig(PassConfig):
    """Fields every structured pruner takes."""

    amount: float = field(default=0.25, metadata={
        "help": "fraction of each targeted group's units removed (rounded, at least one), in [0, 1)"})
    targets: str = field(default="all", metadata={
        "help": "groups whose layers match (module-path globs, re:, !exclude, joined by |); all: every shrinkable one"})
    score: str = field(default="l2", metadata={
        "help": "unit importance: l2 or l1 norm of every weight slice it owns (data-free); wanda: "
                "Σ |W|·‖X‖ over the weights that read it; taylor: Σ |W·∂L/∂W| over every slice it owns "
                "(wanda and taylor need calibration)"})

    def __post_init__(self):
        if not 0 <= self.amount < 1:
            raise ValueError(f"amount must be in [0, 1), got {self.amount}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        validate_targets(self.targets)


def targeted(coupling: Coupling, kinds: tuple[str, ...], cfg: StructuredConfig, pass_name: str,
             where=lambda g: True) -> tuple[list[Group], dict[int, str]]:
    """The groups of ``kinds`` (and ``where``) whose layers ``cfg.targets`` selects, and the pinned
    ones left out (id -> reason). A group the user named explicitly that cannot shrink is an error."""
    sel = parse_targets(cfg.targets)
    chosen, pinned = [], {}
    for group in coupling.groups:
        if group.kind not in kinds or not where(group) or not any(sel.matches("all", m) for m in group.modules):
            continue
        if group.pinned_by is None:
            chosen.append(group)
        elif cfg.targets != "all":
            raise ConfigError(f"{pass_name}: {group.kind} group #{group.id} of {group.touches()} cannot shrink: "
                              f"pinned by {group.pinned_by}")
        else:
            pinned[group.id] = str(group.pinned_by)
    if not chosen:
        raise ConfigError(f"{pass_name}: no shrinkable {'/'.join(kinds)} group matches targets '{cfg.targets}'"
                          + (f" ({len(pinned)} pinned)" if pinned else ""))
    return chosen, pinned


def unit_scores(graph: Graph, group: Group, score: str, grads: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Importance of each unit of ``group``: the sum over its member tensors of the slice the unit
    owns of ``|W|²`` (l2: Torch-Pruning's group norm importance), ``|W|`` (l1) or ``|W ⊙ G|``
    (taylor, ``grads`` by target; tensors without one, batch-norm statistics, count nothing)."""
    out = torch.zeros(group.units, dtype=torch.float64)
    for m in group.members:
        if score == "taylor" and m.target not in grads:
            continue
        t = graph.tensor(m.target).detach().double().abs()
        t = t.square() if score == "l2" else t * grads[m.target].double().abs() if score == "taylor" else t
        owned = t.index_select(m.axis, m.index.reshape(-1)).movedim(m.axis, 0)
        out += owned.reshape(group.units, -1).sum(1)
    return out


def wanda_scores(graph: Graph, groups: list[Group], ctx: PassContext) -> dict[int, torch.Tensor]:
    """Structured Wanda: for each unit, ``Σ |W_ij| · ‖X_j‖₂`` over the input features ``j`` it owns
    of every linear that reads it (down_proj's columns for an MLP channel, o_proj's for a head),
    with ``‖X_j‖`` from calibration on the graph as it is (cached with the other passes' statistics)."""
    readers = {m.target for g in groups for m in g.members if m.axis == 1}
    nodes = [n for n in graph.gm.graph.nodes if n.target == aten.linear.default and n.args[1].target in readers]
    stats = input_stats(graph, nodes, ctx.calibration, WANDA_STATS, ctx.cache)
    per_feature = {}
    for node in nodes:
        seen = stats[node.name]
        norm = seen.feature_sq().double().clamp(min=0).sqrt() if seen.rows else 1.0
        per_feature[node.args[1].target] = (graph.tensor(node.args[1].target).detach().double().abs() * norm).sum(0)
    out = {}
    for g in groups:
        score = torch.zeros(g.units, dtype=torch.float64)
        for m in g.members:
            if m.axis == 1 and m.target in per_feature:
                score += per_feature[m.target][m.index].sum(1)
        out[g.id] = score
    return out


def scores_of(graph: Graph, groups: list[Group], cfg: StructuredConfig, ctx: PassContext,
              pass_name: str) -> dict[int, torch.Tensor]:
    """Each group's unit scores by ``cfg.score``."""
    if cfg.score == "wanda":
        return wanda_scores(graph, groups, ctx)
    grads = None
    if cfg.score == "taylor":
        targets = sorted({m.target for g in groups for m in g.members})
        grads = weight_gradients(graph, targets, ctx.calibration, pass_name)
    return {g.id: unit_scores(graph, g, cfg.score, grads) for g in groups}


def needs_data(cfg: StructuredConfig) -> bool:
    return cfg.score in CALIBRATED_SCORES


def units_removed(amount: float, units: int) -> int:
    """How many of ``units`` ``amount`` removes: rounded, and at least one when ``amount`` > 0 (a
    quarter of 2 KV heads is one, not none)."""
    return max(round(amount * units), 1 if amount > 0 else 0)


def kept_units(scores: torch.Tensor, amount: float, group: Group, pass_name: str) -> torch.Tensor:
    """The highest-scoring ``1 - amount`` of the units (``units_removed``), in order."""
    remove = units_removed(amount, len(scores))
    if remove >= len(scores):
        raise ConfigError(f"{pass_name}: amount={amount} would remove every unit ({len(scores)}) of {group.kind} "
                          f"group #{group.id} ({group.touches()})")
    return torch.topk(scores, len(scores) - remove).indices.sort().values


def shrink_report(graph: Graph, out: Graph, keep: dict[int, torch.Tensor], coupling: Coupling,
                  pinned: dict[int, str]) -> dict:
    return {"groups": len(keep),
            "units_removed": sum(coupling.group(g).units - len(k) for g, k in keep.items()),
            "params_before": graph.num_params(), "params_after": out.num_params(),
            "kept": {f"#{g} {coupling.group(g).kind} {coupling.group(g).touches()}":
                     f"{len(k)}/{coupling.group(g).units}" for g, k in keep.items()},
            "pinned_skipped": pinned}


def shrink_groups(graph: Graph, keep: dict[int, torch.Tensor], coupling: Coupling, pinned: dict[int, str]):
    """The shrunk graph and the report (``STRUCTURED_REPORT`` fields, kept units per group)."""
    keep = {g: k for g, k in keep.items() if len(k) < coupling.group(g).units}
    if not keep:
        return graph, {"groups": 0, "units_removed": 0, "params_before": graph.num_params(),
                       "params_after": graph.num_params(), "pinned_skipped": pinned}
    out = shrink(graph, keep, coupling)
    return out, shrink_report(graph, out, keep, coupling, pinned)
