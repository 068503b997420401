"""PEFT interop for users: ``load_peft`` (the ``adapter.peft`` pass through a Pipeline) and
``save_peft`` (write splice adapters as a directory ``PeftModel.from_pretrained`` loads)."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save as safetensors_bytes

import splice.passes.adapters  # noqa: F401  (registers every adapter kind's PEFT format)
from splice.errors import ConfigError
from splice.ir.atomic import atomic_dir, check_writable
from splice.ir.graph import Graph
from splice.passes.adapters._common import sites
from splice.passes.adapters._peft import format_for_method
from splice.passes.adapters.peft import CONFIG, WEIGHTS, PeftConfig
from splice.passes.base import get_pass
from splice.passes.manager import Pipeline


def load_peft(graph: Graph, path: str | Path, name: str = "default") -> Graph:
    """A copy of ``graph`` with the PEFT adapter in directory ``path`` attached as ``name``: the
    pass ``adapter.peft:path=DIR,name=NAME``, verified and recorded in the history."""
    info = get_pass("adapter.peft")
    try:
        cfg = PeftConfig(path=str(path), name=name)
    except ValueError as e:
        raise ConfigError(f"adapter.peft: {e}") from None
    return Pipeline([(info, cfg)]).run(graph, probe=False).graph


def save_peft(graph: Graph, path: str | Path, name: str = "default", *, force: bool = False) -> Path:
    """Write adapter ``name`` (unfolded) as a directory ``PeftModel.from_pretrained`` loads."""
    path = Path(path)
    check_writable(path, force)
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
        # serialized here and written by Python, so a full disk is an OSError the atomic writer reports
        # in one line (safetensors' own file writer raises its SafetensorError instead)
        (tmp / WEIGHTS).write_bytes(safetensors_bytes(weights, metadata={"format": "pt"}))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))

    atomic_dir(path, force, write)
    return path
