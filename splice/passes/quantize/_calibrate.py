"""Calibrated weight quantization: gather each layer's input statistics on calibration data,
then let a method solve each layer (``solve_layers``, GPTQ) or each set of layers reading one
input tensor (``solve_groups``, AWQ), optionally block by block.

Sequential mode (``sequential=True``, as llm-compressor's sequential pipeline): blocks run in
graph order; each block's statistics are gathered on activations produced by the blocks
before it *already quantized*, the block's layers are solved, then the block is re-run with its
quantized weights to produce the next block's inputs. Only one block's statistics are alive at
a time. Otherwise the whole graph runs once and every layer is solved from those statistics.
Observer kind ``asym`` (GPTAQ) also runs the float graph block by block beside the quantized
copy, so each layer sees how its quantized-model inputs differ from the float model's.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from splice.ir.graph import Graph, set_attr
from splice.ir.segments import SegmentRunner, block_end, blocks
from splice.kernels.instrument.store import LayerStats, StatsStore
from splice.kernels.quant.grid import GroupGrid
from splice.passes.instrument.observe import insert_observers
from splice.passes.quantize._common import WeightQuantConfig, layer_grid
from splice.progress import track

# (node, float weight [N, K], its input statistics, grid) -> (codes [N, K], scale [N, G], zero [N, G])
SolveFn = Callable[[fx.Node, torch.Tensor, LayerStats, GroupGrid], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
Solution = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# (layers reading one input tensor, their float weights, that input's statistics)
#   -> the float weights the rest of calibration should see (e.g. dequantized), one per layer
GroupSolveFn = Callable[[list[fx.Node], list[torch.Tensor], LayerStats], list[torch.Tensor]]


class _FloatReference:
    """The float graph, observed like the working copy and advanced with it block by block;
    its store holds the rows each observer saw there until the working copy's ``asym``
    statistics consume them."""

    def __init__(self, graph: Graph, nodes: list[fx.Node], calibration: list[tuple]):
        work = graph.copy()
        by_name = {n.name: n for n in work.gm.graph.nodes}
        keys = insert_observers(work, [by_name[n.name] for n in nodes])
        self.store = StatsStore({k: ("rows",) for k in keys.values()})
        self.runner = SegmentRunner(work.gm, calibration)

    def advance(self, observed_end: int, end: int) -> None:
        with self.store.recording():
            self.runner.run_to(observed_end)
        self.runner.run_to(end)


def solve_groups(graph: Graph, nodes: list[fx.Node], calibration: list[tuple], kinds: tuple[str, ...],
                 solve_group: GroupSolveFn, *, sequential: bool, pass_name: str, progress: bool = False) -> None:
    """Call ``solve_group`` once per set of ``nodes`` (linears of ``graph``, left untouched) that
    read the same input tensor (q/k/v, gate/up), in graph order, with that input's statistics.
    ``solve_group`` receives the nodes of a private working copy; their weights there are
    replaced by what it returns, so later blocks calibrate on the solved layers' outputs."""
    work = graph.copy()
    by_name = {n.name: n for n in work.gm.graph.nodes}
    targets = [by_name[n.name] for n in nodes]
    keys = insert_observers(work, targets)
    reference = _FloatReference(graph, nodes, calibration) if "asym" in kinds and sequential else None
    store = StatsStore({k: kinds if reference else tuple(x for x in kinds if x != "asym") for k in keys.values()},
                       reference=reference and reference.store)
    groups: dict[str, list[fx.Node]] = {}
    for node in work.gm.graph.nodes:
        if node in keys:
            groups.setdefault(keys[node], []).append(node)
    # a group belongs to the block of its first layer; blocks in graph order
    by_block = blocks(work.gm, [members[0] for members in groups.values()])
    block_keys = {block: [keys[m] for m in firsts] for block, firsts in by_block.items()}

    def solve_block(block_key_list: list[str]) -> None:
        for key in block_key_list:
            members = groups[key]
            stats = store.pop(key)
            weights = [work.tensor(m.args[1].target).detach().float() for m in members]
            for node, new in zip(members, solve_group(members, weights, stats)):
                old = work.tensor(node.args[1].target)
                set_attr(work.gm, node.args[1].target, new.to(old.dtype))

    if sequential:
        runner = SegmentRunner(work.gm, calibration)
        observers = sorted(runner.nodes.index(m.args[0]) for members in groups.values() for m in members[:1])
        last = next(reversed(block_keys), None)
        for block, block_key_list in track(block_keys.items(), f"{pass_name}: calibrate", unit="block",
                                           show=progress):
            members = [m for key in block_key_list for m in groups[key]]
            end = max(block_end(work.gm, block), *(runner.nodes.index(m) for m in members))
            observed_end = max(i for i in observers if i <= end)  # statistics need the block only up to here
            if reference:
                reference.advance(observed_end, end)
            snap = runner.snapshot()
            with store.recording():
                runner.run_to(observed_end)
            solve_block(block_key_list)
            if block != last:  # the next blocks' inputs, through this block's solved layers
                runner.restore(snap)
                runner.run_to(end)
    else:
        with store.recording(), torch.no_grad():
            for sample in calibration:
                work.gm(*sample)
        for block_key_list in block_keys.values():
            solve_block(block_key_list)


def solve_layers(graph: Graph, nodes: list[fx.Node], cfg: WeightQuantConfig, calibration: list[tuple],
                 kinds: tuple[str, ...], solve: SolveFn, *, sequential: bool, pass_name: str,
                 progress: bool = False) -> dict[str, Solution]:
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
                 pass_name=pass_name, progress=progress)
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


def input_hessians(graph: Graph, nodes: list[fx.Node], calibration: list[tuple], *, pass_name: str,
                   progress: bool = False) -> dict[str, torch.Tensor]:
    """``H = 2XᵀX/n`` of the input of each linear in ``nodes`` on ``calibration``, the float
    model run once (not sequential), keyed by weight target; layers that saw no rows are left
    out. Layers reading one input share one tensor."""
    hessians: dict[str, torch.Tensor] = {}

    def keep(members, weights, stats: LayerStats):
        if stats.rows:
            h = stats.hessian()
            for node in members:
                hessians[node.args[1].target] = h
        return weights

    solve_groups(graph, nodes, calibration, ("hessian",), keep, sequential=False, pass_name=pass_name,
                 progress=progress)
    return hessians
