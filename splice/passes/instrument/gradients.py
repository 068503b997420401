"""Gradients of the stored weights on calibration data: the instrumented gradient pass behind
first-order (Taylor) importance, and the loss every gradient-based statistic of a pass uses.

The loss needs no labels: next-token cross-entropy of ``logits`` on the calibration tokens for a
language model (LLM-Pruner's, https://arxiv.org/abs/2305.11627), cross-entropy against the model's
own top prediction for a classifier (a CNN's or ViT's class scores). A graph with neither (a bare
encoder's hidden states) has no such loss and is refused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from splice.errors import ConfigError
from splice.ir.graph import Graph, set_attr


def calibration_loss(graph: Graph, sample: tuple, outputs, who: str) -> torch.Tensor:
    """The label-free loss of ``outputs`` (the graph's outputs on ``sample``; see the module docstring)."""
    if "logits" in graph.output_names and "input_ids" in graph.input_names:
        logits = outputs[graph.output_names.index("logits")]
        ids = sample[graph.input_names.index("input_ids")]
        if logits.dim() == 3:
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    first = outputs[0]
    if first.dim() == 2 and first.is_floating_point():
        return F.cross_entropy(first.float(), first.detach().argmax(-1))
    raise ConfigError(f"{who}: needs a loss without labels, i.e. a 'logits' output over input_ids or class "
                      f"scores [batch, classes]; this graph outputs {', '.join(graph.output_names)} "
                      f"{tuple(first.shape)}")


_RUNNING_STATS = {torch.ops.aten._native_batch_norm_legit_no_training.default: (3, 4),
                  torch.ops.aten.batch_norm.default: (3, 4)}


def running_stats(graph: Graph) -> set[str]:
    """Stored tensors read as a batch norm's running mean/variance (statistics, not differentiable)."""
    return {node.args[i].target for node in graph.gm.graph.nodes for i in _RUNNING_STATS.get(node.target, ())
            if len(node.args) > i and getattr(node.args[i], "op", None) == "get_attr"}


def weight_gradients(graph: Graph, targets: list[str], calibration: list[tuple], who: str) -> dict[str, torch.Tensor]:
    """``∂loss/∂W`` of each stored tensor in ``targets`` (batch-norm running statistics left out),
    summed over the calibration samples (``calibration_loss`` per sample), on a copy of ``graph``
    whose other tensors stay frozen."""
    targets = [t for t in targets if t not in running_stats(graph)]
    work = graph.copy()
    params = {t: torch.nn.Parameter(graph.tensor(t).detach().clone().float(), requires_grad=True) for t in targets}
    for t, p in params.items():
        set_attr(work.gm, t, p, trainable=True)
    with torch.enable_grad():
        for sample in calibration:
            calibration_loss(work, sample, work.gm(*sample), who).backward()
    return {t: (p.grad if p.grad is not None else torch.zeros_like(p)).detach() for t, p in params.items()}
