"""``delta.bitstack``: BitStack (Wang et al., https://arxiv.org/abs/2410.23918) on weight deltas — each
delta decomposed into ``levels`` residual blocks, each a sign matrix times a rank-1 magnitude:
``R_0 = Δ``, ``R_{i+1} = R_i − sign(R_i) ⊙ u_i v_iᵀ`` with ``u_i v_iᵀ`` the best rank-1 approximation
of ``|R_i|`` (power iteration), stored as ``splice::delta_signs`` with ``levels`` levels
(≈ 1 bit per weight per level plus the vectors).

A stack is truncatable: ``budget`` keeps the levels that fit a byte budget over the whole model — a
share of the full stacks' bytes (``budget <= 1``) or a number of bytes (``> 1``) — choosing across
matrices greedily by each level's contribution per byte (``‖u_i‖·‖v_i‖``: the norm of
``sign ⊙ u vᵀ``), always the first levels of a stack. A delta that already is a sign stack (an
artifact's) is not decomposed again: truncating it just drops levels, so one saved stack serves every
budget. A matrix left with no level reads its base weight. Norms and biases (1-D) stay dense.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from splice.errors import ConfigError
from splice.ir.deltas import delta_nodes
from splice.ir.graph import Graph
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.delta._common import (CARRIES_DELTAS, COMPRESS_REPORT, SIGNS, DeltaConfig, Tally, compress, drop, key,
                                         rewrite, stored)
from splice.passes.delta.bitdelta import sign_level

WHO = "delta.bitstack"
POWER_STEPS = 30


@dataclass(frozen=True, kw_only=True)
class BitStackConfig(DeltaConfig):
    """BitStack: each delta as a stack of sign x rank-1 residual levels, truncatable to a byte budget."""

    levels: int = field(default=8, metadata={"help": "residual levels per matrix (an existing stack keeps at most this many)"})
    budget: float = field(default=1.0, metadata={"help": "bytes kept: a share of the full stacks' (<= 1) or bytes (> 1)"})

    def __post_init__(self):
        if self.levels < 1:
            raise ValueError(f"levels must be >= 1, got {self.levels}")
        if self.budget <= 0:
            raise ValueError(f"budget must be > 0 (a share <= 1 or bytes), got {self.budget}")


def rank_one(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``u``, ``v`` with ``u vᵀ`` the best rank-1 approximation of the non-negative ``a`` (power
    iteration from the column means; both vectors non-negative, the scale in ``u``)."""
    v = a.mean(0)
    for _ in range(POWER_STEPS):
        if float(v.norm()) == 0:  # a zero residual: nothing left to approximate
            return torch.zeros(a.shape[0]), torch.zeros(a.shape[1])
        v = a.T @ (a @ v)
        v = v / v.norm()
    return a @ v, v


def decompose(delta: torch.Tensor, levels: int) -> list:
    """``[signs [L, rows, ⌈cols/8⌉], u [L, rows], v [L, cols]]`` of ``delta``'s residual sign stack."""
    residual, signs, us, vs = delta.clone(), [], [], []
    for _ in range(levels):
        s = residual >= 0
        u, v = rank_one(residual.abs())
        residual -= torch.where(s, 1.0, -1.0) * (u[:, None] * v[None, :])
        signs.append(sign_level(s))
        us.append(u)
        vs.append(v)
    return [torch.cat(signs), torch.stack(us), torch.stack(vs)]


def level_bytes(signs: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> int:
    return signs[0].numel() * signs.element_size() + (u.shape[1] + v.shape[1]) * u.element_size()


def allocate(stacks: dict[str, tuple], budget: int) -> dict[str, int]:
    """Levels kept per stack within ``budget`` bytes: greedy by contribution per byte, each stack's
    contributions made non-increasing so that a stack always keeps a prefix."""
    blocks = []
    for name, (signs, u, v) in stacks.items():
        size, running = level_bytes(signs, u, v), float("inf")
        for level in range(signs.shape[0]):
            running = min(running, float(u[level].norm() * v[level].norm()) / size)
            blocks.append((-running, level, name, size))
    kept, used = dict.fromkeys(stacks, 0), 0
    for _, level, name, size in sorted(blocks, key=lambda b: (b[0], b[1])):
        if kept[name] == level and used + size <= budget:
            kept[name], used = level + 1, used + size
    return kept


def _stacks(graph: Graph, cfg: BitStackConfig) -> tuple[Tally, dict[str, fx.Node]]:
    """Every matrix delta as a sign stack of at most ``levels`` levels (existing stacks kept)."""
    def encode(delta, node):
        args = stored(graph, node)
        if node.target == SIGNS:
            return SIGNS, [t[:cfg.levels] for t in args[1:]]
        return SIGNS, decompose(delta, cfg.levels)

    tally = compress(graph, WHO, encode)
    return tally, {key(n): n for n in delta_nodes(graph) if n.target == SIGNS}


@register_pass(WHO, BitStackConfig, reference="https://arxiv.org/abs/2410.23918", requires=("delta",),
               applies=CARRIES_DELTAS, report_fields={**COMPRESS_REPORT, "budget_bytes": "byte budget of the stacks"})
def bitstack(graph: Graph, cfg: BitStackConfig, ctx: PassContext) -> PassResult:
    tally, nodes = _stacks(graph, cfg)
    if not nodes:
        raise ConfigError(f"{WHO}: the graph's deltas have no matrix to stack (only 1-D deltas)")
    stacks = {name: stored(graph, node)[1:] for name, node in nodes.items()}
    full = sum(level_bytes(*s) * s[0].shape[0] for s in stacks.values())
    budget = int(cfg.budget * full) if cfg.budget <= 1 else int(cfg.budget)
    kept = allocate(stacks, budget)
    for name, node in nodes.items():
        if kept[name] == 0:
            drop(graph, node)
        elif kept[name] < stacks[name][0].shape[0]:
            rewrite(graph, node, SIGNS, [t[:kept[name]].clone() for t in stacks[name]])
    levels = list(kept.values())
    return PassResult(graph, True, {**tally.report(graph), "budget_bytes": budget,
                                    "levels_mean": round(sum(levels) / len(levels), 2), "levels_max": max(levels)})
