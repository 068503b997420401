"""The label-free loss of a graph on calibration samples, and the loss along the straight line
between two weight sets (linear mode connectivity: Frankle et al., https://arxiv.org/abs/1912.05671).

The loss needs no labels: next-token cross-entropy of ``logits`` on the calibration tokens for a
language model (LLM-Pruner's, https://arxiv.org/abs/2305.11627), cross-entropy against the model's
own top prediction for a classifier (a CNN's or ViT's class scores). A graph with neither (a bare
encoder's hidden states) has no such loss and is refused.

A path's *barrier* is the largest excess of the loss over the straight line between the endpoints'
losses, ``max_α loss(α) − ((1 − α)·loss(0) + α·loss(1))`` (Ainsworth et al.,
https://arxiv.org/abs/2209.04836): 0 when the models are linearly mode connected.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from splice.errors import ConfigError
from splice.ir.graph import Graph, set_attr

Loss = Callable[[Graph, tuple, tuple], torch.Tensor]  # (graph, sample, its outputs) -> scalar


def has_label_free_loss(graph: Graph) -> bool:
    """Whether ``calibration_loss`` applies: a 3-D ``logits`` over ``input_ids``, or 2-D class scores first."""
    out = next(n for n in graph.gm.graph.nodes if n.op == "output").args[0]
    vals = [getattr(a, "meta", {}).get("val") for a in (out if isinstance(out, (tuple, list)) else [out])]
    shapes = dict(zip(graph.output_names, [None if v is None else v.dim() for v in vals]))
    if "logits" in shapes and "input_ids" in graph.input_names and shapes["logits"] == 3:
        return True
    return bool(vals) and vals[0] is not None and vals[0].dim() == 2 and vals[0].is_floating_point()


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


def mean_loss(graph: Graph, calibration: Sequence[tuple], who: str, loss: Loss | None = None) -> float:
    """The mean over ``calibration`` of ``loss`` (default: ``calibration_loss``) without gradients."""
    fn = loss or (lambda g, sample, outputs: calibration_loss(g, sample, outputs, who))
    with torch.no_grad():
        return sum(float(fn(graph, s, graph.gm(*s))) for s in calibration) / len(calibration)


def interpolated(graph: Graph, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float) -> Graph:
    """A copy of ``graph`` whose float tensors in ``a`` are ``(1 − alpha)·a + alpha·b`` (exactly
    ``a`` at 0 and ``b`` at 1); ``b`` is keyed by ``graph``'s targets like ``a``."""
    out = graph.copy()
    for target, x in a.items():
        if x.is_floating_point():
            set_attr(out.gm, target, torch.lerp(x.detach(), b[target].detach().to(x.dtype), alpha))
    return out


def loss_path(graph: Graph, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], calibration: Sequence[tuple],
              weights: Sequence[float], who: str, loss: Loss | None = None) -> dict:
    """``mean_loss`` at each of ``weights`` along the line from weights ``a`` to ``b``
    (``interpolated``) and the path's ``barrier``: ``{"losses": [...], "barrier": x}``."""
    losses = [mean_loss(interpolated(graph, a, b, alpha), calibration, who, loss) for alpha in weights]
    return {"losses": losses, "barrier": barrier(weights, losses)}


def barrier(weights: Sequence[float], losses: Sequence[float]) -> float:
    """The path's barrier (module docstring); ``weights`` run from 0 to 1."""
    return max(loss - ((1 - alpha) * losses[0] + alpha * losses[-1]) for alpha, loss in zip(weights, losses))


def alphas(points: int) -> list[float]:
    """``points`` evenly spaced interpolation weights from 0 to 1 (at least the two endpoints)."""
    return [i / (points - 1) for i in range(points)]
