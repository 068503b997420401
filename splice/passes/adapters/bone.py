"""``adapter.bone``: MiSS (formerly Bone), a block-shared update, and its Bat variant.

MiSS/Bone (https://arxiv.org/abs/2409.15371), as PEFT 0.21's ``MissLinear`` (PEFT renamed Bone to
MiSS; ``peft_type`` ``MISS``, tensor ``miss_block``):

* ``variant=balance`` (PEFT ``init_weights=True``, the default): ``block [r, out]``; the input is
  zero-padded to a multiple of ``r`` and its ``r``-wide blocks are summed, ``Δy = (Σ_k x_k) block``,
  i.e. ``ΔW = blockᵀ`` repeated along ``in`` (cut to ``in``). ``splice::bone_delta``.
* ``variant=bat`` (PEFT ``init_weights="bat"``): ``block [out/r, r, r]``; every ``r×r`` block of the
  base weight becomes ``W_ij + W_ij B_i + B_i``, so the update depends on ``W``: ``splice::bat_linear``
  recomputes the layer as PEFT does, ``linear(x, W + ΔW, b)``, from the base's stored weight (a float
  base whose sizes are multiples of ``r``; one Bat adapter per layer, where PEFT would chain several
  on the updated weight).
* ``variant=mini`` (PEFT ``init_weights="mini"``): ``block [r, mini_rank]`` repeated along the
  output to ``[r, out]`` (``mini_rank`` must divide every layer's out-features), then as balance;
  ``r·mini_rank`` trainable values per layer. ``splice::bone_mini_delta``.

``init=zero`` (PEFT's default) leaves outputs unchanged; ``init=random`` is PEFT's
``init_weights=False`` (kaiming-uniform like ``nn.Linear``) for balance, and the same bound per block
for Bat and mini. ``rank`` is at most the layer's in-features
(PEFT's check); there is no scaling (PEFT refuses to scale MiSS), ``scale`` carries splice's adapter weight.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.kernels.adapters.adapter_math import bat_update
from splice.passes.adapters._base import float_base
from splice.passes.adapters._common import ADAPTER_REPORT, AdapterConfig, Method, attach, check_rank_dropout, register_method, sites
from splice.passes.adapters._inject import Layer, inject
from splice.passes.adapters._peft import PeftLoad, base_config, most_common, register_peft_format
from splice.passes.adapters.lora_peft import refuse_options
from splice.passes.base import PassContext, PassResult, register_pass


@dataclass(frozen=True, kw_only=True)
class BoneConfig(AdapterConfig):
    """MiSS/Bone adapter (PEFT's MISS): block-shared update, or the Bat form that reads W."""

    rank: int = field(default=64, metadata={"help": "r, the block width; at most every layer's in-features (PEFT's default 64)"})
    variant: Literal["balance", "bat", "mini"] = field(default="balance",
                                                       metadata={"help": "balance (PEFT default) | bat | mini"})
    mini_rank: int = field(default=1, metadata={"help": "mini: the block's width, dividing every out-features "
                                                         "(PEFT's mini_r)"})
    init: Literal["zero", "random"] = field(default="zero", metadata={"help": "zero (outputs unchanged) | random"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input, training only"})

    def __post_init__(self):
        super().__post_init__()
        check_rank_dropout(self.rank, self.dropout)
        if self.mini_rank < 1:
            raise ConfigError(f"adapter.bone: mini_rank must be >= 1, got {self.mini_rank}")


def balance_update(block: torch.Tensor, in_f: int) -> torch.Tensor:
    """``blockᵀ`` repeated along the input axis and cut to ``in_f`` (PEFT's ``get_delta_weight_miss``)."""
    r = block.shape[0]
    return block.T.repeat(1, -(-in_f // r))[:, :in_f]


def _balance_delta(t: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """Balance's ``ΔW``; a mini block (``[r, mini_r]``) is first repeated to ``[r, out]``."""
    block = t["block"].detach().float()
    return balance_update(block.repeat(1, shape[0] // block.shape[1]), shape[1]) * t["scale"].detach().float()


def _bat_affine(t: dict[str, torch.Tensor], w: torch.Tensor, b: torch.Tensor | None):
    return bat_update(w, t["block"].detach().float()) * t["scale"].detach().float(), None


BONE = register_method(Method("bone", torch.ops.splice.bone_delta.default, ("block", "scale"), ("block",),
                              _balance_delta, shaped=True))
BAT = register_method(Method("bone_bat", torch.ops.splice.bat_linear.default, ("block", "scale"), ("block",),
                             None, reads=("out", "x", "weight", "bias"), affine=_bat_affine, recomputes=True))
MINI = register_method(Method("bone_mini", torch.ops.splice.bone_mini_delta.default, ("block", "scale"), ("block",),
                              _balance_delta, shaped=True, reads=("x", "out")))
VARIANTS = {"balance": BONE, "bat": BAT, "mini": MINI}


def check_layer(who: str, variant: str, rank: int, layer: Layer, mini_rank: int = 1) -> None:
    """PEFT's ``MissLayer.update_layer`` checks, naming the layer."""
    if rank > layer.in_f:
        raise ConfigError(f"{who}: rank {rank} exceeds the in-features ({layer.in_f}) of layer '{layer.path}'")
    if variant == "bat" and (layer.in_f % rank or layer.out_f % rank):
        raise ConfigError(f"{who}: variant=bat needs in and out divisible by rank {rank}; layer '{layer.path}' "
                          f"is {layer.in_f} -> {layer.out_f}")
    if variant == "mini" and layer.out_f % mini_rank:
        raise ConfigError(f"{who}: variant=mini needs out-features divisible by mini_rank {mini_rank}; layer "
                          f"'{layer.path}' has {layer.out_f}")


def block_shape(variant: str, rank: int, out_f: int, mini_rank: int = 1) -> tuple[int, ...]:
    return {"bat": (out_f // rank, rank, rank), "mini": (rank, mini_rank)}.get(variant, (rank, out_f))


def _bat_layers(graph: Graph) -> set[str]:
    return {s.path for s in sites(graph) if s.method is BAT}


@register_pass("adapter.bone", BoneConfig, reference="https://arxiv.org/abs/2409.15371", provides=("adapter",),
               report_fields=ADAPTER_REPORT)
def bone(graph: Graph, cfg: BoneConfig, ctx: PassContext) -> PassResult:
    who, r = "adapter.bone", cfg.rank
    gen, has_bat = ctx.generator(), _bat_layers(graph)

    def make(layer: Layer) -> dict:
        check_layer(who, cfg.variant, r, layer, cfg.mini_rank)
        shape = block_shape(cfg.variant, r, layer.out_f, cfg.mini_rank)
        bound = 1 / math.sqrt(shape[-1])  # nn.Linear's kaiming_uniform(a=√5) on the block's fan-in
        block = torch.empty(shape).uniform_(-bound, bound, generator=gen) if cfg.init == "random" else torch.zeros(shape)
        if cfg.variant == "bat":
            float_base(graph, layer.node, who, "Bat")
            if layer.path in has_bat:
                raise ConfigError(f"{who}: layer '{layer.path}' already has a Bat adapter (one per layer)")
        return {"block": block}

    meta = {"rank": r, "variant": cfg.variant, "init": cfg.init, "dropout": cfg.dropout, "scaling": 1.0}
    return inject(graph, cfg, who, VARIANTS[cfg.variant], ("linear",), make, meta)


# ------------------------------------------------------------------------ PEFT mapping
# ``<path>.miss_block``: ``[r, out]`` (``init_weights`` true/false), ``[out/r, r, r]`` ("bat") or
# ``[r, mini_r]`` ("mini").
MISS_KEY = re.compile(r"(?P<path>.+)\.(?P<key>miss_block)")


def load_miss(job: PeftLoad) -> None:
    refuse_options(job)
    init = job.config.get("init_weights")
    variant = init if init in ("bat", "mini") else "balance"
    mini_r = int(job.config.get("mini_r") or 1)
    for mod, parts in job.modules(MISS_KEY, "MiSS miss_block").items():
        key, block = parts["miss_block"]
        first, *again = job.layers(mod, key)
        out_f, in_f = job.shape(first)
        lp = job.claim(first)
        r = block.shape[-1] if variant == "bat" else block.shape[0]
        if tuple(block.shape) != block_shape(variant, r, out_f, mini_r) or r > in_f or (variant == "bat" and in_f % r) \
                or (variant == "mini" and out_f % mini_r):
            want = {"bat": f"[{out_f}/r, r, r] with r dividing {in_f}",
                    "mini": f"[r, {mini_r}] with r <= {in_f} and mini_r dividing {out_f}"}.get(
                variant, f"[r, {out_f}] with r <= {in_f}")
            raise ConfigError(f"adapter.peft: {key} has shape {list(block.shape)}, expected {want} for '{lp}'")
        if variant == "bat":
            float_base(job.graph, first, "adapter.peft", "Bat")
        meta = {"rank": r, "variant": variant, "init": "peft", "dropout": float(job.config.get("miss_dropout") or 0.0),
                "scaling": 1.0, "weight": 1.0, "active": True, "source": str(job.path)}
        tensors = {"block": block.float().contiguous(), "scale": torch.tensor(1.0)}
        for node in (first, *again):
            tensors = attach(job.graph, node, job.name, VARIANTS[variant], tensors, meta)


def save_miss(graph: Graph, chosen: list) -> tuple[dict, dict]:
    """The block carries the adapter's weight (the update is linear in it); one rank, one variant
    and (mini) one block width."""
    ranks = {s.meta["rank"] for s in chosen}
    widths = {s.tensors(graph)["block"].shape[1] for s in chosen if s.method is MINI}
    if len(ranks) > 1 or len({s.method for s in chosen}) > 1 or len(widths) > 1:
        raise ConfigError(f"save_peft: MiSS adapter '{chosen[0].name}' mixes ranks {sorted(ranks)}, variants or "
                          "mini widths across layers; PEFT's MissConfig has one r, one init_weights and one mini_r")
    weights = {f"base_model.model.{s.path}.miss_block": (s.tensors(graph)["block"] * s.tensors(graph)["scale"])
               .detach().contiguous() for s in chosen}
    init = {BAT: "bat", MINI: "mini"}.get(chosen[0].method, True)
    config = {**base_config("MISS", graph, [s.path for s in chosen]), "r": ranks.pop(), "mini_r": widths.pop() if widths
              else 1, "bias": "none", "init_weights": init, "exclude_modules": None,
              "miss_dropout": most_common(s.meta.get("dropout", 0.0) for s in chosen)}
    return config, weights


register_peft_format("MISS", load=load_miss, save=save_miss, methods=("bone", "bone_bat", "bone_mini"))
