"""Weight access: any op's stored weight as a dense float tensor, and a new dense weight put back
on the op's own format, without knowing how another family stores it.

ATen ops (linear, conv, embedding) keep their float weight in one argument (the table below); a
splice op declares its own access in its registry record (``kernels.registry.WeightAccess``:
dequantize / re-quantize onto the same grid, snap to its tables, …). Passes that change weights of
any base op (adapter folding, masks, merging, sharing) go through ``dense_weight`` /
``replace_weight``; ``shared_tensors`` says which stored tensors several nodes read (tied weights).
"""
from __future__ import annotations

import torch
from torch import fx

from splice.errors import ConfigError
from splice.ir.graph import Graph, attr_users, set_attr
from splice.ir.metrics import sqnr_db
from splice.ir.select import module_path
from splice.kernels.registry import record

aten = torch.ops.aten

# the argument that holds an ATen op's float weight, and its name in a fold record
_ATEN_WEIGHT = {
    aten.linear.default: 1,
    aten.conv1d.default: 1,
    aten.conv2d.default: 1,
    aten.conv3d.default: 1,
    aten.convolution.default: 1,
    aten.embedding.default: 0,
}
Originals = dict[str, fx.Node]


def weight_args(node: fx.Node) -> dict[int, str] | None:
    """``{argument position: name}`` of the stored tensors ``node``'s weight lives in (None: the op
    stores no weight). Names are those fold records keep (``weight``; ``qweight``/``scales``/``qzeros``)."""
    if node.op != "call_function":
        return None
    if node.target in _ATEN_WEIGHT:
        return {_ATEN_WEIGHT[node.target]: "weight"}
    rec = record(node.target)
    return dict(rec.weight.args) if rec is not None and rec.weight is not None else None


def stored_weight(node: fx.Node) -> fx.Node:
    """The node of the first stored tensor ``node``'s weight lives in (the float weight of an ATen
    op, ``qweight`` of a quantized one); ``node`` must store a weight (``weight_args``)."""
    return node.args[next(iter(weight_args(node)))]


def is_lossy(node: fx.Node) -> bool:
    """Whether writing a weight to ``node`` rounds it (re-quantizes), so ``replace_weight`` keeps the originals."""
    rec = record(node.target)
    return rec is not None and rec.weight is not None and rec.weight.lossy


def _stored(graph: Graph, node: fx.Node, index: int):
    arg = node.args[index] if len(node.args) > index else None
    if arg is None:
        return None
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        raise ConfigError(f"layer '{module_path(node)}' ({node.target}) has no stored weight (it is computed in the graph)")
    return graph.tensor(arg.target)


def _args(graph: Graph, node: fx.Node) -> tuple:
    """``node``'s arguments with the weight's stored tensors in place of their nodes."""
    args = weight_args(node)
    if args is None:
        raise ConfigError(f"layer '{module_path(node)}' ({node.target}) stores no weight")
    return tuple(_stored(graph, node, i) if i in args else a for i, a in enumerate(node.args))


def dense_weight(graph: Graph, node: fx.Node) -> torch.Tensor:
    """The weight ``node`` computes with, as a dense float tensor (``[out, in]`` for a linear, the
    conv weight's own shape for a conv, ``[rows, dim]`` for an embedding)."""
    args = _args(graph, node)
    if node.target in _ATEN_WEIGHT:
        return args[_ATEN_WEIGHT[node.target]].float()
    return record(node.target).weight.read(args)


def layer_key(node: fx.Node) -> str:
    """The key of ``node``'s pruning mask in ``Graph.masks``: its module path (the node's name for an
    op outside any module); see ``ir/sparsity.py``."""
    return module_path(node) or node.name


def replace_weight(graph: Graph, node: fx.Node, new_dense: torch.Tensor, suffix: str = "_folded") -> Originals:
    """Give ``node`` the weight ``new_dense`` in its own format (dtype, grid, tables); weights its
    pruning mask drops stay zero. A tensor only ``node`` reads is replaced under its own name, unless
    the format is lossy; otherwise (a tied weight, or a re-quantized one) the new tensor is stored as
    ``<name><suffix>`` and the original's node is returned by name, so ``restore_weight`` puts it back exactly."""
    keep = graph.masks.get(layer_key(node))
    if keep is not None:
        new_dense = new_dense * keep
    args = _args(graph, node)
    if node.target in _ATEN_WEIGHT:
        i = _ATEN_WEIGHT[node.target]
        new = {i: new_dense.to(args[i].dtype)}
    else:
        new = record(node.target).weight.write(args, new_dense)
    shared = shared_tensors(graph)
    names = weight_args(node)
    originals: Originals = {}
    for i, value in new.items():
        old = node.args[i]
        if old is None:
            continue
        if not is_lossy(node) and old.target not in shared:
            set_attr(graph.gm, old.target, value)
            continue
        originals[names[i]] = old
        node.update_arg(i, graph.add_tensor(old.target + suffix, value.contiguous()))
    return originals


def restore_weight(node: fx.Node, originals: Originals) -> None:
    """Undo ``replace_weight``: point ``node`` back at the stored tensors it returned."""
    for i, name in weight_args(node).items():
        if name in originals:
            node.update_arg(i, originals[name])


def requantization_error(requested: torch.Tensor, stored: torch.Tensor) -> dict[str, float]:
    """How far a lossy ``replace_weight`` landed from the weight asked for: SQNR (dB) of the stored
    weight against the requested one and the largest absolute error."""
    err = stored - requested
    return {"requant_sqnr_db": round(sqnr_db(requested, stored), 2), "requant_max_abs_err": float(err.abs().max())}


def shared_tensors(graph: Graph) -> dict[str, list[fx.Node]]:
    """Stored tensors that several op nodes read (tied weights), with those nodes."""
    return {t: nodes for t, nodes in attr_users(graph.gm).items() if len(nodes) > 1}
