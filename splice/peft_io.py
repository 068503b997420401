"""PEFT interop: read a PEFT LoRA directory onto a captured base, write splice LoRA adapters back.

A PEFT directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` (``[r, in]``) and ``...lora_B.weight``
(``[out, r]``). splice stores the same tensors as ``<module path>.adapters.<name>.A`` / ``.B`` beside
the layer's (canonical ``aten.linear``) op, and ``scale = lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``; ``alpha_pattern`` per layer). GPT-2's ``Conv1D`` is canonicalized to ``aten.linear``
with a transposed weight; PEFT's ``lora_A``/``lora_B`` already act on ``x`` the nn.Linear way
whatever ``fan_in_fan_out`` says (it only transposes the *merged* delta), so they map unchanged.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from splice.errors import ConfigError
from splice.ir.artifact import atomic_dir, refuse_existing
from splice.ir.graph import Graph
from splice.passes.adapters._base import base_op
from splice.passes.adapters._common import (
    attach,
    check_name,
    layer_path,
    sites,
    taken_names,
)
from splice.passes.adapters.lora import LORA, lora_scaling

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")
_UNSUPPORTED = {"use_dora": "DoRA (use_dora)", "lora_bias": "lora_bias"}


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not (path / CONFIG).is_file():
        raise ConfigError(f"load_peft: {path}: no {CONFIG} (not a PEFT adapter directory)")
    try:
        cfg = json.loads((path / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"load_peft: {path / CONFIG}: unreadable ({type(e).__name__})") from None
    if not (path / WEIGHTS).is_file():
        other = " (adapter_model.bin is pickle; re-save with safe_serialization=True)" if (path / "adapter_model.bin").exists() else ""
        raise ConfigError(f"load_peft: {path}: no {WEIGHTS}{other}")
    return cfg, load_file(str(path / WEIGHTS))


def _check_config(cfg: dict, path: Path) -> None:
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise ConfigError(f"load_peft: {path}: peft_type '{kind}' is not supported (supported: LORA)")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise ConfigError(f"load_peft: {path}: {what} is not supported yet")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise ConfigError(f"load_peft: {path}: bias/modules_to_save (fully trained tensors) are not supported yet")


def _alpha(cfg: dict, path: str) -> float:
    for pattern, alpha in (cfg.get("alpha_pattern") or {}).items():  # PEFT's key matching
        if re.match(rf"(.*\.)?({pattern})$", path):
            return float(alpha)
    return float(cfg.get("lora_alpha", 8))


def _layers(graph: Graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in graph.nodes("linear"):
        out.setdefault(layer_path(node), []).append(node)
    return out


def _match(layers: dict[str, list], path: str, key: str) -> list:
    if path in layers:
        return layers[path]
    near = [p for p in layers if p.endswith("." + path) or path.endswith("." + p)]
    if len(near) != 1:
        raise ConfigError(f"load_peft: {key}: no linear layer '{path}' in the graph (an adapter for another base?)")
    return layers[near[0]]


def load_peft(graph: Graph, path: str | Path, name: str = "default") -> Graph:
    """A copy of ``graph`` with the PEFT LoRA adapter in directory ``path`` attached as ``name``."""
    path = Path(path)
    try:
        check_name(name)
    except ValueError as e:
        raise ConfigError(f"load_peft: {e}") from None
    cfg, tensors = _read(path)
    _check_config(cfg, path)
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ConfigError(f"load_peft: {path}: tensor '{key}' is not a LoRA A/B weight (unsupported)")
        pairs.setdefault(m["path"], {})[m["ab"]] = (key, value)
    out = graph.copy()
    layers, taken = _layers(out), taken_names(out)
    for mod, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ConfigError(f"load_peft: {path}: '{mod}' has lora_{'A' if 'A' not in ab else 'B'} missing")
        (ka, a), (kb, b) = ab["A"], ab["B"]
        for node in _match(layers, mod, ka):
            out_f, in_f = base_op(node, "load_peft").shape(out, node, "load_peft")
            lp = layer_path(node)
            if a.dim() != 2 or a.shape[1] != in_f:
                raise ConfigError(f"load_peft: {ka} has shape {list(a.shape)} but layer '{lp}' takes {in_f} inputs")
            if b.dim() != 2 or b.shape[0] != out_f or b.shape[1] != a.shape[0]:
                raise ConfigError(f"load_peft: {kb} has shape {list(b.shape)}, expected [{out_f}, {a.shape[0]}] for '{lp}'")
            if (lp, name) in taken:
                raise ConfigError(f"load_peft: layer '{lp}' already has an adapter named '{name}'; pass another name=")
            rank, alpha, rs = a.shape[0], _alpha(cfg, lp), bool(cfg.get("use_rslora"))
            scaling = lora_scaling(alpha, rank, rs)
            meta = {"rank": rank, "alpha": alpha, "rslora": rs, "dropout": float(cfg.get("lora_dropout") or 0.0),
                    "init": "peft", "scaling": scaling, "weight": 1.0, "active": True, "source": str(path)}
            attach(out, node, name, LORA, {"A": a.float().contiguous(), "B": b.float().contiguous(),
                                           "scale": torch.tensor(scaling, dtype=torch.float32)}, meta)
            taken.add((lp, name))
    return out.finalize()


def save_peft(graph: Graph, path: str | Path, name: str = "default", *, force: bool = False) -> Path:
    """Write adapter ``name`` (LoRA, unfolded) as a PEFT directory ``PeftModel.from_pretrained`` loads.
    The adapter's weight goes into ``lora_alpha``; a layer's rank or alpha that differs from the
    most common one goes into ``rank_pattern``/``alpha_pattern``."""
    path = Path(path)
    refuse_existing(path, force)
    chosen = {s.path: s for s in sites(graph) if s.name == name}
    if not chosen:
        raise ConfigError(f"save_peft: no unfolded adapter named '{name}' in the graph")
    rows = {}
    for lp, s in chosen.items():
        meta = s.meta
        if s.method is not LORA:
            raise ConfigError(f"save_peft: adapter '{name}' on '{lp}' is {s.method.name}; only LoRA is supported")
        if meta.get("init") in ("pissa", "olora"):
            raise ConfigError(f"save_peft: adapter '{name}' was initialized with {meta['init']}, which changed the "
                              "base weights; fold it, or save the base too (not supported yet)")
        t = s.tensors(graph)
        rs = bool(meta.get("rslora"))
        scale = meta.get("scaling", float(t["scale"])) * meta.get("weight", 1.0)
        rank = t["A"].shape[0]
        rows[lp] = (t, rank, scale * (rank ** 0.5 if rs else rank), rs, meta.get("dropout", 0.0))
    if len({r[3] for r in rows.values()}) > 1:
        raise ConfigError(f"save_peft: adapter '{name}' mixes rslora and plain scaling across layers")
    r0 = Counter(r[1] for r in rows.values()).most_common(1)[0][0]
    a0 = Counter(r[2] for r in rows.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": graph.source.get("path"),
        "r": r0, "lora_alpha": a0, "lora_dropout": max(r[4] for r in rows.values()),
        "use_rslora": next(iter(rows.values()))[3], "target_modules": sorted(rows), "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {lp: r[1] for lp, r in rows.items() if r[1] != r0},
        "alpha_pattern": {lp: r[2] for lp, r in rows.items() if r[2] != a0},
    }
    weights = {}
    for lp, (t, *_rest) in rows.items():
        weights[f"base_model.model.{lp}.lora_A.weight"] = t["A"].detach().contiguous()
        weights[f"base_model.model.{lp}.lora_B.weight"] = t["B"].detach().contiguous()

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))

    atomic_dir(path, force, write)
    return path
