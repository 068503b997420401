"""``reparam.shiftadd_allocate``: shift-add (ShiftAddLLM, https://arxiv.org/abs/2406.05981) with
bits chosen per layer under a budget — the paper's mixed-bit allocation, solved with the integer
program ``quantize.allocate`` uses (HAWQ-V3, https://arxiv.org/abs/2011.10680; ``ir/allocation.py``).

Sensitivity of layer ``l`` at ``b`` bits, with ``Δ = W − BCQ_b(W)`` (the fit ``reparam.shiftadd``
makes with the same options) and ``H = 2XᵀX/n`` of the layer's input on the calibration data:
``s(l, b) = Σ_n f_n (Δ H Δᵀ)_nn``, ``f_n`` the diagonal Fisher ``(∂loss/∂y_n)²`` of a language model's
next-token loss (``weighting=fisher``) or 1. Budget ``avg_bits``: the parameter-weighted mean number
of bit-planes over the targeted weights (scales not counted: uniform 3-bit is 3.0). The fits
measured are the ones stored (no layer is fitted twice).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from splice.ir.allocation import choose_bits
from splice.ir.graph import Graph
from splice.ir.select import module_path
from splice.kernels.reparam.bcq import dequantize
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.instrument.calibrate import input_hessians
from splice.passes.instrument.gradients import output_fisher
from splice.passes.quantize._common import output_error
from splice.passes.reparam._bcq import (BCQ_REPORT, BCQOptions, check_bits, data_free_fit, layer_group,
                                        linear_layers, rewrite_layers)
from splice.passes.reparam.shiftadd import calibrated_fit

PASS = "reparam.shiftadd_allocate"


@dataclass(frozen=True, kw_only=True)
class ShiftAddAllocateConfig(BCQOptions):
    """Shift-add with bits per layer chosen under an average-bits budget (needs calibration)."""

    avg_bits: float = field(default=3.0, metadata={"help": "budget: mean bit-planes per targeted weight"})
    bits: str = field(default="2,3,4", metadata={"help": "candidate bit widths (1..8), comma-separated"})
    weighting: Literal["fisher", "none"] = field(default="fisher", metadata={"help": "output error weighted by (∂loss/∂y)² or not"})

    def __post_init__(self):
        cands = self.candidates()
        if self.avg_bits < min(cands):
            raise ValueError(f"avg_bits {self.avg_bits:g} is below the minimum achievable {min(cands)} "
                             "(every layer at the smallest candidate)")
        if self.weighting not in ("fisher", "none"):
            raise ValueError(f"weighting must be fisher or none, got {self.weighting!r}")
        super().__post_init__()

    def candidates(self) -> tuple[int, ...]:
        out = set()
        for item in str(self.bits).replace("/", ",").split(","):
            if not item.strip().isdigit():
                raise ValueError(f"bits: unknown candidate {item.strip()!r}; give bit widths 1..8, e.g. bits=2,3,4")
            check_bits(int(item), "bits candidates")
            out.add(int(item))
        return tuple(sorted(out))


@register_pass(PASS, ShiftAddAllocateConfig, reference="https://arxiv.org/abs/2406.05981", needs_calibration=True,
               report_fields={**BCQ_REPORT, "avg_bits": "average bit-planes per weight"})
def shiftadd_allocate(graph: Graph, cfg: ShiftAddAllocateConfig, ctx: PassContext) -> PassResult:
    nodes = linear_layers(graph, cfg.targets, PASS)
    layers = {}  # weight target -> first layer reading it
    for node in nodes:
        layers.setdefault(node.args[1].target, node)
    cands = cfg.candidates()
    hessians = input_hessians(graph, nodes, ctx.calibration, ctx.cache)
    weighted = cfg.weighting == "fisher" and "logits" in graph.output_names and "input_ids" in graph.input_names
    fisher = output_fisher(graph, list(layers.values()), ctx.calibration, PASS) if weighted else {}
    extra: dict = {}
    solve = calibrated_fit(graph, nodes, cfg, ctx, extra) if cfg.calib else data_free_fit(cfg)
    fits, sens = {}, np.zeros((len(layers), len(cands)))
    for li, (target, node) in enumerate(layers.items()):
        w = graph.tensor(target).detach().float()
        g = layer_group(cfg.group_size, w.shape[1], module_path(node), PASS)
        h = hessians.get(target)
        for bi, b in enumerate(cands):
            fits[target, b] = solve(node, w, b, g)
            delta = w - dequantize(*fits[target, b], g)
            per_row = output_error(delta, h) if h is not None else delta.square().sum(1)
            f = fisher.get(target)
            sens[li, bi] = float(per_row @ f) if f is not None else float(per_row.sum())
    params = np.array([graph.tensor(t).numel() for t in layers], dtype=np.float64)
    budget = (f"avg_bits {cfg.avg_bits:g}", np.outer(params, cands) / params.sum(), cfg.avg_bits)
    plan = {t: cands[i] for t, i in zip(layers, choose_bits(sens, [budget], PASS))}
    report = rewrite_layers(graph, nodes, cfg, PASS, lambda node, w, b, g: fits[node.args[1].target, b], plan.__getitem__)
    report.update(extra)
    report.update({
        "plan": {module_path(layers[t]): b for t, b in plan.items()},
        "avg_bits": round(float(sum(p * plan[t] for t, p in zip(layers, params)) / params.sum()), 4),
        "sensitivity": {module_path(n): dict(zip(map(str, cands), map(float, row))) for n, row in zip(layers.values(), sens)},
        "weighting": "fisher (∂loss/∂y)²" if weighted else "none (output error ‖ΔX‖²)",
        "activation_aware": cfg.calib, "calibration_samples": len(ctx.calibration),
    })
    return PassResult(graph, True, report)
