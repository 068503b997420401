"""Physical shrinking of coupled groups: a smaller Graph that exports as one.

``shrink(graph, {group_id: kept_units})`` slices every stored tensor a group touches (weights,
biases, norms, batch-norm statistics, a GQA KV head's query-head rows), fixes every shape constant
that depends on it (head counts in ``view``/``reshape``/``expand``, ``layer_norm``'s
normalized_shape, ``split`` sizes, conv ``groups``, ``repeat_interleave`` counts), and
re-propagates the fake-tensor shapes in ``node.meta["val"]``; pruning masks are sliced with their weights. The input Graph is not touched:
the result is a copy whose sliced tensors are new and whose other tensors are shared.

Under GQA, a ``kv_heads`` group removes whole KV groups (each KV head with its query heads); its
child ``heads`` group removes query heads, the same number from every kept KV group.
"""
from __future__ import annotations

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from splice.errors import ConfigError
from splice.ir.axes import Classes
from splice.ir.coupling import Coupling, analyze
from splice.ir.graph import Graph, set_attr
from splice.ir.sparsity import weight_layers
from splice.ir.weights import stored_weight

aten = torch.ops.aten


def shrink(graph: Graph, keep: dict[int, torch.Tensor], coupling: Coupling | None = None) -> Graph:
    """A copy of ``graph`` keeping only ``keep[group_id]`` (unit indices) of each listed group.
    Raises ConfigError (one line) for an unknown or pinned group, an index out of range, removing
    every unit, or query heads that leave KV groups unequal."""
    c = coupling if coupling is not None else analyze(graph)
    sizes = _Sizes(c.state.classes, _constraints(c, keep))
    g = graph.copy()
    for target, axes in c.state.stored.items():
        _slice_tensor(g, graph.tensor(target), target, axes, sizes)
    for node in g.gm.graph.nodes:
        if node.op == "call_function":
            _fix_constants(node, c, sizes, g)
    _slice_masks(g, c, sizes)
    g.gm.recompile()
    refresh_meta(g)
    return g


# --------------------------------------------------------------------------- checks


def _kept_units(c: Coupling, gid, units) -> torch.Tensor | None:
    """Validated, sorted, unique unit indices (None when every unit is kept)."""
    if not isinstance(gid, int) or not 0 <= gid < len(c.groups):
        raise ConfigError(f"shrink: no coupling group #{gid} (the graph has {len(c.groups)})")
    group = c.groups[gid]
    if group.pinned_by is not None:
        raise ConfigError(f"shrink: group #{gid} ({group.kind}) cannot shrink: pinned by {group.pinned_by}")
    idx = torch.as_tensor(units, dtype=torch.long).flatten().unique()
    if idx.numel() == 0:
        raise ConfigError(f"shrink: group #{gid} ({group.kind}) would lose all {group.units} units")
    if int(idx.min()) < 0 or int(idx.max()) >= group.units:
        bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
        raise ConfigError(f"shrink: group #{gid} ({group.kind}) has units 0..{group.units - 1}, got {bad}")
    return None if idx.numel() == group.units else idx


def _constraints(c: Coupling, keep: dict) -> dict[int, torch.Tensor]:
    """Kept units by class root. Query heads under GQA also constrain their KV class (a KV head
    whose query heads all go goes too) and the repeat class (the heads kept per KV head)."""
    out: dict[int, torch.Tensor] = {}
    # KV-head groups before their query-head groups, which read the kept KV heads
    for gid in sorted(keep, key=lambda gid: isinstance(gid, int) and 0 <= gid < len(c.groups)
                      and c.groups[gid].parent is not None):
        idx = _kept_units(c, gid, keep[gid])
        group = c.groups[gid]
        if idx is not None and group.parent is not None:
            _query_heads(c, group, idx, out)
        elif idx is not None:
            out[c.classes_of[gid]] = idx
    return out


def _query_heads(c: Coupling, group, idx: torch.Tensor, out: dict[int, torch.Tensor]) -> None:
    cls = c.state.classes
    kv_root, rep = c.classes_of[group.parent], group.per_parent
    kv_kept = out.get(kv_root, torch.arange(c.groups[group.parent].units))
    idx = idx[torch.isin(idx // rep, kv_kept)]
    counts = torch.bincount(idx // rep, minlength=c.groups[group.parent].units)[kv_kept]
    if idx.numel() == 0:
        raise ConfigError(f"shrink: group #{group.id} (heads) would lose every query head of the kept KV heads")
    kept_groups = kv_kept[counts > 0]
    per = counts[counts > 0]
    if bool((per != per[0]).any()):
        raise ConfigError(f"shrink: group #{group.id} (heads) must keep the same number of query heads in every "
                          f"kept KV head, got {per.tolist()}")
    out[c.classes_of[group.id]] = idx
    if kept_groups.numel() < c.groups[group.parent].units:
        out[kv_root] = kept_groups
    rep_root = cls.find(cls.struct[c.classes_of[group.id]][1][1])
    if int(per[0]) < rep:
        out[rep_root] = torch.arange(int(per[0]))


# --------------------------------------------------------------------------- sizes


class _Sizes:
    """Kept positions of each class: a constrained class keeps its listed units; a structured
    one combines its parts' (row-major for products, in order for concatenations)."""

    def __init__(self, cls: Classes, constraints: dict[int, torch.Tensor]):
        self.cls, self.constraints, self.memo = cls, constraints, {}

    def mask(self, c: int) -> torch.Tensor:
        r = self.cls.find(c)
        if r not in self.memo:
            self.memo[r] = self._mask(r)
        return self.memo[r]

    def _mask(self, r: int) -> torch.Tensor:
        n, s = self.cls.size[r], self.cls.struct[r]
        if r in self.constraints:
            return torch.isin(torch.arange(n), self.constraints[r])
        if s is None:
            return torch.ones(n, dtype=torch.bool)
        masks = [self.mask(p) for p in s[1]]
        if s[0] == "cat":
            return torch.cat(masks)
        out = torch.ones((), dtype=torch.bool)
        for m in masks:
            out = (out.unsqueeze(-1) & m).flatten()
        return out

    def kept(self, c: int) -> torch.Tensor | None:
        """Kept positions, or None when nothing is removed."""
        m = self.mask(c)
        return None if bool(m.all()) else m.nonzero().flatten()

    def new(self, c: int | None, old):
        return old if c is None else int(self.mask(c).sum())


def _slice_tensor(g: Graph, t: torch.Tensor, target: str, axes, sizes: _Sizes) -> None:
    new = t
    for a, c in enumerate(axes):
        idx = sizes.kept(c) if c is not None else None
        if idx is not None:
            new = new.index_select(a, idx)
    if new is not t:
        trainable = isinstance(t, torch.nn.Parameter) and t.requires_grad
        set_attr(g.gm, target, new.detach(), trainable=trainable)


def _slice_masks(g: Graph, c: Coupling, sizes: _Sizes) -> None:
    """Slice each pruning mask (``ir/sparsity.py``) as its layer's weight was sliced."""
    layers = weight_layers(g)
    for key, keep in list(g.masks.items()):
        node = layers.get(key)
        axes = c.state.stored.get(stored_weight(node).target) if node is not None else None
        for a, cl in enumerate(axes or ()):
            idx = sizes.kept(cl) if cl is not None else None
            if idx is not None:
                keep = keep.index_select(a, idx)
        g.masks[key] = keep


# ----------------------------------------------------------------------- constants


def _new_sizes(node: fx.Node, c: Coupling, sizes: _Sizes, index: int = 0) -> list:
    """The output shape of ``node`` after shrinking (ints where fixed, original entries else)."""
    val = node.meta["val"]
    val = val[index] if isinstance(val, (tuple, list)) else val
    classes = c.state.values[(node.name, index)]
    return [sizes.new(cl, d) for cl, d in zip(classes, val.shape)]


def _fix_list(values, new_shape, old_shape) -> list:
    """Replace each literal int of a shape argument by the new size of its axis (-1 and
    symbolic sizes stay)."""
    return [n if isinstance(v, int) and v != -1 and v == o else v for v, n, o in zip(values, new_shape, old_shape)]


def _fix_constants(node: fx.Node, c: Coupling, sizes: _Sizes, g: Graph) -> None:
    t = node.target
    if (node.name, 0) not in c.state.values:
        return
    old = tuple(node.meta["val"].shape) if isinstance(node.meta.get("val"), torch.Tensor) else None
    if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default):
        node.args = (node.args[0], _fix_list(node.args[1], _new_sizes(node, c, sizes), old), *node.args[2:])
    elif t == aten.unflatten.int:
        d = node.args[1] % len(old)
        new = _new_sizes(node, c, sizes)[d:d + len(node.args[2])]
        node.args = (*node.args[:2], _fix_list(node.args[2], new, old[d:d + len(new)]))
    elif t == aten.layer_norm.default:
        k = len(node.args[1])
        node.args = (node.args[0], _fix_list(node.args[1], _new_sizes(node, c, sizes)[-k:], old[-k:]), *node.args[2:])
    elif t in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
        _fix_split(node, c, sizes)
    elif t in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default):
        _fix_groups(node, c, sizes, g)
    elif t == aten.slice.Tensor and len(node.args) > 3 and isinstance(node.args[3], int):
        d = node.args[1] % len(old)
        if node.args[3] == old[d]:
            node.args = (*node.args[:3], _new_sizes(node, c, sizes)[d], *node.args[4:])
    elif t == aten.repeat_interleave.self_int and isinstance(node.args[1], int):
        d = node.args[2] % len(old)
        src = c.state.values[(node.args[0].name, 0)][d]
        node.args = (node.args[0], _new_sizes(node, c, sizes)[d] // sizes.new(src, old[d] // node.args[1]),
                     *node.args[2:])


def _fix_split(node: fx.Node, c: Coupling, sizes: _Sizes) -> None:
    x = node.args[0]
    d = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(x.meta["val"].shape)
    parts = [_new_sizes(node, c, sizes, i)[d] for i in range(len(node.meta["val"]))]
    old = [v.shape[d] for v in node.meta["val"]]
    if parts == old:
        return
    node.target = aten.split_with_sizes.default
    node.args = (x, parts, d)
    node.kwargs = {}


def _fix_groups(node: fx.Node, c: Coupling, sizes: _Sizes, g: Graph) -> None:
    """A grouped conv's ``groups``: its input channels after shrinking over the (sliced) weight's
    channels per group."""
    pos = 8 if node.target == aten.convolution.default else 6
    groups = node.args[pos] if len(node.args) > pos else node.kwargs.get("groups", 1)
    if groups == 1:
        return
    x = node.args[0]
    cin = sizes.new(c.state.values[(x.name, 0)][1], x.meta["val"].shape[1])
    args = list(node.args) + [None] * (pos + 1 - len(node.args))
    args[pos] = cin // g.tensor(node.args[1].target).shape[1]
    node.args = tuple(args)


# ---------------------------------------------------------------------------- meta


def refresh_meta(graph: Graph) -> None:
    """Recompute ``meta["val"]`` of every node under fake tensors, keeping the inputs' symbolic
    shapes (the placeholders' fake values), so later passes read the new shapes."""
    placeholders = [n for n in graph.gm.graph.nodes if n.op == "placeholder"]
    vals = [n.meta.get("val") for n in placeholders]
    mode = next((v.fake_mode for v in vals if hasattr(v, "fake_mode")), None)
    if mode is None:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        vals = [mode.from_tensor(t) for t in graph.example_inputs]
    allow = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True
    try:
        FakeTensorProp(graph.gm, mode).propagate_dont_convert_inputs(*vals)
    finally:
        mode.allow_non_fake_inputs = allow
