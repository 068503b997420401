"""How adapters read and change the weight of each kind of base op.

``BASE_OPS`` maps a base op to a ``BaseOp``: the layer's ``(out, in)`` shape, its weight as a float
``[out, in]`` matrix, ``fold`` (add a dense update; return the stored tensors ``unfold`` needs back)
and ``restore`` (undo ``fold``). Float ``aten.linear`` folds exactly and unfolds by subtraction
(or, for a weight it had to untie, by pointing back at the original); ``splice::qlinear`` is
dequantized, updated and re-quantized on the same format (bits, group size, symmetry; fresh
min/max scales), and keeps its original packed tensors for an exact unfold.

Sparsity masks (a later issue): a base op that carries a mask registers its own ``BaseOp`` with
``register_base_op`` whose ``fold`` multiplies the update by the mask before adding it, so folding
an adapter never fills pruned weights; nothing else in the adapter passes needs to change.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from splice.errors import ConfigError
from splice.ir.graph import Graph, attr_users, set_attr
from splice.kernels.quant.grid import GroupGrid, dequantize_packed
from splice.passes.adapters._common import layer_path
from splice.passes.quantize._common import _sqnr_db

aten = torch.ops.aten
Originals = dict[str, fx.Node]


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
    if node.target not in BASE_OPS:
        raise ConfigError(f"{who}: layer '{layer_path(node)}' ({node.target}) cannot carry adapters yet")
    return BASE_OPS[node.target]


def stored(graph: Graph, node: fx.Node, index: int, who: str = "adapter") -> torch.Tensor:
    arg = node.args[index] if len(node.args) > index else None
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        raise ConfigError(f"{who}: layer '{layer_path(node)}' has no stored weight (it is computed in the graph)")
    return graph.tensor(arg.target)


def replace_stored(graph: Graph, nodes: list[fx.Node], index: int, value: torch.Tensor, suffix: str) -> fx.Node | None:
    """Give ``nodes`` a new tensor at argument ``index``. Replaced under its own name when only
    ``nodes`` read it; otherwise (tied weights) stored anew and the old node returned."""
    old = nodes[0].args[index]
    if all(any(u is n for n in nodes) for u in attr_users(graph.gm)[old.target]):
        set_attr(graph.gm, old.target, value)
        return None
    new = graph.add_tensor(old.target + suffix, value)
    for n in nodes:
        n.update_arg(index, new)
    return old


# ----------------------------------------------------------------------- aten.linear


def _linear_shape(graph, node, who):
    return tuple(stored(graph, node, 1, who).shape)


def _linear_fold(graph, node, dw):
    w = stored(graph, node, 1)
    tied = replace_stored(graph, [node], 1, (w.float() + dw).to(w.dtype), "_folded")
    return ({"weight": tied} if tied is not None else {}), {}


def _linear_restore(graph, node, originals, dw):
    if "weight" in originals:  # was untied at fold time: the original is still stored, exactly
        node.update_arg(1, originals["weight"])
        return
    w = stored(graph, node, 1)
    replace_stored(graph, [node], 1, (w.float() - dw).to(w.dtype), "_unfolded")


def _linear_set(graph, nodes, w):
    old = stored(graph, nodes[0], 1)
    replace_stored(graph, nodes, 1, w.to(old.dtype), "_residual")


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


register_base_op(aten.linear.default, BaseOp(_linear_shape, lambda g, n: stored(g, n, 1).float(),
                                             _linear_fold, _linear_restore, _linear_set,
                                             _linear_bias, _linear_replace, _linear_unreplace))

# ----------------------------------------------------------------------- aten.conv2d
# The weight ``[O, I/groups, kh, kw]`` is argument 1 like a linear's and folds the same way; an
# update has the weight's 4-D shape; ``shape`` is the matrix view ``(O, I/groups·kh·kw)``.


def _conv_shape(graph, node, who):
    w = stored(graph, node, 1, who)
    return w.shape[0], w[0].numel()


register_base_op(aten.conv2d.default, BaseOp(_conv_shape, lambda g, n: stored(g, n, 1).float(),
                                             _linear_fold, _linear_restore, _linear_set))

# ---------------------------------------------------------------------- splice::qlinear
_Q_KEYS = ("qweight", "scales", "qzeros")


def _q_shape(graph, node, who):
    q = stored(graph, node, 1, who)
    return q.shape[0], q.shape[1] * node.args[6]


def _q_weight(graph, node):
    q, s, z = (None if node.args[i] is None else graph.tensor(node.args[i].target) for i in (1, 2, 3))
    return dequantize_packed(q, s, z, node.args[5], node.args[6]).float()


def _q_fold(graph, node, dw):
    w = _q_weight(graph, node) + dw
    old = {k: node.args[i] for i, k in enumerate(_Q_KEYS, 1) if node.args[i] is not None}
    grid = GroupGrid(node.args[5], node.args[6], "qzeros" not in old)
    scale, zero = grid.params(w)
    codes = grid.quantize(w, scale, zero)
    err = w - grid.dequantize(codes, scale, zero)
    new = {"qweight": grid.pack_codes(codes), "scales": scale.to(graph.tensor(old["scales"].target).dtype),
           "qzeros": grid.pack_zeros(zero)}
    for i, k in enumerate(_Q_KEYS, 1):
        if k in old:
            node.update_arg(i, graph.add_tensor(old[k].target + "_folded", new[k].contiguous()))
    return old, {"requant_sqnr_db": round(_sqnr_db(w, w - err), 2), "requant_max_abs_err": float(err.abs().max())}


def _q_restore(graph, node, originals, dw):
    for i, k in enumerate(_Q_KEYS, 1):
        node.update_arg(i, originals.get(k))


register_base_op(torch.ops.splice.qlinear.default, BaseOp(_q_shape, _q_weight, _q_fold, _q_restore))
