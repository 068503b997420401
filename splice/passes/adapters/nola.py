"""``adapter.nola``: LoRA whose factors are linear combinations of frozen random bases.

NOLA (https://arxiv.org/abs/2310.02556): ``ΔW = scale · B A`` with ``A = Σ_k α_k A_k`` and
``B = Σ_k β_k B_k``; the bases ``A_k [r, in]`` and ``B_k [out, r]`` are random and frozen, only the
``2·num_basis`` coefficients ``α`` (``coef_a``) and ``β`` (``coef_b``) train, whatever the layer's size.
Init: bases uniform like LoRA's (``A_k`` in ±1/√in, ``B_k`` in ±1/√r), ``α`` in ±1/√k, ``β = 0``, so the
update starts at exactly zero (as LoRA's ``B = 0``); ``scale = alpha / rank``.

Storage (honest bytes): the bases are stored in the graph (``adapters.<name>.basis_a_<k>x<r>x<in>``)
and exported as ONNX initializers, once per layer shape: every layer of one shape reads the same
bases (generated from ``(seed, shape)``; NOLA's compact checkpoint is ``seed`` plus the coefficients,
and the bases regenerate from the seed exactly). Unfolded, ORT folds ``A``/``B`` at load and runs
LoRA's two Gemms; folded, nothing remains.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from splice.ir.graph import Graph
from splice.kernels.adapters.factored import nola_factors
from splice.passes.adapters._common import ADAPTER_REPORT, AdapterConfig, Method, check_rank, register_method
from splice.passes.adapters._inject import (
    FrozenRandom,
    Layer,
    check_options,
    inject,
    uniform,
)
from splice.passes.base import PassContext, PassResult, register_pass


@dataclass(frozen=True, kw_only=True)
class NolaConfig(AdapterConfig):
    """NOLA adapter: LoRA factors as trainable combinations of frozen random bases."""

    rank: int = field(default=8, metadata={"help": "r of the basis matrices, at most min(in, out) of every layer"})
    num_basis: int = field(default=64, metadata={"help": "k: random bases for A and for B (2k trainable per layer)"})
    alpha: float = field(default=8.0, metadata={"help": "scale = alpha / rank"})
    seed: int = field(default=0, metadata={"help": "seed of the random bases (with the layer shape)"})

    def __post_init__(self):
        super().__post_init__()
        check_options(self, at_least_one=("rank", "num_basis"), positive=("alpha",))


def _delta_weight(t: dict[str, torch.Tensor]) -> torch.Tensor:
    a, b = nola_factors(*(t[k].detach().float() for k in ("coef_a", "coef_b", "basis_a", "basis_b")))
    return (b @ a) * t["scale"].detach().float()


NOLA = register_method(Method("nola", torch.ops.splice.nola_delta.default,
                              ("coef_a", "coef_b", "basis_a", "basis_b", "scale"), ("coef_a", "coef_b"), _delta_weight))


@register_pass("adapter.nola", NolaConfig, reference="https://arxiv.org/abs/2310.02556", provides=("adapter",),
               report_fields=ADAPTER_REPORT)
def nola(graph: Graph, cfg: NolaConfig, ctx: PassContext) -> PassResult:
    who, k, r = "adapter.nola", cfg.num_basis, cfg.rank
    bases, gen = FrozenRandom(graph, cfg.name, cfg.seed), ctx.generator()

    def make(layer: Layer):
        check_rank(who, r, layer.path, layer.out_f, layer.in_f)
        return {"coef_a": uniform(1 / math.sqrt(k))((k,), gen), "coef_b": torch.zeros(k),
                "basis_a": bases.get("basis_a", (k, r, layer.in_f), uniform(1 / math.sqrt(layer.in_f))),
                "basis_b": bases.get("basis_b", (k, layer.out_f, r), uniform(1 / math.sqrt(r)))}

    meta = {"rank": r, "num_basis": k, "alpha": cfg.alpha, "seed": cfg.seed, "scaling": cfg.alpha / r}
    return inject(graph, cfg, who, NOLA, ("linear",), make, meta)
