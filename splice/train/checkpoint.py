"""Training checkpoints: ``<checkpoint_dir>/checkpoint/`` holds the latest one.

* ``trainable.safetensors``: the trainable tensors by stored name;
* ``state.pt``: optimizer and scheduler state, the step reached, the global RNG state (dropout),
  the loss history: tensors, numbers and strings only, read back with ``torch.load(...,
  weights_only=True)`` (no pickled code is ever loaded);
* ``run.json``: what the run was (config, data fingerprint, trainable shapes): resuming
  refuses a checkpoint written for another run, naming the first difference.

Each checkpoint is written through ``ir/atomic.py`` (temporary sibling directory renamed into
place), so an interrupted save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from splice.errors import SpliceError
from splice.ir.atomic import atomic_dir, failsafe_file

CHECKPOINT = "checkpoint"
TENSORS, STATE, RUN = "trainable.safetensors", "state.pt", "run.json"


def checkpoint_path(checkpoint_dir: str | Path) -> Path:
    return Path(checkpoint_dir) / CHECKPOINT


def save_checkpoint(checkpoint_dir: str | Path, params: dict[str, torch.Tensor], state: dict[str, Any],
                    run: dict[str, Any]) -> Path:
    path = checkpoint_path(checkpoint_dir)

    def write(tmp: Path) -> None:
        (tmp / TENSORS).write_bytes(safetensors_bytes({k: v.detach().contiguous() for k, v in params.items()}))
        with failsafe_file(tmp / STATE) as f:  # a failed write is an OSError, not a C++ abort
            torch.save(state, f)
        (tmp / RUN).write_text(json.dumps(run, indent=2, sort_keys=True))

    atomic_dir(path, True, write)
    return path


def _first_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            return f"{key} {saved.get(key)!r} there, {current.get(key)!r} here"
    return None


def load_checkpoint(checkpoint_dir: str | Path, params: dict[str, torch.Tensor],
                    run: dict[str, Any]) -> dict[str, Any]:
    """Copy the saved trainable tensors into ``params`` (in place) and return the saved state."""
    path = checkpoint_path(checkpoint_dir)
    if not (path / STATE).is_file():
        raise SpliceError(f"train: resume: no checkpoint in {checkpoint_dir} (expected {path / STATE})")
    try:
        saved_run = json.loads((path / RUN).read_text())
        tensors = load_file(str(path / TENSORS))
        state = torch.load(path / STATE, weights_only=True)
    except (OSError, ValueError, SafetensorError, RuntimeError) as e:
        raise SpliceError(f"train: resume: {path} is unreadable or truncated ({type(e).__name__})") from None
    diff = _first_difference(saved_run, run)
    if diff:
        raise SpliceError(f"train: resume: {path} was written for a different run ({diff})")
    if set(tensors) != set(params):
        raise SpliceError(f"train: resume: {path / TENSORS} holds other tensors than the graph's trainable ones")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    return state
