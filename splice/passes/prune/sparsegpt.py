"""``prune.sparsegpt``: SparseGPT — prune each layer column block by column block, choosing the mask
of a block by ``w² / [H⁻¹]ᵢᵢ²`` and spreading each pruned weight's error over the columns not yet
visited through the inverse Hessian of the layer's inputs (optimal brain surgeon updates, in
GPTQ's Cholesky form). https://arxiv.org/abs/2301.00774

As the reference code: ``block_size`` 128 columns per mask decision, ``damp`` 1 % of the mean
Hessian diagonal, calibration block by block through the blocks already pruned (``sequential``).
For N:M (``prune.nm:criterion=sparsegpt``) the mask is chosen every ``m`` columns instead.

``bits`` (2..8) is SparseGPT's joint quantization (its ``--wbits``): in the same column sweep each
kept weight is also rounded to a ``group_size`` grid (scales from the error-updated weights as each
group starts, as GPTQ) and the rounding error is spread with the pruning error; the layers are
written as the quantizers write them (packed codes; pruned weights on the grid's zero).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.ir.graph import Graph
from splice.ir.sparsity import mask_of
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.instrument.hessian import inverse_hessian_cholesky, without_dead_inputs
from splice.kernels.quant.grid import GroupGrid
from splice.passes.quantize._common import WeightQuantConfig, layer_grid, quantize_layers
from splice.passes.prune._common import HIDDEN_LINEAR, PRUNE_REPORT, CalibratedPruneConfig, prunable, prune_calibrated


@dataclass(frozen=True, kw_only=True)
class SparseGPTConfig(CalibratedPruneConfig):
    """SparseGPT: one-shot pruning with Hessian-based weight updates (needs calibration)."""

    block_size: int = field(default=128, metadata={"help": "columns per mask decision and lazy update"})
    damp: float = field(default=0.01, metadata={"help": "dampening, fraction of mean diag(H)"})
    bits: int = field(default=0, metadata={"help": "also quantize the kept weights to this many bits in the "
                                                   "same sweep (SparseGPT --wbits), 2..8; 0: no"})
    group_size: int = field(default=128, metadata={"help": "with bits: weights per scale along the input dim; "
                                                             "0 or -1 = per channel"})
    symmetric: bool = field(default=True, metadata={"help": "with bits: zero point fixed at 2**(bits-1)"})

    def __post_init__(self):
        super().__post_init__()
        if self.bits:
            WeightQuantConfig(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")


class _Rounding:
    """Joint quantization's state: the grid, and each group's scale/zero set as the sweep reaches it."""

    def __init__(self, grid: GroupGrid, n_rows: int, k: int):
        self.grid = grid
        self.scale = torch.zeros(n_rows, k // grid.group_size)
        self.zero = torch.zeros(n_rows, k // grid.group_size, dtype=torch.int32)

    def start_group(self, col: int, weights: torch.Tensor) -> None:
        """Set the grid of the group starting at ``col`` from its (error-updated) ``weights`` [N, group_size]."""
        s, z = self.grid.params(weights)
        self.scale[:, col // self.grid.group_size], self.zero[:, col // self.grid.group_size] = s[:, 0], z[:, 0]

    def column(self, col: int, w: torch.Tensor) -> torch.Tensor:
        """Column ``col``'s weights ``w`` [N] rounded to its group's grid."""
        scale, zero = self.scale[:, col // self.grid.group_size], self.zero[:, col // self.grid.group_size]
        return (torch.clamp(torch.round(w / scale) + zero, 0, self.grid.maxq) - zero) * scale


def sparsegpt_layer(w: torch.Tensor, h: torch.Tensor, *, sparsity: float = 0.0, nm: tuple[int, int] | None = None,
                    block_size: int = 128, damp: float = 0.01, prior: torch.Tensor | None = None,
                    grid: GroupGrid | None = None):
    """SparseGPT on a weight ``[N, K]`` with input Hessian ``[K, K]``: ``sparsity`` of each column
    block pruned (or ``nm = (n, m)``: ``n`` of every ``m`` kept), weights ``prior`` drops pruned
    too; with ``grid`` the kept weights are rounded to it in the same sweep. Returns the keep-mask
    and the updated weight (zero where pruned; on the grid with ``grid``), and with ``grid`` its
    ``(codes, scale, zero)``."""
    w, h = without_dead_inputs(w, h)
    n_rows, k = w.shape
    hinv = inverse_hessian_cholesky(h, damp)[0].float()
    rounding = None if grid is None else _Rounding(grid, n_rows, k)
    dropped = torch.zeros(n_rows, k, dtype=torch.bool) if prior is None else ~prior
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n_rows, i2 - i1), hinv[i1:i2, i1:i2]
        saliency = w1 ** 2 / torch.diagonal(hinv1).reshape(1, -1) ** 2
        saliency[dropped[:, i1:i2]] = -1  # already pruned: counted first
        if nm is None:
            cut = int(saliency.numel() * sparsity)
            if cut:
                drop = torch.zeros(saliency.numel(), dtype=torch.bool)
                drop[torch.topk(saliency.reshape(-1), cut, largest=False).indices] = True
                dropped[:, i1:i2] |= drop.reshape(saliency.shape)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                group = saliency[:, i:i + nm[1]]
                low = torch.topk(group, nm[1] - nm[0], dim=1, largest=False).indices
                dropped[:, i1 + i:i1 + i + nm[1]].scatter_(1, low, True)
            if rounding is not None and (i1 + i) % grid.group_size == 0:  # the group may run past this block
                group = w1[:, i:i + grid.group_size]
                rounding.start_group(i1 + i, torch.cat([group, w[:, i2:i2 + grid.group_size - group.shape[1]]], 1))
            kept = w1[:, i] if rounding is None else rounding.column(i1 + i, w1[:, i])
            q = torch.where(dropped[:, i1 + i], 0.0, kept)
            err = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1)
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if rounding is None:
        return ~dropped, w * ~dropped
    codes = grid.quantize(w, rounding.scale, rounding.zero)
    codes = torch.where(dropped, rounding.zero.repeat_interleave(grid.group_size, dim=1), codes)
    return ~dropped, grid.dequantize(codes, rounding.scale, rounding.zero), (codes, rounding.scale, rounding.zero)


@register_pass("prune.sparsegpt", SparseGPTConfig, reference="https://arxiv.org/abs/2301.00774",
               needs_calibration=True, report_fields=PRUNE_REPORT,
               applies=HIDDEN_LINEAR)
def sparsegpt(graph: Graph, cfg: SparseGPTConfig, ctx: PassContext) -> PassResult:
    nodes = prunable(graph, cfg, ("linear",), "prune.sparsegpt")
    qcfg = WeightQuantConfig(bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric) if cfg.bits else None
    rounded: dict[str, tuple] = {}

    def solve(node, w, stats):
        h = stats.hessian() if stats.rows else torch.eye(w.shape[1])  # no rows: magnitude, no update
        grid = None if qcfg is None else layer_grid(qcfg, node, w.shape[1], "prune.sparsegpt")
        keep, new, *codes = sparsegpt_layer(w, h, sparsity=cfg.sparsity, block_size=cfg.block_size, damp=cfg.damp,
                                            prior=mask_of(graph, node), grid=grid)
        if codes:
            rounded[node.args[1].target] = codes[0]
        return keep, new

    report = prune_calibrated(graph, nodes, cfg, ctx, solve, "prune.sparsegpt")
    if qcfg is not None:
        quantized = quantize_layers(graph, qcfg, "prune.sparsegpt", lambda node, w, grid: rounded[node.args[1].target],
                                    nodes=nodes)
        report = {**report, "bits": cfg.bits, "weight_bytes_after": quantized["weight_bytes_after"],
                  "weight_sqnr_db": quantized["weight_sqnr_db"]}
    return PassResult(graph, True, report)
