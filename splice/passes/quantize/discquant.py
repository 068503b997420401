"""``quantize.discquant``: data-dependent rounding — every weight is rounded down or up on
the round-to-nearest grid, the choice made by optimization (DiscQuant,
https://arxiv.org/abs/2409.19246).

The paper's relaxation: ``w = s·(⌊W/s⌋ + x − z)`` with ``x ∈ [0, 1]`` per weight (starting at
the fractional part, i.e. the float weight itself), minimizing the whole model's KL divergence
to the float model on calibration data plus a linear term ``⟨c, x⟩``. The linear term drives
the solution to a vertex of the feasible set where (discrepancy theory) almost every
coordinate is 0 or 1 while the loss stays flat along the data's gradient directions. The
paper's argument holds for any ``c``; splice takes ``c = 1 − 2·frac(W/s)``, so a weight the data
does not constrain rounds to nearest (a random ``c`` rounds such weights at random, which
measured worse than round-to-nearest on the zoo models).

The linear term's weight is relative: at each step it is ``λ`` times the root-mean-square of
the layer's KL gradient, so ``λ`` means the same on any model (a fixed weight on a mean over
weights shrinks with the model's size; on SmolLM2-135M it vanished below the KL gradient's
noise and the noise rounded the weights, perplexity 7,628 against round-to-nearest's 177).
Projected gradient descent (Adam, then clamp to ``[0, 1]``); coordinates still fractional at
the end are rounded. Scales and zero points stay round-to-nearest's. The last ``holdout`` of
the calibration samples is not trained on: the result is kept only if its KL there is lower
than round-to-nearest's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.ir.graph import Graph
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.quantize._calibrate import solution_lookup
from splice.passes.quantize._common import QUANT_REPORT, WeightQuantConfig, pinning, quantize_layers
from splice.passes.quantize._finetune import Distiller, split_holdout, trainable_layers

PASS = "quantize.discquant"


@dataclass(frozen=True, kw_only=True)
class DiscQuantConfig(WeightQuantConfig):
    """DiscQuant: choose each weight's rounding direction by projected gradient descent on the model's KL."""

    steps: int = field(default=100, metadata={"help": "projected gradient steps (one calibration sample each)"})
    holdout: float = field(default=0.25, metadata={
        "help": "fraction of calibration samples kept out of training: the result stays round-to-nearest if its "
                "KL on them is not lower (0: no check)"})
    lr: float = field(default=0.05, metadata={"help": "Adam learning rate of the rounding variables"})
    reg: float = field(default=5.0, metadata={"help": "λ, weight of the linear objective that drives x to 0/1, "
                                                       "relative to the RMS of each layer's KL gradient"})

    def __post_init__(self):
        super().__post_init__()
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not self.lr > 0 or self.reg < 0:
            raise ValueError(f"lr must be > 0 and reg >= 0, got lr={self.lr}, reg={self.reg}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")


class _Rounding:
    """One weight's floor codes on its grid and its relaxed rounding variables ``x``."""

    def __init__(self, w, grid):
        self.grid = grid
        self.scale, self.zero = grid.params(w)
        ratio = w / self.scale.repeat_interleave(grid.group_size, 1)
        self.floor = torch.floor(ratio)
        self.x = (ratio - self.floor).clone().requires_grad_(True)
        self.c = 1 - 2 * self.x.detach()  # towards the nearer grid point
        self.nearest = torch.round(self.x.detach())

    def _codes(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.floor + x + self.zero.repeat_interleave(self.grid.group_size, 1), 0, self.grid.maxq)

    def weight(self) -> torch.Tensor:
        return self.grid.dequantize(self._codes(self.x), self.scale, self.zero)

    def solution(self, nearest: bool = False):
        """Codes (of the rounded ``x``, or round-to-nearest's), scales and zero points."""
        with torch.no_grad():
            x = self.nearest if nearest else torch.round(self.x)
            return self._codes(x).to(torch.int32), self.scale, self.zero

    def integral_fraction(self) -> float:
        x = self.x.detach()
        return float(((x == 0) | (x == 1)).float().mean())


@register_pass(PASS, DiscQuantConfig, reference="https://arxiv.org/abs/2409.19246", needs_calibration=True,
               report_fields=QUANT_REPORT, version=2, migrate=pinning(holdout=0.0))
def discquant(graph: Graph, cfg: DiscQuantConfig, ctx: PassContext) -> PassResult:
    _, weights = trainable_layers(graph, cfg, PASS)
    layers = {t: _Rounding(w, grid) for t, (w, grid) in weights.items()}
    train, held = split_holdout(ctx.calibration, cfg.holdout)
    distiller = Distiller(graph, train)

    def substituted():
        return {t: r.weight() for t, r in layers.items()}

    before = distiller.mean_loss(substituted)
    opt = torch.optim.Adam([r.x for r in layers.values()], lr=cfg.lr)
    for step in range(cfg.steps):
        opt.zero_grad()
        distiller.loss(step % len(train), substituted()).backward()
        with torch.no_grad():
            for r in layers.values():
                r.x.grad.add_(r.c * (cfg.reg * r.x.grad.pow(2).mean().sqrt()))
        opt.step()
        with torch.no_grad():
            for r in layers.values():
                r.x.clamp_(0, 1)
    integral = [r.integral_fraction() for r in layers.values()]
    after = distiller.mean_loss(substituted)
    solutions = {t: r.solution() for t, r in layers.items()}
    held_kl = None
    if held:  # the rounding found vs round-to-nearest, on samples it was not trained on
        judge = Distiller(graph, held)
        held_kl = [judge.mean_loss(lambda n=nearest: {t: r.grid.dequantize(*r.solution(n)) for t, r in layers.items()})
                   for nearest in (False, True)]
        if held_kl[0] >= held_kl[1]:
            solutions = {t: r.solution(nearest=True) for t, r in layers.items()}
    report = quantize_layers(graph, cfg, PASS, solution_lookup(solutions))
    report["held_out_kl_discquant_rtn"] = held_kl and [round(v, 6) for v in held_kl]
    report["kl_relaxed_before_after"] = [round(before, 6), round(after, 6)]
    report["integral_fraction_before_final_rounding"] = round(sum(integral) / max(len(integral), 1), 4)
    report["calibration_samples"] = len(ctx.calibration)
    return PassResult(graph, True, report)
