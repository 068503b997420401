"""Moving a per-input-channel scale from activations into weights (AWQ, SmoothQuant):
``y = x Wᵀ = (x / s)(W · diag(s))ᵀ`` for the linears that read one tensor ``x``.

``1/s`` must reach the input so the graph computes the same function up to quantization.
It is folded into the op that produces the input when that is exact — an RMSNorm weight
(``mul(weight, normalized)``), a LayerNorm's weight and bias, or a preceding linear's output
rows (and its quantization scales if it is quantized) — reached through ops that keep channels
in place or move them knowably: views/reshapes keeping the last dim, dtype casts, inference
dropout, slices/splits (channel offsets), ReLU (positively homogeneous), either side of an
elementwise product (``silu(gate)·up`` → ``up``), and attention's ``v → o`` path when every
query head has its own value head (no GQA). Every tensor folded into must be read only by
that op, and every value on the way only by the path. Otherwise an explicit
``mul(x, 1/s)`` is inserted before the group (its ``1/s`` stored as ``<layer>.<tag>_inv_scale``).
A group whose weights other ops read too (tied embeddings) is left alone.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from splice.ir.graph import Graph, attr_users, set_attr
from splice.ir.select import module_path
from splice.passes.quantize._calibrate import Solution

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default

def input_groups(nodes: list[fx.Node]) -> list[list[fx.Node]]:
    """``nodes`` grouped by the tensor they read (their first argument), in graph order."""
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in nodes:
        groups.setdefault(node.args[0], []).append(node)
    return list(groups.values())


@dataclass
class _Fold:
    kind: str  # "norm" (mul by a stored vector) | "layer_norm" | "rms_norm" | "linear"
    node: fx.Node  # the op whose stored tensors absorb 1/s
    idx: torch.Tensor  # its output channel for each input channel of the group

    def where(self) -> str:
        return f"{self.kind}:{module_path(self.node) or self.node.name}"


def _val(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def last_dim(node) -> int | None:
    v = _val(node)
    return v.shape[-1] if v is not None and v.dim() and isinstance(v.shape[-1], int) else None


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = _val(a), _val(b)
    return va is not None and vb is not None and [str(d) for d in va.shape] == [str(d) for d in vb.shape]


def is_last_dim(node: fx.Node, dim) -> bool | None:
    """Whether ``dim`` is ``node``'s last dim; None when its shape is unknown."""
    v = _val(node)
    if v is None or not isinstance(dim, int) or not v.dim():
        return None
    return dim % v.dim() == v.dim() - 1


def _sole_reader(node: fx.Node, arg, users) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "get_attr" and users[arg.target] == [node]


_CASTS = {aten.clone.default, aten.alias.default, aten.detach.default, aten.to.dtype, aten.to.dtype_layout,
          aten.to.device, aten._to_copy.default, aten.relu.default, aten.contiguous.default}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
             aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.select.int}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}
_LAYOUT_KEEPING = (_CASTS - {aten.relu.default}) | {aten.view.default, aten.reshape.default}


def _absorb(node: fx.Node, users) -> str | None:
    """The kind of fold ``node`` can absorb 1/s into (its stored tensors read only by it)."""
    if node.op != "call_function":
        return None
    a = node.args
    if node.target == aten.mul.Tensor and len(a) == 2:
        for attr, other in ((a[0], a[1]), (a[1], a[0])):
            t = _val(attr)
            if _sole_reader(node, attr, users) and isinstance(other, fx.Node) and other is not attr \
                    and t is not None and t.numel() == t.shape[-1] == last_dim(node):
                return "norm"
    if node.target == aten.layer_norm.default and len(a) > 2 and len(a[1]) == 1 \
            and _sole_reader(node, a[2], users) and (len(a) < 4 or a[3] is None or _sole_reader(node, a[3], users)):
        return "layer_norm"
    if node.target == aten.rms_norm.default and len(a) > 2 and len(a[1]) == 1 and _sole_reader(node, a[2], users):
        return "rms_norm"
    if node.target == aten.linear.default and _sole_reader(node, a[1], users) \
            and (len(a) < 3 or a[2] is None or _sole_reader(node, a[2], users)):
        return "linear"
    return None


def _through(node: fx.Node, idx: torch.Tensor):
    """Where ``node``'s channels ``idx`` come from: ``(producer, its channels, op reading it)``
    for each way through ``node`` that keeps per-channel scaling exact."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return []
    t, a = node.target, node.args
    src = a[0]
    if t in _CASTS or (t == aten.dropout.default and not (len(a) > 2 and a[2])):
        return [(src, idx, node)]
    if t in (aten.mul.Tensor, aten.div.Tensor) and not isinstance(a[1], fx.Node):
        return [(src, idx, node)]
    if t == aten.mul.Tensor and isinstance(a[1], fx.Node) and a[0] is not a[1]:
        return [(x, idx, node) for x in a if last_dim(x) == last_dim(node)]
    if t == aten.slice.Tensor:
        last = is_last_dim(src, a[1] if len(a) > 1 else 0)
        if last is False:
            return [(src, idx, node)]
        start, step = (a[2] if len(a) > 2 and a[2] is not None else 0), (a[4] if len(a) > 4 else 1)
        return [(src, start % last_dim(src) + idx * step, node)] if last and last_dim(src) else []
    if t == operator.getitem and isinstance(src, fx.Node) and src.target in _SPLITS:
        split_src, size = src.args[0], src.args[1]
        last = is_last_dim(split_src, src.args[2] if len(src.args) > 2 else 0)
        others = [u for u in src.users if u is not node]  # must read other channels
        if not last or any(u.target != operator.getitem or u.args[1] == a[1] for u in others):
            return []
        offset = a[1] * size if isinstance(size, int) else sum(size[:a[1]])
        return [(split_src, idx + offset, src)]
    if t in _RESHAPES:
        if t == aten.select.int and is_last_dim(src, a[1]) is not False:
            return []
        if last_dim(src) is not None and last_dim(src) == last_dim(node):
            return [(src, idx, node)]
        return _through_attention(node, idx)
    return []


def _is_head_transpose(node) -> bool:
    v = _val(node)
    if v is None or v.dim() != 4:
        return False
    if node.target == aten.transpose.int:
        return {node.args[1] % 4, node.args[2] % 4} == {1, 2}
    return node.target == aten.permute.default and [d % 4 for d in node.args[1]] == [0, 2, 1, 3]


def _skip_same_shape(node: fx.Node) -> fx.Node | None:
    """Back from ``node`` through ops that keep its shape and layout; None if a value on
    the way (``node`` included) has another reader."""
    while True:
        if len(node.users) != 1:
            return None
        if not (node.op == "call_function" and node.target in _LAYOUT_KEEPING and _same_shape(node, node.args[0])):
            return node
        node = node.args[0]


def _through_attention(node: fx.Node, idx: torch.Tensor):
    """``o_proj`` input ``[..., H*D]`` <- transpose <- sdpa ``[B, H, S, D]`` <- its value
    ``[B, H, S, D]`` (as many heads: no GQA) <- transpose <- ``[B, S, H, D]`` <- ``v_proj`` output
    ``[..., H*D]``: channel ``h*D + d`` is the same on both sides and attention is linear in
    the value, so scaling value channels scales output channels alike."""
    t = node.args[0]
    if not _is_head_transpose(t) or len(t.users) != 1:
        return []
    h, d = _val(t).shape[2:]
    if not (isinstance(h, int) and isinstance(d, int) and last_dim(node) == h * d):
        return []
    attn = _skip_same_shape(t.args[0])
    if attn is None or attn.target != SDPA or len(attn.users) != 1 or attn.kwargs.get("enable_gqa", False):
        return []
    q, k, v = attn.args[:3]
    if v is q or v is k or not _same_shape(v, attn) or len(v.users) != 1:
        return []
    vt = _skip_same_shape(v)
    if vt is None or not _is_head_transpose(vt) or len(vt.users) != 1:
        return []
    heads = vt.args[0]  # [..., H, D] <- [..., H*D]: channel h*D + d, as on the o side
    if heads.target not in (aten.view.default, aten.reshape.default) or len(heads.users) != 1 \
            or last_dim(heads.args[0]) != h * d:
        return []
    return [(heads.args[0], idx, heads)]


def plan_fold(members: list[fx.Node], users) -> _Fold | None:
    """Where the group's ``1/s`` can be folded exactly, or None (insert a Mul)."""
    x = members[0].args[0]
    k = last_dim(x)
    if k is None:
        return None

    def trace(node, idx, readers, depth=0):
        if depth > 32 or not isinstance(node, fx.Node) or any(u not in readers for u in node.users):
            return None
        kind = _absorb(node, users)
        if kind:
            return _Fold(kind, node, idx)
        for prev, prev_idx, via in _through(node, idx):
            found = trace(prev, prev_idx, {via}, depth + 1)
            if found:
                return found
        return None

    return trace(x, torch.arange(k), set(members))


def _divide(t: torch.Tensor, idx: torch.Tensor, s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """A new tensor: ``t`` with entries ``idx`` along ``dim`` divided by ``s``."""
    out = t.detach().clone()
    shape = [1] * t.dim()
    shape[dim] = -1
    out.index_copy_(dim, idx, (t.detach().float().index_select(dim, idx) / s.reshape(shape)).to(t.dtype))
    return out


def _apply_fold(graph: Graph, fold: _Fold, s: torch.Tensor, solutions: dict[str, Solution]) -> None:
    idx, a = fold.idx, fold.node.args
    if fold.kind == "norm":
        attr = a[0] if isinstance(a[0], fx.Node) and a[0].op == "get_attr" else a[1]
        targets = [(attr.target, -1)]
    elif fold.kind in ("layer_norm", "rms_norm"):
        targets = [(arg.target, -1) for arg in a[2:4] if isinstance(arg, fx.Node)]
    else:  # linear: output rows, its bias, and its quantization scales
        targets = [(a[1].target, 0)] + ([(a[2].target, 0)] if len(a) > 2 and isinstance(a[2], fx.Node) else [])
        if a[1].target in solutions:
            codes, scale, zero = solutions[a[1].target]
            solutions[a[1].target] = (codes, _divide(scale, idx, s, 0), zero)
    for target, dim in targets:
        set_attr(graph.gm, target, _divide(graph.tensor(target), idx, s, dim))


def _insert_mul(graph: Graph, members: list[fx.Node], s: torch.Tensor, tag: str) -> None:
    x = members[0].args[0]
    w_target = members[0].args[1].target
    dtype = _val(x).dtype if _val(x) is not None else torch.float32
    inv = graph.add_tensor(w_target.removesuffix(".weight") + f".{tag}_inv_scale", (1 / s).to(dtype))
    with graph.gm.graph.inserting_before(members[0]):
        mul = graph.gm.graph.call_function(aten.mul.Tensor, (x, inv))
    mul.meta["nn_module_stack"] = members[0].meta.get("nn_module_stack", {})
    if _val(x) is not None:
        mul.meta["val"] = _val(x)
    for m in members:
        m.replace_input_with(x, mul)


def migrate_scales(graph: Graph, groups: list[list[fx.Node]], scales: list[torch.Tensor],
                   solutions: dict[str, Solution] | None = None, *, tag: str) -> list[str]:
    """For each group (linears of ``graph`` reading one tensor) and its positive scale
    ``s`` [K]: ``W -> W·diag(s)`` for its layers and ``x -> x/s`` on its input, folded where
    exact (see the module docstring), else by an inserted Mul whose tensor is named after
    ``tag`` (the method). Edits ``graph`` in place (a pass's own copy) with new tensors only;
    quantization ``solutions`` of folded-into linears get their scales divided too. A group
    whose weights other ops read too (tied) is left alone. Returns each group's fold site
    (``"mul"`` if none, ``"tied"`` if left)."""
    solutions = {} if solutions is None else solutions
    users = attr_users(graph.gm)
    plans = [plan_fold(members, users) for members in groups]  # all planned on the unedited graph
    sites = []
    for members, s, fold in zip(groups, scales, plans):
        s = s.float()
        if tied_group(members, users):
            sites.append("tied")
            continue
        for target in dict.fromkeys(m.args[1].target for m in members):
            w = graph.tensor(target)
            set_attr(graph.gm, target, (w.detach().float() * s).to(w.dtype))
        if fold is None:
            _insert_mul(graph, members, s, tag)
            sites.append("mul")
        else:
            _apply_fold(graph, fold, s, solutions)
            sites.append(fold.where())
    graph.gm.recompile()
    return sites


def tied_group(members: list[fx.Node], users) -> bool:
    """Whether ops outside the group read one of its weights."""
    return any(not set(users[m.args[1].target]) <= set(members) for m in members)
