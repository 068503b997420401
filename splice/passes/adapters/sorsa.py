"""``adapter.sorsa``: principal singular components trainable, kept orthonormal by a regularizer.

SORSA (https://arxiv.org/abs/2409.00055): ``W = W_res + U_p·diag(S_p)·V_pᵀ`` where ``U_p [out, r]``,
``S_p [r]``, ``V_pᵀ [r, in]`` (``Vh``) are the top-``rank`` SVD components of the float base weight
(all three train) and the base keeps the frozen residual ``W_res`` (as PiSSA), so outputs are
unchanged at init up to float rounding. Training adds ``γ·(‖U_pᵀU_p − I‖²_F + ‖V_pᵀ V_p − I‖²_F)``
(``V_pᵀ V_p`` is ``Vh·Vhᵀ`` here) to the loss through a ``splice.train`` hook: it is 0 at init and its
gradient pulls the singular vectors back toward orthonormal. The paper applies the regularizer's
gradient with its own step size; here it is a loss term weighted by ``gamma`` (per adapter, read
from the graph when training starts). Needs a float base (it rewrites W); trainable per layer:
``rank·(in + out + 1)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from splice.errors import ConfigError
from splice.ir.graph import Graph, get_attr
from splice.ir.train_hooks import TrainHook, register_train_hook
from splice.passes.adapters._common import ADAPTER_REPORT, AdapterConfig, Method, check_rank, register_method, sites
from splice.passes.adapters._inject import (
    Layer,
    check_options,
    inject,
    principal,
    svd_delta_weight,
)
from splice.passes.base import PassContext, PassResult, register_pass


@dataclass(frozen=True, kw_only=True)
class SorsaConfig(AdapterConfig):
    """SORSA adapter: trainable principal singular components with an orthonormal regularizer."""

    rank: int = field(default=8, metadata={"help": "principal components per layer, at most min(in, out)"})
    gamma: float = field(default=4e-4, metadata={"help": "weight of the orthonormal regularizer in the loss"})

    def __post_init__(self):
        super().__post_init__()
        check_options(self, at_least_one=("rank",), non_negative=("gamma",))


SORSA = register_method(Method("sorsa", torch.ops.splice.sorsa_delta.default, ("U", "S", "Vh", "scale"),
                               ("U", "S", "Vh"), partial(svd_delta_weight, s_key="S")))


@register_pass("adapter.sorsa", SorsaConfig, reference="https://arxiv.org/abs/2409.00055", provides=("adapter",),
               report_fields=ADAPTER_REPORT)
def sorsa(graph: Graph, cfg: SorsaConfig, ctx: PassContext) -> PassResult:
    who = "adapter.sorsa"

    def make(layer: Layer):
        check_rank(who, cfg.rank, layer.path, layer.out_f, layer.in_f)
        if layer.handler.set_weight is None:
            raise ConfigError(f"{who}: layer '{layer.path}' is quantized; SORSA rewrites the base weight "
                              "(add the adapter before quantizing)")
        if layer.calls > 1:
            raise ConfigError(f"{who}: layer '{layer.path}' is called {layer.calls} times; its shared weight "
                              "cannot hold one residual per call (exclude it from targets)")
        w = layer.handler.weight(graph, layer.node)
        u, s, vh = principal(w, cfg.rank)
        layer.handler.set_weight(graph, [layer.node], w - (u * s) @ vh)
        return {"U": u, "S": s, "Vh": vh}

    return inject(graph, cfg, who, SORSA, ("linear",), make, {"rank": cfg.rank, "gamma": cfg.gamma, "scaling": 1.0})


def orthonormal_penalty(u: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """``‖UᵀU − I‖²_F + ‖Vh·Vhᵀ − I‖²_F`` for ``U [out, r]``, ``Vh [r, in]``."""
    eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    return (u.T @ u - eye).square().sum() + (vh @ vh.T - eye).square().sum()


class SorsaRegularizer(TrainHook):
    """Adds ``Σ_layers γ·orthonormal_penalty(U, Vh)`` over the graph's SORSA adapters to the loss."""

    def __init__(self, terms: list[tuple[float, torch.Tensor, torch.Tensor]]):
        self.terms = terms

    def regularizer(self, step: int, total: int) -> torch.Tensor | None:
        return sum(gamma * orthonormal_penalty(u, vh) for gamma, u, vh in self.terms)


@register_train_hook
def sorsa_hook(graph: Graph) -> SorsaRegularizer | None:
    terms = {}
    for s in sites(graph):
        if s.method is SORSA and s.meta["gamma"] > 0:
            nodes = s.nodes()
            terms[nodes["U"].target] = (s.meta["gamma"], *(get_attr(graph.gm, nodes[k].target) for k in ("U", "Vh")))
    return SorsaRegularizer(list(terms.values())) if terms else None
