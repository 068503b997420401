"""``quantize.nonuniform``: non-uniform weight grids stored as indices into a look-up table
(``splice::lut_linear``, ``kernels/quant/lut.py``). Two grid kinds (``grid=``):

* ``power`` — NUPES' power-exponent grid (https://arxiv.org/abs/2308.05600): levels
  ``sign(t)·|t|^p`` over ``2**bits`` uniform ``t`` in ``[-1, 1]``, times a scale per group of
  ``group_size`` weights (the group's ``max|w|``, so its extreme lands on ``±1``). NUPES learns
  ``p``; here ``p`` is searched per output channel over ``0.5, 0.6, …, 2.0`` (``p = 1`` is a
  uniform grid) for the least (weighted) weight error. Stored: one ``2**bits`` table per row
  (``G_lut = 1``) and the group scales — the same bytes as a symmetric uniform grid plus
  ``2**bits`` floats per row.
* ``kmeans`` — SqueezeLLM's codebooks (https://arxiv.org/abs/2306.07629): 1-D k-means with
  ``2**bits`` centroids per output channel (``group_size=0``, SqueezeLLM's choice) or per group,
  Lloyd iterations from quantile starts; no scales.

Sensitivity weighting: when calibration data is given (Python API ``calibration=``), the error
of input column ``k`` is weighted by ``diag(XᵀX)_k`` of the layer's input — the output error
``‖(W−Q)X‖²`` without cross terms — for both the ``p`` search and k-means (SqueezeLLM weights
by a Fisher diagonal instead). Without it the plain weight error is minimized. The pass does
not *require* calibration, so the CLI (which passes ``--calib`` only to passes that need it)
runs it unweighted. Linear layers only; a weight read by several layers is fitted once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import fx

from splice.ir.graph import Graph
from splice.ir.metrics import sqnr_db
from splice.ir.select import module_path, select_nodes, validate_targets
from splice.kernels.quant.lut import apply_scales, lut_lookup, pack_indices
from splice.passes.base import PassConfig, PassContext, PassResult, register_pass
from splice.passes.instrument.calibrate import input_hessians
from splice.passes.quantize._common import QUANT_REPORT, check_not_quantized, resolve_group

PASS = "quantize.nonuniform"
POWERS = torch.arange(5, 21) / 10  # p searched: 0.5, 0.6, ..., 2.0
ROW_CHUNK = 4096  # rows fitted at a time (bounds memory on large LM heads)


@dataclass(frozen=True, kw_only=True)
class NonUniformConfig(PassConfig):
    """Non-uniform weight grids (NUPES power grids or SqueezeLLM k-means codebooks) with a LUT-dequant op."""

    bits: int = field(default=4, metadata={"help": "bits per index: 2, 3, 4 or 8"})
    grid: Literal["power", "kmeans"] = field(default="power", metadata={"help": "power (NUPES) or kmeans (SqueezeLLM)"})
    group_size: int = field(default=0, metadata={"help": "power: weights per scale; kmeans: weights per codebook; 0 = per channel"})
    iters: int = field(default=20, metadata={"help": "k-means Lloyd iterations"})
    targets: str = field(default="linear", metadata={"help": "linear layers: path globs, re:, !exclude, joined by |"})

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.grid not in ("power", "kmeans"):
            raise ValueError(f"grid must be power or kmeans, got {self.grid!r}")
        if self.group_size < -1:
            raise ValueError(f"group_size must be positive, or 0/-1 for per-channel, got {self.group_size}")
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")
        validate_targets(self.targets)


def _nearest(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the ascending ``levels`` ([L] or [R, L]) for each of ``values``."""
    mid = ((levels[..., 1:] + levels[..., :-1]) / 2).contiguous()
    return torch.bucketize(values, mid) if mid.dim() == 1 else torch.searchsorted(mid, values.contiguous())


def power_levels(bits: int, p: float) -> torch.Tensor:
    """``sign(t)·|t|^p`` over ``2**bits`` uniform ``t`` in ``[-1, 1]``, ascending."""
    t = torch.linspace(-1, 1, 2 ** bits, dtype=torch.float64)
    return (t.sign() * t.abs().pow(p)).float()


def fit_power(w: torch.Tensor, weight: torch.Tensor, bits: int, group_size: int):
    """Power grid for ``w [N, K]`` with column weights ``weight [K]``: indices ``[N, K]``,
    table ``[N, 1, L]`` (each row's best ``p``), scales ``[N, K/group_size]``."""
    n, k = w.shape
    scales = w.reshape(n, k // group_size, group_size).abs().amax(-1).clamp(min=torch.finfo(w.dtype).tiny)
    u = apply_scales(w, 1 / scales)
    col_err = apply_scales(torch.ones_like(w), scales).square_() * weight  # weight error per unit of u-error²
    best_err = torch.full((n,), float("inf"))
    best_idx = torch.zeros(n, k, dtype=torch.long)
    best_p = torch.ones(n)
    for p in POWERS.tolist():
        levels = power_levels(bits, p)
        idx = _nearest(u, levels)
        err = ((u - levels[idx]).square_() * col_err).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_idx[better] = idx[better]
        best_p[better] = p
    lut = torch.stack([power_levels(bits, p) for p in best_p.tolist()]).unsqueeze(1)
    return best_idx, lut, scales


def fit_kmeans(w: torch.Tensor, weight: torch.Tensor, bits: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted 1-D k-means with ``2**bits`` centroids on each row of ``w [R, m]`` (weights
    ``weight [R, m]``): indices ``[R, m]`` and ascending centroids ``[R, L]``. Starts at the
    weighted quantiles; an empty cluster restarts at its row's worst-fitted value."""
    r, m = w.shape
    levels = 2 ** bits
    ordered, order = w.sort(1)
    cum = weight.gather(1, order).cumsum(1)
    marks = (torch.arange(levels) + 0.5) / levels * cum[:, -1:]
    centroids = ordered.gather(1, torch.searchsorted(cum, marks).clamp(max=m - 1))
    for _ in range(iters):
        idx = _nearest(w, centroids)
        num = torch.zeros(r, levels).scatter_add_(1, idx, weight * w)
        den = torch.zeros(r, levels).scatter_add_(1, idx, weight)
        empty = den == 0
        new = torch.where(empty, centroids, num / den.clamp(min=1e-30))
        rows = empty.any(1).nonzero().squeeze(1)
        if len(rows):
            err = weight[rows] * (w[rows] - centroids[rows].gather(1, idx[rows])).square()
            new[rows, empty[rows].float().argmax(1)] = w[rows].gather(1, err.argmax(1, keepdim=True)).squeeze(1)
        centroids = new.sort(1).values
    return _nearest(w, centroids), centroids


def fit_layer(w: torch.Tensor, col_weight: torch.Tensor, cfg: NonUniformConfig, group_size: int):
    """``(indices [N, K], table [N, G_lut, L], scales [N, G] or None)`` for ``w [N, K]``."""
    n, k = w.shape
    if cfg.grid == "power":
        return fit_power(w, col_weight, cfg.bits, group_size)
    codebooks = k // group_size  # kmeans: one codebook per group (1 = per channel)
    rows = w.reshape(n * codebooks, group_size)
    weight = col_weight.reshape(codebooks, group_size).repeat(n, 1)
    idx, centroids = fit_kmeans(rows, weight, cfg.bits, cfg.iters)
    return idx.reshape(n, k), centroids.reshape(n, codebooks, -1), None


def _fit_by_rows(w: torch.Tensor, col_weight: torch.Tensor, cfg: NonUniformConfig, group_size: int):
    parts = [fit_layer(w[i:i + ROW_CHUNK], col_weight, cfg, group_size) for i in range(0, w.shape[0], ROW_CHUNK)]
    idx, lut, scales = (None if parts[0][j] is None else torch.cat([p[j] for p in parts]) for j in range(3))
    return idx, lut, scales


def _replace(graph: Graph, node: fx.Node, stored: tuple) -> None:
    q, lut, scales, bits, group_size = stored
    bias = node.args[2] if len(node.args) > 2 else None
    with graph.gm.graph.inserting_before(node):
        new = graph.gm.graph.call_function(torch.ops.splice.lut_linear.default,
                                           (node.args[0], q, lut, scales, bias, bits, group_size))
    new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    node.replace_all_uses_with(new)
    graph.gm.graph.erase_node(node)


@register_pass(PASS, NonUniformConfig, reference="https://arxiv.org/abs/2308.05600",
               report_fields=QUANT_REPORT)
def nonuniform(graph: Graph, cfg: NonUniformConfig, ctx: PassContext) -> PassResult:
    nodes = select_nodes(graph.gm, cfg.targets, ("linear",), PASS)
    for node in nodes:
        check_not_quantized(node, PASS)
    nodes = [n for n in nodes if n.target == torch.ops.aten.linear.default]  # not adapters' ops
    diag = {}
    if ctx.calibration:
        hessians = input_hessians(graph, nodes, ctx.calibration, ctx.cache)
        diag = {target: torch.diag(h) for target, h in hessians.items()}
    stored: dict[str, tuple] = {}
    layers, before, after = {}, 0, 0
    for node in nodes:
        target = node.args[1].target
        if target not in stored:
            w = graph.tensor(target)
            wf = w.detach().float()
            g = resolve_group(cfg, wf.shape[1], module_path(node), PASS)
            idx, lut, scales = _fit_by_rows(wf, diag.get(target, torch.ones(wf.shape[1])), cfg, g)
            layers[module_path(node)] = round(sqnr_db(wf, apply_scales(lut_lookup(idx, lut), scales)), 2)
            base = target.removesuffix(".weight")
            tensors = [pack_indices(idx, cfg.bits, g), lut.to(w.dtype), None if scales is None else scales.to(w.dtype)]
            stored[target] = (graph.add_tensor(base + ".lut_index", tensors[0]), graph.add_tensor(base + ".lut", tensors[1]),
                              None if scales is None else graph.add_tensor(base + ".lut_scales", tensors[2]),
                              cfg.bits, g)
            before += w.numel() * w.element_size()
            after += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        _replace(graph, node, stored[target])
    report = {"layers": len(nodes), "grid": cfg.grid, "weight_bytes_before": before, "weight_bytes_after": after,
              "weighting": f"diag(XᵀX), {len(ctx.calibration)} samples" if diag else "none (weight error)",
              "weight_sqnr_db": layers}
    return PassResult(graph, True, report)
