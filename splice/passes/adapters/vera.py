"""``adapter.vera``: one frozen random low-rank pair shared by every layer, scaled per layer.

VeRA (https://arxiv.org/abs/2310.11454), as PEFT 0.21's ``VeraModel``/``VeraLayer``:
``ΔW = Λ_b B Λ_d A`` with ``vera_A [r, max_in]`` and ``vera_B [max_out, r]`` frozen, drawn once
(kaiming-uniform, gain √2, from ``torch.Generator().manual_seed(projection_prng_key)``: A first,
then B) at the largest in/out size of the targeted layers, and sliced per layer (``A[:, :in]``,
``B[:out]``). Per layer only ``lambda_d [r]`` (init ``d_initial``) and ``lambda_b [out]`` (init 0,
so outputs start unchanged) train. The pair is stored once (``adapters.<name>.vera_A`` /
``.vera_B``) and read by every layer's ``splice::vera_delta``; ONNX export keeps one initializer each.

As in PEFT, ``rank`` is not bounded by the layers' sizes (the paper uses r = 256…1024 on 768-wide
layers) and the layers may differ in shape. PEFT shares one pair between all VeRA adapters of a model
(and refuses a later adapter that does not fit it); splice gives each named adapter its own pair.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from splice.ir.graph import Graph
from splice.ir.select import select_nodes
from splice.passes.adapters._base import base_op
from splice.passes.adapters._common import AdapterConfig, Method, register_method
from splice.passes.adapters._inject import Layer, inject
from splice.passes.base import PassContext, PassResult, register_pass


@dataclass(frozen=True, kw_only=True)
class VeraConfig(AdapterConfig):
    """VeRA adapter (PEFT-compatible): shared frozen random A/B, trainable scaling vectors."""

    rank: int = field(default=256, metadata={"help": "r of the shared random matrices (PEFT's default 256)"})
    d_initial: float = field(default=0.1, metadata={"help": "initial value of every lambda_d entry"})
    projection_prng_key: int = field(default=0, metadata={"help": "seed of vera_A / vera_B (PEFT's projection_prng_key)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input, training only"})
    init: Literal["default", "random"] = field(default="default", metadata={
        "help": "default: lambda_b = 0 (outputs unchanged); random: lambda_b = 1, lambda_d ~ N(0, 1) (PEFT init_weights=False)"})

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def _delta_weight(t: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    out_f, in_f = shape
    d, b, va, vb, scale = (t[k].detach().float() for k in VERA.keys)
    return (b[:, None] * vb[:out_f]) @ (d[:, None] * va[:, :in_f]) * scale


VERA = register_method(Method("vera", torch.ops.splice.vera_delta.default,
                              ("lambda_d", "lambda_b", "vera_A", "vera_B", "scale"), ("lambda_d", "lambda_b"),
                              _delta_weight, shaped=True))


def kaiming_projection(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """PEFT's ``vera.model._kaiming_init``: U(±√3·√2/√fan_in), fan_in = ``shape[1]``."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def projections(rank: int, max_out: int, max_in: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``vera_A [r, max_in]``, ``vera_B [max_out, r]`` exactly as PEFT draws them from ``key``."""
    gen = torch.Generator().manual_seed(key)
    a = kaiming_projection((rank, max_in), gen)
    return a, kaiming_projection((max_out, rank), gen)


def largest_shape(graph: Graph, targets: str, who: str) -> tuple[int, int]:
    """The largest (out, in) over the targeted layers (PEFT's ``VeraModel._find_dim``)."""
    shapes = [base_op(n, who).shape(graph, n, who) for n in select_nodes(graph.gm, targets, ("linear",), who)]
    return max(s[0] for s in shapes), max(s[1] for s in shapes)


@register_pass("adapter.vera", VeraConfig, reference="https://arxiv.org/abs/2310.11454")
def vera(graph: Graph, cfg: VeraConfig, ctx: PassContext) -> PassResult:
    who = "adapter.vera"
    max_out, max_in = largest_shape(graph, cfg.targets, who)
    a, b = projections(cfg.rank, max_out, max_in, cfg.projection_prng_key)
    shared = {"vera_A": graph.add_tensor(f"adapters.{cfg.name}.vera_A", a),
              "vera_B": graph.add_tensor(f"adapters.{cfg.name}.vera_B", b)}
    gen = ctx.generator()

    def make(layer: Layer) -> dict:
        if cfg.init == "random":
            lam_d, lam_b = torch.randn(cfg.rank, generator=gen), torch.ones(layer.out_f)
        else:
            lam_d, lam_b = torch.full((cfg.rank,), float(cfg.d_initial)), torch.zeros(layer.out_f)
        return {"lambda_d": lam_d, "lambda_b": lam_b, **shared}

    meta = {"rank": cfg.rank, "d_initial": cfg.d_initial, "projection_prng_key": cfg.projection_prng_key,
            "dropout": cfg.dropout, "init": cfg.init, "scaling": 1.0}
    return inject(graph, cfg, who, VERA, ("linear",), make, meta)
