"""Calibrated weight quantization: gather each layer's input statistics on calibration data,
then let a method solve each layer, optionally block by block.

Sequential mode (``sequential=True``, as llm-compressor's sequential pipeline): blocks run in
graph order; each block's statistics are gathered on activations produced by the blocks
before it *already quantized*, the block's layers are solved, then the block is re-run with its
quantized weights to produce the next block's inputs. Only one block's statistics are alive at
a time. Otherwise the whole graph runs once and every layer is solved from those statistics.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import fx
from tqdm import tqdm

from splice.ir.graph import Graph, set_attr
from splice.ir.segments import SegmentRunner, block_end, blocks
from splice.kernels.observe import LayerStats, StatsStore
from splice.kernels.quant import GroupGrid
from splice.passes.instrument.observe import insert_observers
from splice.passes.quantize._common import WeightQuantConfig, resolve_group
from splice.ir.select import module_path

# (node, float weight [N, K], its input statistics, grid) -> (codes [N, K], scale [N, G], zero [N, G])
SolveFn = Callable[[fx.Node, torch.Tensor, LayerStats, GroupGrid], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
Solution = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def solve_layers(graph: Graph, nodes: list[fx.Node], cfg: WeightQuantConfig, calibration: list[tuple],
                 kinds: tuple[str, ...], solve: SolveFn, *, sequential: bool, pass_name: str,
                 progress: bool = False) -> dict[str, Solution]:
    """Solutions keyed by weight target for the linear ``nodes`` of ``graph`` (untouched)."""
    work = graph.copy()
    by_name = {n.name: n for n in work.gm.graph.nodes}
    targets = [by_name[n.name] for n in nodes]
    keys = insert_observers(work, targets)
    store = StatsStore({k: kinds for k in keys.values()})
    solutions: dict[str, Solution] = {}

    def solve_block(members: list[fx.Node]) -> None:
        taken: dict[str, LayerStats] = {}
        for node in members:
            stats = taken.setdefault(keys[node], store.pop(keys[node]))
            w_target = node.args[1].target
            if w_target in solutions:
                continue
            w = work.tensor(w_target).detach().float()
            grid = GroupGrid(cfg.bits, resolve_group(cfg, w.shape[1], module_path(node), pass_name), cfg.symmetric)
            codes, scale, zero = solve(node, w, stats, grid)
            solutions[w_target] = (codes, scale, zero)
            set_attr(work.gm, w_target, grid.dequantize(codes, scale, zero).to(w.dtype))

    groups = blocks(work.gm, targets)
    if sequential:
        runner = SegmentRunner(work.gm, calibration)
        for block, members in tqdm(groups.items(), desc=pass_name, disable=not progress):
            end = max(block_end(work.gm, block), *(runner.nodes.index(m) for m in members))
            snap = runner.snapshot()
            with store.recording():
                runner.run_to(end)
            solve_block(members)
            runner.restore(snap)
            runner.run_to(end)
    else:
        with store.recording(), torch.no_grad():
            for sample in calibration:
                work.gm(*sample)
        for members in groups.values():
            solve_block(members)
    return solutions
