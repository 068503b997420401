"""``adapter.tera``: a high-rank update from a frozen random tensor network, trained through vectors.

TeRA (https://arxiv.org/abs/2509.03234; the task brief cites it as 2509.25814): the ``[out, in]``
update is tensorized as ``[o1, o2, i1, i2]`` (``out = o1·o2``, ``in = i1·i2``, each split as evenly as
its divisors allow) and written as a Tucker-like network
``ΔW = scale · C ×₁ F1·diag(λ1) ×₂ F2·diag(λ2) ×₃ F3·diag(λ3) ×₄ F4·diag(λ4)``. The core ``C`` and the
factors ``F_n [I_n, r_n]`` are random and frozen, generated from ``(seed, shape)`` and stored once
per shape, shared by every layer of that shape (as the paper shares them across layers); only the
layer's diagonal vectors ``λ = [λ1 λ2 λ3 λ4]`` (``lam``, ``Σ r_n`` numbers) train. Mode ranks are
``r_n = min(rank, I_n)``, so the matricized update reaches rank ``min(r1·r2, r3·r4)`` from ``Σ r_n``
parameters (a 576×576 layer at rank 24: full rank 576 from 96 numbers; LoRA needs 1152 per rank).

Init: ``C ~ N(0, 1/Π r_n)``; ``F_n`` random with orthonormal columns, times ``√I_n`` for the two output
modes (so with ``λ = 1`` the update's entries have variance ``1/in``, like a fan-in-scaled weight, and
orthonormal factors keep the update as well conditioned as the core); ``λ1 = 0``, ``λ2..4 = 1``, so
the update starts at exactly zero; ``scale = alpha``. The op materializes ``ΔW`` (out×in) per call; ORT folds it
at load when unfolded, and folding removes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from splice.ir.graph import Graph
from splice.kernels.adapters.factored import tera_update
from splice.passes.adapters._common import ADAPTER_REPORT, AdapterConfig, Method, check_rank, register_method
from splice.passes.adapters._inject import (
    FrozenRandom,
    Layer,
    check_options,
    inject,
    orthonormal,
)
from splice.passes.base import PassContext, PassResult, register_pass

_FACTORS = ("F1", "F2", "F3", "F4")


@dataclass(frozen=True, kw_only=True)
class TeraConfig(AdapterConfig):
    """TeRA adapter: frozen random Tucker network, trainable diagonal vectors (high rank, few params)."""

    rank: int = field(default=8, metadata={"help": "Tucker rank per tensor mode (capped at the mode size), at most min(in, out)"})
    alpha: float = field(default=1.0, metadata={"help": "scale of the update"})
    seed: int = field(default=0, metadata={"help": "seed of the random core and factors (with their shapes)"})

    def __post_init__(self):
        super().__post_init__()
        check_options(self, at_least_one=("rank",), positive=("alpha",))


def split_dim(n: int) -> tuple[int, int]:
    """``n = a·b`` with ``a`` the largest divisor ``<= √n`` (576 -> (24, 24), 1536 -> (32, 48))."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def _delta_weight(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return tera_update(*(t[k].detach().float() for k in ("lam", "core", *_FACTORS))) * t["scale"].detach().float()


TERA = register_method(Method("tera", torch.ops.splice.tera_delta.default, ("lam", "core", *_FACTORS, "scale"),
                              ("lam",), _delta_weight))


@register_pass("adapter.tera", TeraConfig, reference="https://arxiv.org/abs/2509.03234", provides=("adapter",),
               report_fields=ADAPTER_REPORT)
def tera(graph: Graph, cfg: TeraConfig, ctx: PassContext) -> PassResult:
    who = "adapter.tera"
    shared = FrozenRandom(graph, cfg.name, cfg.seed)

    def make(layer: Layer):
        check_rank(who, cfg.rank, layer.path, layer.out_f, layer.in_f)
        dims = (*split_dim(layer.out_f), *split_dim(layer.in_f))
        ranks = tuple(min(cfg.rank, d) for d in dims)
        gains = (math.sqrt(dims[0]), math.sqrt(dims[1]), 1.0, 1.0)
        factors = {k: shared.get(k, (d, r), lambda shape, gen, g=g: g * orthonormal(*shape, gen))
                   for k, d, r, g in zip(_FACTORS, dims, ranks, gains)}
        lam = torch.ones(sum(ranks))
        lam[:ranks[0]] = 0
        core = shared.get("core", ranks, lambda shape, gen: torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape)))
        return {"lam": lam, "core": core, **factors}

    meta = {"rank": cfg.rank, "alpha": cfg.alpha, "seed": cfg.seed, "scaling": cfg.alpha}
    return inject(graph, cfg, who, TERA, ("linear",), make, meta)
