"""``reparam.shiftadd``: ShiftAddLLM (https://arxiv.org/abs/2406.05981) — every selected linear
becomes binary-coded quantization ``W ≈ Σ_i α_i B_i`` (``B_i ∈ {−1, +1}``, ``α_i`` per output row
and group of ``group_size`` input columns), run as ``splice::bcq_linear``: shifts (``pow2``) or
multiplies by the scales, and adds of looked-up partial sums of activations (``kernels/reparam``).

The fit (``kernels/reparam/bcq.py``) alternates least squares on α with an exhaustive search of
each weight's code over the ``2^bits`` sign combinations, for ``iters`` rounds. Data-free by
default; ``calib=true`` is the paper's activation-aware mode: each layer's input Hessian from
the calibration data and GPTQ-style error compensation across columns (``_bcq.fit_compensated``).
Stored: the codes 1 bit per sign (uint8), the scales in ``scale_dtype``: reported bytes are
``bits × params / 8 + bits × rows × groups × scale bytes``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from splice.ir.graph import Graph
from splice.ir.select import module_path
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.instrument.calibrate import input_hessians
from splice.passes.reparam._bcq import (BCQ_REPORT, BCQOptions, check_bits, data_free_fit, fit_compensated,
                                        linear_layers, rewrite_layers)

PASS = "reparam.shiftadd"


@dataclass(frozen=True, kw_only=True)
class ShiftAddConfig(BCQOptions):
    """Shift-add reparameterization: binary-coded weights (BCQ), scales per row and column group."""

    bits: int = field(default=3, metadata={"help": "bit-planes (binary codes) per weight, 1..8"})

    def __post_init__(self):
        check_bits(self.bits)
        super().__post_init__()


def calibrated_fit(graph: Graph, nodes, cfg: BCQOptions, ctx: PassContext, report: dict):
    """The fit function of ``calib=true``: ``fit_compensated`` on each layer's input Hessian (the
    data-free fit for layers that saw no calibration rows); extra dampings go to ``report``."""
    hessians = input_hessians(graph, nodes, ctx.calibration, ctx.cache)
    data_free = data_free_fit(cfg)

    def solve(node, w, bits, group_size):
        h = hessians.get(node.args[1].target)
        if h is None:
            return data_free(node, w, bits, group_size)
        codes, scales, retries = fit_compensated(w, h, bits, group_size, cfg.iters, cfg.pow2, cfg.damp)
        if retries:
            report.setdefault("damped_layers", {})[module_path(node)] = retries
        return codes, scales

    return solve


@register_pass(PASS, ShiftAddConfig, reference="https://arxiv.org/abs/2406.05981",
               needs_calibration=lambda cfg: cfg.calib, report_fields=BCQ_REPORT)
def shiftadd(graph: Graph, cfg: ShiftAddConfig, ctx: PassContext) -> PassResult:
    nodes = linear_layers(graph, cfg.targets, PASS)
    extra: dict = {}
    solve = calibrated_fit(graph, nodes, cfg, ctx, extra) if cfg.calib else data_free_fit(cfg)
    report = rewrite_layers(graph, nodes, cfg, PASS, solve, lambda target: cfg.bits)
    report.update(extra, bits=cfg.bits, activation_aware=cfg.calib)
    return PassResult(graph, True, report)
