"""``adapter.ssf``: scale and shift the features after each targeted linear.

SSF (https://arxiv.org/abs/2210.08823; not in PEFT): per output channel a trainable scale ``γ``
and shift ``β`` after the layer, ``y·γ + β``. In the graph ``splice::ssf_delta(y, γ, β, scale) =
(γ - 1)·y + β`` is added to the base output (``scale``: the adapter's weight, 0 = off).
``init=default`` is the zero-effect start (γ = 1, β = 0: outputs unchanged exactly);
``init=random`` is the paper's code's init (γ ~ N(1, 0.02), β ~ N(0, 0.02)). SSF is a linear map
after a linear layer, so it folds exactly into the layer (the paper's re-parameterization):
``W' = diag(γ) W``, ``b' = γ·b + β``; a layer without bias gets one. Unfold restores the
original tensors (and removes the added bias). Attaches to float and quantized bases; folding
needs a float one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from splice.ir.graph import Graph
from splice.passes.adapters._common import ADAPTER_REPORT, AdapterConfig, Method, register_method
from splice.passes.adapters._inject import Layer, inject
from splice.passes.base import PassContext, PassResult, register_pass


@dataclass(frozen=True, kw_only=True)
class SSFConfig(AdapterConfig):
    """SSF adapter: per-channel scale and shift after each targeted layer, foldable into it."""

    init: Literal["default", "random"] = field(default="default", metadata={
        "help": "default: gamma = 1, beta = 0 (outputs unchanged); random: N(1, 0.02) / N(0, 0.02) (the paper's)"})


def _affine(t, w, b):
    g = t["scale"].detach().float()
    gamma, beta = t["gamma"].detach().float(), t["beta"].detach().float()
    shift = beta if b is None else (gamma - 1) * b + beta
    return (g * (gamma - 1))[:, None] * w, g * shift


SSF = register_method(Method("ssf", torch.ops.splice.ssf_delta.default, ("gamma", "beta", "scale"), ("gamma", "beta"),
                             None, reads=("out",), affine=_affine))


@register_pass("adapter.ssf", SSFConfig, reference="https://arxiv.org/abs/2210.08823", provides=("adapter",),
               report_fields=ADAPTER_REPORT)
def ssf(graph: Graph, cfg: SSFConfig, ctx: PassContext) -> PassResult:
    gen = ctx.generator()

    def make(layer: Layer) -> dict:
        if cfg.init == "random":
            return {"gamma": 1 + 0.02 * torch.randn(layer.out_f, generator=gen),
                    "beta": 0.02 * torch.randn(layer.out_f, generator=gen)}
        return {"gamma": torch.ones(layer.out_f), "beta": torch.zeros(layer.out_f)}

    return inject(graph, cfg, "adapter.ssf", SSF, ("linear",), make, {"init": cfg.init, "scaling": 1.0})
