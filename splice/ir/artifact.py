"""Artifacts: a directory with ``program.pt2`` (``torch.export.save``) and ``manifest.json``.

The manifest records the source model, every pass with its config, version and report,
the package versions, the graph's input/output spec, and a SHA-256 of every file plus a
checksum of the manifest itself, so edited or truncated artifacts are refused on load.
Writes go to a temporary sibling directory that is renamed into place: an interrupted
save leaves nothing half-written.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from splice.errors import ArtifactError, SpliceError

FORMAT = "splice-artifact"
FORMAT_VERSION = 1
PROGRAM = "program.pt2"
MANIFEST = "manifest.json"
_PACKAGES = ("splice", "torch", "transformers", "onnx", "onnxruntime", "onnxscript")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def refuse_existing(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise SpliceError(f"{path}: already exists; use --force (force=True) to overwrite")


def atomic_dir(path: Path, force: bool, write) -> None:
    """Run ``write(tmpdir)`` and move the result to ``path`` only if it succeeds."""
    path = Path(path)
    refuse_existing(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save(graph, path: str | Path, *, force: bool = False) -> Path:
    """Save ``graph`` as an artifact directory (atomically)."""
    path = Path(path)
    refuse_existing(path, force)
    program = graph.export_program()

    def write(tmp: Path) -> None:
        torch.export.save(program, tmp / PROGRAM)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "source": graph.source, "inputs": graph.input_names, "outputs": graph.output_names,
            "dynamic": {k: {str(a): v for a, v in d.items()} for k, d in graph.dynamic.items()},
            "passes": graph.history, "bytes_by_role": graph.bytes_by_role(), "params": graph.num_params(),
            "packages": package_versions(),
            "files": {PROGRAM: {"sha256": sha256(tmp / PROGRAM), "bytes": (tmp / PROGRAM).stat().st_size}},
        }
        manifest["checksum"] = _checksum(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))

    atomic_dir(path, force, write)
    return path


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of artifact ``path``, after checking it and every file it lists."""
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{mpath}: unreadable or truncated manifest ({type(e).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: not a splice artifact manifest")
    if manifest.get("checksum") != _checksum(manifest):
        raise ArtifactError(f"{mpath}: manifest was edited (checksum mismatch); re-create the artifact")
    for name, info in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{path}: missing {name}")
        if f.stat().st_size != info["bytes"] or sha256(f) != info["sha256"]:
            raise ArtifactError(f"{f}: content does not match the manifest (edited or truncated)")
    return manifest


def refuse_pickled(program: Path) -> None:
    """Refuse a .pt2 whose weights would be unpickled (arbitrary code on load)."""
    try:
        with zipfile.ZipFile(program) as z:
            configs = [n for n in z.namelist() if n.endswith("_config.json")]
            if any(b'"use_pickle": true' in z.read(n) for n in configs):
                raise ArtifactError(f"{program}: contains pickled tensors; refusing to load untrusted pickle")
    except zipfile.BadZipFile:
        raise ArtifactError(f"{program}: not a torch.export program (bad zip)") from None


def load_program(program: Path) -> torch.export.ExportedProgram:
    refuse_pickled(program)
    try:
        return torch.export.load(program)
    except Exception as e:
        raise ArtifactError(f"{program}: cannot load program: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def load(path: str | Path):
    """Load an artifact directory or a bare ``.pt2`` program into a Graph."""
    from splice.frontends.torch_export import graph_from_program

    path = Path(path)
    if not path.exists():
        raise SpliceError(f"{path}: no such file or directory")
    if path.is_file():
        ep = load_program(path)
        inputs = tuple(ep.example_inputs[0]) if ep.example_inputs else ()
        return graph_from_program(ep, inputs, {"kind": "pt2", "path": str(path.resolve()), "name": path.stem})
    if not (path / MANIFEST).is_file():
        raise SpliceError(f"{path}: not a splice artifact (no {MANIFEST})")
    manifest = read_manifest(path)
    ep = load_program(path / PROGRAM)
    graph = graph_from_program(ep, tuple(ep.example_inputs[0]), manifest["source"],
                               output_names=manifest["outputs"], history=manifest["passes"])
    graph.dynamic = {k: {int(a): v for a, v in d.items()} for k, d in manifest["dynamic"].items()}
    return graph
