"""Calibrated weight quantization: each layer solved on its own (``solve_layers``, GPTQ) through
the shared calibration driver (``passes/instrument/calibrate.py``), and the lookup that hands
the solutions to ``quantize_layers``."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from splice.ir.graph import Graph
from splice.kernels.instrument.store import LayerStats
from splice.kernels.quant.grid import GroupGrid
from splice.passes.analysis import AnalysisCache
from splice.passes.instrument.calibrate import solve_groups
from splice.passes.quantize._common import WeightQuantConfig, layer_grid

# (node, float weight [N, K], its input statistics, grid) -> (codes [N, K], scale [N, G], zero [N, G])
SolveFn = Callable[[fx.Node, torch.Tensor, LayerStats, GroupGrid], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
Solution = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def solve_layers(graph: Graph, nodes: list[fx.Node], cfg: WeightQuantConfig, calibration: list[tuple],
                 kinds: tuple[str, ...], solve: SolveFn, *, sequential: bool, pass_name: str,
                 progress: bool = False, cache: AnalysisCache | None = None, holdout: int = 0) -> dict[str, Solution]:
    """Solutions keyed by weight target for the linear ``nodes`` of ``graph`` (untouched),
    each layer solved on its own by ``solve``."""
    solutions: dict[str, Solution] = {}

    def solve_each(members, weights, stats):
        out = []
        for node, w in zip(members, weights):
            w_target = node.args[1].target
            if w_target in solutions:  # a weight read by several layers is solved once
                out.append(w)
                continue
            grid = layer_grid(cfg, node, w.shape[1], pass_name)
            codes, scale, zero = solve(node, w, stats, grid)
            solutions[w_target] = (codes, scale, zero)
            out.append(grid.dequantize(codes, scale, zero))
        return out

    solve_groups(graph, nodes, calibration, kinds, solve_each, sequential=sequential,
                 pass_name=pass_name, progress=progress, cache=cache, holdout=holdout)
    return solutions


def solution_lookup(solutions: dict[str, Solution]):
    """``quantize_layers``' quantize function: the solution for the node's weight, or round to
    nearest for weights no method solved (embeddings)."""

    def lookup(node: fx.Node, w: torch.Tensor, grid: GroupGrid) -> Solution:
        target = (node.args[0] if node.target == torch.ops.aten.embedding.default else node.args[1]).target
        if target in solutions:
            return solutions[target]
        scale, zero = grid.params(w)
        return grid.quantize(w, scale, zero), scale, zero

    return lookup
