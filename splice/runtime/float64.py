"""Float64 twins of a captured graph and of its ONNX export, to separate translation error from fp32 noise.

An fp32 model's ONNX Runtime outputs differ from torch's by its rounding (on SmolLM2-135M's logits
about 1e-4, before any splice op). Run both sides in float64 and that noise drops by ~9 decimal
digits, so what remains is the difference between the ONNX graph's math and the torch graph's math.
Both twins widen *every* float32 in the graph, including the casts the model makes itself (Llama's
RMSNorm casts to float32): ``double_module`` rewrites ``dtype=torch.float32`` arguments of the FX
graph, and ``double_graph`` exports that module with splice's own ONNX translations
(``to_onnx_model``): the same lowering as an fp32 export, only computed and constant-folded wider.
(ORT has no float64 ``Erf``, so BERT-like models with exact GELU cannot run this way.)
"""
from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch

from splice.ir.graph import Graph


def double_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` with float64 parameters and buffers and every ``torch.float32`` argument
    (casts, factory dtypes) replaced by ``torch.float64``."""
    gm = copy.deepcopy(gm).double()
    widen = lambda a: torch.float64 if a is torch.float32 else a  # noqa: E731
    for node in gm.graph.nodes:
        node.args = torch.fx.node.map_aggregate(node.args, widen)
        node.kwargs = torch.fx.node.map_aggregate(node.kwargs, widen)
    gm.recompile()
    return gm


def _widen(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(x.double() if x.is_floating_point() else x for x in inputs)


def double_outputs(gm: torch.fx.GraphModule, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``gm`` (a ``double_module``) run on ``inputs`` widened to float64."""
    with torch.no_grad():
        out = gm(*_widen(inputs))
    return [t.detach() for t in (out if isinstance(out, (tuple, list)) else (out,))]


def double_graph(graph: Graph) -> Graph:
    """``graph`` computing in float64: ``double_module`` and float64 example inputs."""
    return Graph(double_module(graph.gm), list(graph.input_names), list(graph.output_names),
                 _widen(graph.example_inputs), dict(graph.dynamic), dict(graph.source), list(graph.history))


def _session(model):
    """An ORT CPU session with graph optimizations off (ORT's fusions are float32 kernels; this
    measures the exported graph's own math)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def double_parity(graph: Graph, inputs_list: Sequence[Sequence[torch.Tensor]]) -> dict:
    """Max abs diff between ORT and torch, both in float64 (one float64 twin, exported with
    splice's translations and run in both), over ``inputs_list``; also the largest |output|."""
    from splice.runtime.onnx import run_session, to_onnx_model

    twin = double_graph(graph)
    sess = _session(to_onnx_model(twin))
    worst, scale = 0.0, 0.0
    for inputs in inputs_list:
        got = run_session(sess, twin, _widen(inputs))
        for r, g in zip(double_outputs(twin.gm, inputs), got.values()):
            worst = max(worst, float(np.abs(r.numpy() - g).max()))
            scale = max(scale, float(r.abs().max()))
    return {"max_abs_diff": worst, "max_abs_output": scale}
