"""How adapters read and change the weight of each kind of base op.

``base_op`` gives a layer's ``BaseOp``: its ``(out, in)`` shape, its weight as a dense float matrix,
``fold`` (add a dense update; return the stored tensors ``unfold`` needs back) and ``restore`` (undo
``fold``). Reading and writing the weight is the IR's weight-access protocol (``ir/weights.py``), so
any op that declares one in its registry record carries adapters without this module knowing its
storage: float ``aten.linear`` folds exactly and unfolds by subtraction (or, for a weight it had to
untie, by pointing back at the original); a quantized op (``splice::qlinear``, …) is dequantized,
updated and re-quantized on its own format, and keeps its original tensors for an exact unfold.
Float linears also offer ``bias`` / ``replace`` / ``unreplace`` for methods that read the base.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.ir.select import op_kind
from splice.ir.weights import (Originals, dense_weight, is_lossy, replace_weight, requantization_error,
                               restore_weight, weight_args)
from splice.passes.adapters._common import layer_path

aten = torch.ops.aten


@dataclass(frozen=True)
class BaseOp:
    shape: Callable[[Graph, fx.Node, str], tuple[int, int]]
    weight: Callable[[Graph, fx.Node], torch.Tensor]
    fold: Callable[[Graph, fx.Node, torch.Tensor], tuple[Originals, dict[str, Any]]]
    restore: Callable[[Graph, fx.Node, Originals, torch.Tensor], None]
    set_weight: Callable[[Graph, list[fx.Node], torch.Tensor], None] | None = None
    # float bases only, for methods that read the base (DoRA, IA3, SSF): the bias (or None), and
    # ``replace`` (new weight, new bias or None = keep it; returns the old tensors) / ``unreplace``
    bias: Callable[[Graph, fx.Node], torch.Tensor | None] | None = None
    replace: Callable[[Graph, fx.Node, torch.Tensor, torch.Tensor | None], Originals] | None = None
    unreplace: Callable[[Graph, fx.Node, Originals], None] | None = None


BASE_OPS: dict[Any, BaseOp] = {}


def register_base_op(op, handler: BaseOp) -> None:
    BASE_OPS[op] = handler


def base_op(node: fx.Node, who: str) -> BaseOp:
    """The handler of ``node``: a float ATen op's, or that of any linear whose op declares weight access."""
    if node.target in BASE_OPS:
        return BASE_OPS[node.target]
    if op_kind(node) == "linear" and weight_args(node):
        return _STORED
    raise ConfigError(f"{who}: layer '{layer_path(node)}' ({node.target}) cannot carry adapters yet")


def stored(graph: Graph, node: fx.Node, index: int, who: str = "adapter") -> torch.Tensor:
    arg = node.args[index] if len(node.args) > index else None
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        raise ConfigError(f"{who}: layer '{layer_path(node)}' has no stored weight (it is computed in the graph)")
    return graph.tensor(arg.target)


# ----------------------------------------------------------------------- aten.linear


def _linear_shape(graph, node, who):
    return tuple(stored(graph, node, 1, who).shape)


def _fold(graph, node, dw):
    """``W + ΔW`` onto the layer's own format (``ir.weights.replace_weight``); re-quantized formats
    report how far the stored weight landed from ``W + ΔW``."""
    w = dense_weight(graph, node) + dw
    originals = replace_weight(graph, node, w, "_folded")
    return originals, (requantization_error(w, dense_weight(graph, node)) if is_lossy(node) else {})


def _restore(graph, node, originals, dw):
    if originals:  # stored anew at fold time (tied or re-quantized): the originals come back exactly
        restore_weight(node, originals)
        return
    replace_weight(graph, node, dense_weight(graph, node) - dw, "_unfolded")


def _linear_set(graph, nodes, w):
    replace_weight(graph, nodes[0], w, "_residual")


def _linear_bias(graph, node):
    return graph.tensor(node.args[2].target).float() if len(node.args) > 2 and node.args[2] is not None else None


def _linear_replace(graph, node, w, b):
    """Point the layer at new tensors (a layer without bias gets one), returning the old ones."""
    old = {"weight": node.args[1]}
    if _linear_bias(graph, node) is not None:
        old["bias"] = node.args[2]
    args = [node.args[0], graph.add_tensor(old["weight"].target + "_folded", w.to(graph.tensor(old["weight"].target).dtype))]
    if b is not None:
        dtype = graph.tensor(old["bias"].target).dtype if "bias" in old else b.dtype
        args.append(graph.add_tensor(old["bias"].target + "_folded" if "bias" in old else f"{layer_path(node)}.bias", b.to(dtype)))
    elif "bias" in old:
        args.append(old["bias"])
    node.args = tuple(args)
    return old


def _linear_unreplace(graph, node, originals):
    node.args = (node.args[0], originals["weight"], *([originals["bias"]] if "bias" in originals else []))


def float_base(graph: Graph, node: fx.Node, who: str, method: str) -> BaseOp:
    """The handler of a base whose float weight a method reads (and replaces when folded)."""
    handler = base_op(node, who)
    if handler.replace is None:
        raise ConfigError(f"{who}: layer '{layer_path(node)}' ({node.target}) has no float weight for {method} to read "
                          "(add the adapter before quantizing)")
    stored(graph, node, 1, who)
    return handler


register_base_op(aten.linear.default, BaseOp(_linear_shape, dense_weight, _fold, _restore, _linear_set,
                                             _linear_bias, _linear_replace, _linear_unreplace))

# ----------------------------------------------------------------------- aten.conv2d
# The weight ``[O, I/groups, kh, kw]`` is argument 1 like a linear's and folds the same way; an
# update has the weight's 4-D shape; ``shape`` is the matrix view ``(O, I/groups·kh·kw)``.


def _conv_shape(graph, node, who):
    w = stored(graph, node, 1, who)
    return w.shape[0], w[0].numel()


register_base_op(aten.conv2d.default, BaseOp(_conv_shape, dense_weight, _fold, _restore, _linear_set))

# ------------------------------------------------------- ops with declared weight access
# A quantized linear of any family (``splice::qlinear``, ``lut_linear``, …): read, folded and
# restored through its registry record's weight access; no float weight for methods that read it.


def _stored_shape(graph, node, who):
    stored(graph, node, min(weight_args(node)), who)
    return tuple(dense_weight(graph, node).shape)


_STORED = BaseOp(_stored_shape, dense_weight, _fold, _restore)
