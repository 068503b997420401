"""``quantize.smoothquant``: migrate activation outliers into the weights so both quantize
well to int8. https://arxiv.org/abs/2211.10438

For each set of linears reading one tensor ``x`` (q/k/v, gate/up, …) the per-input-channel
scale is the reference implementation's (mit-han-lab/smoothquant ``smooth_ln_fcs``)::

    s_j = max|X_j|^α / max|W_j|^(1-α)      (clamped to >= 1e-5; max|W_j| over the set's rows, >= 1e-5)

with ``max|X_j|`` the channel's absolute maximum over the calibration tokens (observer kind
``act``). Then ``W -> W·diag(s)`` and ``x -> x/s``: the graph computes the same function in
exact arithmetic (fp32: to rounding). ``1/s`` is folded into the op producing ``x`` where that
is exact — RMSNorm/LayerNorm weights (the reference's ``input_layernorm -> q/k/v``,
``post_attention_layernorm -> gate/up``), or a preceding linear's rows — else, with ``mul``
(default), an explicit ``mul(x, 1/s)`` is inserted (``_smooth.py``); ``mul=false`` leaves such
sets unsmoothed, as the reference does. A set whose weights other ops read too (a tied LM head)
is left alone. Quantize afterwards, typically ``-p quantize.smoothquant:alpha=0.5 -p quantize.w8a8``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.ir.graph import Graph, attr_users
from splice.ir.select import module_path, select_nodes, validate_targets
from splice.kernels.instrument.store import LayerStats
from splice.passes.base import PassConfig, PassContext, PassResult, register_pass
from splice.passes.instrument.calibrate import solve_groups
from splice.passes.quantize._common import check_not_quantized
from splice.passes.quantize._smooth import input_groups, migrate_scales, plan_fold

NAME = "quantize.smoothquant"
MIN_SCALE = 1e-5  # the reference's clamp


@dataclass(frozen=True, kw_only=True)
class SmoothQuantConfig(PassConfig):
    """SmoothQuant: per-channel scales s = max|X|^α / max|W|^(1-α) moved from activations into weights."""

    alpha: float = field(default=0.5, metadata={"help": "migration strength in [0, 1]: 1 moves all of the activation range into the weights"})
    mul: bool = field(default=True, metadata={"help": "insert an explicit Mul where 1/s cannot be folded (false: leave those layers unsmoothed)"})
    targets: str = field(default="linear", metadata={"help": "layers: path globs, re:, !exclude, joined by |"})

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        validate_targets(self.targets)


def smoothing_scale(x_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s [K]`` for activation channel maxima ``x_max [K]`` and the set's weights ``[N_i, K]``."""
    w_max = torch.cat([w.detach().float() for w in weights]).abs().amax(0).clamp(min=MIN_SCALE)
    return (x_max.float().pow(alpha) / w_max.pow(1 - alpha)).clamp(min=MIN_SCALE)


def _outlier_ratio(x_max: torch.Tensor) -> float:
    """Largest channel maximum over the mean channel maximum (how "outlier-heavy" ``x`` is)."""
    return round(float(x_max.max() / x_max.mean().clamp(min=1e-12)), 3)


@register_pass(NAME, SmoothQuantConfig, reference="https://arxiv.org/abs/2211.10438", needs_calibration=True,
               report_fields={"scales_folded": "scales folded", "scales_mul": "explicit Mul scales"})
def smoothquant(graph: Graph, cfg: SmoothQuantConfig, ctx: PassContext) -> PassResult:
    nodes = select_nodes(graph.gm, cfg.targets, ("linear",), NAME)
    for node in nodes:
        check_not_quantized(node, NAME)
    groups = input_groups(nodes)
    x_max: dict[str, torch.Tensor] = {}

    def record(members, weights, stats: LayerStats):
        if stats.rows:
            x_max[members[0].name] = stats.abs_max
        return weights  # statistics only: nothing is quantized here

    solve_groups(graph, nodes, ctx.calibration, ("act",), record, sequential=False, pass_name=NAME, cache=ctx.cache)
    users = attr_users(graph.gm)
    chosen = [m for m in groups if m[0].name in x_max and (cfg.mul or plan_fold(m, users) is not None)]
    scales = [smoothing_scale(x_max[m[0].name], [graph.tensor(n.args[1].target) for n in m], cfg.alpha)
              for m in chosen]
    sites = migrate_scales(graph, chosen, scales, tag="smoothquant")
    smoothed = {module_path(m[0]): {"site": site, "outlier_ratio_before": _outlier_ratio(x_max[m[0].name]),
                                    "outlier_ratio_after": _outlier_ratio(x_max[m[0].name] / s)}
                for m, s, site in zip(chosen, scales, sites) if site != "tied"}
    report = {"groups": len(groups), "smoothed": smoothed,
              "scales_folded": sum(site not in ("mul", "tied") for site in sites),
              "scales_mul": sum(site == "mul" for site in sites),
              "left_alone": [module_path(m[0]) for m in groups if module_path(m[0]) not in smoothed],
              "calibration_samples": len(ctx.calibration)}
    return PassResult(graph, bool(smoothed), report)
