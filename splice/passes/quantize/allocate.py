"""``quantize.allocate``: mixed precision — measure each layer's sensitivity at each candidate
bit width, choose one width per layer under a budget by integer programming
(``scipy.optimize.milp``), and quantize every layer at its width. HAWQ-V3's ILP formulation
(https://arxiv.org/abs/2011.10680) with a cheaper, calibration-based sensitivity.

Sensitivity of layer ``l`` at ``b`` bits, with ``Δ = W − Q_b(W)`` (``Q_b`` = ``method``: RTN, or
GPTQ on the layer's float-model Hessian) and ``H = 2XᵀX/n`` of its input on the calibration data:

    s(l, b) = Σ_n f_n · (Δ H Δᵀ)_nn

the output error ``‖ΔX‖²`` per output channel ``n``, weighted (``weighting=fisher``, the default)
by ``f_n`` = the mean over calibration tokens of ``(∂loss/∂y_n)²`` at the layer's output, loss =
next-token cross-entropy: a diagonal-Fisher (Gauss-Newton) estimate of the loss increase, so
errors of different layers add up in one unit. Graphs without ``logits``/``input_ids`` (or
``weighting=none``) use ``f_n = 1``. Cost: one calibration forward for the Hessians, one
forward+backward per calibration sample, and one quantization per layer × candidate (for GPTQ
that is ``len(bits)`` non-sequential GPTQ runs).

The plan minimizes ``Σ_l s(l, b_l)`` with one binary per (layer, candidate), one-hot per layer,
and budget rows: ``avg_bits`` — the parameter-weighted mean *code* width over the targeted weights
(scales and zero points not counted, so uniform 3-bit is 3.0) — and/or ``max_bytes`` — the stored
bytes of the targeted weights after quantization (packed codes + scales + zero points). A weight
read by several layers is one decision. Each layer is then quantized with the solution of
``method`` at its chosen width, through the same rewrite as ``quantize.rtn``/``gptq``
(``splice::qlinear`` with per-layer ``bits``), so the plan lives in the graph itself (every
qlinear's ``bits`` argument) and in the pass report (``plan``, per-layer ``sensitivity``),
which the artifact's manifest keeps and ``splice run`` prints.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from splice.errors import ConfigError
from splice.ir.allocation import choose_bits as solve_plan
from splice.ir.graph import Graph
from splice.ir.select import module_path, select_nodes, validate_targets
from splice.kernels.quant.packing import packed_width
from splice.kernels.quant.grid import GroupGrid
from splice.passes.base import PassConfig, PassContext, PassResult, register_pass
from splice.passes.instrument.calibrate import input_hessians
from splice.passes.instrument.gradients import output_fisher
from splice.passes.quantize._common import QUANT_REPORT, check_not_quantized, quantize_layers, resolve_group
from splice.passes.quantize.gptq import GPTQConfig, gptq_layer

PASS = "quantize.allocate"
aten = torch.ops.aten


@dataclass(frozen=True, kw_only=True)
class AllocateConfig(PassConfig):
    """Mixed precision: per-layer bit widths chosen by integer programming under a budget (needs calibration)."""

    bits: str = field(default="2,3,4,8", metadata={"help": "candidate bit widths (2..8), comma-separated"})
    avg_bits: float | None = field(default=3.5, metadata={"help": "budget: mean code bits per targeted weight (none = no limit)"})
    max_bytes: int | None = field(default=None, metadata={"help": "budget: stored bytes of the targeted weights (codes+scales+zeros)"})
    group_size: int = field(default=32, metadata={"help": "weights per scale along the input dim; 0 or -1 = per channel"})
    symmetric: bool = field(default=True, metadata={"help": "zero point fixed at 2**(bits-1) (no stored zeros)"})
    method: Literal["rtn", "gptq"] = field(default="rtn", metadata={"help": "quantizer measured and applied: rtn or gptq"})
    weighting: Literal["fisher", "none"] = field(default="fisher", metadata={"help": "output error weighted by (∂loss/∂y)² or not"})
    targets: str = field(default="linear", metadata={"help": "linear layers: path globs, re:, !exclude, joined by |"})

    def __post_init__(self):
        cands = self.candidates()
        if self.avg_bits is None and self.max_bytes is None:
            raise ValueError("give a budget: avg_bits or max_bytes")
        if self.avg_bits is not None and self.avg_bits < min(cands):
            raise ValueError(f"avg_bits {self.avg_bits:g} cannot be met: the minimum achievable is {min(cands)} "
                             f"(every layer at the smallest candidate)")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"method must be rtn or gptq, got {self.method!r}")
        if self.weighting not in ("fisher", "none"):
            raise ValueError(f"weighting must be fisher or none, got {self.weighting!r}")
        if self.group_size < -1:
            raise ValueError(f"group_size must be positive, or 0/-1 for per-channel, got {self.group_size}")
        validate_targets(self.targets)

    def candidates(self) -> tuple[int, ...]:
        """The candidate widths, ascending; ValueError naming an unknown one."""
        out = set()
        for item in str(self.bits).replace("/", ",").split(","):
            item = item.strip()
            if not item.isdigit() or not 2 <= int(item) <= 8:
                raise ValueError(f"bits: unknown candidate {item!r}; candidates are bit widths 2..8, e.g. bits=2,3,4,8")
            out.add(int(item))
        return tuple(sorted(out))


# --------------------------------------------------------------------------- the plan


def choose_bits(sensitivity: np.ndarray, budgets: list[tuple[str, np.ndarray, float]]) -> np.ndarray:
    """``ir.allocation.choose_bits`` for this pass (its errors name it)."""
    return solve_plan(sensitivity, budgets, PASS)


def _budget_rows(cfg: AllocateConfig, shapes: list[tuple[int, int]], group_sizes: list[int],
                 cands: tuple[int, ...], scale_bytes: list[int]) -> list[tuple[str, np.ndarray, float]]:
    params = np.array([n * k for n, k in shapes], dtype=np.float64)
    rows = []
    if cfg.avg_bits is not None:
        rows.append((f"avg_bits {cfg.avg_bits:g}", np.outer(params, cands) / params.sum(), cfg.avg_bits))
    if cfg.max_bytes is not None:
        cost = np.array([[stored_bytes(n, k, g, b, cfg.symmetric, sb) for b in cands]
                         for (n, k), g, sb in zip(shapes, group_sizes, scale_bytes)], dtype=np.float64)
        rows.append((f"max_bytes {cfg.max_bytes:,}", cost, float(cfg.max_bytes)))
    return rows


def stored_bytes(n: int, k: int, group_size: int, bits: int, symmetric: bool, scale_bytes: int) -> int:
    """Bytes ``quantize_layers`` stores for an ``[n, k]`` weight: packed codes, scales, zeros."""
    groups = k // group_size
    zeros = 0 if symmetric else n * packed_width(groups, bits)
    return n * groups * packed_width(group_size, bits) + n * groups * scale_bytes + zeros


# ------------------------------------------------------------------------ sensitivity


def quantize_at(w: torch.Tensor, h: torch.Tensor | None, grid: GroupGrid, method: str):
    """``(codes, scale, zero)`` of ``w`` on ``grid`` by ``method`` (GPTQ needs ``h``)."""
    if method == "gptq" and h is not None:
        codes, scale, zero, _ = gptq_layer(w, h, grid, GPTQConfig(sequential=False))
        return codes, scale, zero
    scale, zero = grid.params(w)
    return grid.quantize(w, scale, zero), scale, zero


def sensitivity(w: torch.Tensor, h: torch.Tensor | None, fisher: torch.Tensor | None, grid: GroupGrid,
                method: str) -> float:
    """``Σ_n f_n (Δ H Δᵀ)_nn`` for ``Δ = w − Q(w)`` (``H = I``, ``f = 1`` when missing)."""
    delta = w - grid.dequantize(*quantize_at(w, h, grid, method))
    per_row = ((delta @ h) * delta).sum(1) if h is not None else delta.square().sum(1)
    return float(per_row @ fisher) if fisher is not None else float(per_row.sum())


def _is_language_model(graph: Graph) -> bool:
    return "logits" in graph.output_names and "input_ids" in graph.input_names


# ------------------------------------------------------------------------------- pass


@register_pass(PASS, AllocateConfig, reference="https://arxiv.org/abs/2011.10680", needs_calibration=True,
               report_fields={**QUANT_REPORT, "avg_bits": "average bits per weight"})
def allocate(graph: Graph, cfg: AllocateConfig, ctx: PassContext) -> PassResult:
    nodes = select_nodes(graph.gm, cfg.targets, ("linear", "embedding"), PASS)
    for node in nodes:
        check_not_quantized(node, PASS)
    linears = [n for n in nodes if n.target == aten.linear.default]
    layers = {}  # weight target -> first linear reading it
    for node in linears:
        layers.setdefault(node.args[1].target, node)
    for node in nodes:
        if node.target == aten.embedding.default and node.args[0].target not in layers:
            raise ConfigError(f"{PASS}: targets select embedding '{module_path(node)}'; allocate plans linear "
                              "layers only (quantize embeddings with quantize.rtn)")
    cands = cfg.candidates()
    hessians = input_hessians(graph, linears, ctx.calibration, ctx.cache)
    weighted = cfg.weighting == "fisher" and _is_language_model(graph)
    fisher = output_fisher(graph, linears, ctx.calibration, PASS) if weighted else {}

    weights = {t: graph.tensor(t).detach().float() for t in layers}
    groups = {t: resolve_group(cfg, w.shape[1], module_path(layers[t]), PASS) for t, w in weights.items()}
    sens = np.array([[sensitivity(w, hessians.get(t), fisher.get(t), GroupGrid(b, groups[t], cfg.symmetric), cfg.method)
                      for b in cands] for t, w in weights.items()])
    budgets = _budget_rows(cfg, [tuple(w.shape) for w in weights.values()], list(groups.values()), cands,
                           [graph.tensor(t).element_size() for t in layers])
    choice = choose_bits(sens, budgets)
    plan = {t: cands[i] for t, i in zip(layers, choice)}

    def lookup(node, w, grid):
        target = (node.args[0] if node.target == aten.embedding.default else node.args[1]).target
        return quantize_at(w, hessians.get(target), grid, cfg.method)

    report = quantize_layers(graph, cfg, PASS, lookup, bits_of=plan.__getitem__)
    params = {t: w.numel() for t, w in weights.items()}
    report.update({
        "plan": {module_path(layers[t]): b for t, b in plan.items()},
        "avg_bits": round(sum(params[t] * b for t, b in plan.items()) / sum(params.values()), 4),
        "budget": {name: limit for name, _, limit in budgets},
        "sensitivity": {module_path(layers[t]): dict(zip(map(str, cands), map(float, row)))
                        for t, row in zip(layers, sens)},
        "method": cfg.method,
        "weighting": "fisher (∂loss/∂y)²" if weighted else "none (output error ‖ΔX‖²)",
        "calibration_samples": len(ctx.calibration),
    })
    return PassResult(graph, True, report)
