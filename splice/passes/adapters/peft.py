"""``adapter.peft``: attach the adapter of a PEFT directory (``path=DIR``) as ``name``.

A PEFT directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. What the
tensors and options mean depends on ``peft_type``; each adapter kind registers its mapping with
``register_peft_format`` (``_peft.py``, which documents the contract), and this pass only reads,
checks and dispatches: LoRA's mapping is in ``lora_peft.py``. Run as a pass, a PEFT load is
verified by the Pipeline and recorded in the history (``splice.load_peft`` runs it so).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.passes.adapters._common import check_name, taken_names
from splice.passes.adapters._peft import PeftLoad, format_for_config
from splice.passes.base import PassConfig, PassContext, PassResult, register_pass

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
WHO = "adapter.peft"
RANKS = ("r", "init_r", "target_r", "mini_r")  # positive integers (LoRA's rank_pattern values too)
NUMBERS = ("lora_alpha", "d_initial", "beta1", "beta2", "orth_reg_weight")  # finite numbers (alpha_pattern too)
DROPOUTS = ("lora_dropout", "vera_dropout", "miss_dropout")  # in [0, 1)


@dataclass(frozen=True, kw_only=True)
class PeftConfig(PassConfig):
    """Attach a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""

    path: str = field(default="", metadata={"help": "the PEFT adapter directory (what save_pretrained wrote)"})
    name: str = field(default="default", metadata={
        "help": "adapter name in splice; adapters with different names share a layer"})

    def __post_init__(self):
        check_name(self.name)


def _error(file: Path, message: str) -> ConfigError:
    return ConfigError(f"{WHO}: {file}: {message}")


def _check_value(file: Path, key: str, value) -> None:
    """A rank, number or dropout option of ``adapter_config.json`` (``None`` = PEFT's default)."""
    base = key.split("[")[0]
    if value is None:
        return
    if base in RANKS + ("rank_pattern",):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _error(file, f"{key} must be a positive integer, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _error(file, f"{key} must be a finite number, got {value!r}")
    elif base in DROPOUTS and not 0 <= value < 1:
        raise _error(file, f"{key} must be in [0, 1), got {value!r}")


def check_config(cfg, file: Path) -> dict:
    """The parsed ``adapter_config.json``, its ranks, alphas and dropouts checked."""
    if not isinstance(cfg, dict):
        raise _error(file, f"must be a JSON object, got a {type(cfg).__name__}")
    for key in RANKS + NUMBERS + DROPOUTS:
        _check_value(file, key, cfg.get(key))
    for key, base in (("rank_pattern", "rank_pattern"), ("alpha_pattern", "alpha_pattern")):
        patterns = cfg.get(key) or {}
        if not isinstance(patterns, dict):
            raise _error(file, f"{key} must be an object of module pattern -> value, got {patterns!r}")
        for pattern, value in patterns.items():
            if not isinstance(value, list):  # AdaLoRA's rank_pattern is a kept-triplet mask, its loader checks it
                _check_value(file, f"{base}[{pattern!r}]", value)
    return cfg


def read_peft_dir(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The checked config and the tensors of PEFT directory ``path``."""
    if not (path / CONFIG).is_file():
        raise ConfigError(f"{WHO}: {path}: no {CONFIG} (not a PEFT adapter directory)")
    try:
        cfg = json.loads((path / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _error(path / CONFIG, f"unreadable ({type(e).__name__})") from None
    cfg = check_config(cfg, path / CONFIG)
    if not (path / WEIGHTS).is_file():
        pickled = (path / "adapter_model.bin").exists()
        other = " (adapter_model.bin is pickle; re-save with safe_serialization=True)" if pickled else ""
        raise ConfigError(f"{WHO}: {path}: no {WEIGHTS}{other}")
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _error(path / WEIGHTS, f"not a readable safetensors file ({first})") from None
    return cfg, tensors


@register_pass("adapter.peft", PeftConfig, reference="https://huggingface.co/docs/peft", provides=("adapter",))
def peft(graph: Graph, cfg: PeftConfig, ctx: PassContext) -> PassResult:
    """Attach the PEFT adapter in ``cfg.path`` under ``cfg.name``."""
    if not cfg.path:
        raise ConfigError(f"{WHO}: path is required (a PEFT adapter directory, e.g. {WHO}:path=DIR)")
    path = Path(cfg.path)
    config, tensors = read_peft_dir(path)
    fmt = format_for_config(config, path)
    before = len(taken_names(graph))
    fmt.load(PeftLoad(graph, cfg.name, path, config, tensors, taken_names(graph)))
    return PassResult(graph, True, {"peft_type": config.get("peft_type"), "layers": len(taken_names(graph)) - before,
                                    "tensors": len(tensors)})
