"""``adapter.s2ft``: structured sparse fine-tuning (S2FT, https://arxiv.org/abs/2412.06289).

S2FT trains a few whole channels of each layer: "sparse selection, dense computation". In the
paper's ``x W`` notation it updates the selected rows of the output projections (attention heads
of ``W_O``, channels of ``W_down``); in PyTorch's ``[out, in]`` layout those are *input columns*,
``side="in"`` (``splice::col_delta``: gathers the chosen input features, then one small GEMM).
``side="out"`` trains chosen output rows instead (``splice::row_delta``: a GEMM for the chosen
rows only), the paper's choice for the input side (``W_Q/K/V``, ``W_up``). Channels are chosen in
units of ``group`` (``group=head_dim`` picks whole heads), at random (seeded, the paper's default)
or by the largest L2 norm of the unit's weights. The update touches only the chosen rows/columns;
``values`` start at zero. Matches the paper's ``targets=o_proj|down_proj, side=in``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.passes.adapters._common import ADAPTER_REPORT, AdapterConfig
from splice.passes.adapters._sparse import attach_per_layer, channel_update, check_fraction, count
from splice.passes.base import PassContext, PassResult, register_pass


@dataclass(frozen=True, kw_only=True)
class S2ftConfig(AdapterConfig):
    """S2FT: train only chosen input columns (heads / FFN channels) or output rows of each layer."""

    fraction: float = field(default=0.1, metadata={"help": "fraction of each layer's channel units trained (0, 1]"})
    side: Literal["in", "out"] = field(default="in", metadata={"help": "in: input columns; out: output rows"})
    group: int = field(default=1, metadata={"help": "channels per unit (head_dim: whole heads)"})
    select: Literal["random", "norm"] = field(default="random", metadata={"help": "random (seeded) | norm (largest L2)"})

    def __post_init__(self):
        super().__post_init__()
        check_fraction("fraction", self.fraction)
        if self.group < 1:
            raise ValueError(f"group must be >= 1, got {self.group}")


def channel_mask(w: torch.Tensor, cfg: S2ftConfig, gen: torch.Generator, path: str) -> torch.Tensor:
    """Bool mask over the chosen side's channels, whole ``group``-sized units at a time."""
    axis = 1 if cfg.side == "in" else 0
    dim = w.shape[axis]
    if dim % cfg.group:
        raise ConfigError(f"adapter.s2ft: group {cfg.group} does not divide the {dim} {cfg.side}put channels of "
                          f"layer '{path}'")
    units = dim // cfg.group
    k = count(cfg.fraction, units)
    if cfg.select == "random":
        chosen = torch.randperm(units, generator=gen)[:k]
    else:
        norms = w.movedim(axis, 0).reshape(units, -1).norm(dim=1)
        chosen = norms.topk(k).indices
    unit_mask = torch.zeros(units, dtype=torch.bool)
    unit_mask[chosen] = True
    return unit_mask.repeat_interleave(cfg.group)


@register_pass("adapter.s2ft", S2ftConfig, reference="https://arxiv.org/abs/2412.06289", provides=("adapter",),
               report_fields=ADAPTER_REPORT)
def s2ft(graph: Graph, cfg: S2ftConfig, ctx: PassContext) -> PassResult:
    gen = ctx.generator()

    def build(path, w):
        mask = channel_mask(w, cfg, gen, path)
        method, tensors = channel_update(mask, cfg.side, w)
        return method, tensors, {"channels": int(mask.sum()), "trainable": tensors["values"].numel()}

    meta = {"fraction": cfg.fraction, "side": cfg.side, "group": cfg.group, "select": cfg.select}
    return PassResult(graph, True, attach_per_layer(graph, cfg, "adapter.s2ft", build, meta))
