"""``prune.heads``: remove whole attention heads, physically (smaller q/k/v/o projections, head
counts fixed in every reshape). Under grouped-query attention ``mode=kv`` removes whole KV groups
— a KV head with every query head that reads it — and ``mode=query`` removes query heads inside
each KV group, the same number from every group so the GQA ratio stays whole; without GQA both
remove heads. Heads, KV groups and their query heads come from the coupling analysis of the
exported graph (``ir/coupling.py``), never from a model's config or attribute names.
Importance: the group norm of every weight slice a head owns (data-free), as in Torch-Pruning
(https://arxiv.org/abs/2301.12900); head pruning itself: https://arxiv.org/abs/1905.10650.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.errors import ConfigError
from splice.ir.coupling import analyze
from splice.ir.graph import Graph
from splice.passes.base import Applies, PassContext, PassResult, register_pass
from splice.passes.prune._structured import (STRUCTURED_REPORT, StructuredConfig, kept_units, needs_data, scores_of,
                                             shrink_groups, targeted, units_removed)

MODES = ("kv", "query")


@dataclass(frozen=True, kw_only=True)
class HeadsConfig(StructuredConfig):
    """Structured attention-head pruning (whole KV groups or query heads; data-free by default)."""

    mode: str = field(default="kv", metadata={"help": "kv: whole KV groups (heads without GQA); query: query heads "
                                                      "within each KV group, keeping the GQA ratio"})

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")


def query_heads_kept(scores: torch.Tensor, group, parent_units: int, amount: float) -> torch.Tensor:
    """Per KV head, its best ``1 - amount`` query heads (the same count in every KV group)."""
    per = group.per_parent
    drop = units_removed(amount, per)
    if drop >= per:
        raise ConfigError(f"prune.heads: amount={amount} would remove every query head of the KV groups of "
                          f"{group.touches()} ({per} per group)")
    by_parent = scores.reshape(parent_units, per)
    keep = torch.topk(by_parent, per - drop, dim=1).indices + torch.arange(parent_units).unsqueeze(1) * per
    return keep.reshape(-1).sort().values


def _has_attention(graph: Graph) -> bool:
    return any(g.kind in ("heads", "kv_heads") for g in analyze(graph).groups)


@register_pass("prune.heads", HeadsConfig, reference="https://arxiv.org/abs/1905.10650",
               report_fields=STRUCTURED_REPORT, needs_calibration=needs_data,
               applies=Applies("attention heads", check=_has_attention))
def heads(graph: Graph, cfg: HeadsConfig, ctx: PassContext) -> PassResult:
    coupling = analyze(graph)
    if cfg.mode == "query":
        if not any(g.kind == "kv_heads" for g in coupling.groups):
            raise ConfigError("prune.heads: mode=query needs grouped-query attention (this graph has no KV groups); "
                              "use mode=kv")
        groups, pinned = targeted(coupling, ("heads",), cfg, "prune.heads", where=lambda g: g.parent is not None)
        scores = scores_of(graph, groups, cfg, ctx, "prune.heads")
        keep = {g.id: query_heads_kept(scores[g.id], g, coupling.group(g.parent).units, cfg.amount) for g in groups}
    else:
        gqa = any(g.kind == "kv_heads" for g in coupling.groups)
        groups, pinned = targeted(coupling, ("kv_heads",) if gqa else ("heads",), cfg, "prune.heads")
        scores = scores_of(graph, groups, cfg, ctx, "prune.heads")
        keep = {g.id: kept_units(scores[g.id], cfg.amount, g, "prune.heads") for g in groups}
    out, report = shrink_groups(graph, keep, coupling, pinned)
    return PassResult(out, report["groups"] > 0, report)
