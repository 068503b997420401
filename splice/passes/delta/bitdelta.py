"""``delta.bitdelta``: BitDelta (Liu et al., https://arxiv.org/abs/2402.10193) — each weight delta as its
sign and one scale per matrix, ``Δ̂ = α·sign(Δ)`` with ``α = mean|Δ|`` (the L2-optimal scale for a sign
matrix), stored as ``splice::delta_signs`` with one level (1 bit per weight plus the scale).

``distill_steps > 0``: BitDelta's scale distillation — the scales are trained (Adam, ``lr``) to match
the fine-tuned model's outputs (the graph before the pass) on the calibration data, mean squared error
of the first output (the logits). Each matrix keeps one scale (its gradient is averaged over the rows).
Norms and biases (1-D) stay dense.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.ir.graph import Graph, set_attr
from splice.kernels.quant.packing import pack_bits
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.delta._common import CARRIES_DELTAS, COMPRESS_REPORT, SIGNS, DeltaConfig, compress

WHO = "delta.bitdelta"


@dataclass(frozen=True, kw_only=True)
class BitDeltaConfig(DeltaConfig):
    """BitDelta: each delta as sign x one scale per matrix (1 bit per weight), scales optionally distilled."""

    distill_steps: int = field(default=0, metadata={"help": "steps of scale distillation on the calibration data (0: none)"})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate of the scale distillation"})

    def __post_init__(self):
        if self.distill_steps < 0:
            raise ValueError(f"distill_steps must be >= 0, got {self.distill_steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def sign_level(signs: torch.Tensor) -> torch.Tensor:
    """A bool sign matrix as one packed level ``[1, rows, ⌈cols/8⌉]``."""
    return pack_bits(signs.to(torch.uint8), 1).unsqueeze(0)


def one_bit(delta: torch.Tensor) -> list:
    """``[signs, u, v]`` of ``mean|Δ|·sign(Δ)``: u the scale on every row, v ones."""
    rows, cols = delta.shape
    return [sign_level(delta >= 0), torch.full((1, rows), float(delta.abs().mean())), torch.ones(1, cols)]


def distill(graph: Graph, teacher: Graph, calibration: list, steps: int, lr: float) -> list[float]:
    """Train every ``delta_signs`` scale ``u`` of ``graph`` (in place) to match ``teacher``'s first
    output; returns the loss per step."""
    scales = {}
    for node in graph.gm.graph.nodes:
        if node.target == SIGNS:
            target = node.args[2].target
            set_attr(graph.gm, target, graph.tensor(target).detach().clone(), trainable=True)
            scales[target] = graph.tensor(target)
    with torch.no_grad():
        wanted = [teacher.gm(*batch)[0] for batch in calibration]
    opt = torch.optim.Adam(scales.values(), lr=lr)
    losses = []
    for step in range(steps):
        i = step % len(calibration)
        loss = torch.nn.functional.mse_loss(graph.gm(*calibration[i])[0].float(), wanted[i].float())
        opt.zero_grad()
        loss.backward()
        for u in scales.values():
            u.grad.copy_(u.grad.mean().expand_as(u.grad))  # one scale per matrix
        opt.step()
        losses.append(float(loss))
    for target, u in scales.items():
        set_attr(graph.gm, target, u.detach())
    return losses


@register_pass(WHO, BitDeltaConfig, reference="https://arxiv.org/abs/2402.10193", requires=("delta",),
               needs_calibration=lambda cfg: cfg.distill_steps > 0, applies=CARRIES_DELTAS, report_fields=COMPRESS_REPORT)
def bitdelta(graph: Graph, cfg: BitDeltaConfig, ctx: PassContext) -> PassResult:
    teacher = graph.copy()
    tally = compress(graph, WHO, lambda delta, node: (SIGNS, one_bit(delta)))
    report = {}
    if cfg.distill_steps:
        graph.finalize()
        losses = distill(graph, teacher, ctx.calibration, cfg.distill_steps, cfg.lr)
        report = {"distill_loss_first": round(losses[0], 8), "distill_loss_last": round(losses[-1], 8)}
    return PassResult(graph, True, {**tally.report(graph), **report})
