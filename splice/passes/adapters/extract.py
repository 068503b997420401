"""``adapter.extract``: a fine-tuned model's weight delta as a LoRA adapter of a given rank.

As PEFT's / mergekit's LoRA extraction (``mergekit-extract-lora``): the graph the pass runs on is
the base; the graph ``source`` (``ctx.graphs["source"]``) is the fine-tuned model of the same
architecture, given as ``graphs={"source": g}`` or by path with the option ``source`` (an HF
directory, a saved artifact or a ``.pt2``, which the API/CLI load). For every targeted linear, ``ΔW = W_source − W_base`` is truncated to
its top-``rank`` SVD ``U S Vᵀ`` and split as ``A = √S Vᵀ [r, in]``, ``B = U √S [out, r]`` (PEFT
layout, ``scale = 1``, i.e. ``lora_alpha = r``), attached with ``adapter.lora``'s method, so
fold/unfold, ``save_peft`` and export treat it as any LoRA. The report gives the relative
reconstruction error ``‖ΔW − B A‖_F / ‖ΔW‖_F`` per layer (0 where ``ΔW = 0``); by Eckart–Young
it is the least any rank-``rank`` update can reach. Layers are matched by module path.
Reference: https://arxiv.org/abs/2106.09685 (LoRA), mergekit's ``extract_lora.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.ir.lowrank import low_rank_factors
from splice.passes.adapters._base import base_op
from splice.passes.adapters._common import AdapterConfig, check_rank, layer_path
from splice.passes.adapters._sparse import attach_per_layer
from splice.passes.adapters.lora import LORA
from splice.passes.base import PassContext, PassResult, register_pass

WHO = "adapter.extract"


@dataclass(frozen=True, kw_only=True)
class ExtractConfig(AdapterConfig):
    """Extract a LoRA of a given rank from a fine-tuned model's weight delta (per-layer error reported)."""

    source: str = field(default="", metadata={"help": "the fine-tuned model: HF dir, artifact dir or .pt2 (required)"})
    rank: int = field(default=8, metadata={"help": "LoRA rank r, at most min(in, out) of every layer"})

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")


def _source_weights(src: Graph) -> dict[str, tuple[str, torch.Tensor]]:
    """``{layer path: (parameter name, float [out, in] weight)}`` of the fine-tuned model."""
    out = {}
    for node in src.nodes("linear"):
        arg = node.args[1]
        name = arg.target if getattr(arg, "op", None) == "get_attr" else layer_path(node)
        out[layer_path(node)] = (name, base_op(node, WHO).weight(src, node))
    return out


@register_pass(WHO, ExtractConfig, reference="https://arxiv.org/abs/2106.09685", graphs=("source",),
               provides=("adapter",), report_fields={"layers": "layers", "rel_error_mean": "mean rel. error",
                                                     "rel_error_max": "max rel. error"})
def extract(graph: Graph, cfg: ExtractConfig, ctx: PassContext) -> PassResult:
    tuned = _source_weights(ctx.graphs["source"])
    where = cfg.source or "graphs['source']"
    errors = {}

    def build(path, w):
        if path not in tuned:
            raise ConfigError(f"{WHO}: layer '{path}' is not in source '{where}' (a different architecture?)")
        name, w_tuned = tuned[path]
        if w_tuned.shape != w.shape:
            raise ConfigError(f"{WHO}: source parameter '{name}' has shape {list(w_tuned.shape)} but the base's is "
                              f"{list(w.shape)} (a different architecture?)")
        check_rank(WHO, cfg.rank, path, *w.shape)
        a, b, errors[path] = low_rank_factors(w_tuned - w, cfg.rank)
        return LORA, {"A": a, "B": b, "scale": torch.ones(())}, {"rel_error": round(errors[path], 6)}

    meta = {"rank": cfg.rank, "alpha": float(cfg.rank), "rslora": False, "dropout": 0.0, "init": "extract",
            "source": cfg.source}
    report = attach_per_layer(graph, cfg, WHO, build, meta)
    report.update(rel_error_mean=sum(errors.values()) / len(errors), rel_error_max=max(errors.values()))
    return PassResult(graph, True, report)
