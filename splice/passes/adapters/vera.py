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
import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.ir.select import select_nodes
from splice.passes.adapters._base import base_op
from splice.passes.adapters._common import ADAPTER_REPORT, AdapterConfig, Method, attach, check_rank_dropout, register_method
from splice.passes.adapters._inject import Layer, inject
from splice.passes.adapters._peft import PeftLoad, base_config, register_peft_format
from splice.passes.adapters.lora_peft import refuse_options
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
        check_rank_dropout(self.rank, self.dropout)


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


@register_pass("adapter.vera", VeraConfig, reference="https://arxiv.org/abs/2310.11454", provides=("adapter",),
               report_fields=ADAPTER_REPORT)
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


# ------------------------------------------------------------------------ PEFT mapping
# ``<path>.vera_lambda_d`` [r], ``<path>.vera_lambda_b`` [out]; ``base_model.vera_A`` / ``vera_B``
# (absent with ``save_projection=False``: regenerated from ``projection_prng_key``, as PEFT does).
VERA_KEY = re.compile(r"(?P<path>.+)\.(?P<key>vera_lambda_[bd]|vera_[AB])")


def _check(key: str, value: torch.Tensor, ok: bool, want: str, lp: str) -> None:
    if not ok:
        raise ConfigError(f"adapter.peft: {key} has shape {list(value.shape)}, expected {want} for '{lp}'")


def load_vera(job: PeftLoad) -> None:
    refuse_options(job)
    modules = job.modules(VERA_KEY, "VeRA lambda/projection")
    shared = modules.pop("base_model", {})
    layers = {mod: job.layers(mod, parts.get("vera_lambda_b", next(iter(parts.values())))[0])
              for mod, parts in modules.items()}
    r = int(job.config.get("r", 256))
    if "vera_A" in shared:
        a, b = (shared[k][1].float().contiguous() for k in ("vera_A", "vera_B"))
    else:
        shapes = [job.shape(nodes[0]) for nodes in layers.values()]
        a, b = projections(r, max(s[0] for s in shapes), max(s[1] for s in shapes), int(job.config.get("projection_prng_key", 0)))
    r = a.shape[0]
    nodes = {"vera_A": job.graph.add_tensor(f"adapters.{job.name}.vera_A", a),
             "vera_B": job.graph.add_tensor(f"adapters.{job.name}.vera_B", b)}
    meta = {"rank": r, "d_initial": float(job.config.get("d_initial", 0.1)), "init": "peft", "scaling": 1.0,
            "projection_prng_key": int(job.config.get("projection_prng_key", 0)), "weight": 1.0, "active": True,
            "dropout": float(job.config.get("vera_dropout") or 0.0), "source": str(job.path)}
    for mod, parts in modules.items():
        for key in ("vera_lambda_b", "vera_lambda_d"):
            if key not in parts:
                raise job.error(f"'{mod}' has {key} missing")
        (kb, lam_b), (kd, lam_d) = parts["vera_lambda_b"], parts["vera_lambda_d"]
        first, *again = layers[mod]
        out_f, in_f = job.shape(first)
        lp = job.claim(first)
        _check(kb, lam_b, tuple(lam_b.shape) == (out_f,) and out_f <= b.shape[0], f"[{out_f}] (<= vera_B rows)", lp)
        _check(kd, lam_d, tuple(lam_d.shape) == (r,) and in_f <= a.shape[1], f"[{r}] (vera_A rank)", lp)
        tensors = {"lambda_d": lam_d.float().contiguous(), "lambda_b": lam_b.float().contiguous(), **nodes,
                   "scale": torch.tensor(1.0)}
        for node in (first, *again):
            tensors = attach(job.graph, node, job.name, VERA, tensors, meta)


def save_vera(graph: Graph, chosen: list) -> tuple[dict, dict]:
    """``lambda_b`` carries the adapter's weight; the shared pair is cut to the saved layers' largest size
    (PEFT sizes it from the targeted layers)."""
    weights, shapes = {}, []
    for s in chosen:
        t = s.tensors(graph)
        weights[f"base_model.model.{s.path}.vera_lambda_d"] = t["lambda_d"].detach().contiguous()
        weights[f"base_model.model.{s.path}.vera_lambda_b"] = (t["lambda_b"] * t["scale"]).detach().contiguous()
        shapes.append(base_op(s.base, "save_peft").shape(graph, s.base, "save_peft"))
    t, meta = chosen[0].tensors(graph), chosen[0].meta
    weights["base_model.vera_A"] = t["vera_A"][:, :max(i for _, i in shapes)].detach().contiguous()
    weights["base_model.vera_B"] = t["vera_B"][:max(o for o, _ in shapes)].detach().contiguous()
    config = {**base_config("VERA", graph, [s.path for s in chosen]), "r": t["vera_A"].shape[0],
              "projection_prng_key": meta.get("projection_prng_key", 0), "save_projection": True,
              "vera_dropout": meta.get("dropout", 0.0), "d_initial": meta.get("d_initial", 0.1),
              "fan_in_fan_out": False, "bias": "none", "init_weights": True}
    return config, weights


register_peft_format("VERA", load=load_vera, save=save_vera, methods=("vera",))
