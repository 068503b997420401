"""Frontends: everything that turns a model into a Graph.

``capture(model, example_inputs)`` for an ``nn.Module``; ``capture(path)`` for a local HF
directory, a ``.gguf`` file, a saved artifact or a ``.pt2`` program.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from splice.errors import SpliceError
from splice.frontends import artifact
from splice.frontends.hf import capture_hf, example_inputs_for, max_positions
from splice.frontends.torch_export import capture_module
from splice.ir.artifact import MANIFEST
from splice.ir.graph import Graph


def capture(model: Any, example_inputs: Any = None, *, dynamic: Any = True) -> Graph:
    """Capture ``model`` (an ``nn.Module`` or a path) into a Graph."""
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.exists():
            raise SpliceError(f"{path}: no such file or directory")
        if path.suffix == ".pt2" or (path / MANIFEST).is_file():
            return artifact.load(path, find_base=capture)
        return capture_hf(path)
    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            if hasattr(model, "config"):
                example_inputs = example_inputs_for(model)
            else:
                raise SpliceError(f"capture: example_inputs are required for {type(model).__name__}")
        config = getattr(model, "config", None)
        source = {"max_positions": max_positions(config)} if config is not None else None
        return capture_module(model, example_inputs, dynamic=dynamic, source=source)
    raise SpliceError(f"capture: expected an nn.Module or a path, got {type(model).__name__}")


def load(path: str | Path, *, base: Any = None) -> Graph:
    """Load an artifact directory or a ``.pt2`` program. ``base`` (a Graph or a path ``capture``
    reads): the base model a delta-only artifact was saved against; its weights digest is checked
    (without it, the base is loaded from the path the delta recorded, if it still exists)."""
    if isinstance(base, (str, Path)):
        base = capture(base)
    return artifact.load(path, base, find_base=capture)


__all__ = ["capture", "load"]
