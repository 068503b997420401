"""Canonical form: every linear-like op becomes ``aten.linear`` so passes match one form.

Rules (each a pattern + replacement, applied to a Graph's own copy):

* ``addmm(bias, x, W)`` with a stored ``W[K, N]`` (HF's GPT-2 ``Conv1D``) -> ``linear(x, Wᵀ, bias)``
* ``mm(x, W)`` / ``matmul(x, W)`` with a stored 2-D ``W[K, N]`` -> ``linear(x, Wᵀ)``
* the same with ``W`` reached through ``t``/``transpose``/``permute`` -> ``linear(x, W)`` (no copy)

It also drops ``_assert_tensor_metadata`` checks (they pin dtypes that passes change) and
dead nodes (export leaves an unused ``get_attr`` for tied weights). Convolutions are already
``aten.conv*d`` in export IR.
"""
from __future__ import annotations

import torch
from torch import fx

from splice.ir.graph import Graph, attr_users, get_attr, set_attr

aten = torch.ops.aten
_DROP = {aten._assert_tensor_metadata.default}
_TRANSPOSES = {aten.t.default, aten.numpy_T.default}


def canonicalize(graph: Graph) -> Graph:
    """Return a canonical copy of ``graph`` (the input is left untouched)."""
    g = graph.copy()
    fxg = g.gm.graph
    for node in list(fxg.nodes):
        if node.op == "call_function" and node.target in _DROP:
            fxg.erase_node(node)
    transposed: dict[str, fx.Node] = {}
    for node in list(fxg.nodes):
        if node.op == "call_function":
            _linearize(g, node, transposed)
    return g.finalize()


def _stored_weight(node) -> tuple[fx.Node | None, bool]:
    """(get_attr node, already [N, K]) if ``node`` is a stored 2-D matrix, maybe transposed."""
    if not isinstance(node, fx.Node):
        return None, False
    if node.op == "get_attr":
        return node, False
    if node.op == "call_function" and (
        node.target in _TRANSPOSES
        or (node.target == aten.transpose.int and set(node.args[1:3]) in ({0, 1}, {-1, -2}, {0, -1}, {-2, 1}))
        or (node.target == aten.permute.default and list(node.args[1]) == [1, 0])
    ):
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "get_attr":
            return src, True
    return None, False


def _linearize(g: Graph, node: fx.Node, transposed: dict[str, fx.Node]) -> None:
    if node.target == aten.addmm.default and len(node.args) == 3 and not node.kwargs:
        bias, x, w = node.args
    elif node.target in (aten.mm.default, aten.matmul.default):
        (x, w), bias = node.args, None
    else:
        return
    attr, is_nk = _stored_weight(w)
    if attr is None or get_attr(g.gm, attr.target).dim() != 2:
        return
    if not is_nk:
        attr = _transposed_attr(g, attr, transposed)
    with g.gm.graph.inserting_before(node):
        lin = g.gm.graph.call_function(aten.linear.default, (x, attr) + ((bias,) if bias is not None else ()))
    lin.meta.update(node.meta)
    node.replace_all_uses_with(lin)
    g.gm.graph.erase_node(node)


def _transposed_attr(g: Graph, attr: fx.Node, cache: dict[str, fx.Node]) -> fx.Node:
    """A get_attr for ``Wᵀ`` (contiguous). If every reader of ``W`` is a matmul being
    canonicalized the transposed tensor replaces ``W`` under its own name."""
    w = get_attr(g.gm, attr.target)
    readers = attr_users(g.gm)[attr.target]
    only_matmuls = all(u.target in (aten.addmm.default, aten.mm.default, aten.matmul.default) for u in readers)
    if attr.target not in cache:
        wt = torch.nn.Parameter(w.detach().t().contiguous(), requires_grad=False)
        if only_matmuls:
            set_attr(g.gm, attr.target, wt)
            cache[attr.target] = attr
        else:
            cache[attr.target] = g.add_tensor(attr.target + "_t", wt)
    return cache[attr.target]
