"""Training a quantized representation against the float model, shared by
``quantize.reconstruct`` (block by block), ``quantize.discquant`` and ``quantize.pvtune``
(whole model).

The graph stays float while it trains: the targeted linears' weights are substituted by
differentiable functions of each method's grid variables through ``SegmentRunner.replay``;
the pass then writes the final codes with ``quantize_layers``. Targets come from the float
model run on the calibration samples. Whole-model losses (``Distiller``) are the KL divergence
of outputs named ``logits`` (as knowledge distillation and the papers use) and MSE for other
float outputs.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from splice.ir.graph import Graph, attr_users
from splice.ir.segments import SegmentRunner
from splice.ir.select import select_nodes
from splice.kernels.quant.grid import GroupGrid
from splice.passes.quantize._common import WeightQuantConfig, layer_grid

aten = torch.ops.aten


def trainable_layers(graph: Graph, cfg: WeightQuantConfig, pass_name: str) -> tuple[list, dict[str, tuple[torch.Tensor, GroupGrid]]]:
    """(selected linear nodes, weight target -> (float weight, grid)) for the weights only those
    linears read; a weight other ops read too (a tied LM head) is left to round-to-nearest."""
    nodes = [n for n in select_nodes(graph.gm, cfg.targets, ("linear", "embedding"), pass_name)
             if n.target == aten.linear.default]
    users = attr_users(graph.gm)
    layers = {}
    for node in nodes:
        target = node.args[1].target
        if target not in layers and all(u in nodes for u in users[target]):
            w = graph.tensor(target).detach().float()
            layers[target] = (w, layer_grid(cfg, node, w.shape[1], pass_name))
    return nodes, layers


def float_values(values: list) -> list[int]:
    return [i for i, v in enumerate(values) if isinstance(v, torch.Tensor) and v.is_floating_point()]


def mse_loss(out: list[torch.Tensor], ref: list[torch.Tensor]) -> torch.Tensor:
    return sum(F.mse_loss(out[i], ref[i]) for i in float_values(ref))


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """``round`` forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


class Distiller:
    """The graph's outputs on every calibration sample, with chosen weights substituted,
    against the float model's (computed once)."""

    def __init__(self, graph: Graph, calibration: list[tuple]):
        self.runner = SegmentRunner(graph.gm, calibration)
        out = next(n for n in graph.gm.graph.nodes if n.op == "output").args[0]
        self.read = [self.runner.nodes.index(n) for n in out]
        self.logits = [name == "logits" for name in graph.output_names]
        self.end = len(self.runner.nodes) - 1
        with torch.no_grad():
            self.targets = [self.runner.replay(j, self.end, self.read) for j in range(len(calibration))]

    def loss(self, sample: int, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        out, ref = self.runner.replay(sample, self.end, self.read, weights), self.targets[sample]
        total = 0
        for i in float_values(ref):
            if self.logits[i]:
                total = total + F.kl_div(F.log_softmax(out[i].float(), -1).flatten(0, -2),
                                         F.log_softmax(ref[i].float(), -1).flatten(0, -2),
                                         log_target=True, reduction="batchmean")
            else:
                total = total + F.mse_loss(out[i], ref[i])
        return total

    def mean_loss(self, weights: Callable[[], dict[str, torch.Tensor]]) -> float:
        with torch.no_grad():
            return sum(float(self.loss(j, weights())) for j in range(len(self.targets))) / len(self.targets)


def split_holdout(samples: list, holdout: float) -> tuple[list, list]:
    """(training, held-out) samples: the last ``holdout`` fraction is held out (with windows drawn
    in text order, the end of the text), at least one sample stays for training."""
    held = min(int(holdout * len(samples)), len(samples) - 1)
    return samples[:len(samples) - held], samples[len(samples) - held:]
