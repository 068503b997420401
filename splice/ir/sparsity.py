"""Pruning masks: which weights of a layer are pruned, carried by the Graph (``Graph.masks``, keyed
by the layer's module path) through every later pass.

A pruning pass zeroes the weights and records the mask (``prune_layer``). Later passes keep them
zero: the weight-access protocol (``ir/weights.py``'s ``replace_weight``: adapter folding, merging)
multiplies what it writes by the mask, and quantizers put pruned weights on the grid's zero. The
``MaskGuard`` instrument checks after every pass that each masked layer's dense weight is still
exactly zero wherever its mask says pruned (``check_masks``) and names the pass and the layer
otherwise. While training updates a masked layer's weight (``splice.train``'s ``trainable=weights``),
a train hook zeroes the pruned entries' gradients and re-applies the mask after every step. Saved, a masked float weight is stored packed (``pack_graph``): its kept values and a
bitmask, read through ``splice::sparse_weight`` (one bit per weight — for 2:4 as small as two 2-bit
indices per four weights); loading expands it back (``unpack_graph``). Masks of other layers
(quantized ones) are saved as bitmasks beside the program.
"""
from __future__ import annotations

import torch
from torch import fx

from splice.ir.graph import Graph, set_attr
from splice.ir.train_hooks import TrainHook, register_train_hook
from splice.ir.weights import dense_weight, layer_key, replace_weight, shared_tensors, stored_weight, weight_args
from splice.kernels.prune.ops import pack_mask, unpack_mask

SPARSE_WEIGHT = torch.ops.splice.sparse_weight.default


def weight_layers(graph: Graph) -> dict[str, fx.Node]:
    """Every op that stores a weight (linear, conv, embedding, their quantized forms), by mask key."""
    return {layer_key(n): n for n in graph.gm.graph.nodes if weight_args(n) is not None}


def mask_of(graph: Graph, node: fx.Node) -> torch.Tensor | None:
    """``node``'s mask (True = kept, the dense weight's shape), or None if it is not pruned."""
    return graph.masks.get(layer_key(node))


def prune_layer(graph: Graph, node: fx.Node, keep: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    """Zero what ``keep`` drops in ``node``'s weight (or set it to ``weight`` masked: pruning with an
    update, SparseGPT) and record the mask. A weight pruned before stays pruned (masks intersect)."""
    old = mask_of(graph, node)
    keep = keep.bool() if old is None else keep.bool() & old
    graph.masks[layer_key(node)] = keep
    replace_weight(graph, node, dense_weight(graph, node) if weight is None else weight, "_pruned")  # masks it


def check_masks(graph: Graph) -> list[str]:
    """What breaks the masks of ``graph``, one line per layer: pruned weights that are not zero, a
    mask whose layer is gone, or whose shape is not its weight's."""
    layers = weight_layers(graph)
    problems = []
    for key, keep in graph.masks.items():
        node = layers.get(key)
        if node is None:
            problems.append(f"'{key}' is masked but no longer in the graph")
            continue
        w = dense_weight(graph, node)
        if w.shape != keep.shape:
            problems.append(f"'{key}': mask {tuple(keep.shape)} does not fit its weight {tuple(w.shape)}")
        elif (revived := int(((w != 0) & ~keep).sum())):
            problems.append(f"'{key}': {revived:,} of {int((~keep).sum()):,} pruned weights are no longer zero")
    return problems


class _KeepPruned(TrainHook):
    """Masked fine-tuning: pruned weights get no gradient and stay exactly zero after every step."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
        self.pairs = pairs  # (trainable weight, keep as its dtype)

    def after_backward(self, step: int, total: int) -> None:
        for weight, keep in self.pairs:
            if weight.grad is not None:
                weight.grad.mul_(keep)

    def after_step(self, step: int, total: int) -> None:
        with torch.no_grad():
            for weight, keep in self.pairs:
                weight.mul_(keep)


@register_train_hook
def _keep_pruned(graph: Graph) -> TrainHook | None:
    """The hook for the masked layers whose stored weight training updates, if any."""
    layers, pairs = weight_layers(graph), []
    for key, keep in graph.masks.items():
        node = layers.get(key)
        weight = None if node is None else graph.tensor(stored_weight(node).target)
        if weight is not None and weight.requires_grad and weight.shape == keep.shape:
            pairs.append((weight, keep.to(weight.dtype)))
    return _KeepPruned(pairs) if pairs else None


def sparsity(graph: Graph) -> dict[str, float]:
    """Pruned fraction of each masked layer, by key."""
    return {key: round(1 - float(keep.float().mean()), 4) for key, keep in graph.masks.items()}


def packed_bytes(keep: torch.Tensor, element_size: int) -> int:
    """Bytes of a masked weight stored packed: kept values plus the bitmask."""
    return int(keep.sum()) * element_size + (keep.numel() + 7) // 8


def _packable(graph: Graph, node: fx.Node, shared) -> fx.Node | None:
    """The float weight node of a masked ATen op that reads it alone, else None."""
    if graph.masks.get(layer_key(node)) is None or node.target.namespace != "aten":
        return None
    w_node = stored_weight(node)
    ok = w_node.target not in shared and graph.tensor(w_node.target).is_floating_point()
    return w_node if ok else None


def pack_graph(graph: Graph) -> Graph:
    """A copy of ``graph`` whose masked float weights are stored packed (kept values and a bitmask
    read through ``splice::sparse_weight``); its ``masks`` keep only the other layers' masks."""
    out = graph.copy()
    shared = shared_tensors(out)
    for key, node in weight_layers(out).items():
        w_node = _packable(out, node, shared)
        if w_node is None:
            continue
        keep, w = out.masks.pop(key), out.tensor(w_node.target).detach()
        values = out.add_tensor(f"{w_node.target}_values", w[keep].contiguous())
        bits = out.add_tensor(f"{w_node.target}_mask", pack_mask(keep))
        with out.gm.graph.inserting_before(node):
            dense = out.gm.graph.call_function(SPARSE_WEIGHT, (values, bits, list(w.shape)))
        node.replace_input_with(w_node, dense)
    return out.finalize()


def unpack_graph(graph: Graph) -> Graph:
    """Undo ``pack_graph`` in place: each ``splice::sparse_weight`` becomes its dense weight again
    (stored under the name it had) and its bitmask the mask of the layers reading it."""
    for node in list(graph.gm.graph.nodes):
        if node.target != SPARSE_WEIGHT:
            continue
        values, bits, shape = node.args
        keep = unpack_mask(graph.tensor(bits.target), int(torch.Size(shape).numel())).reshape(shape)
        target = values.target.removesuffix("_values")
        set_attr(graph.gm, target, SPARSE_WEIGHT(graph.tensor(values.target).detach(), graph.tensor(bits.target), shape))
        with graph.gm.graph.inserting_before(node):
            w_node = graph.gm.graph.get_attr(target)
        for user in node.users:
            graph.masks[layer_key(user)] = keep
        node.replace_all_uses_with(w_node)
        graph.gm.graph.erase_node(node)
    return graph.finalize()
