"""PEFT ``LORA`` directories <-> ``adapter.lora`` (and the low-rank part DoRA shares).

PEFT keys ``<module path>.lora_A.weight`` (``[r, in]``) and ``...lora_B.weight`` (``[out, r]``) are
splice's ``A`` / ``B`` unchanged; ``scale = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``;
``alpha_pattern`` per layer). GPT-2's ``Conv1D`` is canonicalized to ``aten.linear`` with a
transposed weight; PEFT's ``lora_A``/``lora_B`` already act on ``x`` the nn.Linear way whatever
``fan_in_fan_out`` says (it only transposes the *merged* delta), so they map unchanged. On save,
the adapter's weight goes into ``lora_alpha``; a layer's rank or alpha that differs from the most
common one goes into ``rank_pattern`` / ``alpha_pattern``.
"""
from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import fx

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.passes.adapters._common import Method, Site, attach
from splice.passes.adapters._peft import (
    PeftLoad,
    base_config,
    most_common,
    register_peft_format,
)
from splice.passes.adapters.lora import LORA, lora_scaling

LORA_KEY = re.compile(r"(?P<path>.+)\.(?P<key>lora_[AB])(?:\.[A-Za-z0-9_]+)?\.weight")
# options of PEFT's LoraConfig that change the computation and that no splice format reads
UNSUPPORTED = {"lora_bias": "lora_bias", "use_qalora": "QA-LoRA (use_qalora)", "layer_replication": "layer_replication",
               "trainable_token_indices": "trainable_token_indices", "target_parameters": "target_parameters"}
# Build = (job, node, layer path, {PEFT key: (key, tensor)}, A, B, meta) -> (method, tensors, meta) to attach
Build = Callable[[PeftLoad, fx.Node, str, dict, torch.Tensor, torch.Tensor, dict], tuple[Method, dict, dict]]


def refuse_options(job: PeftLoad) -> None:
    job.refuse(UNSUPPORTED)
    if job.config.get("bias", "none") != "none" or job.config.get("modules_to_save"):
        raise job.error("bias/modules_to_save (fully trained tensors) are not supported yet")


def load_low_rank(job: PeftLoad, pattern: re.Pattern, what: str, build: Build) -> None:
    """Attach one adapter per module of ``A``/``B`` pairs (plus what ``build`` reads); a module
    called more than once shares its tensors, as PEFT's module does."""
    for mod, parts in job.modules(pattern, what).items():
        for ab in ("lora_A", "lora_B"):
            if ab not in parts:
                raise job.error(f"'{mod}' has {ab} missing")
        (ka, a), (kb, b) = parts["lora_A"], parts["lora_B"]
        first, *again = job.layers(mod, ka)
        out_f, in_f = job.shape(first)
        lp = job.claim(first)
        if a.dim() != 2 or a.shape[1] != in_f:
            raise ConfigError(f"adapter.peft: {ka} has shape {list(a.shape)} but layer '{lp}' takes {in_f} inputs")
        if b.dim() != 2 or b.shape[0] != out_f or b.shape[1] != a.shape[0]:
            raise ConfigError(f"adapter.peft: {kb} has shape {list(b.shape)}, expected [{out_f}, {a.shape[0]}] for '{lp}'")
        rank, alpha = a.shape[0], float(job.option("alpha_pattern", lp, "lora_alpha", 8))
        rs = bool(job.config.get("use_rslora"))
        meta = {"rank": rank, "alpha": alpha, "rslora": rs, "dropout": float(job.config.get("lora_dropout") or 0.0),
                "init": "peft", "scaling": lora_scaling(alpha, rank, rs), "weight": 1.0, "active": True,
                "source": str(job.path)}
        method, tensors, meta = build(job, first, lp, parts, a.float().contiguous(), b.float().contiguous(), meta)
        made = attach(job.graph, first, job.name, method, tensors, meta)
        for node in again:
            attach(job.graph, node, job.name, method, made, meta)


def _build_lora(job, node, lp, parts, a, b, meta):
    return LORA, {"A": a, "B": b, "scale": torch.tensor(meta["scaling"], dtype=torch.float32)}, meta


def load_lora(job: PeftLoad) -> None:
    refuse_options(job)
    load_low_rank(job, LORA_KEY, "LoRA A/B", _build_lora)


def save_low_rank(graph: Graph, chosen: list[Site], scaling: Callable[[Site, dict], float],
                  extra: dict) -> tuple[dict, dict]:
    """PEFT ``LORA`` config and ``lora_A``/``lora_B`` tensors of ``chosen``, one row per layer;
    ``scaling(site, tensors)`` is the factor on ``B A`` that ``lora_alpha`` must reproduce."""
    rows = {}
    for s in chosen:
        meta = s.meta
        if meta.get("init") in ("pissa", "olora"):
            raise ConfigError(f"save_peft: adapter '{s.name}' was initialized with {meta['init']}, which changed the "
                              "base weights; fold it, or save the base too (not supported yet)")
        t, rs = s.tensors(graph), bool(meta.get("rslora"))
        rank = t["A"].shape[0]
        rows[s.path] = (t, rank, scaling(s, t) * (rank ** 0.5 if rs else rank), rs, meta.get("dropout", 0.0))
    if len({r[3] for r in rows.values()}) > 1:
        raise ConfigError(f"save_peft: adapter '{chosen[0].name}' mixes rslora and plain scaling across layers")
    r0, a0 = most_common(r[1] for r in rows.values()), most_common(r[2] for r in rows.values())
    config = {
        **base_config("LORA", graph, rows), "r": r0, "lora_alpha": a0,
        "lora_dropout": max(r[4] for r in rows.values()), "use_rslora": next(iter(rows.values()))[3], "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": False,
        "rank_pattern": {lp: r[1] for lp, r in rows.items() if r[1] != r0},
        "alpha_pattern": {lp: r[2] for lp, r in rows.items() if r[2] != a0}, **extra,
    }
    weights = {}
    for lp, (t, *_rest) in rows.items():
        weights[f"base_model.model.{lp}.lora_A.weight"] = t["A"].detach().contiguous()
        weights[f"base_model.model.{lp}.lora_B.weight"] = t["B"].detach().contiguous()
    return config, weights


def _lora_scaling(s: Site, t: dict) -> float:
    meta = s.meta
    return meta.get("scaling", float(t["scale"])) * meta.get("weight", 1.0)


def save_lora(graph: Graph, chosen: list[Site]) -> tuple[dict, dict]:
    return save_low_rank(graph, chosen, _lora_scaling, {})


register_peft_format("LORA", load=load_lora, save=save_lora, methods=("lora",), accepts=lambda cfg: not cfg.get("use_dora"))
