"""``quantize.awq``: activation-aware weight quantization. https://arxiv.org/abs/2306.00978

As AutoAWQ / llm-compressor run it: linears that read the same input tensor (q/k/v, gate/up,
a lone o_proj/down_proj) form a group; on calibration data, for ``α`` in ``0, 1/grid, …``
the input channels are scaled by ``s = mean|x|^α`` (``duo_scaling``, AutoAWQ's default:
``÷ mean|ŵ|^(1-α)``; normalized so ``max·min = 1``), ``W·diag(s)`` is quantized on the group
grid, and the ``α`` with the least output error ``Σ‖(Q(W·s)/s − W) xᵀ‖²`` over all the group's
layers wins. ``s = 1`` (round-to-nearest) is the first candidate, so the search never does
worse than RTN on the calibration data.
Then (``clip``, AutoAWQ's auto_clip) each layer's per-group clipping range is shrunk in 5%
steps down to half where that lowers the group's partial output error (not for layers
feeding attention scores: q/k). Errors are computed exactly over every calibration token
from the input Hessian ``XᵀX`` (observer kinds ``act`` + ``hessian``), block by block on
the outputs of already-quantized blocks (``sequential``, see ``passes/instrument/calibrate.py``). Both searches
run on the calibration samples but every ``1/holdout``-th (``holdout``): a group keeps its
scales, and a layer its clipping, only where they also lower the output error on those
(``held_back`` in the report lists the others).

``1/s`` reaches the input by folding into the op that produces it where exact, else an
explicit Mul (``_smooth.py``). Weights read by other ops too (tied embeddings) are not
scaled or clipped: they are quantized round-to-nearest.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from splice.ir.graph import Graph, attr_users
from splice.ir.select import module_path, op_kind, select_nodes
from splice.kernels.instrument.store import LayerStats, holdout_every
from splice.kernels.quant.grid import GroupGrid
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.instrument.calibrate import solve_groups
from splice.passes.quantize._calibrate import Solution, solution_lookup
from splice.passes.quantize._common import (
    QUANT_REPORT,
    WeightQuantConfig,
    layer_grid,
    output_error,
    pinning,
    quantize_layers,
)
from splice.passes.quantize._smooth import input_groups, migrate_scales, tied_group

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
CLIP_GRID, CLIP_MAX_SHRINK = 20, 0.5  # AutoAWQ's auto_clip: ratios 1.0, 0.95, ..., 0.55
_NO_CLIP_NAMES = ("q_", "k_", "query", "key", "wqkv")  # AutoAWQ's avoid_clipping, for eager attention


@dataclass(frozen=True, kw_only=True)
class AWQConfig(WeightQuantConfig):
    """AWQ: activation-aware per-channel scaling searched on calibration data, then group-wise quantization."""

    symmetric: bool = field(default=False, metadata={"help": "zero point fixed at 2**(bits-1) (AWQ uses asymmetric grids)"})
    grid: int = field(default=20, metadata={"help": "number of α steps searched in [0, 1)"})
    clip: bool = field(default=True, metadata={"help": "search per-group weight clipping (AutoAWQ auto_clip)"})
    duo_scaling: bool = field(default=False, metadata={"help": "s = mean|x|^α / mean|ŵ|^(1-α) (AutoAWQ's default) instead of mean|x|^α"})
    sequential: bool = field(default=True, metadata={"help": "calibrate block by block on quantized outputs"})
    holdout: float = field(default=0.125, metadata={
        "help": "fraction of calibration samples held out: a group keeps its scales, and a layer its clipping, "
                "only where their output error on them is lower (0: no check)"})

    def __post_init__(self):
        super().__post_init__()
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")


# ------------------------------------------------------------------------------ search


def _fake_quant(w: torch.Tensor, grid: GroupGrid) -> torch.Tensor:
    """``w`` quantized and dequantized on its own min/max grid (``GroupGrid``'s arithmetic,
    broadcast per group instead of repeated per column: this runs ~grid times per layer)."""
    n, k = w.shape
    scale, zero = grid.params(w)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1).to(scale.dtype)
    q = w.reshape(n, -1, grid.group_size) / s
    return q.round_().add_(z).clamp_(0, grid.maxq).sub_(z).mul_(s).reshape(n, k)


def search_scale(w: torch.Tensor, x_mean: torch.Tensor, h: torch.Tensor, grid: GroupGrid, steps: int,
                 duo: bool) -> tuple[float | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Best ``(α, s)`` for the (row-concatenated) group weight ``w`` [N, K], and the output
    error per row of round-to-nearest and of the best scaling. ``α`` and ``s`` are None when
    no scaling beats plain round-to-nearest."""
    rtn = output_error(_fake_quant(w, grid).sub_(w), h)
    alpha, best_s, best = None, None, rtn
    if duo:
        n, k = w.shape
        g = w.abs().reshape(-1, grid.group_size)
        w_mean = (g / (g.amax(1, keepdim=True) + 1e-6)).reshape(n, k).mean(0)
    for i in range(0 if duo else 1, steps):  # α = 0 without duo scaling is s = 1: the RTN start
        a = i / steps
        s = x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4) if duo else x_mean.pow(a)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = output_error(_fake_quant(w * s, grid).div_(s).sub_(w), h)
        if err.sum() < best.sum():
            alpha, best_s, best = a, s, err
    return alpha, best_s, rtn, best


def search_clip(w: torch.Tensor, h: torch.Tensor, grid: GroupGrid) -> tuple[torch.Tensor, float]:
    """``w`` clipped per (row, group) to the range with the least partial output error
    ``δ_g H_gg δ_gᵀ`` (AutoAWQ's auto_clip); returns it and the mean kept ratio."""
    n, k = w.shape
    g, groups = grid.group_size, k // grid.group_size
    wg = w.reshape(n, groups, g)
    hb = torch.stack([h[i * g:(i + 1) * g, i * g:(i + 1) * g] for i in range(groups)])  # [G, g, g]
    amax = wg.abs().amax(-1, keepdim=True)
    best_err = torch.full((n, groups), float("inf"))
    best_ratio = torch.ones(n, groups, 1)
    for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        ratio = 1 - i / CLIP_GRID
        clipped = torch.maximum(torch.minimum(wg, amax * ratio), -amax * ratio)
        d = (_fake_quant(clipped.reshape(n, k), grid).reshape(n, groups, g) - wg).transpose(0, 1)  # [G, N, g]
        err = ((d @ hb) * d).sum(-1).T  # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio[better] = ratio
    lim = amax * best_ratio
    return torch.maximum(torch.minimum(wg, lim), -lim).reshape(n, k), float(best_ratio.mean())


def _feeds_attention_scores(node: fx.Node, depth: int = 16) -> bool:
    """Whether ``node``'s output reaches an attention's query or key (not crossing a layer)."""
    leaf = module_path(node).rsplit(".", 1)[-1].lower()
    if any(name in leaf for name in _NO_CLIP_NAMES):
        return True
    frontier, seen = [node], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for user in n.users:
                if user.target == SDPA:
                    if n in user.args[:2]:
                        return True
                elif op_kind(user) is None and user not in seen:
                    seen.add(user)
                    nxt.append(user)
        frontier = nxt
    return False


# -------------------------------------------------------------------------------- pass


@register_pass("quantize.awq", AWQConfig, reference="https://arxiv.org/abs/2306.00978", needs_calibration=True,
               report_fields={**QUANT_REPORT, "mean_err_awq": "mean AWQ output error"}, version=2,
               migrate=pinning(holdout=0.0))
def awq(graph: Graph, cfg: AWQConfig, ctx: PassContext) -> PassResult:
    nodes = [n for n in select_nodes(graph.gm, cfg.targets, ("linear", "embedding"), "quantize.awq")
             if n.target == aten.linear.default]
    users = attr_users(graph.gm)
    groups = input_groups(nodes)
    by_leader = {members[0].name: members for members in groups}
    tied = {m.name for members in groups if tied_group(members, users) for m in members}
    no_clip = {m.name for m in nodes if not cfg.clip or _feeds_attention_scores(m)}
    solutions: dict[str, Solution] = {}
    scales: dict[str, torch.Tensor] = {}
    held_back: dict[str, str] = {}  # layer -> "scale" / "clip": not kept, worse on the held-out samples
    layers: dict[str, dict] = {}

    def solve_group(members, weights, stats: LayerStats):
        k = weights[0].shape[1]
        grid = layer_grid(cfg, members[0], k, "quantize.awq")
        if stats.rows == 0 or members[0].name in tied:  # round to nearest, unscaled
            for node, w in zip(members, weights):
                if node.args[1].target not in solutions:  # else solved with another group
                    scale, zero = grid.params(w)
                    solutions[node.args[1].target] = (grid.quantize(w, scale, zero), scale, zero)
                    layers[module_path(node)] = {"alpha": None, "clip": None,
                                                 "skipped": "tied weight" if stats.rows else "no calibration rows"}
            return [_dequant(solutions[m.args[1].target], grid) for m in members]
        h = stats.hessian()
        h_held = stats.held.hessian() if stats.held is not None and stats.held.rows else None
        w_all = torch.cat(weights)
        alpha, s, rtn, scaled = search_scale(w_all, stats.abs_mean(), h, grid, cfg.grid, cfg.duo_scaling)
        if s is not None and h_held is not None and \
                not _beats(_fake_quant(w_all * s, grid) / s, _fake_quant(w_all, grid), w_all, h_held):
            alpha, s, scaled, held_back[module_path(members[0])] = None, None, rtn, "scale"
        if s is None:
            s = torch.ones(k)
        else:
            scales[members[0].name] = s
        h_scaled = h / torch.outer(s, s)  # the statistics of x/s
        out, row = [], 0
        for node, w in zip(members, weights):
            ws, ratio = w * s, None
            if node.name not in no_clip:
                clipped, ratio = search_clip(ws, h_scaled, grid)
                if h_held is None or _beats(_fake_quant(clipped, grid), _fake_quant(ws, grid), ws,
                                            h_held / torch.outer(s, s)):
                    ws = clipped
                else:
                    ratio, held_back[module_path(node)] = None, "clip"
            scale, zero = grid.params(ws)
            solutions[node.args[1].target] = (grid.quantize(ws, scale, zero), scale, zero)
            out.append(_dequant(solutions[node.args[1].target], grid) / s)
            rows = slice(row, row + w.shape[0])
            row += w.shape[0]
            ref = float(output_error(w, h).sum()) or 1.0
            layers[module_path(node)] = {"alpha": alpha, "clip": None if ratio is None else round(ratio, 4),
                                         "err_rtn": _rel(rtn[rows], ref), "err_scaled": _rel(scaled[rows], ref),
                                         "err_awq": _rel(output_error(out[-1] - w, h), ref)}
        return out

    solve_groups(graph, nodes, ctx.calibration, ("act", "hessian"), solve_group,
                 sequential=cfg.sequential, pass_name="quantize.awq", progress=ctx.progress, cache=ctx.cache,
                 holdout=holdout_every(cfg.holdout))
    leaders = [name for name in by_leader if name in scales]
    sites = migrate_scales(graph, [by_leader[n] for n in leaders], [scales[n] for n in leaders], solutions,
                           tag="awq")

    report = quantize_layers(graph, cfg, "quantize.awq", solution_lookup(solutions))
    solved = [v for v in layers.values() if "err_awq" in v]
    report.update({
        "awq_layers": layers,
        "scales_folded": sum(site not in ("mul", "tied") for site in sites),
        "scales_mul": sum(site == "mul" for site in sites),
        "fold_sites": {module_path(by_leader[n][0]): site for n, site in zip(leaders, sites)},
        "mean_err_rtn": _mean([v["err_rtn"] for v in solved]),
        "mean_err_awq": _mean([v["err_awq"] for v in solved]),
        "calibration_samples": len(ctx.calibration),
        "held_back": held_back,
    })
    return PassResult(graph, True, report)


def _beats(candidate: torch.Tensor, baseline: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> bool:
    """Whether quantized ``candidate`` has a lower output error than ``baseline`` (both of ``w``)
    on inputs of Hessian ``h``."""
    return bool(output_error(candidate - w, h).sum() < output_error(baseline - w, h).sum())


def _dequant(solution: Solution, grid: GroupGrid) -> torch.Tensor:
    codes, scale, zero = solution
    return grid.dequantize(codes, scale, zero)


def _rel(err: torch.Tensor, ref: float) -> float:
    return round(float(err.sum()) / ref, 6)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None
