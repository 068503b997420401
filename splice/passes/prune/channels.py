"""``prune.channels``: remove whole channels — MLP intermediate channels of transformers, conv
channels of CNNs (through batch norm, depthwise and grouped convs, squeeze-excitation and residual
adds) — so the weights physically shrink and the model exports smaller. The coupling analysis
(``ir/coupling.py``) finds which axes shrink together; each targeted group loses the ``amount`` of
its channels with the lowest group norm (Torch-Pruning's default importance,
https://arxiv.org/abs/2301.12900), data-free, or with ``score=wanda`` the lowest structured Wanda
score from calibration (Wanda-sp, https://arxiv.org/abs/2312.11983): on LLMs the data-free norm
ranks channels badly (docs/bench_prune.md), as LLM-Pruner found for its L2 baseline.

Kinds pruned: ``mlp`` and ``conv``/``channels`` groups; the residual stream too in a graph without
attention (a CNN's stages), where it is the channel axis a residual add shares. A transformer's
hidden size (``kinds=residual``) is left alone by default: its norms then normalize over fewer
channels.

``mode=gates`` removes nothing yet: it puts trainable relaxed gates on the targeted groups' channels
(``_gates.py``) for ``splice train`` to learn under a budget of ``amount``; ``prune.gates`` then
removes the channels whose gates closed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from splice.ir.coupling import analyze
from splice.ir.graph import Graph
from splice.passes.base import Applies, PassContext, PassResult, register_pass
from splice.passes.prune._gates import insert_gates
from splice.passes.prune._structured import (STRUCTURED_REPORT, StructuredConfig, kept_units, needs_data, scores_of,
                                             shrink_groups, targeted)

KINDS = ("mlp", "conv", "channels", "residual")
MODES = ("prune", "gates")


@dataclass(frozen=True, kw_only=True)
class ChannelsConfig(StructuredConfig):
    """Structured channel pruning (physically smaller layers; data-free by default)."""

    kinds: str = field(default="auto", metadata={
        "help": "group kinds pruned, comma list of mlp, conv, channels, residual; auto: mlp, conv, channels, "
                "and residual where the graph has no attention"})
    mode: str = field(default="prune", metadata={
        "help": "prune: remove the lowest-scoring channels now; gates: insert trainable gates (train, then prune.gates)"})
    penalty: float = field(default=10.0, metadata={"help": "gates: weight of the budget term in the training loss"})

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.penalty < 0:
            raise ValueError(f"penalty must be >= 0, got {self.penalty}")
        bad = [k for k in self.kinds.split(",") if k not in KINDS] if self.kinds != "auto" else []
        if bad:
            raise ValueError(f"kinds must be auto or a comma list of {', '.join(KINDS)}, got {bad[0]!r}")


def chosen_kinds(cfg: ChannelsConfig, coupling) -> tuple[str, ...]:
    if cfg.kinds != "auto":
        return tuple(cfg.kinds.split(","))
    attention = any(g.kind in ("heads", "kv_heads") for g in coupling.groups)
    return ("mlp", "conv", "channels") if attention else KINDS


def _needs_data(cfg: ChannelsConfig) -> bool:
    return cfg.mode == "prune" and needs_data(cfg)


@register_pass("prune.channels", ChannelsConfig, reference="https://arxiv.org/abs/2301.12900",
               report_fields={**STRUCTURED_REPORT, "gated": "channels gated"}, needs_calibration=_needs_data,
               applies=Applies("a linear or conv layer", kinds=("linear", "conv")))
def channels(graph: Graph, cfg: ChannelsConfig, ctx: PassContext) -> PassResult:
    coupling = analyze(graph)
    groups, pinned = targeted(coupling, chosen_kinds(cfg, coupling), cfg, "prune.channels")
    if cfg.mode == "gates":
        gated = insert_gates(graph, groups, 1 - cfg.amount, cfg.penalty, "prune.channels")
        return PassResult(graph, True, {"gated": gated, "groups": len(groups), "pinned_skipped": pinned})
    scores = scores_of(graph, groups, cfg, ctx, "prune.channels")
    keep = {g.id: kept_units(scores[g.id], cfg.amount, g, "prune.channels") for g in groups}
    out, report = shrink_groups(graph, keep, coupling, pinned)
    return PassResult(out, report["groups"] > 0, report)
