"""``adapter.svfit``: fine-tune only the top singular values of each weight.

SVFit (https://arxiv.org/abs/2409.05926): with ``W = U·diag(s)·Vᵀ`` the SVD of the (float; a
quantized base is dequantized) base weight, the ``rank`` largest singular values train and the
singular vectors stay frozen: ``W' = W + U_r·diag(Δs)·V_rᵀ``, ``Δs = 0`` at init, so outputs start
unchanged exactly and every update lies in ``span(U_r) ⊗ span(V_r)``. Trainable: ``rank`` numbers per
layer. The base weight is not rewritten (the adapter carries ``U_r [out, r]``, ``Δs [r]`` (``ds``)
and ``V_rᵀ [r, in]`` (``Vh``), frozen except ``ds``), so it folds into float and quantized bases alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from splice.ir.graph import Graph
from splice.passes.adapters._common import ADAPTER_REPORT, AdapterConfig, Method, check_rank, register_method
from splice.passes.adapters._inject import (
    Layer,
    check_options,
    inject,
    principal,
    svd_delta_weight,
)
from splice.passes.base import PassContext, PassResult, register_pass


@dataclass(frozen=True, kw_only=True)
class SvfitConfig(AdapterConfig):
    """SVFit adapter: train only the top-r singular values of each weight."""

    rank: int = field(default=8, metadata={"help": "singular values trained per layer, at most min(in, out)"})

    def __post_init__(self):
        super().__post_init__()
        check_options(self, at_least_one=("rank",))


SVFIT = register_method(Method("svfit", torch.ops.splice.svfit_delta.default, ("U", "ds", "Vh", "scale"), ("ds",),
                               partial(svd_delta_weight, s_key="ds")))


@register_pass("adapter.svfit", SvfitConfig, reference="https://arxiv.org/abs/2409.05926", provides=("adapter",),
               report_fields=ADAPTER_REPORT)
def svfit(graph: Graph, cfg: SvfitConfig, ctx: PassContext) -> PassResult:
    who = "adapter.svfit"

    def make(layer: Layer):
        check_rank(who, cfg.rank, layer.path, layer.out_f, layer.in_f)
        u, s, vh = principal(layer.handler.weight(graph, layer.node), cfg.rank)
        return {"U": u, "ds": torch.zeros_like(s), "Vh": vh}

    return inject(graph, cfg, who, SVFIT, ("linear",), make, {"rank": cfg.rank, "scaling": 1.0})
