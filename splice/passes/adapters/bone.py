"""``adapter.bone``: MiSS (formerly Bone), a block-shared update, and its Bat variant.

MiSS/Bone (https://arxiv.org/abs/2409.15371), as PEFT 0.21's ``MissLinear`` (PEFT renamed Bone to
MiSS; ``peft_type`` ``MISS``, tensor ``miss_block``):

* ``variant=balance`` (PEFT ``init_weights=True``, the default): ``block [r, out]``; the input is
  zero-padded to a multiple of ``r`` and its ``r``-wide blocks are summed, ``Δy = (Σ_k x_k) block``,
  i.e. ``ΔW = blockᵀ`` repeated along ``in`` (cut to ``in``). ``splice::bone_delta``.
* ``variant=bat`` (PEFT ``init_weights="bat"``): ``block [out/r, r, r]``; every ``r×r`` block of the
  base weight becomes ``W_ij + W_ij B_i + B_i``, so the update depends on ``W``: ``splice::bone_bat_delta``
  reads the base's stored weight (a float base whose sizes are multiples of ``r``; one Bat adapter per layer,
  where PEFT would chain several on the updated weight).

``init=zero`` (PEFT's default) leaves outputs unchanged; ``init=random`` is PEFT's
``init_weights=False`` (kaiming-uniform like ``nn.Linear``) for balance, and the same bound per block
for Bat. PEFT's ``mini`` variant is not supported. ``rank`` is at most the layer's in-features
(PEFT's check); there is no scaling (PEFT refuses to scale MiSS), ``scale`` carries splice's adapter weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.kernels.adapter_math import bat_update
from splice.passes.adapters._base import float_base
from splice.passes.adapters._common import AdapterConfig, Method, register_method, sites
from splice.passes.adapters._inject import Layer, inject
from splice.passes.base import PassContext, PassResult, register_pass


@dataclass(frozen=True, kw_only=True)
class BoneConfig(AdapterConfig):
    """MiSS/Bone adapter (PEFT's MISS): block-shared update, or the Bat form that reads W."""

    rank: int = field(default=64, metadata={"help": "r, the block width; at most every layer's in-features (PEFT's default 64)"})
    variant: Literal["balance", "bat"] = field(default="balance", metadata={"help": "balance (PEFT default) | bat"})
    init: Literal["zero", "random"] = field(default="zero", metadata={"help": "zero (outputs unchanged) | random"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input, training only"})

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def balance_update(block: torch.Tensor, in_f: int) -> torch.Tensor:
    """``blockᵀ`` repeated along the input axis and cut to ``in_f`` (PEFT's ``get_delta_weight_miss``)."""
    r = block.shape[0]
    return block.T.repeat(1, -(-in_f // r))[:, :in_f]


def _balance_delta(t: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    return balance_update(t["block"].detach().float(), shape[1]) * t["scale"].detach().float()


def _bat_affine(t: dict[str, torch.Tensor], w: torch.Tensor, b: torch.Tensor | None):
    return bat_update(w, t["block"].detach().float()) * t["scale"].detach().float(), None


BONE = register_method(Method("bone", torch.ops.splice.bone_delta.default, ("block", "scale"), ("block",),
                              _balance_delta, shaped=True))
BAT = register_method(Method("bone_bat", torch.ops.splice.bone_bat_delta.default, ("block", "scale"), ("block",),
                             None, reads=("x", "weight"), affine=_bat_affine))


def check_layer(who: str, variant: str, rank: int, layer: Layer) -> None:
    """PEFT's ``MissLayer.update_layer`` checks, naming the layer."""
    if rank > layer.in_f:
        raise ConfigError(f"{who}: rank {rank} exceeds the in-features ({layer.in_f}) of layer '{layer.path}'")
    if variant == "bat" and (layer.in_f % rank or layer.out_f % rank):
        raise ConfigError(f"{who}: variant=bat needs in and out divisible by rank {rank}; layer '{layer.path}' "
                          f"is {layer.in_f} -> {layer.out_f}")


def block_shape(variant: str, rank: int, out_f: int) -> tuple[int, ...]:
    return (out_f // rank, rank, rank) if variant == "bat" else (rank, out_f)


def _bat_layers(graph: Graph) -> set[str]:
    return {s.path for s in sites(graph) if s.method is BAT}


@register_pass("adapter.bone", BoneConfig, reference="https://arxiv.org/abs/2409.15371")
def bone(graph: Graph, cfg: BoneConfig, ctx: PassContext) -> PassResult:
    who, r = "adapter.bone", cfg.rank
    gen, has_bat = ctx.generator(), _bat_layers(graph)

    def make(layer: Layer) -> dict:
        check_layer(who, cfg.variant, r, layer)
        shape = block_shape(cfg.variant, r, layer.out_f)
        bound = 1 / math.sqrt(shape[-1])  # nn.Linear's kaiming_uniform(a=√5) on the block's fan-in
        block = torch.empty(shape).uniform_(-bound, bound, generator=gen) if cfg.init == "random" else torch.zeros(shape)
        if cfg.variant == "bat":
            float_base(graph, layer.node, who, "Bat")
            if layer.path in has_bat:
                raise ConfigError(f"{who}: layer '{layer.path}' already has a Bat adapter (one per layer)")
        return {"block": block}

    meta = {"rank": r, "variant": cfg.variant, "init": cfg.init, "dropout": cfg.dropout, "scaling": 1.0}
    return inject(graph, cfg, who, BAT if cfg.variant == "bat" else BONE, ("linear",), make, meta)
