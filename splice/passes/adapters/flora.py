"""``adapter.flora``: a Tucker-form update beside each targeted 2-D convolution.

FLoRA (https://arxiv.org/abs/2403.14541) keeps a conv weight's 4-D structure instead of flattening
it for LoRA: ``ΔW = scale · G ×₁ U_out ×₂ U_in ×₃ U_h ×₄ U_w`` with a small core ``G [r_o, r_i, r_h, r_w]``
and factors ``U_out [O, r_o]``, ``U_in [I/groups, r_i]``, ``U_h [kh, r_h]``, ``U_w [kw, r_w]``, all trainable.
The delta op ``splice::flora_conv2d_delta`` convolves the layer's input with ``ΔW`` using the base
conv's stride, padding, dilation and groups. Init: factors with random orthonormal columns, ``G = 0``
(the update starts at exactly zero, as LoRA's ``B = 0``); ``scale = alpha / rank``.

Ranks: ``rank`` for both channel modes, ``kernel_rank`` for the two spatial modes (0 = the kernel's
size, i.e. full); a mode's rank is capped at the mode's size (a Tucker rank above it adds nothing),
and ``rank`` above ``min(O, I/groups·kh·kw)`` (the layer's matrix rank) is an error.

Grouped and depthwise convs: the update keeps the group structure (``ΔW`` has the weight's shape
``[O, I/groups, kh, kw]`` and is applied with the same ``groups``), so it folds into the weight
exactly; the in-channel mode has size ``I/groups`` (1 for depthwise: the update is then a Tucker
form over out-channels × kernel). Only ``aten.conv2d`` is supported (conv1d/3d targets are refused).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from splice.ir.graph import Graph
from splice.kernels.adapters.factored import tucker4
from splice.passes.adapters._common import ADAPTER_REPORT, AdapterConfig, Method, check_rank, register_method
from splice.passes.adapters._inject import (
    Layer,
    check_options,
    inject,
    orthonormal,
)
from splice.passes.base import Applies, PassContext, PassResult, register_pass

_FACTORS = ("U_out", "U_in", "U_h", "U_w")
_CONV_DEFAULTS = {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1}


@dataclass(frozen=True, kw_only=True)
class FloraConfig(AdapterConfig):
    """FLoRA adapter: Tucker-form (core + 4 factors) update for conv2d layers."""

    targets: str = field(default="conv", metadata={"help": "conv layers: kind conv, path globs, re:, !exclude"})
    rank: int = field(default=4, metadata={"help": "Tucker rank of the channel modes, at most min(out, in·kh·kw)"})
    kernel_rank: int = field(default=0, metadata={"help": "Tucker rank of the spatial modes; 0 = kernel size (full)"})
    alpha: float = field(default=4.0, metadata={"help": "scale = alpha / rank"})

    def __post_init__(self):
        super().__post_init__()
        check_options(self, at_least_one=("rank",), positive=("alpha",), non_negative=("kernel_rank",))


def conv_args(base: fx.Node) -> tuple:
    """(stride, padding, dilation, groups) of an ``aten.conv2d`` node, defaults filled in."""
    given = dict(zip(_CONV_DEFAULTS, base.args[3:])) | dict(base.kwargs)
    values = [given.get(k, d) for k, d in _CONV_DEFAULTS.items()]
    return (*[list(v) * 2 if len(v) == 1 else list(v) for v in values[:3]], values[3])


def _delta_weight(t: dict[str, torch.Tensor]) -> torch.Tensor:
    core, *factors = (t[k].detach().float() for k in ("core", *_FACTORS))
    return tucker4(core, *factors) * t["scale"].detach().float()


FLORA = register_method(Method("flora", torch.ops.splice.flora_conv2d_delta.default, ("core", *_FACTORS, "scale"),
                               ("core", *_FACTORS), _delta_weight, base_args=conv_args))


@register_pass("adapter.flora", FloraConfig, reference="https://arxiv.org/abs/2403.14541", provides=("adapter",),
               applies=Applies("models with a conv layer", kinds=("conv",)),
               report_fields=ADAPTER_REPORT)
def flora(graph: Graph, cfg: FloraConfig, ctx: PassContext) -> PassResult:
    who, gen = "adapter.flora", ctx.generator()

    def make(layer: Layer):
        check_rank(who, cfg.rank, layer.path, layer.out_f, layer.in_f)
        dims = layer.handler.weight(graph, layer.node).shape  # [O, I/groups, kh, kw]
        ranks = [min(cfg.rank, d) for d in dims[:2]] + [min(cfg.kernel_rank or d, d) for d in dims[2:]]
        factors = {k: orthonormal(d, r, gen) for k, d, r in zip(_FACTORS, dims, ranks)}
        return {"core": torch.zeros(ranks), **factors}

    meta = {"rank": cfg.rank, "kernel_rank": cfg.kernel_rank, "alpha": cfg.alpha, "scaling": cfg.alpha / cfg.rank}
    return inject(graph, cfg, who, FLORA, ("conv",), make, meta)
