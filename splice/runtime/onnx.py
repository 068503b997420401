"""ONNX export, ONNX Runtime sessions, and the parity check against ``graph.module()``.

``export_onnx`` re-exports the Graph, lowers it with ``torch.onnx`` (dynamo) using the
translations of every splice op (``kernels.registry.translations("onnx")``), names the dynamic dims after the
Graph's labels (``batch``, ``seq``), and writes the file atomically, with weights in an
external ``.data`` file when the model is large.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch

from splice.errors import ExportError
from splice.ir.atomic import atomic_files, check_writable
from splice.ir.graph import Graph
from splice.kernels.registry import ONNX_OPSET, missing_translations, op_name, record, translations
from splice.progress import phase, track
from splice.runtime.adapter_inputs import with_adapter_inputs

EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to an external file


def untranslatable_ops(graph: Graph, backend: str = "onnx") -> list[tuple[str, str]]:
    """(op, pass that introduced it) for custom ops with no ``backend`` translation in the op registry."""
    introduced = {}
    for node in graph.gm.graph.nodes:
        if node.op == "call_function":
            introduced.setdefault(node.target, node.meta.get("splice_pass", "capture"))
    return [(op_name(op), introduced[op]) for op in missing_translations(backend, introduced)]


def refuse_instruments(graph: Graph) -> None:
    """ExportError when the graph still has instrument ops (observers): a pass removes them first."""
    found = [n for n in graph.gm.graph.nodes
             if n.op == "call_function" and getattr(record(n.target), "family", None) == "instrument"]
    if found:
        ops = sorted({op_name(n.target) for n in found})
        raise ExportError(f"export: the graph still has {len(found)} instrument op(s) ({', '.join(ops)}); "
                          "remove them first with the pass instrument.strip (-p instrument.strip)")


def to_onnx_model(graph: Graph, accuracy_level: int = 0) -> onnx.ModelProto:
    """Lower ``graph`` to ONNX. ``accuracy_level`` goes to every MatMulNBits (0 exact, 4 int8 compute)."""
    refuse_instruments(graph)
    missing = untranslatable_ops(graph)
    if missing:
        raise ExportError("ONNX export: no onnx translation for " + ", ".join(
            f"op {op} (introduced by pass {by})" for op, by in missing))
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # not torchvision's missing ops
    try:
        program = torch.onnx.export(graph.export_program(), (), dynamo=True, custom_translation_table=translations("onnx"),
                                    input_names=graph.input_names, output_names=graph.output_names,
                                    opset_version=ONNX_OPSET, optimize=True, verbose=False)
    except Exception as e:
        raise ExportError(f"ONNX export failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
    model = program.model_proto
    _dedupe_initializers(model)
    _label_dynamic_dims(model, graph)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", accuracy_level))
    return model


def adapter_inputs_model(graph: Graph, accuracy_level: int = 0) -> onnx.ModelProto:
    """ONNX model of ``graph`` with the adapter tensors as inputs (``runtime.adapter_inputs``), each
    with its current value as an initializer of the same name: a default that a call may override
    (``export_onnx(..., adapter_inputs=True)`` uses this)."""
    g = with_adapter_inputs(graph)
    model = to_onnx_model(g, accuracy_level)
    n = len(graph.input_names)
    for name, value in zip(g.input_names[n:], g.example_inputs[n:]):
        model.graph.initializer.append(onnx.numpy_helper.from_array(value.numpy(), name))
    return model


def _dedupe_initializers(model: onnx.ModelProto) -> None:
    """Store equal initializers (type, shape, bytes) once: export folds a weight that several ops
    read (a tied or block-shared weight) into one transposed copy per reader."""
    import hashlib

    protected = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    kept = []
    for init in model.graph.initializer:
        data = init.raw_data or onnx.numpy_helper.to_array(init).tobytes()
        key = (init.data_type, tuple(init.dims), hashlib.sha256(data).digest())
        if init.name not in protected and key in first:
            rename[init.name] = first[key]
            continue
        first.setdefault(key, init.name)
        kept.append(init)
    if not rename:
        return
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]


def _label_dynamic_dims(model: onnx.ModelProto, graph: Graph) -> None:
    """Rename export's symbolic dims (``s43``) to the Graph's labels (``batch``, ``seq``)."""
    rename = {}
    for value in model.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            label = graph.dynamic.get(value.name, {}).get(axis)
            if dim.dim_param and label:
                rename[dim.dim_param] = label
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def export_onnx(graph: Graph, path: str | os.PathLike, *, external_data: bool | None = None,
                force: bool = True, accuracy_level: int = 0, adapter_inputs: bool = False) -> Path:
    """Write ``graph`` as ONNX to ``path`` (and ``path.data`` when weights are external).
    ``adapter_inputs``: adapter tensors become graph inputs with defaults (``adapter_inputs_model``)."""
    path = check_writable(path, force)  # also refuses a path inside an artifact (ART/program.pt2)
    with phase(f"lower to ONNX ({path.name})"):
        model = adapter_inputs_model(graph, accuracy_level) if adapter_inputs else to_onnx_model(graph, accuracy_level)
    if external_data is None:
        external_data = sum(t.numel() * t.element_size() for t in graph.tensors().values()) > EXTERNAL_DATA_BYTES

    def write(tmp: Path) -> None:
        onnx.save_model(model, tmp / path.name, save_as_external_data=external_data,
                        all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024)

    return atomic_files(path, force, write)


def onnx_bytes(path: str | os.PathLike) -> int:
    """Size on disk of an ONNX model including its external data file."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def session(path: str | os.PathLike, *, threads: int | None = None, accuracy_level: int = 0):
    """An ONNX Runtime CPU session. ``accuracy_level`` applies to the MatMulNBits that ORT
    fuses from DequantizeLinear+MatMul (0 exact, 4 int8 compute); MatMulNBits written by
    the exporter carry their own level (``export_onnx(..., accuracy_level=)``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_session(sess, graph: Graph, inputs: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    feeds = {name: t.detach().cpu().numpy() for name, t in zip(graph.input_names, inputs)}
    return dict(zip(graph.output_names, sess.run(graph.output_names, feeds)))


def parity(graph: Graph, path: str | os.PathLike, inputs_list: Sequence[Sequence[torch.Tensor]]) -> float:
    """Max abs difference between ONNX Runtime and ``graph.module()`` over ``inputs_list``."""
    sess = session(path)
    worst = 0.0
    for inputs in track(inputs_list, "parity: ONNX Runtime vs torch", unit="shape"):
        ref = graph.run(*inputs)
        got = run_session(sess, graph, inputs)
        for name, r in ref.items():
            r = r.detach().numpy()
            if got[name].shape != r.shape:
                raise ExportError(f"ONNX output {name} has shape {got[name].shape}, expected {r.shape}")
            diff = float(np.abs(got[name] - r).max()) if r.size else 0.0
            worst = max(worst, diff if np.isfinite(diff) else float("inf"))
    return worst
