"""Per-op coupling rules and the propagation that applies them (see ``ir/axes.py`` for classes).

Each rule reads one ATen node's arguments and the shapes in ``meta["val"]`` and unifies, splits
or pins the classes of its inputs' and outputs' axes. An op without a rule pins every channel axis
it reads or writes, so an unknown op never lets a group shrink through it.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from splice.ir.axes import AxisState, Pin, is_channel, reshape_segments
from splice.ir.select import module_path

aten = torch.ops.aten


class Propagator:
    """Walks the graph in order, giving each value fresh classes and applying its op's rule."""

    def __init__(self, graph):
        self.graph = graph
        self.state = AxisState()
        self.cls = self.state.classes

    # -------------------------------------------------------------- helpers
    def fresh(self, shape) -> list[int | None]:
        return [self.cls.new(d) if is_channel(d) else None for d in shape]

    def axes(self, arg, index: int = 0) -> list[int | None]:
        if not isinstance(arg, fx.Node):
            return []
        if arg.op == "get_attr":
            return self.state.stored[arg.target]
        return self.state.values.get((arg.name, index), [])

    def shape(self, node) -> tuple:
        """Shape of a value (meta["val"]) or stored tensor; () for anything else."""
        if not isinstance(node, fx.Node):
            return ()
        if node.op == "get_attr":
            return tuple(self.graph.tensor(node.target).shape)
        val = node.meta.get("val")
        return tuple(val.shape) if isinstance(val, torch.Tensor) else ()

    def out(self, node: fx.Node, index: int = 0) -> list[int | None]:
        return self.state.values[(node.name, index)]

    def pin(self, classes, why: str) -> None:
        for c in classes:
            if c is not None:
                self.cls.pin_class(c, why)

    def pin_all(self, node: fx.Node, why: str) -> None:
        for arg in tensor_args(node):
            self.pin(self.axes(arg), why)
        for key, axes in self.state.values.items():
            if key[0] == node.name:
                self.pin(axes, why)

    def broadcast(self, out: list, inp: list) -> None:
        """Unify ``inp`` with ``out`` aligned from the right (size-1 or missing axes broadcast)."""
        off = len(out) - len(inp)
        for i, c in enumerate(inp):
            if off + i >= 0:
                self.cls.union(out[off + i], c)

    # -------------------------------------------------------------- driver
    def run(self) -> AxisState:
        for node in self.graph.gm.graph.nodes:
            self.cls.context = Pin(node.name, op_name(node), module_path(node), "")
            if node.op == "get_attr":
                if node.target not in self.state.stored:  # tied reads share one tensor's classes
                    self.state.stored[node.target] = self.fresh(tuple(self.graph.tensor(node.target).shape))
            elif node.op == "placeholder":
                axes = self.state.values[(node.name, 0)] = self.fresh(self.shape(node))
                self.pin(axes, f"graph input '{node.name}'")
            elif node.op == "output":
                names = self.graph.output_names
                for i, arg in enumerate(node.args[0]):
                    self.pin(self.axes(arg), f"graph output '{names[i] if i < len(names) else i}'")
            elif node.op == "call_function":
                self._call(node)
        self.cls.context = None
        return self.state

    def _call(self, node: fx.Node) -> None:
        val = node.meta.get("val")
        if node.target is operator.getitem:
            src, i = node.args
            self.state.values[(node.name, 0)] = list(self.axes(src, i))
            return
        if isinstance(val, (tuple, list)):
            for i, v in enumerate(val):
                self.state.values[(node.name, i)] = self.fresh(tuple(getattr(v, "shape", ())))
        elif isinstance(val, torch.Tensor):
            self.state.values[(node.name, 0)] = self.fresh(tuple(val.shape))
        else:
            return  # SymInt arithmetic, sym_size, asserts: no tensor axes
        rule = _RULES.get(node.target)
        if rule is None and node.target in _ELEMENTWISE or (
                rule is None and isinstance(node.target, torch._ops.OpOverload)
                and torch.Tag.pointwise in node.target.tags):
            rule = _elementwise
        if rule is None:
            self.pin_all(node, f"no coupling rule for {op_name(node)}")
        else:
            rule(self, node)


def propagate(graph) -> AxisState:
    """Classes of every channel axis of ``graph`` (values by node name, stored tensors by target)."""
    return Propagator(graph).run()


# ---------------------------------------------------------------------------- helpers


def op_name(node: fx.Node) -> str:
    if node.op != "call_function":
        return node.op
    return "getitem" if node.target is operator.getitem else str(node.target).removesuffix(".default")




def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The tensor-valued node arguments of ``node`` (nested lists included)."""
    found: list[fx.Node] = []

    def visit(a):
        if isinstance(a, fx.Node) and (a.op == "get_attr" or isinstance(a.meta.get("val"), torch.Tensor)):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)

    visit(list(node.args) + list(node.kwargs.values()))
    return found


def arg(node: fx.Node, i: int, name: str, default=None):
    """Positional argument ``i`` or keyword ``name`` of ``node``."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# ----------------------------------------------------------------------------- rules

_ELEMENTWISE = {
    aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten.to.other, aten._to_copy.default,
    aten.dropout.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
    aten.clone.default, aten.lift_fresh_copy.default, aten.__and__.Tensor, aten.__or__.Tensor,
    aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
    aten.zeros_like.default, aten.ones_like.default, aten.full_like.default, aten.empty_like.default,
}


def _elementwise(p: Propagator, node: fx.Node) -> None:
    """Pointwise ops with broadcasting: aligned axes of equal size are one class; an ``add`` or
    ``sub`` joining two carriers of a class tags it (residual adds)."""
    out = p.out(node)
    ins = [p.axes(a) for a in tensor_args(node)]
    for axes in ins:
        p.broadcast(out, axes)
    if node.target in (aten.add.Tensor, aten.sub.Tensor) and len(ins) == 2:
        off = [len(out) - len(a) for a in ins]
        for j, c in enumerate(out):
            if c is not None and all(0 <= j - o < len(a) and a[j - o] is not None for a, o in zip(ins, off)):
                p.cls.tag(c, "add")


def _type_as(p, node):
    p.broadcast(p.out(node), p.axes(node.args[0]))


def _linear(p: Propagator, node: fx.Node) -> None:
    x, w, out = p.axes(node.args[0]), p.axes(node.args[1]), p.out(node)
    b = arg(node, 2, "bias")
    p.cls.union(x[-1] if x else None, w[1])
    p.cls.union(out[-1], w[0])
    if b is not None:
        p.cls.union(out[-1], p.axes(b)[0])
    p.broadcast(out[:-1], x[:-1])
    p.cls.tag(w[1], "contracted")
    if w[0] is not None:
        p.cls.writers[p.cls.find(w[0])].add(node.name)


def _conv(p: Propagator, node: fx.Node) -> None:
    """``conv*d``: ``x[:, c]`` joins ``W[:, c]`` and ``out[:, n]`` joins ``W[n]`` and the bias; with
    ``groups`` g > 1 both channel axes are (g groups) × (channels per group), so groups shrink
    whole; spatial axes are pinned."""
    if node.target == aten.convolution.default and node.args[6]:
        p.pin_all(node, "transposed convolution has no coupling rule")
        return
    x, w, out = p.axes(node.args[0]), p.axes(node.args[1]), p.out(node)
    groups = node.args[8] if node.target == aten.convolution.default else arg(node, 6, "groups", 1)
    p.pin(x[2:] + out[2:] + w[2:], "spatial axis of a convolution")
    p.cls.union(out[0], x[0])
    if groups == 1:
        p.cls.union(x[1], w[1])
        outc = w[0]
    else:
        g = p.cls.new(groups)
        co = p.shape(node)[1] // groups
        outc = p.cls.compose([g, p.cls.new(co)]) if co > 1 else g
        p.cls.union(x[1], p.cls.compose([g, w[1]]) if w[1] is not None else g)
        p.cls.union(w[0], outc)
    p.cls.union(out[1], outc)
    b = arg(node, 2, "bias")
    if b is not None:
        p.cls.union(out[1], p.axes(b)[0])
    p.cls.tag(out[1], "conv")
    p.cls.tag(w[1], "contracted")
    if out[1] is not None:
        p.cls.writers[p.cls.find(out[1])].add(node.name)


def _pool(p: Propagator, node: fx.Node) -> None:
    """Pooling: batch and channel axes pass through, spatial axes are pinned."""
    x = p.axes(node.args[0])
    for i in range(len(node.meta["val"]) if isinstance(node.meta["val"], (tuple, list)) else 1):
        out = p.out(node, i)
        p.cls.union(out[0], x[0])
        p.cls.union(out[1], x[1])
        p.pin(out[2:], "spatial axis of a pooling op")
    p.pin(x[2:], "spatial axis of a pooling op")


def _embedding(p: Propagator, node: fx.Node) -> None:
    w, idx, out = p.axes(node.args[0]), p.axes(node.args[1]), p.out(node)
    p.cls.union(out[-1], w[1])
    p.broadcast(out[:-1], idx)
    p.pin([w[0]], "rows read by an embedding lookup")
    p.cls.tag(w[0], "vocab")
    if w[1] is not None:
        p.cls.writers[p.cls.find(w[1])].add(node.name)


def _layer_norm(p: Propagator, node: fx.Node) -> None:
    x, out = p.axes(node.args[0]), p.out(node)
    k = len(node.args[1])
    p.broadcast(out, x)
    for i in (2, 3):
        t = arg(node, i, ("weight", "bias")[i - 2])
        if t is not None:
            p.broadcast(out, p.axes(t))
    for c in out[-k:]:
        p.cls.tag(c, "norm")


def _batch_norm(p: Propagator, node: fx.Node) -> None:
    x, out = p.axes(node.args[0]), p.out(node)
    p.broadcast(out, x)
    for t in node.args[1:5]:
        if isinstance(t, fx.Node) and len(x) > 1:
            p.cls.union(x[1], p.axes(t)[0])
    p.cls.tag(out[1] if len(out) > 1 else None, "batch_norm")


def _reduce(p: Propagator, node: fx.Node) -> None:
    """``mean``/``sum``/``amax``/``var`` over ``dims``: the other axes pass through; a reduced
    channel axis is consumed (RMSNorm's mean over the hidden axis: tagged ``norm``)."""
    x, out = p.axes(node.args[0]), p.out(node)
    dims = arg(node, 1, "dim")
    dims = list(range(len(x))) if dims is None else [dims] if isinstance(dims, int) else list(dims)
    dims = {_dim(d, len(x)) for d in dims}
    keep = len(out) == len(x)
    kept = [c if (keep or i not in dims) else None for i, c in enumerate(x)]
    kept = kept if keep else [c for i, c in enumerate(x) if i not in dims]
    for i, c in enumerate(kept):
        if not (keep and i in dims):
            p.cls.union(out[i], c)
    for d in dims:
        p.cls.tag(x[d], "norm")


def _reshape(p: Propagator, node: fx.Node) -> None:
    """view/reshape/flatten/unflatten/(un)squeeze: runs of axes with equal products are one
    segment; its channel axes unify as row-major sequences (4 heads × 16 = 64 channels)."""
    src = node.args[0]
    ins, outs = p.shape(src), p.shape(node)
    x, out = p.axes(src), p.out(node)
    segs = reshape_segments(ins, outs)
    if segs is None:
        p.pin(x + out, "reshape cannot be expressed")
        return
    for a, b in segs:
        xa, ob = [x[i] for i in a if x[i] is not None], [out[j] for j in b if out[j] is not None]
        dynamic = any(not isinstance(ins[i], int) for i in a) or any(not isinstance(outs[j], int) for j in b)
        if (xa or ob) and dynamic:
            p.pin(xa + ob, "reshape merges a channel axis with a dynamic axis")
        elif (xa or ob) and not p.cls.match(xa, ob):
            p.pin(xa + ob, "reshape cannot be expressed")


def _permute(p: Propagator, node: fx.Node) -> None:
    x, out = p.axes(node.args[0]), p.out(node)
    n = len(x)
    if node.target in (aten.transpose.int, aten.swapaxes.default):
        d0, d1 = _dim(node.args[1], n), _dim(node.args[2], n)
        perm = list(range(n))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    elif node.target == aten.permute.default:
        perm = [_dim(d, n) for d in node.args[1]]
    else:  # t
        perm = list(range(n))[::-1]
    for i, j in enumerate(perm):
        p.cls.union(out[i], x[j])


def _expand(p: Propagator, node: fx.Node) -> None:
    """``expand``: equal axes unify; a size-1 (or new) axis broadcast to n is a *repeat* class
    (GQA's ``repeat_kv`` makes the query heads of a KV head this way)."""
    src = node.args[0]
    ins, outs = p.shape(src), p.shape(node)
    x, out = p.axes(src), p.out(node)
    off = len(outs) - len(ins)
    for j, c in enumerate(out):
        k = j - off
        if k >= 0 and ins[k] == outs[j]:
            p.cls.union(c, x[k])
        elif c is not None:
            p.cls.repeat[p.cls.find(c)] = True


def _cat(p: Propagator, node: fx.Node) -> None:
    tensors = [t for t in node.args[0] if p.shape(t) and len(p.shape(t)) == len(p.shape(node))]
    out = p.out(node)
    d = _dim(arg(node, 1, "dim", 0), len(out))
    for t in tensors:
        axes = p.axes(t)
        for i, c in enumerate(axes):
            if i != d:
                p.cls.union(out[i], c)
    parts = [p.axes(t)[d] for t in tensors]
    if out[d] is None:
        p.pin(parts, "concatenated along a dynamic axis")
        return
    parts = [c if c is not None else p.cls.new(p.shape(t)[d]) for c, t in zip(parts, tensors) if p.shape(t)[d] != 0]
    p.cls.struct[p.cls.find(out[d])] = ("cat", parts)


def _split(p: Propagator, node: fx.Node) -> None:
    """``split``/``split_with_sizes``/``chunk``: the axis becomes a concatenation of the parts
    (a fused qkv or gate_up projection)."""
    x = p.axes(node.args[0])
    d = _dim(arg(node, 2, "dim", 0), len(x))
    n_out = len(node.meta["val"])
    outs = [p.out(node, i) for i in range(n_out)]
    for o in outs:
        for i, c in enumerate(o):
            if i != d:
                p.cls.union(c, x[i])
    if x[d] is None:
        return
    sizes = [node.meta["val"][i].shape[d] for i in range(n_out)]
    root = p.cls.find(x[d])
    s = p.cls.struct[root]
    if s is None:
        parts = [p.cls.new(n) for n in sizes]
        p.cls.struct[root] = ("cat", parts)
    elif s[0] == "cat" and [p.cls.size[p.cls.find(c)] for c in s[1]] == sizes:
        parts = s[1]
    else:
        p.pin([x[d]] + [o[d] for o in outs], "split does not match the axis layout")
        return
    for o, part in zip(outs, parts):
        p.cls.union(o[d], part)


def _slice(p: Propagator, node: fx.Node) -> None:
    x, out = p.axes(node.args[0]), p.out(node)
    d = _dim(arg(node, 1, "dim", 0), len(x))
    whole = p.shape(node.args[0])[d] == p.shape(node)[d]
    for i, (a, b) in enumerate(zip(x, out)):
        if i != d or whole:
            p.cls.union(a, b)
    if not whole:
        p.pin([x[d], out[d]], "slices part of the axis")


def _select(p: Propagator, node: fx.Node) -> None:
    x, out = p.axes(node.args[0]), p.out(node)
    d = _dim(node.args[1], len(x))
    p.pin([x[d]], "selects one index of the axis")
    for a, b in zip(x[:d] + x[d + 1:], out):
        p.cls.union(a, b)


def _sdpa(p: Propagator, node: fx.Node) -> None:
    """``scaled_dot_product_attention(q, k, v)``: q, k, v and the output share heads (under
    ``enable_gqa`` each KV head carries a repeat class of query heads); q and k share head_dim,
    v and the output share theirs. The default scale 1/sqrt(head_dim) pins q/k's head_dim."""
    q, k, v = (p.axes(a) for a in node.args[:3])
    out = p.out(node)
    if min(len(q), len(k), len(v)) < 3:
        p.pin_all(node, "attention without a heads axis")
        return
    for t in (q, k, v):
        p.broadcast(out[:-3], t[:-3])
    hq, hk = p.shape(node.args[0])[-3], p.shape(node.args[1])[-3]
    p.cls.union(out[-3], q[-3])
    p.cls.union(k[-3], v[-3])
    if hq == hk:
        p.cls.union(q[-3], k[-3])
    elif arg(node, 7, "enable_gqa", False) and isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0:
        rep = p.cls.new(hq // hk, repeat=True)
        p.cls.union(q[-3], p.cls.compose([k[-3], rep]) if k[-3] is not None else rep)
    else:
        p.pin([q[-3], k[-3]], "query and key heads differ")
    p.cls.union(out[-2], q[-2])
    p.cls.union(k[-2], v[-2])
    p.cls.union(q[-1], k[-1])
    p.cls.union(out[-1], v[-1])
    mask = arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node):
        p.broadcast(out[:-3] + [q[-3], q[-2], k[-2]], p.axes(mask))
    if arg(node, 6, "scale") is None:
        p.pin([q[-1]], "default attention scale depends on head_dim")
    for c in (q[-3], k[-3]):
        p.cls.tag(c, "heads")
    for c in (q[-1], v[-1]):
        p.cls.tag(c, "head_dim")


def _matmul(p: Propagator, node: fx.Node) -> None:
    """Matmul of two activations (eager attention): batch axes broadcast (heads), the contracted
    axes unify (head_dim in q·kᵀ), rows and columns pass through."""
    a, b, out = p.axes(node.args[0]), p.axes(node.args[1]), p.out(node)
    if len(a) < 2 or len(b) < 2:
        p.pin_all(node, "matmul of a vector has no coupling rule")
        return
    p.cls.union(a[-1], b[-2])
    p.cls.union(out[-2], a[-2])
    p.cls.union(out[-1], b[-1])
    p.broadcast(out[:-2], a[:-2])
    p.broadcast(out[:-2], b[:-2])
    if len(out) > 2:
        for c in out[:-2]:
            p.cls.tag(c, "heads")
        p.cls.tag(a[-1], "head_dim")  # q·kᵀ
        p.cls.tag(out[-1], "head_dim")  # probabilities · v


def _repeat_interleave(p: Propagator, node: fx.Node) -> None:
    x, out = p.axes(node.args[0]), p.out(node)
    d = arg(node, 2, "dim")
    reps = node.args[1]
    if d is None or not isinstance(reps, int):
        p.pin_all(node, "repeat_interleave without a dim")
        return
    d = _dim(d, len(x))
    for i, (a, b) in enumerate(zip(x, out)):
        if i != d:
            p.cls.union(a, b)
    if out[d] is not None and reps > 1:
        rep = p.cls.new(reps, repeat=True)
        p.cls.union(out[d], p.cls.compose([x[d], rep]) if x[d] is not None else rep)


def _creation(p: Propagator, node: fx.Node) -> None:
    p.pin(p.out(node), f"created with a fixed shape by {op_name(node)}")


_RULES = {
    aten.type_as.default: _type_as,
    aten.linear.default: _linear,
    aten.embedding.default: _embedding,
    aten.layer_norm.default: _layer_norm,
    aten.native_layer_norm.default: _layer_norm,
    aten.batch_norm.default: _batch_norm,
    aten._native_batch_norm_legit_no_training.default: _batch_norm,
    aten._native_batch_norm_legit.default: _batch_norm,
    aten.native_batch_norm.default: _batch_norm,
    aten.cat.default: _cat,
    aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split,
    aten.chunk.default: _split,
    aten.slice.Tensor: _slice,
    aten.select.int: _select,
    aten.scaled_dot_product_attention.default: _sdpa,
    aten.matmul.default: _matmul,
    aten.bmm.default: _matmul,
    aten.mm.default: _matmul,
    aten.repeat_interleave.self_int: _repeat_interleave,
    aten.expand.default: _expand,
    aten.expand_as.default: _expand,
    aten.broadcast_to.default: _expand,
    **{op: _conv for op in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default)},
    **{op: _pool for op in (aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default, aten.max_pool2d.default,
                            aten.max_pool2d_with_indices.default, aten.adaptive_avg_pool1d.default,
                            aten.avg_pool1d.default, aten.max_pool1d.default)},
    **{op: _reduce for op in (aten.mean.dim, aten.mean.default, aten.sum.dim_IntList, aten.sum.default,
                              aten.amax.default, aten.amin.default, aten.var.correction, aten.var.dim,
                              aten.std.correction)},
    **{op: _reshape for op in (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                               aten.flatten.using_ints, aten.unflatten.int, aten.unsqueeze.default,
                               aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.view_as.default,
                               aten.reshape_as.default)},
    **{op: _permute for op in (aten.transpose.int, aten.swapaxes.default, aten.permute.default,
                               aten.t.default, aten.numpy_T.default)},
    **{op: _creation for op in (aten.new_ones.default, aten.new_zeros.default, aten.new_full.default,
                                aten.new_empty.default, aten.zeros.default, aten.ones.default,
                                aten.full.default, aten.empty.memory_format, aten.arange.default,
                                aten.arange.start, aten.arange.start_step)},
}
