"""PEFT interop: read a PEFT adapter directory onto a captured base, write splice adapters back.

A PEFT directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. What the
tensors and options mean depends on ``peft_type``; each adapter kind registers its mapping with
``register_peft_format`` (``passes/adapters/_peft.py``, which documents the contract), and this
module only reads, dispatches and writes: LoRA's mapping is in ``passes/adapters/lora_peft.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import splice.passes.adapters  # noqa: F401  (registers every adapter kind's PEFT format)
from splice.errors import ConfigError
from splice.ir.artifact import atomic_dir, refuse_existing
from splice.ir.graph import Graph
from splice.passes.adapters._common import check_name, sites, taken_names
from splice.passes.adapters._peft import PeftLoad, format_for_config, format_for_method

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


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


def load_peft(graph: Graph, path: str | Path, name: str = "default") -> Graph:
    """A copy of ``graph`` with the PEFT adapter in directory ``path`` attached as ``name``."""
    path = Path(path)
    try:
        check_name(name)
    except ValueError as e:
        raise ConfigError(f"load_peft: {e}") from None
    cfg, tensors = _read(path)
    fmt = format_for_config(cfg, path)
    out = graph.copy()
    fmt.load(PeftLoad(out, name, path, cfg, tensors, taken_names(out)))
    return out.finalize()


def save_peft(graph: Graph, path: str | Path, name: str = "default", *, force: bool = False) -> Path:
    """Write adapter ``name`` (unfolded) as a directory ``PeftModel.from_pretrained`` loads."""
    path = Path(path)
    refuse_existing(path, force)
    chosen = [s for s in sites(graph) if s.name == name]
    if not chosen:
        raise ConfigError(f"save_peft: no unfolded adapter named '{name}' in the graph")
    formats = {format_for_method(s.method.name, name, s.path) for s in chosen}
    if len(formats) > 1:
        raise ConfigError(f"save_peft: adapter '{name}' mixes methods ({', '.join(sorted({s.method.name for s in chosen}))}); "
                          "PEFT stores one kind per directory")
    unique = list({s.path: s for s in chosen}.values())  # a module called twice shares its adapter
    config, weights = formats.pop().save(graph, unique)

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))

    atomic_dir(path, force, write)
    return path
