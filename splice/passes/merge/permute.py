"""``merge.permute``: weight matching (Git Re-Basin, Ainsworth et al., https://arxiv.org/abs/2209.04836).
The second model's units are permuted to line up with the first's, then the two are interpolated:
``(1 − t)·A + t·P(B)``; ``t = 1`` gives ``P(B)``, a model that computes exactly what ``B`` does.

The permutable units come from the coupling analysis (``ir/coupling.py``): every group whose units
may be reordered without changing the outputs when every member tensor is reordered alike — MLP
channels, attention heads as whole heads, GQA KV heads carrying their query heads (which may also
be reordered among themselves, within their KV head), the shared V/O head dimensions, conv channels
and the residual stream. Pinned groups stay as they are: every pin the analysis records ties
positions to meaning (a graph input or output axis, embedding rows, an axis sliced in parts as RoPE's
``rotate_half`` slices the Q/K head dimension, a reshape, split or concat layout), and the query heads
of a pinned KV head stay too.

Each group's permutation maximizes ``Σ_members ⟨A, P(B)⟩`` with the other groups' permutations held
(a linear assignment, ``scipy.optimize.linear_sum_assignment``); groups are visited in a seeded
random order until a sweep improves none, or ``max_iter`` sweeps (the paper's algorithm 1). A tensor
that a group slices on two axes (a conv mapping the residual stream to itself) counts the other
axis at its current permutation, as the paper does. With calibration data the report holds the
label-free loss barrier along the path from A to B before and after alignment (``ir/loss.py``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from splice.errors import ConfigError
from splice.ir.coupling import Group, Member, analyze
from splice.ir.graph import Graph, set_attr
from splice.ir.loss import alphas, has_label_free_loss, loss_path
from splice.passes.base import PassContext, PassResult
from splice.passes.merge._common import (MergeConfig, MergeMethod, Param, in_unit_closed, keep_pruned, model_units,
                                         read_inputs, recipe_names, register_merge, resolve, setting_value)
from splice.passes.merge._units import MergeInputs

WHO = "merge.permute"
BARRIER_POINTS = 5  # interpolation weights the report's barriers are measured at


@dataclass
class Unit:
    """One permutation to solve: ``group``'s units over ``members``; for GQA KV heads also ``child``,
    the query heads, ``blocks[a]`` those of KV head ``a``, permuted within their KV head (``child_perm``).
    ``perm[u]``: the unit of B placed at A's unit ``u``."""

    group: Group
    members: tuple[Member, ...]
    perm: torch.Tensor
    child: Group | None = None
    blocks: torch.Tensor | None = None
    child_perm: torch.Tensor | None = None

    def moves(self) -> list[tuple[Member, torch.Tensor]]:
        child = [(m, self.child_perm) for m in self.child.members] if self.child is not None else []
        return [(m, self.perm) for m in self.members] + child


def _blocks(parent: Group, child: Group) -> torch.Tensor | None:
    """``[parent units, per_parent]``: the child units inside each parent unit, read off a tensor
    axis both slice; None when the child's units do not nest in the parent's."""
    outer = {(m.target, m.axis): m for m in parent.members}
    m = next((c for c in child.members if (c.target, c.axis) in outer), None)
    if m is None:
        return None
    p = outer[(m.target, m.axis)]
    owner = torch.full((int(max(p.index.max(), m.index.max())) + 1,), -1)
    owner[p.index.reshape(-1)] = torch.arange(parent.units).repeat_interleave(p.index.shape[1])
    of = owner[m.index]  # the parent unit of each position of each child unit
    if bool((of != of[:, :1]).any() or (of < 0).any()):
        return None
    blocks = [torch.nonzero(of[:, 0] == a).flatten() for a in range(parent.units)]
    return torch.stack(blocks) if len({len(x) for x in blocks}) == 1 else None


def _units(groups: list[Group]) -> tuple[list[Unit], list[dict]]:
    """The permutations to solve, and the groups left as they are with the reason."""
    free = {g.id: g for g in groups if g.shrinkable}
    skipped = [{"group": g.describe(), "why": f"pinned: {g.pinned_by}"} for g in groups if not g.shrinkable]
    units = []
    for g in free.values():
        if g.parent is not None:
            if g.parent not in free:
                skipped.append({"group": g.describe(), "why": "its KV heads are pinned"})
            continue
        child = next((c for c in free.values() if c.parent == g.id), None)
        blocks = _blocks(g, child) if child is not None else None
        if child is not None and blocks is None:
            skipped.append({"group": child.describe(), "why": "its units do not nest in the KV heads"})
            child = None
        inner = {(m.target, m.axis) for m in child.members} if child is not None else set()
        units.append(Unit(g, tuple(m for m in g.members if (m.target, m.axis) not in inner), torch.arange(g.units),
                          child, blocks, torch.arange(child.units) if child is not None else None))
    return units, skipped


def _reorder(tensor: torch.Tensor, moves: list[tuple[Member, torch.Tensor]]) -> torch.Tensor:
    """``tensor`` with each move's units reordered along its axis: position ``index[u, j]`` takes
    ``index[perm[u], j]`` (positions of no unit stay)."""
    for m, perm in moves:
        source = torch.arange(tensor.shape[m.axis])
        source[m.index.reshape(-1)] = m.index[perm].reshape(-1)
        tensor = tensor.index_select(m.axis, source)
    return tensor


def permuted(b: dict[str, torch.Tensor], units: list[Unit]) -> dict[str, torch.Tensor]:
    """B's tensors (keyed by A's targets) with every unit permutation applied."""
    moves: dict[str, list] = {}
    for unit in units:
        for m, perm in unit.moves():
            moves.setdefault(m.target, []).append((m, perm))
    return {t: _reorder(x, moves[t]) if t in moves else x for t, x in b.items()}


def _similarity(group: Group, members, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], units: list[Unit],
                this: Unit) -> torch.Tensor:
    """``S[u, v] = Σ_members ⟨A's unit u, B's unit v⟩`` over ``group``'s units, B with every other
    permutation applied (and ``this`` one's on the tensors' other axes)."""
    total = torch.zeros(group.units, group.units, dtype=torch.float64)
    for m in members:
        others = [(o, p) for u in units for o, p in u.moves()
                  if o.target == m.target and not (u is this and o.axis == m.axis)]
        xa = a[m.target].movedim(m.axis, 0)[m.index].reshape(m.index.shape[0], -1)
        xb = _reorder(b[m.target], others).movedim(m.axis, 0)[m.index].reshape(m.index.shape[0], -1)
        total = total + xa.double() @ xb.double().T
    return total


def _assign(score: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The permutation maximizing ``Σ_u score[u, perm[u]]``, and that sum."""
    from scipy.optimize import linear_sum_assignment  # lazily: `import splice.passes` stays light

    rows, cols = linear_sum_assignment(score.numpy(), maximize=True)
    return torch.as_tensor(cols), float(score[rows, cols].sum())


def _step(unit: Unit, a, b, units: list[Unit]) -> bool:
    """Re-solve ``unit``'s permutation with the others held; whether it improved the objective."""
    score = _similarity(unit.group, unit.members, a, b, units, unit)
    rows = torch.arange(unit.group.units)
    old = float(score[rows, unit.perm].sum())
    if unit.child is None:
        perm, new = _assign(score)
        child_perm = None
    else:  # a KV-head pair's value: the best assignment of their query heads (a nested assignment)
        inner = _similarity(unit.child, unit.child.members, a, b, units, unit)
        old += float(inner[torch.arange(unit.child.units), unit.child_perm].sum())
        nested = [[_assign(inner[unit.blocks[i]][:, unit.blocks[j]]) for j in rows] for i in rows]
        perm, new = _assign(score + torch.tensor([[v for _, v in row] for row in nested], dtype=score.dtype))
        child_perm = torch.empty(unit.child.units, dtype=torch.long)
        for i, j in zip(rows.tolist(), perm.tolist()):
            child_perm[unit.blocks[i]] = unit.blocks[j][nested[i][j][0]]
    if new <= old + 1e-9 * max(1.0, abs(old)):
        return False
    unit.perm, unit.child_perm = perm, child_perm
    return True


def weight_matching(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], units: list[Unit], max_iter: int,
                    generator: torch.Generator) -> int:
    """Coordinate descent over ``units`` (module docstring), in place; the sweeps run."""
    for sweep in range(1, max_iter + 1):
        improved = [_step(units[i], a, b, units) for i in torch.randperm(len(units), generator=generator).tolist()]
        if not any(improved):
            return sweep
    return max_iter


def _moved(unit: Unit) -> int:
    """Units not at their own place (query heads counted as units too)."""
    perms = [unit.perm] + ([unit.child_perm] if unit.child is not None else [])
    return sum(int((p != torch.arange(len(p))).sum()) for p in perms)


def _barriers(graph: Graph, a, b, aligned, calibration) -> dict:
    """The loss along the path A→B and A→P(B) and their barriers (``ir/loss.py``)."""
    weights = alphas(BARRIER_POINTS)
    return {"alphas": weights, **{key: loss_path(graph, a, end, calibration, weights, WHO)
                                  for key, end in (("naive", b), ("aligned", aligned))}}


def _settings(graph: Graph, cfg: MergeConfig, ctx: PassContext) -> tuple[MergeInputs, dict[str, float], int]:
    """The inputs, ``t`` of every float tensor (mergekit's settings) and ``max_iter``; errors first."""
    if json.loads(cfg.slices):
        raise ConfigError(f"{WHO}: slices are not supported (it aligns two whole models; use models)")
    inputs = read_inputs(graph, cfg, ctx, METHOD)
    units = model_units(graph, cfg, METHOD, inputs)
    shown = recipe_names(graph, [u.target for u in units])
    ts = {u.target: resolve(METHOD, u.shared, u.own, inputs.names, u.merged, shown[u.target], u.t)["t"] for u in units}
    return inputs, ts, setting_value(METHOD, MAX_ITER, [inputs.top], "", 0.0)


def permute(graph: Graph, cfg: MergeConfig, ctx: PassContext) -> PassResult:
    inputs, ts, max_iter = _settings(graph, cfg, ctx)
    floats = list(ts)
    a, b = ({t: g.tensor(src[t]).detach() for t in floats} for g, src in zip(inputs.graphs, inputs.sources))  # template's targets
    units, skipped = _units(analyze(graph).groups)
    sweeps = weight_matching(a, b, units, max_iter, ctx.generator())
    aligned = permuted(b, units)
    for target in floats:
        set_attr(graph.gm, target, torch.lerp(a[target], aligned[target].to(a[target].dtype), ts[target]))
    keep_pruned(graph)
    report = {"method": "permute", "inputs": inputs.digests(),
              "tensors_merged": len(floats), "tensors_kept": len(graph.tensors()) - len(floats), "sweeps": sweeps,
              "groups_permuted": [{"group": u.group.describe(), "units_moved": _moved(u)} for u in units],
              "units_moved": sum(_moved(u) for u in units), "groups_skipped": skipped}
    if ctx.calibration and has_label_free_loss(graph):
        report["barrier"] = _barriers(graph, a, b, aligned, ctx.calibration)
    return PassResult(graph, True, report)


T = Param("t", float, 0.5, check=in_unit_closed, valid="[0, 1]", help="weight of the permuted second model")
MAX_ITER = Param("max_iter", int, 100, check=lambda x: x >= 1, valid="[1, ∞)",
                 help="sweeps of the coordinate descent over the unit groups")
METHOD = register_merge(MergeMethod(
    "permute", "https://arxiv.org/abs/2209.04836",
    lambda g: torch.lerp(g.tensors[0], g.tensors[1], g.params["t"]),  # once aligned (the pass's own run)
    (T, MAX_ITER), min_models=2, max_models=2,
    summary="Git Re-Basin weight matching: permute the second model's units onto the first's, then interpolate"),
    run=permute)
