"""Gradients on calibration data: of the stored weights (``weight_gradients``, behind first-order
Taylor importance; ``weight_fisher``, their mean and empirical Fisher, behind D-Pruner), of layer outputs (``output_fisher``: the diagonal Fisher that weights output
errors in ``quantize.allocate`` and ``prune.allocate:method=dp``), all of the label-free loss
``ir/loss.py``'s ``calibration_loss``.
"""
from __future__ import annotations

import torch
from torch import fx

from splice.ir.graph import Graph, set_attr
from splice.ir.loss import calibration_loss

_RUNNING_STATS = {torch.ops.aten._native_batch_norm_legit_no_training.default: (3, 4),
                  torch.ops.aten.batch_norm.default: (3, 4)}


def running_stats(graph: Graph) -> set[str]:
    """Stored tensors read as a batch norm's running mean/variance (statistics, not differentiable)."""
    return {node.args[i].target for node in graph.gm.graph.nodes for i in _RUNNING_STATS.get(node.target, ())
            if len(node.args) > i and getattr(node.args[i], "op", None) == "get_attr"}


def _sample_gradients(graph: Graph, targets: list[str], calibration: list[tuple], who: str):
    """Per calibration sample, ``∂loss/∂W`` of each stored tensor in ``targets`` (batch-norm running
    statistics left out) on a copy of ``graph`` whose other tensors stay frozen: a dict per sample."""
    targets = [t for t in targets if t not in running_stats(graph)]
    work = graph.copy()
    params = {t: torch.nn.Parameter(graph.tensor(t).detach().clone().float(), requires_grad=True) for t in targets}
    for t, p in params.items():
        set_attr(work.gm, t, p, trainable=True)
    for sample in calibration:
        with torch.enable_grad():
            calibration_loss(work, sample, work.gm(*sample), who).backward()
        yield {t: (p.grad if p.grad is not None else torch.zeros_like(p)).detach() for t, p in params.items()}
        for p in params.values():
            p.grad = None


def weight_gradients(graph: Graph, targets: list[str], calibration: list[tuple], who: str) -> dict[str, torch.Tensor]:
    """``∂loss/∂W`` of each stored tensor in ``targets`` summed over the calibration samples
    (``calibration_loss`` per sample); batch-norm running statistics are left out."""
    total: dict[str, torch.Tensor] = {}
    for grads in _sample_gradients(graph, targets, calibration, who):
        for t, g in grads.items():
            total[t] = total[t] + g if t in total else g.clone()
    return total


def weight_fisher(graph: Graph, targets: list[str], calibration: list[tuple],
                  who: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The mean gradient and the empirical Fisher diagonal (mean squared per-sample gradient) of
    each stored tensor in ``targets`` over the calibration samples."""
    mean: dict[str, torch.Tensor] = {}
    fisher: dict[str, torch.Tensor] = {}
    n = 0
    for grads in _sample_gradients(graph, targets, calibration, who):
        n += 1
        for t, g in grads.items():
            mean[t] = mean[t] + g if t in mean else g.clone()
            fisher[t] = fisher[t] + g.square() if t in fisher else g.square()
    return {t: g / n for t, g in mean.items()}, {t: f / n for t, f in fisher.items()}


def output_fisher(graph: Graph, nodes: list[fx.Node], calibration: list[tuple], who: str) -> dict[str, torch.Tensor]:
    """Mean over calibration tokens of ``(∂loss/∂y_n)²`` at the output ``y`` of each linear in
    ``nodes`` (keyed by weight target), loss = ``calibration_loss`` (a diagonal-Fisher estimate of
    how much an error at each output channel costs)."""
    targets = {n: n.args[1].target for n in nodes}
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    for sample in calibration:
        taps: dict[fx.Node, torch.Tensor] = {}
        probe = torch.zeros((), requires_grad=True)  # makes every tapped output part of the autograd graph

        class Tap(fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n in targets:
                    out = out + probe
                    out.retain_grad()
                    taps[n] = out
                return out

        with torch.enable_grad():
            calibration_loss(graph, sample, Tap(graph.gm).run(*sample), who).backward()
        for node, out in taps.items():
            grad = out.grad.detach().float().reshape(-1, out.shape[-1])
            sums[targets[node]] = sums.get(targets[node], 0) + grad.square().sum(0)
            rows[targets[node]] = rows.get(targets[node], 0) + grad.shape[0]
    return {t: s / rows[t] for t, s in sums.items()}
