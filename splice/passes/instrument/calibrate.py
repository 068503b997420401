"""Calibrated weight rewrites (quantizers, pruners): gather each layer's input statistics on
calibration data, then let a method solve each set of layers reading one input tensor
(``solve_groups``: AWQ, SparseGPT, or each layer on its own through it: GPTQ), optionally block by block.

Sequential mode (``sequential=True``, as llm-compressor's sequential pipeline): blocks run in
graph order; each block's statistics are gathered on activations produced by the blocks
before it *already quantized*, the block's layers are solved, then the block is re-run with its
quantized weights to produce the next block's inputs. Only one block's statistics are alive at
a time. Otherwise the whole graph runs once and every layer is solved from those statistics:
those are statistics of the float graph, so ``input_stats`` shares them through the pipeline's
analysis cache (``PassContext.cache``), keyed by each input value's fingerprint and the
calibration data: GPTQ, AWQ, SmoothQuant, allocate and nonuniform on the same weights gather once.
Observer kind ``asym`` (GPTAQ) also runs the float graph block by block beside the quantized
copy, so each layer sees how its quantized-model inputs differ from the float model's.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import fx

from splice.ir.graph import Graph, set_attr
from splice.ir.segments import SegmentRunner, block_end, blocks
from splice.kernels.instrument.store import LayerStats, StatsStore, sample_scope
from splice.passes.analysis import AnalysisCache, tensors_fingerprint, value_fingerprints
from splice.passes.instrument.observe import insert_observers
from splice.progress import track

# (layers reading one input tensor, their float weights, that input's statistics)
#   -> the float weights the rest of calibration should see (e.g. dequantized), one per layer
GroupSolveFn = Callable[[list[fx.Node], list[torch.Tensor], LayerStats], list[torch.Tensor]]
# the kinds input_stats caches: their LayerStats fields
CACHED = {"hessian": ("xtx", "norm4"), "act": ("abs_sum", "abs_max"), "sqnorm": ("sq_sum",)}


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


def _merged(entry: tuple[frozenset, LayerStats] | None, new: LayerStats, kinds: tuple[str, ...]):
    """A cache entry holding ``entry``'s kinds and ``new``'s (same rows: the same data)."""
    if entry is None:
        return frozenset(kinds), new
    return entry[0] | frozenset(kinds), _with_kinds(entry[1], new, kinds)


def _with_kinds(old: LayerStats, new: LayerStats, kinds: tuple[str, ...]) -> LayerStats:
    """A copy of ``old`` with ``new``'s fields of ``kinds`` (held-out statistics too)."""
    stats = dataclasses.replace(old)
    for kind in kinds:
        for name in CACHED[kind]:
            setattr(stats, name, getattr(new, name))
    if new.held is not None:
        stats.held = _with_kinds(old.held or LayerStats(rows=new.held.rows), new.held, kinds)
    return stats


def _gather(graph: Graph, nodes: list[fx.Node], calibration: list[tuple],
            kinds: tuple[str, ...], holdout: int = 0) -> dict[str, LayerStats]:
    """Run ``calibration`` once through an observed copy of ``graph``: statistics of each node's
    input (every ``holdout``-th sample's in ``LayerStats.held``)."""
    work = graph.copy()
    by_name = {n.name: n for n in work.gm.graph.nodes}
    keys = insert_observers(work, [by_name[n.name] for n in nodes])
    store = StatsStore({k: kinds for k in keys.values()}, holdout=holdout)
    with store.recording(), torch.no_grad():
        for i, sample in enumerate(calibration):
            with sample_scope(i):
                work.gm(*sample)
    return {node.name: store.stats.get(key, LayerStats()) for node, key in keys.items()}


def input_stats(graph: Graph, nodes: list[fx.Node], calibration: list[tuple], kinds: tuple[str, ...],
                cache: AnalysisCache | None = None, holdout: int = 0) -> dict[str, LayerStats]:
    """Statistics (``kinds``) of the input of each of ``nodes`` (of ``graph``) on ``calibration``
    with the float graph run once, by node name; do not modify them (they may be shared). With a
    ``cache``, kinds in ``CACHED`` are looked up by the input value's fingerprint and the
    calibration's (and ``holdout``), and the graph runs only for inputs (and kinds) not gathered before."""
    if cache is None or not set(kinds) <= CACHED.keys():
        return _gather(graph, nodes, calibration, kinds, holdout)
    fps, data = value_fingerprints(graph), (tensors_fingerprint(calibration), holdout)
    entries = {fps[n.args[0]]: cache.get("input_stats", fps[n.args[0]], data) for n in nodes}
    missing = [n for n in nodes if entries[fps[n.args[0]]] is None or not set(kinds) <= entries[fps[n.args[0]]][0]]
    if missing:
        cache.ran("input_stats")
        fresh = _gather(graph, missing, calibration, kinds, holdout)
        for fp, node in {fps[n.args[0]]: n for n in missing}.items():  # one node per input value
            entries[fp] = _merged(entries[fp], fresh[node.name], kinds)
            cache.put("input_stats", fp, data, entries[fp])
    return {n.name: entries[fps[n.args[0]]][1] for n in nodes}


def solve_groups(graph: Graph, nodes: list[fx.Node], calibration: list[tuple], kinds: tuple[str, ...],
                 solve_group: GroupSolveFn, *, sequential: bool, pass_name: str, progress: bool = False,
                 cache: AnalysisCache | None = None, holdout: int = 0) -> None:
    """Call ``solve_group`` once per set of ``nodes`` (linears of ``graph``, left untouched) that
    read the same input tensor (q/k/v, gate/up), in graph order, with that input's statistics.
    ``solve_group`` receives the nodes of a private working copy; their weights there are
    replaced by what it returns, so later blocks calibrate on the solved layers' outputs.
    Not sequential, the statistics come from ``input_stats`` (through ``cache``). With ``holdout``
    every ``holdout``-th sample's statistics are apart, in ``LayerStats.held``."""
    work = graph.copy()
    by_name = {n.name: n for n in work.gm.graph.nodes}
    targets = [by_name[n.name] for n in nodes]
    keys = insert_observers(work, targets)
    reference = _FloatReference(graph, nodes, calibration) if "asym" in kinds and sequential else None
    store = StatsStore({k: kinds if reference else tuple(x for x in kinds if x != "asym") for k in keys.values()},
                       reference=reference and reference.store, holdout=holdout)
    groups: dict[str, list[fx.Node]] = {}
    for node in work.gm.graph.nodes:
        if node in keys:
            groups.setdefault(keys[node], []).append(node)
    # a group belongs to the block of its first layer; blocks in graph order
    by_block = blocks(work.gm, [members[0] for members in groups.values()])
    block_keys = {block: [keys[m] for m in firsts] for block, firsts in by_block.items()}

    def solve_block(block_key_list: list[str], take: Callable[[str], LayerStats]) -> None:
        for key in block_key_list:
            members = groups[key]
            stats = take(key)
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
            solve_block(block_key_list, store.pop)
            if block != last:  # the next blocks' inputs, through this block's solved layers
                runner.restore(snap)
                runner.run_to(end)
    else:
        by_input = input_stats(graph, nodes, calibration, tuple(x for x in kinds if x != "asym"), cache, holdout)
        for block_key_list in block_keys.values():
            solve_block(block_key_list, lambda key: by_input[groups[key][0].name])


def input_hessians(graph: Graph, nodes: list[fx.Node], calibration: list[tuple],
                   cache: AnalysisCache | None = None) -> dict[str, torch.Tensor]:
    """``H = 2XᵀX/n`` of the input of each linear in ``nodes`` on ``calibration``, the float
    model run once (not sequential, through ``cache``), keyed by weight target; layers that saw
    no rows are left out. Layers reading one input share one tensor."""
    hessians: dict[int, torch.Tensor] = {}  # by LayerStats: one tensor per shared input
    out = {}
    by_node = input_stats(graph, nodes, calibration, ("hessian",), cache)
    for node in nodes:
        stats = by_node[node.name]
        if stats.rows:
            out[node.args[1].target] = hessians.setdefault(id(stats), stats.hessian())
    return out
