"""Run a graph over many input samples one segment at a time.

Sequential calibration (GPTQ/AWQ as llm-compressor runs them) needs the activations at a
block boundary for every calibration sample, computed with the blocks before it already
quantized. ``SegmentRunner`` keeps, per sample, only the values still needed by nodes not yet
run, so memory is one boundary's worth of activations rather than a whole forward's.
``blocks`` groups nodes into repeated blocks by module path (``model.layers.3``).
``replay`` re-runs a segment from a saved boundary with chosen weights substituted, gradients
on: block-wise reconstruction trains through it.
"""
from __future__ import annotations

import re
from collections import OrderedDict

import torch
from torch import fx

from splice.ir.select import module_path
from splice.kernels.instrument.store import sample_scope

_BLOCK = re.compile(r"^(.*?\.\d+)(\.|$)")


def block_of(node: fx.Node) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``model.layers.3``; a path with no index is its own block."""
    path = module_path(node)
    m = _BLOCK.match(path)
    return m.group(1) if m else path


def blocks(gm: fx.GraphModule, targets: list[fx.Node]) -> "OrderedDict[str, list[fx.Node]]":
    """Targets grouped by block, blocks in graph order."""
    out: OrderedDict[str, list[fx.Node]] = OrderedDict()
    for node in gm.graph.nodes:
        if node in targets:
            out.setdefault(block_of(node), []).append(node)
    return out


def block_end(gm: fx.GraphModule, block: str) -> int:
    """Index (in graph order) of the last node created by a module inside ``block``."""
    last = -1
    for i, node in enumerate(gm.graph.nodes):
        path = module_path(node)
        if path == block or path.startswith(block + "."):
            last = i
    return last


class _Substituting(fx.Interpreter):
    """Reads ``get_attr`` targets from ``weights`` first (tensors that may carry gradients)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)
        self.weights: dict[str, torch.Tensor] = {}

    def get_attr(self, target, args, kwargs):
        return self.weights[target] if target in self.weights else super().get_attr(target, args, kwargs)


class SegmentRunner:
    """Execute ``gm``'s nodes in order over ``samples`` (tuples of inputs), stopping at
    chosen node indices; values nothing later reads are freed as soon as possible."""

    def __init__(self, gm: fx.GraphModule, samples: list[tuple[torch.Tensor, ...]]):
        self.gm = gm
        self.nodes = [n for n in gm.graph.nodes if n.op != "output"]
        index = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((index.get(u, len(self.nodes)) for u in n.users), default=index[n])
                         for n in self.nodes}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.envs = [dict(zip(placeholders, sample)) for sample in samples]
        self.attrs = [n for n in self.nodes if n.op == "get_attr"]
        self.pos = 0
        self.interp = _Substituting(gm)

    def snapshot(self) -> tuple[int, list[dict]]:
        return self.pos, [dict(env) for env in self.envs]

    def restore(self, snap: tuple[int, list[dict]]) -> None:
        self.pos, envs = snap
        self.envs = [dict(env) for env in envs]

    def live_after(self, end: int) -> list[int]:
        """Indices of the nodes up to ``end`` whose values later nodes (or the output) read."""
        return [i for i, n in enumerate(self.nodes[:end + 1]) if self.last_use[n] > end]

    def replay(self, sample: int, end: int, read: list[int],
               weights: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The values of nodes ``read`` after running ``pos..end`` for one sample from the
        current boundary, with ``weights`` (get_attr target -> tensor) substituted; the
        runner's state is unchanged. Runs under the caller's grad mode."""
        env = dict(self.envs[sample])
        self.interp.env, self.interp.weights = env, weights or {}
        self._refresh_attrs(env)
        try:
            for node in self.nodes[self.pos:end + 1]:
                if node.op != "placeholder":
                    env[node] = self.interp.run_node(node)
        finally:
            self.interp.weights = {}
        return [env[self.nodes[i]] for i in read]

    def _refresh_attrs(self, env: dict) -> None:
        """Re-read the stored tensors an env already holds: ``get_attr`` nodes usually sit at
        the top of the graph, so their values were fetched before a method changed them."""
        for node in self.attrs:
            if node in env:
                env[node] = self.interp.get_attr(node.target, (), {})

    @torch.no_grad()
    def run_to(self, end: int) -> None:
        """Run nodes ``pos..end`` (inclusive) for every sample, on the weights stored now."""
        segment = self.nodes[self.pos:end + 1]
        for sample, env in enumerate(self.envs):
            self.interp.env = env
            self._refresh_attrs(env)
            with sample_scope(sample):
                for i, node in enumerate(segment, self.pos):
                    if node.op != "placeholder":
                        env[node] = self.interp.run_node(node)
                    for arg in node.all_input_nodes:
                        if self.last_use.get(arg, -1) <= i and arg in env:
                            del env[arg]
        self.pos = end + 1
