"""``prune.dpruner``: D-Pruner — unstructured pruning that keeps a domain's weights and the general
ones. https://arxiv.org/abs/2405.06275

Three steps, as the paper: (1) general importance of every weight from an open-domain calibration
set (the ``general`` set: ``--calib-set general=builtin``), the loss change of removing it to second
order with the empirical Fisher as Hessian, ``G = |g·w − ½ F w²|``; (2) a domain objective that keeps
those weights, ``L_dom + λ Σ G (w − w₀)²`` (the regularizer has no gradient at ``w₀`` and adds
``2λG`` to the curvature); (3) the importance under that objective on the domain calibration set
(``--calib``), ``S = |g_dom·w − ½ (F_dom + 2λG) w²|``; the lowest ``S`` of each output row (or layer)
are pruned. Gradients and Fisher come from per-sample backward passes of the label-free loss
(``passes/instrument/gradients.py``). The paper's code is not public; this follows its equations.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.ir.graph import Graph
from splice.ir.loss import has_label_free_loss
from splice.ir.sparsity import mask_of
from splice.passes.base import Applies, PassContext, PassResult, register_pass
from splice.passes.instrument.gradients import weight_fisher
from splice.passes.prune._common import (HIDDEN_LINEAR, PRUNE_REPORT, PruneConfig, apply_masks, prunable,
                                         smallest_dropped, with_prior)

# gradients need a loss without labels: an LM's logits or a classifier's scores
WITH_LOSS = Applies("a hidden linear layer, and logits or class scores out", kinds=("linear",),
                    check=lambda g: HIDDEN_LINEAR(g) and has_label_free_loss(g))


@dataclass(frozen=True, kw_only=True)
class DPrunerConfig(PruneConfig):
    """D-Pruner: domain-specific pruning from a general and a domain calibration set."""

    lam: float = field(default=0.1, metadata={"help": "weight λ of the general-importance regularizer"})
    per_row: bool = field(default=True, metadata={"help": "compare scores within each output row, else per layer"})

    def __post_init__(self):
        super().__post_init__()
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")


def taylor_importance(w: torch.Tensor, grad: torch.Tensor, curvature: torch.Tensor) -> torch.Tensor:
    """``|g·w − ½ c·w²|``: the loss change of setting each weight to zero, to second order."""
    return (grad * w - 0.5 * curvature * w.square()).abs()


@register_pass("prune.dpruner", DPrunerConfig, reference="https://arxiv.org/abs/2405.06275", needs_calibration=True,
               datasets=("general",), report_fields=PRUNE_REPORT, applies=WITH_LOSS)
def dpruner(graph: Graph, cfg: DPrunerConfig, ctx: PassContext) -> PassResult:
    nodes = prunable(graph, cfg, ("linear",), "prune.dpruner")
    targets = sorted({n.args[1].target for n in nodes})
    g_gen, f_gen = weight_fisher(graph, targets, ctx.datasets["general"], "prune.dpruner")
    general = {t: taylor_importance(graph.tensor(t).detach().float(), g_gen[t], f_gen[t]) for t in targets}
    del g_gen, f_gen
    g_dom, f_dom = weight_fisher(graph, targets, ctx.calibration, "prune.dpruner")

    def decide(node, w):
        t = node.args[1].target
        score = taylor_importance(w.float(), g_dom[t], f_dom[t] + 2 * cfg.lam * general[t])
        return smallest_dropped(with_prior(score, mask_of(graph, node)), cfg.sparsity, per_row=cfg.per_row)

    return PassResult(graph, True, apply_masks(graph, nodes, decide))
