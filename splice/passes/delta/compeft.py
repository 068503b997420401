"""``delta.compeft``: ComPEFT (Yadav et al., https://arxiv.org/abs/2311.13171) — keep the ``density``
largest-magnitude entries of each weight delta and ternarize them: ``Δ̂ = α·σ(Δ)·sign(Δ)`` on the kept
entries, zero elsewhere, one scale per tensor (``σ``: the delta's standard deviation; ``alpha=0``: the
scale that minimizes ‖Δ − Δ̂‖, the kept entries' mean magnitude, instead of the paper's searched α). Stored as
``splice::delta_ternary``: a 1-bit mask per weight and one sign bit per kept weight (≈ 1 + density bits
per weight). Norms and biases (1-D) stay dense.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.ir.graph import Graph
from splice.kernels.delta.ops import pack_flat
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.delta._common import CARRIES_DELTAS, COMPRESS_REPORT, TERNARY, DeltaConfig, check_density, compress

WHO = "delta.compeft"


@dataclass(frozen=True, kw_only=True)
class CompeftConfig(DeltaConfig):
    """ComPEFT: top-density magnitudes of each delta, ternarized to sign x alpha*std(delta)."""

    density: float = field(default=0.1, metadata={"help": "share of each delta's entries kept, in (0, 1]"})
    alpha: float = field(default=1.0, metadata={
        "help": "the kept entries' magnitude, in standard deviations of the delta (0: least-squares scale)"})

    def __post_init__(self):
        check_density(self.density)
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")


def ternarize(delta: torch.Tensor, density: float, alpha: float) -> list:
    """``[mask bits, sign bits of the kept entries, scale]`` of ``delta``'s ComPEFT approximation."""
    flat = delta.reshape(-1)
    k = max(1, round(density * flat.numel()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    scale = float(flat[keep].abs().mean()) if alpha == 0 else alpha * float(flat.std())
    return [pack_flat(keep), pack_flat(flat[keep] > 0), torch.tensor(scale)]


@register_pass(WHO, CompeftConfig, reference="https://arxiv.org/abs/2311.13171", requires=("delta",),
               applies=CARRIES_DELTAS, report_fields=COMPRESS_REPORT)
def compeft(graph: Graph, cfg: CompeftConfig, ctx: PassContext) -> PassResult:
    tally = compress(graph, WHO, lambda delta, node: (TERNARY, ternarize(delta, cfg.density, cfg.alpha)))
    return PassResult(graph, True, tally.report(graph))
