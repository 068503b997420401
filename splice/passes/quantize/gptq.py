"""``quantize.gptq``: GPTQ — quantize a layer's columns one at a time and spread each
column's rounding error over the columns not yet quantized, weighted by the inverse Hessian
of the layer's inputs (Cholesky form). https://arxiv.org/abs/2210.17323

Options as in AutoGPTQ/llm-compressor: ``damp`` (fraction of the mean Hessian diagonal added
to it), ``block_size`` (lazy-batch width), ``act_order`` (columns by decreasing Hessian
diagonal; grids are computed up front per group — "static groups" — so the stored layout needs
no reordering index), ``sequential`` (block-by-block calibration, see ``passes/instrument/calibrate.py``).
A Hessian that is not positive definite is damped further (×10 up to 6 times); the report says
which layers needed it. Layers that saw no calibration rows fall back to round-to-nearest.

Off the calibration text (docs/calibration.md): ``damp_auto`` damps each layer by the Ledoit–Wolf
shrinkage of its Hessian (https://doi.org/10.1016/S0047-259X(03)00096-4) when that is more than
``damp`` — the fewer and noisier the rows per input feature, the closer to the diagonal — and
reports every layer's damping; ``clip=mse`` searches each group's range (llm-compressor's MSE
observer); ``hessian_mix`` blends the float model's input Hessian into the quantized model's
(sequential mode, as GPTAQ gathers both).

``gptaq`` (GPTAQ, formerly GPTQv2, https://arxiv.org/abs/2504.02692, as its reference code and
GPTQModel's ``v2=True``): asymmetric calibration. Each layer is fitted to the *float* model's
output ``W X`` from its quantized-model input ``X̃`` (``min ‖W X − Q X̃‖``): besides ``H = X̃ᵀX̃``
the float graph runs beside the quantized one (sequential mode) to gather ``ΔXᵀX̃``
(``ΔX = X − X̃``), and each column update gets the extra term ``w · P[i, i:]`` with
``P = α · triu₁(ΔXᵀX̃ · Uᵀ) · U``, ``U`` the upper Cholesky factor of ``H⁻¹`` (``α`` = ``gptaq_alpha``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.ir.graph import Graph
from splice.ir.select import module_path, select_nodes
from splice.ir.sparsity import mask_of
from splice.kernels.instrument.store import LayerStats, holdout_every
from splice.kernels.quant.grid import GroupGrid
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.instrument.hessian import inverse_hessian_cholesky, without_dead_inputs
from splice.passes.quantize._calibrate import solution_lookup, solve_layers
from splice.passes.quantize._common import (QUANT_REPORT, WeightQuantConfig, output_error, pinning,
                                            quantize_layers)

CLIPS = ("minmax", "mse")


@dataclass(frozen=True, kw_only=True)
class GPTQConfig(WeightQuantConfig):
    """GPTQ: Hessian-aware error-compensating weight quantization (needs calibration)."""

    damp: float = field(default=0.01, metadata={
        "help": "dampening, fraction of mean diag(H) (the least, with damp_auto)"})
    damp_auto: bool = field(default=True, metadata={
        "help": "per layer, damp by the Ledoit-Wolf shrinkage of its Hessian when that is larger"})
    clip: str = field(default="mse", metadata={"help": "group ranges: minmax, or mse (clipped by up to 20% where "
                                                         "that lowers the group's error)"})
    block_size: int = field(default=128, metadata={"help": "columns per lazy update block"})
    act_order: bool = field(default=True, metadata={
        "help": "quantize columns by decreasing diag(H), groups' grids fixed up front (static groups)"})
    sequential: bool = field(default=True, metadata={"help": "calibrate block by block on quantized outputs"})
    gptaq: bool = field(default=False, metadata={"help": "GPTAQ: fit quantized-model inputs to the float model's outputs"})
    gptaq_alpha: float = field(default=0.25, metadata={"help": "weight of GPTAQ's asymmetry term"})
    holdout: float = field(default=0.125, metadata={
        "help": "fraction of calibration samples held out: a layer keeps round-to-nearest where GPTQ's output "
                "error on them is larger (0: no check)"})
    hessian_mix: float = field(default=0.0, metadata={
        "help": "weight of the float model's inputs in each layer's Hessian (0: the quantized model's only)"})

    def __post_init__(self):
        super().__post_init__()
        if self.gptaq and not self.sequential:
            raise ValueError("gptaq needs sequential=true (the quantized and float inputs only differ then)")
        if not 0 <= self.gptaq_alpha <= 1:
            raise ValueError(f"gptaq_alpha must be in [0, 1], got {self.gptaq_alpha}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if not 0 <= self.hessian_mix <= 1:
            raise ValueError(f"hessian_mix must be in [0, 1], got {self.hessian_mix}")
        if self.hessian_mix and not self.sequential:
            raise ValueError("hessian_mix needs sequential=true (the quantized and float inputs only differ then)")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.clip not in CLIPS:
            raise ValueError(f"clip must be one of {', '.join(CLIPS)}, got {self.clip!r}")


def grid_params(grid: GroupGrid, w: torch.Tensor, clip: str) -> tuple[torch.Tensor, torch.Tensor]:
    return grid.mse_params(w) if clip == "mse" else grid.params(w)


def gptq_layer(w: torch.Tensor, h: torch.Tensor, grid: GroupGrid, cfg: GPTQConfig, dxtx: torch.Tensor | None = None,
               damp: float | None = None, static: tuple[torch.Tensor, torch.Tensor] | None = None,
               keep: torch.Tensor | None = None):
    """GPTQ on one weight ``[N, K]`` with Hessian ``[K, K]`` (and GPTAQ's ``ΔXᵀX̃`` on the same
    scale, if given), damped by ``damp`` (default ``cfg.damp``); ``static`` is the layer's grid
    ``(scale, zero)`` if already computed. A pruning mask ``keep`` puts pruned weights on the grid's
    zero and spreads what that costs over the columns left, as SparseGPT's joint quantization does.
    Returns codes, scale, zero, retries.

    The Hessian is factored in float64, the column loop runs in float32 (as the reference code)."""
    scale, zero = static if static is not None else grid_params(grid, w.float(), cfg.clip)
    scale = scale.clone()  # static per-group grids (the layout needs contiguous groups) ...
    zero = zero.clone()  # ... or, without act-order, filled in group by group below
    dead = torch.diag(h) == 0
    w, h = without_dead_inputs(w, h)
    n, k = w.shape
    perm = torch.argsort(torch.diag(h), descending=True) if cfg.act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    keep = None if keep is None else keep[:, perm]
    hinv, retries = inverse_hessian_cholesky(h, cfg.damp if damp is None else damp)
    p = None
    if dxtx is not None:
        dxtx = dxtx.double().clone()
        dxtx[:, dead] = 0
        dxtx = dxtx[perm][:, perm]
        p = (cfg.gptaq_alpha * (dxtx @ hinv.T).triu_(diagonal=1) @ hinv).float()
    hinv = hinv.float()
    codes = torch.zeros(n, k, dtype=torch.int32)
    dynamic_groups = not cfg.act_order
    for i1 in range(0, k, cfg.block_size):
        i2 = min(i1 + cfg.block_size, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // grid.group_size
            if dynamic_groups and col % grid.group_size == 0:  # grid from the error-updated weights
                cols = w1[:, i:i + grid.group_size]
                if cols.shape[1] < grid.group_size:  # the group runs past this lazy block
                    cols = torch.cat([cols, w[:, i2:i2 + grid.group_size - cols.shape[1]]], 1)
                s, z = grid_params(GroupGrid(grid.bits, cols.shape[1], grid.symmetric), cols, cfg.clip)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            q = torch.clamp(torch.round(w1[:, i] / scale[:, g]) + zero[:, g], 0, grid.maxq)
            if keep is not None:
                q = torch.where(keep[:, i1 + i], q, zero[:, g].to(q.dtype))
            codes[:, col] = q.to(torch.int32)
            err = (w1[:, i] - (q - zero[:, g]) * scale[:, g]) / hinv1[i, i]
            if p is None:
                w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1)
            else:
                w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0) - w1[:, i:i + 1] * p[i1 + i, i1 + i:i2].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:] - (0 if p is None else w1 @ p[i1:i2, i2:])
    return codes, scale, zero, retries


def held_error(w: torch.Tensor, solution, grid: GroupGrid, h: torch.Tensor) -> torch.Tensor:
    """Output error ``Σ δ H δᵀ`` of a solution ``(codes, scale, zero)`` of ``w`` on inputs of Hessian ``h``."""
    return output_error(grid.dequantize(*solution).double() - w.double(), h.double()).sum()


def layer_damp(stats: LayerStats, cfg: GPTQConfig) -> float:
    """The damping of one layer: ``cfg.damp``, or with ``damp_auto`` the Ledoit–Wolf shrinkage
    ``ρ`` of its Hessian as a damping (``(1−ρ)S + ρμI ∝ S + ρ/(1−ρ) μI``) when larger, at most 1."""
    if not cfg.damp_auto:
        return cfg.damp
    rho = min(stats.shrinkage(), 0.5)
    return max(cfg.damp, rho / (1 - rho))


@register_pass("quantize.gptq", GPTQConfig, reference="https://arxiv.org/abs/2210.17323", needs_calibration=True,
               report_fields={**QUANT_REPORT, "damp_mean": "mean damping"}, version=2,
               migrate=pinning(damp_auto=False, clip="minmax", holdout=0.0, hessian_mix=0.0))
def gptq(graph: Graph, cfg: GPTQConfig, ctx: PassContext) -> PassResult:
    nodes = [n for n in select_nodes(graph.gm, cfg.targets, ("linear", "embedding"), "quantize.gptq")
             if n.target == torch.ops.aten.linear.default]
    damped: dict[str, int] = {}
    damps: dict[str, float] = {}
    kept_rtn: dict[str, float] = {}

    def solve(node, w, stats: LayerStats, grid):
        static = grid_params(grid, w, cfg.clip)  # GPTQ's static grid, and round-to-nearest's

        def nearest():
            return grid.quantize(w, *static), *static

        if stats.rows == 0:
            return nearest()
        asym = stats.asymmetry() if cfg.gptaq else None
        damp = layer_damp(stats, cfg)
        h = stats.hessian()
        if cfg.hessian_mix:
            h = (1 - cfg.hessian_mix) * h + cfg.hessian_mix * stats.float_hessian()
        codes, scale, zero, retries = gptq_layer(w, h, grid, cfg, asym, damp, static, mask_of(graph, node))
        damps[module_path(node)] = round(damp * 10 ** retries, 5)
        if retries:
            damped[module_path(node)] = retries
        if stats.held is not None and stats.held.rows:  # GPTQ vs round-to-nearest on unseen samples
            rtn, h_held = nearest(), stats.held.hessian()
            ratio = float(held_error(w, (codes, scale, zero), grid, h_held) / held_error(w, rtn, grid, h_held))
            if ratio > 1:
                kept_rtn[module_path(node)] = round(ratio, 4)
                return rtn
        return codes, scale, zero

    kinds = ("hessian", "asym") if cfg.gptaq or cfg.hessian_mix else ("hessian",)
    solutions = solve_layers(graph, nodes, cfg, ctx.calibration, kinds, solve,
                             sequential=cfg.sequential, pass_name="quantize.gptq", progress=ctx.progress,
                             cache=ctx.cache, holdout=holdout_every(cfg.holdout))

    report = quantize_layers(graph, cfg, "quantize.gptq", solution_lookup(solutions))
    report["damped_layers"] = damped
    report["damp"] = damps
    report["damp_mean"] = round(sum(damps.values()) / len(damps), 5) if damps else None
    report["kept_rtn"] = kept_rtn  # layer -> GPTQ's held-out error / round-to-nearest's
    report["calibration_samples"] = len(ctx.calibration)
    return PassResult(graph, True, report)
