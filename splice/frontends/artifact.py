"""Load a saved artifact directory (``ir/artifact.py``) or a bare ``.pt2`` program into a Graph.

An artifact is untrusted input: its manifest and every listed file are checked first
(``ir.artifact.read_manifest``), the program is read without unpickling anything
(``frontends/safe_pt2.py``), and the example inputs come from ``inputs.safetensors``. A bare
``.pt2`` written by ``torch.export.save`` loads the same way, its example inputs read with
``torch.load(weights_only=True)`` or refused.
"""
from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load

from splice.errors import ArtifactError, SpliceError
from splice.frontends.safe_pt2 import read_program
from splice.frontends.torch_export import graph_from_program
from splice.ir.artifact import INPUTS, MANIFEST, PROGRAM, read_manifest
from splice.ir.graph import Graph
from splice.progress import phase


def _example_inputs(path: Path, names: list) -> tuple:
    try:
        tensors = safetensors_load((path / INPUTS).read_bytes())
    except (OSError, SafetensorError) as e:
        raise ArtifactError(f"{path / INPUTS}: unreadable ({type(e).__name__})") from None
    if set(tensors) != set(names):
        raise ArtifactError(f"{path / INPUTS}: holds {sorted(tensors)}, the manifest's inputs are {names}")
    return tuple(tensors[n] for n in names)


def load(path: str | Path) -> Graph:
    """Load an artifact directory or a bare ``.pt2`` program into a Graph."""
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
    with phase(f"read {path.name}/{PROGRAM} (program, weights)"):
        ep, _ = read_program(path / PROGRAM)
    try:
        dynamic = {k: {int(a): v for a, v in d.items()} for k, d in manifest["dynamic"].items()}
    except (AttributeError, TypeError, ValueError):
        raise ArtifactError(f"{path / MANIFEST}: manifest key 'dynamic' must map inputs to {{axis: label}}") from None
    graph = graph_from_program(ep, inputs, manifest["source"], output_names=manifest["outputs"],
                               history=manifest["passes"])
    outputs = len(next(n for n in graph.gm.graph.nodes if n.op == "output").args[0])
    if graph.input_names != manifest["inputs"] or len(manifest["outputs"]) != outputs:
        raise ArtifactError(f"{path / MANIFEST}: inputs {manifest['inputs']} and {len(manifest['outputs'])} outputs "
                            f"do not match {PROGRAM} (inputs {graph.input_names}, {outputs} outputs)")
    graph.dynamic = dynamic
    return graph
