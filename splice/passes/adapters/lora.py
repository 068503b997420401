"""``adapter.lora``: a low-rank update ``ΔW = scale · B A`` beside each targeted linear.

LoRA (https://arxiv.org/abs/2106.09685) with PEFT's conventions, so weights move between the two
unchanged: ``A [r, in]``, ``B [out, r]``, ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA,
https://arxiv.org/abs/2312.03732). Inits (PEFT's ``init_lora_weights``):

* ``default`` (PEFT ``True``): A kaiming-uniform like ``nn.Linear``, B = 0, so outputs are unchanged;
* ``gaussian``: A ~ N(0, 1/r), B = 0;
* ``random`` (PEFT ``False``): A and B both kaiming-uniform, a non-zero update (for tests);
* ``pissa`` (https://arxiv.org/abs/2404.02948): A, B from the top-r SVD of W, the base keeps the
  residual ``W - scale · B A``;
* ``olora`` (https://arxiv.org/abs/2406.01775): A, B from the QR decomposition of W (A = R[:r],
  B = Q[:, :r]), the base keeps the residual.

``dropout`` is recorded for training (a training loop applies it to the adapter's input);
inference and export ignore it, as PEFT does in eval mode. Works on float and quantized
(``splice::qlinear``, QLoRA-style) bases; pissa/olora need a float base (they rewrite W).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.passes.adapters._common import ADAPTER_REPORT, AdapterConfig, Method, check_rank, register_method
from splice.passes.adapters._inject import Layer, inject
from splice.passes.base import PassContext, PassResult, register_pass

Init = Literal["default", "gaussian", "random", "pissa", "olora"]


@dataclass(frozen=True, kw_only=True)
class LoraConfig(AdapterConfig):
    """LoRA adapter (PEFT-compatible init and scaling; rsLoRA, PiSSA, OLoRA)."""

    rank: int = field(default=8, metadata={"help": "r, at most min(in_features, out_features) of every layer"})
    alpha: float = field(default=8.0, metadata={"help": "scale = alpha / r (alpha / sqrt(r) with rslora)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input, training only"})
    rslora: bool = field(default=False, metadata={"help": "rank-stabilized scaling alpha / sqrt(r)"})
    init: Init = field(default="default", metadata={"help": "default|gaussian|random|pissa|olora"})

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _delta_weight(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return (t["B"].detach().float() @ t["A"].detach().float()) * t["scale"].detach().float()


LORA = register_method(Method("lora", torch.ops.splice.lora_delta.default, ("A", "B", "scale"), ("A", "B"), _delta_weight))


def _kaiming(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(a=sqrt(5))``, nn.Linear's default: U(-1/sqrt(cols), 1/sqrt(cols))."""
    bound = 1 / math.sqrt(cols)
    return torch.empty(rows, cols).uniform_(-bound, bound, generator=gen)


def init_lora(init: str, w: torch.Tensor | None, rank: int, out_f: int, in_f: int, scaling: float,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(A, B, residual base weight or None), as PEFT's ``LoraLayer`` initializes them."""
    if init in ("default", "random"):
        a = _kaiming(rank, in_f, gen)
        return a, (_kaiming(out_f, rank, gen) if init == "random" else torch.zeros(out_f, rank)), None
    if init == "gaussian":
        return torch.randn(rank, in_f, generator=gen) / rank, torch.zeros(out_f, rank), None
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(s[:rank] / scaling)
        a, b = root[:, None] * vh[:rank], u[:, :rank] * root
    else:  # olora
        q, r = torch.linalg.qr(w)
        a, b = r[:rank].contiguous(), q[:, :rank].contiguous()
    return a, b, w - scaling * (b @ a)


@register_pass("adapter.lora", LoraConfig, reference="https://arxiv.org/abs/2106.09685", provides=("adapter",),
               report_fields=ADAPTER_REPORT)
def lora(graph: Graph, cfg: LoraConfig, ctx: PassContext) -> PassResult:
    who = "adapter.lora"
    scaling = lora_scaling(cfg.alpha, cfg.rank, cfg.rslora)
    meta = {"rank": cfg.rank, "alpha": cfg.alpha, "rslora": cfg.rslora, "dropout": cfg.dropout,
            "init": cfg.init, "scaling": scaling}
    gen = ctx.generator()

    def make(layer: Layer) -> dict[str, torch.Tensor]:
        check_rank(who, cfg.rank, layer.path, layer.out_f, layer.in_f)
        w = None
        if cfg.init in ("pissa", "olora"):
            if layer.handler.set_weight is None:
                raise ConfigError(f"{who}: init={cfg.init} rewrites the base weight; layer '{layer.path}' is quantized "
                                  "(add the adapter before quantizing)")
            if layer.calls > 1:
                raise ConfigError(f"{who}: init={cfg.init}: layer '{layer.path}' is called {layer.calls} times; "
                                  "use init=default")
            w = layer.handler.weight(graph, layer.node)
        a, b, residual = init_lora(cfg.init, w, cfg.rank, layer.out_f, layer.in_f, scaling, gen)
        if residual is not None:
            layer.handler.set_weight(graph, [layer.node], residual)
        return {"A": a, "B": b}  # inject adds the fp32 scale (PEFT's autocast_adapter_dtype keeps adapters fp32)

    result = inject(graph, cfg, who, LORA, ("linear",), make, meta)
    result.report["scaling"] = scaling
    return result
