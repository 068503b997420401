"""Load a saved artifact directory (``ir/artifact.py``) or a bare ``.pt2`` program into a Graph.

An artifact is untrusted input: its manifest and every listed file are checked first
(``ir.artifact.read_manifest``), the program is read without unpickling anything
(``frontends/safe_pt2.py``), and the example inputs come from ``inputs.safetensors``. A bare
``.pt2`` written by ``torch.export.save`` loads the same way, its example inputs read with
``torch.load(weights_only=True)`` or refused. A delta-only artifact loads only with its base
(``ir/deltas.py``: the base's weights digest is checked, then its tensors are bound).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load

from splice.errors import ArtifactError, ConfigError, SpliceError
from splice.frontends.safe_pt2 import read_program
from splice.frontends.torch_export import graph_from_program
from splice.ir.artifact import INPUTS, MANIFEST, MASKS, PROGRAM, read_manifest
from splice.ir.deltas import bind_base, check_base
from splice.ir.graph import Graph
from splice.ir.sparsity import unpack_graph
from splice.ir.tokenizer import tokenizer_source
from splice.kernels.prune.ops import unpack_mask
from splice.progress import phase


def _example_inputs(path: Path, names: list) -> tuple:
    try:
        tensors = safetensors_load((path / INPUTS).read_bytes())
    except (OSError, SafetensorError) as e:
        raise ArtifactError(f"{path / INPUTS}: unreadable ({type(e).__name__})") from None
    if set(tensors) != set(names):
        raise ArtifactError(f"{path / INPUTS}: holds {sorted(tensors)}, the manifest's inputs are {names}")
    return tuple(tensors[n] for n in names)


def _masks(path: Path, manifest: dict) -> dict:
    """The pruning masks ``masks.safetensors`` holds, shaped as the manifest says."""
    shapes = manifest.get("masks") or {}
    if not shapes:
        return {}
    if not isinstance(shapes, dict) or MASKS not in manifest["files"]:
        raise ArtifactError(f"{path / MANIFEST}: 'masks' must map layers to shapes, with {MASKS} listed")
    try:
        bits = safetensors_load((path / MASKS).read_bytes())
    except (OSError, SafetensorError) as e:
        raise ArtifactError(f"{path / MASKS}: unreadable ({type(e).__name__})") from None
    out = {}
    for key, shape in shapes.items():
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ArtifactError(f"{path / MANIFEST}: mask shape of '{key}' must list sizes")
        numel = 1
        for d in shape:
            numel *= d
        b = bits.get(key)
        if b is None or b.dtype != torch.uint8 or b.shape != ((numel + 7) // 8,):
            raise ArtifactError(f"{path / MASKS}: no {numel}-weight bitmask for '{key}'")
        out[key] = unpack_mask(b, numel).reshape(shape)
    return out


def _recorded_base_path(manifest: dict) -> str | None:
    """Where a delta-only artifact's base was loaded from when the delta was taken (a hint: the digest decides)."""
    hint = (manifest.get("delta_only") or {}).get("base_path")
    return hint if isinstance(hint, str) and Path(hint).exists() else None


def _delta_only(path: Path, manifest: dict) -> str | None:
    """The base weights digest a delta-only artifact records (None: a full artifact)."""
    info = manifest.get("delta_only")
    if info is None:
        return None
    if not isinstance(info, dict) or not isinstance(info.get("base_weights_sha256"), str):
        raise ArtifactError(f"{path / MANIFEST}: 'delta_only' must record base_weights_sha256")
    return info["base_weights_sha256"]


def load(path: str | Path, base: Graph | None = None, find_base: Callable[[str], Graph] | None = None) -> Graph:
    """Load an artifact directory or a bare ``.pt2`` program into a Graph; ``base``: the base model
    of a delta-only artifact (refused unless its weights digest is the one recorded); without one,
    ``find_base(path)`` loads the base from where the delta recorded it, if that path still exists."""
    path = Path(path)
    if not path.exists():
        raise SpliceError(f"{path}: no such file or directory")
    if path.is_file():
        ep, inputs = read_program(path, sample_inputs=True)
        return graph_from_program(ep, inputs, {"kind": "pt2", "path": str(path.resolve()), "name": path.stem})
    if not (path / MANIFEST).is_file():
        raise SpliceError(f"{path}: not a splice artifact (no {MANIFEST})")
    with phase(f"check {path.name} (manifest, file hashes)"):
        manifest = read_manifest(path)
    inputs = _example_inputs(path, manifest["inputs"])
    recorded = _delta_only(path, manifest)
    if recorded is None and base is not None:
        raise ConfigError(f"{path}: not a delta-only artifact; it loads without base=")
    if recorded is not None:
        if base is None and find_base is not None and (hint := _recorded_base_path(manifest)) is not None:
            base = find_base(hint)
        check_base(recorded, base, str(path))
    with phase(f"read {path.name}/{PROGRAM} (program, weights)"):
        ep, _ = read_program(path / PROGRAM)
    try:
        dynamic = {k: {int(a): v for a, v in d.items()} for k, d in manifest["dynamic"].items()}
    except (AttributeError, TypeError, ValueError):
        raise ArtifactError(f"{path / MANIFEST}: manifest key 'dynamic' must map inputs to {{axis: label}}") from None
    source = manifest["source"]
    if (source.get("tokenizer") or {}).get("embedded"):  # its files are the artifact's own (checked above)
        source = {**source, "tokenizer": tokenizer_source(str(path.resolve()), embedded=True)}
    graph = graph_from_program(ep, inputs, source, output_names=manifest["outputs"], history=manifest["passes"])
    outputs = len(next(n for n in graph.gm.graph.nodes if n.op == "output").args[0])
    if graph.input_names != manifest["inputs"] or len(manifest["outputs"]) != outputs:
        raise ArtifactError(f"{path / MANIFEST}: inputs {manifest['inputs']} and {len(manifest['outputs'])} outputs "
                            f"do not match {PROGRAM} (inputs {graph.input_names}, {outputs} outputs)")
    graph.dynamic = dynamic
    unpack_graph(graph)
    graph.masks.update(_masks(path, manifest))
    return graph if recorded is None else bind_base(graph, base)
