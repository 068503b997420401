"""The export targets: what ``splice export ART --onnx FILE`` (and later ``--tvm``, ``--mlir``, ``--hf``) can write.

One :class:`ExportTarget` per target: its name, its ``splice export`` flag and help, the
function that writes the file, and optionally a parity check against torch. The CLI builds
``splice export``'s flags from :func:`export_targets`, so a new target is one
``register_target`` call here plus its runtime module — no CLI edit. Cheap to import: each
target's runtime module (onnx, onnxruntime, …) is imported only when that target runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from splice.errors import SpliceError


@dataclass(frozen=True)
class ExportTarget:
    name: str                  # "onnx"; also the attribute argparse stores the path in
    flag: str                  # "--onnx"
    help: str
    export: Callable[..., None]   # export(graph, path): writes path (and companion files beside it)
    check: Callable[..., float] | None = None  # check(graph, path, inputs_list, verbose) -> max |target - torch|
    metavar: str = "FILE"     # "DIR": the export writes a directory


_TARGETS: dict[str, ExportTarget] = {}


def register_target(target: ExportTarget) -> ExportTarget:
    if target.name in _TARGETS:
        raise SpliceError(f"export target {target.name!r} is already registered")
    _TARGETS[target.name] = target
    return target


def export_targets() -> list[ExportTarget]:
    return list(_TARGETS.values())


def _onnx_export(graph, path: Path) -> None:
    from splice.runtime.onnx import export_onnx

    export_onnx(graph, path, force=True)


def _onnx_check(graph, path: Path, inputs_list: Sequence, verbose: bool = False) -> float:
    import onnxruntime as ort

    from splice.runtime.onnx import parity

    if not verbose:
        ort.set_default_logger_severity(3)  # ORT's C++ warnings bypass Python's stderr
    return parity(graph, path, inputs_list)


register_target(ExportTarget("onnx", "--onnx", "ONNX file to write (weights in FILE.data when large)",
                             _onnx_export, _onnx_check))


def _hf_export(graph, path: Path) -> None:
    from splice.runtime.hf import export_hf

    export_hf(graph, path)


def _hf_check(graph, path: Path, inputs_list: Sequence, verbose: bool = False) -> float:
    from splice.runtime.hf import check_hf

    return check_hf(graph, path, inputs_list, verbose)


register_target(ExportTarget("hf", "--hf", "transformers directory to write (config + safetensors; float graphs "
                             "captured from a transformers model, e.g. after structured pruning)",
                             _hf_export, _hf_check, metavar="DIR"))
