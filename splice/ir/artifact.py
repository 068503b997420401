"""Artifacts: a directory with ``program.pt2``, ``inputs.safetensors`` and ``manifest.json``.

* ``program.pt2``: ``torch.export.save`` of the re-exported graph, without torch's pickled sample
  inputs (weights and constants are raw tensor bytes);
* ``inputs.safetensors``: the example inputs, one tensor per graph input name;
* ``masks.safetensors`` (when a pruned layer's weight is not a plain float tensor, e.g. quantized
  after pruning): those layers' pruning masks as bitmasks, their shapes in the manifest's ``masks``.
  Masked float weights are stored packed in the program itself (``ir/sparsity.py``'s ``pack_graph``);
* a delta-only artifact (``save(..., delta_only=True)`` of a graph carrying deltas, ``ir/deltas.py``)
  stores no base tensor: its manifest's ``delta_only`` records the base's weights digest, and loading
  needs that base (``splice.load(path, base=…)``);
* an embedded tokenizer's files (``ir/tokenizer.py``: a merge's union vocabulary), under their own
  names (``tokenizer.json``, ``tokenizer_config.json`` …);
* ``manifest.json``: the source model, every pass with its config, version and report, the package
  versions, the graph's input/output spec, the SHA-256 and size of every other file, and a checksum
  of the manifest itself.

An artifact holds exactly the files its manifest lists (plus the manifest): a listed name must be
a plain file name in the directory (no ``/``, ``..``, absolute path or symbolic link) and an
unlisted file is refused, so loading never reads outside the artifact. The hashes are unkeyed:
they detect corruption (a truncated copy, an edited file) but not tampering; anyone can rewrite a
file and its hash. Safety against a crafted artifact comes from never unpickling anything
(``frontends/safe_pt2.py``), not from the hashes.

Saving goes through ``ir/atomic.py`` (temporary sibling, lock, rename); loading is
``frontends/artifact.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from splice.errors import ArtifactError
from splice.ir.atomic import ARTIFACT_FORMAT as FORMAT
from splice.ir.atomic import MANIFEST, atomic_dir, check_writable, failsafe_file
from splice.ir.deltas import base_record, strip_base
from splice.ir.graph import set_save
from splice.ir.sparsity import pack_graph
from splice.ir.tokenizer import embedded_files
from splice.kernels.prune.ops import pack_mask

FORMAT_VERSION = 2  # 2: example inputs in inputs.safetensors, none pickled in program.pt2
PROGRAM = "program.pt2"
INPUTS = "inputs.safetensors"
MASKS = "masks.safetensors"
FILES = (PROGRAM, INPUTS)
REQUIRED = {"format": str, "format_version": int, "source": dict, "inputs": list, "outputs": list,
            "dynamic": dict, "passes": list, "files": dict, "checksum": str}
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


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest without its ``checksum`` key (unkeyed, like the file hashes)."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _example_tensors(graph) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in zip(graph.input_names, graph.example_inputs):
        if not isinstance(value, torch.Tensor):
            raise ArtifactError(f"save: example input {name} is a {type(value).__name__}, not a tensor")
        out[name] = value.detach().cpu().contiguous().clone()
    return out


def save(graph, path: str | Path, *, force: bool = False, delta_only: bool = False) -> Path:
    """Save ``graph`` as an artifact directory (atomically; see ``ir/atomic.py``); ``delta_only``:
    without the base tensors of its deltas (module docstring)."""
    from safetensors.torch import save as safetensors_bytes

    path = check_writable(path, force)
    packed = pack_graph(graph)
    if delta_only:
        packed = strip_base(packed, f"save {path}")
    program = packed.export_program()
    program.example_inputs = None  # torch would pickle them; inputs.safetensors holds them
    inputs = safetensors_bytes(_example_tensors(graph))
    masks = safetensors_bytes({k: pack_mask(m) for k, m in packed.masks.items()}) if packed.masks else None
    by_role = packed.bytes_by_role()
    if masks is not None:
        by_role["mask"] = by_role.get("mask", 0) + sum((m.numel() + 7) // 8 for m in packed.masks.values())
    tokenizer = embedded_files(graph.source)
    files = FILES + ((MASKS,) if masks is not None else ()) + tuple(tokenizer)
    source = {**graph.source, "tokenizer": {"embedded": True}} if tokenizer else graph.source

    def write(tmp: Path) -> None:
        with failsafe_file(tmp / PROGRAM) as f:
            torch.export.save(program, f)
        for name, data in ((INPUTS, inputs), (MASKS, masks)):
            if data is not None:
                with open(tmp / name, "wb") as f:
                    f.write(data)
                    os.fsync(f.fileno())
        for name, src in tokenizer.items():
            shutil.copyfile(src, tmp / name)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "source": source, "inputs": graph.input_names, "outputs": graph.output_names,
            "dynamic": {k: {str(a): v for a, v in d.items()} for k, d in graph.dynamic.items()},
            "passes": graph.history, "bytes_by_role": by_role, "params": graph.num_params(),
            "masks": {k: list(m.shape) for k, m in packed.masks.items()}, "packages": package_versions(),
            **({"delta_only": {"base_weights_sha256": base_record(graph)["weights_sha256"],
                               "base_path": base_record(graph).get("path")}} if delta_only else {}),
            "files": {name: {"sha256": sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in files},
        }
        manifest["checksum"] = manifest_checksum(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))

    return atomic_dir(path, force, write)


set_save(save)


def _parse(mpath: Path) -> dict[str, Any]:
    if mpath.is_symlink():
        raise ArtifactError(f"{mpath}: is a symbolic link; an artifact holds only regular files")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{mpath}: unreadable or truncated manifest ({type(e).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: not a splice artifact manifest")
    for key, kind in REQUIRED.items():
        if key not in manifest:
            raise ArtifactError(f"{mpath}: manifest has no '{key}'")
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise ArtifactError(f"{mpath}: manifest key '{key}' must be a {kind.__name__}")
    for key in ("inputs", "outputs"):
        if not all(isinstance(name, str) for name in manifest[key]):
            raise ArtifactError(f"{mpath}: manifest key '{key}' must list names")
    if not all(isinstance(entry, dict) for entry in manifest["passes"]):
        raise ArtifactError(f"{mpath}: manifest key 'passes' must list pass entries")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: artifact format version {manifest['format_version']}, this splice reads "
                            f"version {FORMAT_VERSION}; re-create the artifact")
    if manifest["checksum"] != manifest_checksum(manifest):
        raise ArtifactError(f"{mpath}: manifest was edited (checksum mismatch); re-create the artifact")
    return manifest


def _check_name(path: Path, name: Any) -> None:
    if not isinstance(name, str) or name in ("", ".", "..", MANIFEST) or "/" in name or "\\" in name \
            or "\0" in name or os.path.isabs(name):
        raise ArtifactError(f"{path / MANIFEST}: listed file {name!r} is not a plain file name in the artifact")


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of artifact ``path``, after checking it and every file it lists."""
    manifest = _parse(path / MANIFEST)
    files = manifest["files"]
    for name in FILES:
        if name not in files:
            raise ArtifactError(f"{path / MANIFEST}: does not list {name}")
    for entry in sorted(os.listdir(path)):
        if entry != MANIFEST and entry not in files:
            raise ArtifactError(f"{path / entry}: not listed in the manifest (an artifact holds only listed files)")
    for name, info in files.items():
        _check_name(path, name)
        f = path / name
        if f.is_symlink():
            raise ArtifactError(f"{f}: is a symbolic link; an artifact holds only regular files")
        if not f.is_file():
            raise ArtifactError(f"{path}: missing {name}")
        if not isinstance(info, dict) or not isinstance(info.get("bytes"), int) or not isinstance(info.get("sha256"), str):
            raise ArtifactError(f"{path / MANIFEST}: entry of {name} needs 'bytes' and 'sha256'")
        if f.stat().st_size != info["bytes"] or sha256(f) != info["sha256"]:
            raise ArtifactError(f"{f}: content does not match the manifest (edited or truncated)")
    return manifest
