"""``adapter.dora``: weight-decomposed low-rank adaptation beside each targeted linear.

DoRA (https://arxiv.org/abs/2402.09353) splits the adapted weight into a magnitude and a
direction: ``W' = m · (W + s·B A) / ‖W + s·B A‖`` (norm per output row), with LoRA's ``A [r, in]``,
``B [out, r]``, ``s = alpha / r`` (``/ sqrt(r)`` with rsLoRA) and a trainable magnitude ``m [out]``
initialized to ``‖W + s·B A‖`` so that outputs start unchanged. It matches PEFT's
``LoraConfig(use_dora=True)`` on linear layers exactly: the norm is detached in the backward pass
(PEFT's ``DoraLinearLayer``, paper section 4.3), and the delta added to the base output is
``(m/‖·‖ - 1)·(y - b) + (m/‖·‖)·s·B A x``, so ``splice::dora_delta`` reads the base output ``y``,
weight ``W`` and bias ``b``. The adapter's ``scale`` (weight, 0 = off) multiplies that delta.
Folding is exact: ``W' = m·(W + sBA)/‖W + sBA‖``; unfold points the layer back at ``W``.
A float base is needed (DoRA reads ``W``); inits as ``adapter.lora``'s default/gaussian/random.
PEFT directories (``use_dora: true``, ``lora_magnitude_vector``) load and save as DoRA.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.kernels.adapters.base_deltas import dora_norm
from splice.passes.adapters._base import float_base
from splice.passes.adapters._common import ADAPTER_REPORT, Method, check_rank, register_method
from splice.passes.adapters._inject import Layer, inject
from splice.passes.adapters._peft import PeftLoad, register_peft_format
from splice.passes.adapters.lora import LoraConfig, init_lora, lora_scaling
from splice.passes.adapters.lora_peft import (
    load_low_rank,
    refuse_options,
    save_low_rank,
)
from splice.passes.base import PassContext, PassResult, register_pass

KEYS = ("A", "B", "magnitude", "lora_scale", "scale")


@dataclass(frozen=True, kw_only=True)
class DoraConfig(LoraConfig):
    """DoRA adapter (PEFT use_dora=True): LoRA's direction update plus a trainable magnitude."""

    def __post_init__(self):
        super().__post_init__()
        if self.init in ("pissa", "olora"):
            raise ValueError(f"init must be default, gaussian or random for DoRA, got {self.init}")


def _affine(t: dict[str, torch.Tensor], w: torch.Tensor, b: torch.Tensor | None):
    a, bb, m, s, g = (t[k].detach().float() for k in KEYS)
    adapted = w + s * (bb @ a)
    ratio = m / dora_norm(w, a, bb, s)
    return g * (ratio[:, None] * adapted - w), None


DORA = register_method(Method("dora", torch.ops.splice.dora_delta.default, KEYS, ("A", "B", "magnitude"), None,
                              reads=("x", "out", "weight", "bias"), affine=_affine))


def dora_tensors(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, scaling: float,
                 magnitude: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The stored tensors but ``scale``; ``magnitude`` defaults to ``‖W + s·B A‖`` (PEFT's ``dora_init``)."""
    s = torch.tensor(scaling, dtype=torch.float32)
    m = dora_norm(w, a, b, s).clone() if magnitude is None else magnitude.float().contiguous()
    return {"A": a, "B": b, "magnitude": m, "lora_scale": s}


@register_pass("adapter.dora", DoraConfig, reference="https://arxiv.org/abs/2402.09353", provides=("adapter",),
               report_fields=ADAPTER_REPORT)
def dora(graph: Graph, cfg: DoraConfig, ctx: PassContext) -> PassResult:
    who = "adapter.dora"
    scaling = lora_scaling(cfg.alpha, cfg.rank, cfg.rslora)
    gen = ctx.generator()

    def make(layer: Layer) -> dict:
        check_rank(who, cfg.rank, layer.path, layer.out_f, layer.in_f)
        w = float_base(graph, layer.node, who, "DoRA").weight(graph, layer.node)
        a, b, _ = init_lora(cfg.init, None, cfg.rank, layer.out_f, layer.in_f, scaling, gen)
        return dora_tensors(a, b, w, scaling)

    meta = {"rank": cfg.rank, "alpha": cfg.alpha, "rslora": cfg.rslora, "dropout": cfg.dropout, "init": cfg.init,
            "lora_scaling": scaling, "scaling": 1.0}
    result = inject(graph, cfg, who, DORA, ("linear",), make, meta)
    result.report["scaling"] = scaling
    return result


# ------------------------------------------------------------------------ PEFT mapping
DORA_KEY = re.compile(r"(?P<path>.+)\.(?P<key>lora_[AB]|lora_magnitude_vector)(?:\.[A-Za-z0-9_]+)?(?:\.weight)?")


def _build(job: PeftLoad, node, lp: str, parts: dict, a, b, meta: dict):
    if "lora_magnitude_vector" not in parts:
        raise job.error(f"'{lp}' has lora_magnitude_vector missing (use_dora is set)")
    key, m = parts["lora_magnitude_vector"]
    w = float_base(job.graph, node, "adapter.peft", "DoRA").weight(job.graph, node)
    if tuple(m.shape) != (w.shape[0],):
        raise ConfigError(f"adapter.peft: {key} has shape {list(m.shape)}, expected [{w.shape[0]}] for '{lp}'")
    meta = {**meta, "lora_scaling": meta["scaling"], "scaling": 1.0}
    return DORA, {**dora_tensors(a, b, w, meta["lora_scaling"], m), "scale": torch.tensor(1.0)}, meta


def load_dora(job: PeftLoad) -> None:
    refuse_options(job)
    load_low_rank(job, DORA_KEY, "DoRA A/B/magnitude", _build)


def save_dora(graph: Graph, chosen: list) -> tuple[dict, dict]:
    for s in chosen:
        if float(s.tensors(graph)["scale"]) != 1.0:
            raise ConfigError(f"save_peft: DoRA adapter '{s.name}' on '{s.path}' has weight "
                              f"{float(s.tensors(graph)['scale'])}; PEFT's DoRA has none (set it to 1)")
    config, weights = save_low_rank(graph, chosen, lambda s, t: float(t["lora_scale"]), {"use_dora": True})
    for s in chosen:
        weights[f"base_model.model.{s.path}.lora_magnitude_vector"] = s.tensors(graph)["magnitude"].detach().contiguous()
    return config, weights


register_peft_format("LORA", load=load_dora, save=save_dora, methods=("dora",), accepts=lambda cfg: bool(cfg.get("use_dora")))
