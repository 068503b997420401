"""Capture an ``nn.Module`` with ``torch.export`` (non-strict) and flatten it into a Graph.

Dynamic dims are ``Dim.AUTO`` on the batch axis of every tensor input and on the sequence
axis of token-like inputs (2-D integer tensors, 3-D float sequences); torch.export keeps a
dim symbolic where the model allows and specializes it otherwise. The exported program's
pytree signature is replaced by flat positional inputs and a tuple of outputs, named after
the forward's keyword arguments and the output's fields (``logits``, ``last_hidden_state``).
"""
from __future__ import annotations

import contextlib
import inspect
import io
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch.export import Dim

from splice.errors import CaptureError
from splice.ir.canonical import canonicalize
from splice.ir.graph import Graph, rebuild_module
from splice.ir.select import module_path, op_kind

aten = torch.ops.aten


def capture_module(model: torch.nn.Module, example_inputs: Any, dynamic: Any = True,
                   source: dict | None = None) -> Graph:
    """``torch.export`` ``model`` on ``example_inputs`` (a tensor, tuple, or dict of kwargs)."""
    args, kwargs = _split_inputs(example_inputs)
    model.eval()
    shapes = _dynamic_shapes(model, args, kwargs, dynamic)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # export prints the partial graph on failure
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as e:  # torch.export raises many types; all mean "cannot capture"
        raise CaptureError(f"torch.export cannot capture {type(model).__name__}: {_reason(e)}; "
                           "check that example_inputs match forward(), try dynamic=False, or replace "
                           "data-dependent Python control flow (torch.cond)") from e
    flat_inputs = tuple(pytree.tree_leaves((args, kwargs)))
    src = {"kind": "module", "class": type(model).__qualname__, "name": type(model).__name__, **(source or {})}
    graph = graph_from_program(ep, flat_inputs, src)
    check_input_dtypes(graph)
    return graph


_MATMULS = {aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default}


def _dtype(node: Any) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _origin(node: fx.Node) -> fx.Node:
    """The node ``node``'s value comes from, following first tensor arguments back to an input."""
    while node.op != "placeholder":
        parent = next((a for a in node.args if isinstance(a, fx.Node)), None)
        if parent is None:
            return node
        node = parent
    return node


def check_input_dtypes(graph: Graph) -> None:
    """CaptureError when an integer tensor reaches a float layer's data input (``nn.Linear`` fed
    ``torch.long`` ids): export traces it, but it would fail on the first run."""
    for node in graph.gm.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "namespace", None) != "aten" \
                or not (op_kind(node) in ("linear", "conv") or node.target in _MATMULS):
            continue
        dtypes = [_dtype(a) for a in node.args]
        if not any(d is not None and d.is_floating_point for d in dtypes):
            continue
        bad = next((a for a, d in zip(node.args, dtypes) if d is not None and not d.is_floating_point), None)
        if bad is not None:
            src = _origin(bad)
            what = f"input '{src.target}'" if src.op == "placeholder" else f"tensor '{bad.name}'"
            raise CaptureError(f"capture: {what} is {_dtype(bad)} but feeds the float layer "
                               f"'{module_path(node) or node.name}' ({str(node.target).replace('.default', '')}); "
                               "pass floating-point example inputs (e.g. x.float())")


def graph_from_program(ep: torch.export.ExportedProgram, example_inputs: tuple, source: dict,
                       output_names: list[str] | None = None, history: list | None = None) -> Graph:
    """Flatten ``ep.module()`` to positional inputs / tuple outputs and canonicalize it."""
    gm = ep.module()
    for p in gm.parameters():  # a captured graph is for inference until a pass makes tensors trainable
        p.requires_grad_(False)
    g = gm.graph
    for node in list(g.nodes):
        if node.op == "call_module":  # torch.export's input-guard hook
            g.erase_node(node)
    g._codegen = fx.graph.CodeGen()
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    out = next(n for n in g.nodes if n.op == "output")
    leaves = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    out.args = (tuple(leaves),)
    for node in g.nodes:  # provenance survives re-export in meta["custom"]
        if "splice_pass" in node.meta.get("custom", {}):
            node.meta["splice_pass"] = node.meta["custom"]["splice_pass"]
    names = output_names or _output_names(ep.call_spec.out_spec, len(leaves))
    graph = Graph(rebuild_module(gm, g), [p.name for p in placeholders], names, tuple(example_inputs),
                  _dynamic_axes(placeholders), source, list(history or []))
    return canonicalize(graph)


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CaptureError(f"example_inputs must be a tensor, tuple or dict, got {type(example_inputs).__name__}")


def _auto_axes(t: Any) -> dict[int, Any] | None:
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return None
    axes = {0: Dim.AUTO}
    if (t.dim() == 2 and not t.is_floating_point()) or (t.dim() == 3 and t.is_floating_point()):
        axes[1] = Dim.AUTO
    return axes


def _dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: Any):
    """torch.export ``dynamic_shapes`` keyed by forward's argument names."""
    if dynamic is False or dynamic is None:
        return None
    named = dict(zip(inspect.signature(model.forward).parameters, args)) | kwargs
    if dynamic is True:
        return {k: _auto_axes(v) for k, v in named.items()}
    if isinstance(dynamic, dict) and all(isinstance(v, dict) for v in dynamic.values()):
        # {input_name: {axis: label}} -> Dim.AUTO on those axes
        return {k: {int(ax): Dim.AUTO for ax in dynamic.get(k, {})} or None for k in named}
    return dynamic  # already in torch.export's dynamic_shapes form


def _dynamic_axes(placeholders: list[fx.Node]) -> dict[str, dict[int, str]]:
    """``{input: {axis: label}}`` for every symbolic dim; one label per symbol."""
    labels: dict[str, str] = {}
    out: dict[str, dict[int, str]] = {}
    for p in placeholders:
        val = p.meta.get("val")
        for axis, size in enumerate(getattr(val, "shape", ())):
            if isinstance(size, torch.SymInt):
                key = str(size)
                if key not in labels:  # torch.export.Dim.AUTO gives each input its own symbol
                    labels[key] = "batch" if axis == 0 else "seq" if axis == 1 else f"{p.name}_{axis}"
                out.setdefault(p.name, {})[axis] = labels[key]
    return out


def _output_names(out_spec: pytree.TreeSpec, n: int) -> list[str]:
    dummy = pytree.tree_unflatten(list(range(n)), out_spec)
    names = []
    for path, _ in pytree.tree_flatten_with_path(dummy)[0]:
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        names.append("_".join(parts) or "output")
    if len(set(names)) != len(names):
        names = [f"output_{i}" for i in range(n)]
    return names


def _reason(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return (text[:240] + "…") if len(text) > 240 else text
